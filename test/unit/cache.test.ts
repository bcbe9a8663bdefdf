import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Cache, defaultCacheRoot } from '../../src/engine/cache.js';
import { ENGINE_KEY_VERSION, type KeyParts } from '../../src/engine/compile.js';

const parts = (n: number): KeyParts => ({ engine: ENGINE_KEY_VERSION, kind: 'text', version: '1', arch: 'amd64', sourceDateEpoch: 0, params: { n }, tools: {}, assets: {}, inputs: {} });

async function fresh(): Promise<Cache> {
  const c = new Cache(path.join(await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-cache-')), 'c'));
  await c.init();
  return c;
}

async function put(c: Cache, key: string, files: Record<string, string | Buffer>): Promise<void> {
  const out = await c.staging('out');
  for (const [n, v] of Object.entries(files)) {
    await fs.mkdir(path.dirname(path.join(out, n)), { recursive: true });
    await fs.writeFile(path.join(out, n), v);
  }
  await c.commit(key, 's', parts(1), out, { k: 1 });
  await fs.rm(out, { recursive: true, force: true });
}

test('default root follows PIPELINE_CACHE_DIR, then XDG_CACHE_HOME', () => {
  assert.equal(defaultCacheRoot({ PIPELINE_CACHE_DIR: '/x/y' }), '/x/y');
  assert.equal(defaultCacheRoot({ XDG_CACHE_HOME: '/xdg' }), '/xdg/pipeline');
});

test('commit stores digest-named read-only blobs and a record; identical content is stored once', async () => {
  const c = await fresh();
  await put(c, 'k1', { 'a.txt': 'hello', 'sub/b.bin': Buffer.alloc(5000, 7) });
  await put(c, 'k2', { 'same.txt': 'hello' });
  const e = (await c.lookup('k1'))!;
  assert.deepEqual(e.files.map((f) => f.path), ['a.txt', 'sub/b.bin']);
  assert.equal(e.files[0]!.sha256, '2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824');
  const st = await fs.stat(c.blobPath(e.files[0]!.sha256));
  assert.equal(st.mode & 0o777, 0o444);
  const du = await c.du();
  assert.equal(du.blobs, 2);
  assert.equal(du.entries, 2);
  const tree = await c.materialize(e);
  assert.equal(await fs.readFile(path.join(tree, 'sub/b.bin')).then((b) => b.length), 5000);
});

test('a record whose blob vanished is a miss, not an error', async () => {
  const c = await fresh();
  await put(c, 'k1', { 'a.txt': 'hello' });
  await fs.rm(c.blobPath('2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824'));
  assert.equal(await c.lookup('k1'), undefined);
});

test('commit refuses non-regular files', async () => {
  const c = await fresh();
  const out = await c.staging('out');
  await fs.symlink('/etc/passwd', path.join(out, 'link'));
  await assert.rejects(c.commit('k', 'st', parts(1), out, {}), /not a regular file/);
  assert.equal(await c.lookup('k'), undefined);
});

test('gc evicts least recently used entries to the cap and the cache keeps working at it', async () => {
  const c = await fresh();
  const kb = (n: number) => Buffer.alloc(1024, n);
  for (let i = 0; i < 5; i++) {
    await put(c, `k${i}`, { f: kb(i) });
    const t = new Date(2020, 0, 1 + i);
    await fs.utimes(path.join(c.root, 'entries', `k${i}.json`), t, t);
  }
  await c.touch('k0'); // used just now: newest
  const r = await c.gc(2048 + 100);
  assert.deepEqual(r.evicted, ['k1', 'k2', 'k3']);
  assert.ok(await c.lookup('k0'));
  assert.ok(await c.lookup('k4'));
  assert.equal((await c.du()).bytes, 2048);
  // At the cap, new entries still land; the next gc makes room again.
  await put(c, 'k5', { f: kb(5) });
  assert.ok(await c.lookup('k5'));
  const r2 = await c.gc(2048 + 100);
  assert.equal(r2.evicted.length, 1);
  assert.ok(await c.lookup('k5'));
});

test('gc removes orphan blobs (an interrupted commit) and dead staging dirs', async () => {
  const c = await fresh();
  const orphan = c.blobPath('ab'.repeat(32));
  await fs.mkdir(path.dirname(orphan), { recursive: true });
  await fs.writeFile(orphan, 'half');
  await fs.mkdir(path.join(c.root, 'tmp', 'out-x-999999999-abcdef'));
  await c.gc(1 << 30);
  assert.equal((await c.du()).blobs, 0);
  assert.deepEqual(await fs.readdir(path.join(c.root, 'tmp')), []);
});
