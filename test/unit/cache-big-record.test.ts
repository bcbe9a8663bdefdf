// Big records and memos (a composefs store's: thousands of files) take the cheap read
// path in Cache.readRecord: the memo's header only, the record parsed on first use.
// Everything a small record guarantees must still hold for them.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Cache, CacheCorruptError, checkedRecordDigest, type Entry } from '../../src/engine/cache.js';
import { ENGINE_KEY_VERSION, keyOf, type KeyParts } from '../../src/engine/compile.js';

const parts = (n: number | string): KeyParts => ({ engine: ENGINE_KEY_VERSION, kind: 'text', version: '1', arch: 'amd64', sourceDateEpoch: 0, params: { n }, tools: {}, assets: {}, inputs: {} });
const K = (n: number | string) => keyOf(parts(n));
const sha = (b: string | Buffer) => createHash('sha256').update(b).digest('hex');

/** An entry whose record and memo are both well above 64 KiB. */
async function big(): Promise<{ c: Cache; e: Entry; record: string; memo: string }> {
  const c = new Cache(path.join(await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-cache-big-')), 'c'));
  await c.init();
  const out = await c.staging('out');
  await fs.mkdir(path.join(out, 'objects'));
  for (let i = 0; i < 700; i++) await fs.writeFile(path.join(out, 'objects', `object-${String(i).padStart(4, '0')}`), `object ${i}`);
  const e = await c.commit(K('big'), 'store', parts('big'), out, { k: 1 });
  await fs.rm(out, { recursive: true, force: true });
  const record = path.join(c.root, 'entries', `${e.key}.json`);
  const memo = path.join(c.root, 'verified', e.key);
  assert.ok((await fs.stat(record)).size > 64 * 1024 && (await fs.stat(memo)).size > 64 * 1024, 'the fixture is big enough for the lazy path');
  return { c, e, record, memo };
}

test('a big vouched-for record reads back as the same entry, digest and all, and verifies through its memo', async () => {
  const { c, e, record } = await big();
  const text = await fs.readFile(record);
  const c2 = new Cache(c.root);
  const got = (await c2.lookupAll([e.key])).get(e.key)!;
  assert.equal(checkedRecordDigest(c2, e.key), sha(text), 'the record digest is the one of its bytes');
  assert.deepEqual(got, e);
  assert.deepEqual(JSON.parse(JSON.stringify(got)), JSON.parse(JSON.stringify(e)));
  assert.deepEqual({ ...got }, { ...e });
  await c2.verify(got);
  // A field a caller replaces stays replaced.
  got.meta = { other: true };
  assert.deepEqual(got.meta, { other: true });
});

test('a big record with a changed byte is parsed in full and dropped', async () => {
  const { c, e, record } = await big();
  const text = await fs.readFile(record, 'utf8');
  await fs.writeFile(record, text.replace(e.files[0]!.sha256, e.files[1]!.sha256));
  assert.equal((await new Cache(c.root).lookupAll([e.key])).size, 0);
  assert.equal(existsSync(record), false);
});

test('a big memo is only a hint: a blob changed under it is caught by verify', async () => {
  const { c, e, memo } = await big();
  const before = await fs.readFile(memo, 'utf8');
  const blob = c.blobPath(e.files[5]!.sha256);
  await fs.chmod(blob, 0o644);
  await fs.writeFile(blob, 'tampered');
  await fs.chmod(blob, 0o444);
  await fs.writeFile(memo, before);
  const c2 = new Cache(c.root);
  const got = (await c2.lookupAll([e.key])).get(e.key)!;
  await assert.rejects(c2.verify(got), (err: unknown) => err instanceof CacheCorruptError && err.dropped.includes(e.key));
});

test('a memo forged to vouch for a bad big record: the deferred parse drops it and verify reports it corrupt', async () => {
  const { c, e, record, memo } = await big();
  const text = await fs.readFile(record, 'utf8');
  // Same key prefix, but no longer a record (files is not a list): it never passed parseRecord.
  const bad = text.replace('"files":[', '"files":{"x":[').replace(/\],"meta"/, ']},"meta"');
  assert.notEqual(bad, text);
  await fs.writeFile(record, bad);
  const m = await fs.readFile(memo, 'utf8');
  await fs.writeFile(memo, m.replace(/^(pipeline-verified\/2 [0-9a-f]{64}) [0-9a-f]{64}\n/, `$1 ${sha(bad)}\n`));
  const c2 = new Cache(c.root);
  const got = (await c2.lookupAll([e.key])).get(e.key)!;
  assert.ok(got, 'taken on the memo’s word until a field is read');
  await assert.rejects(c2.verify(got), (err: unknown) => err instanceof CacheCorruptError && err.dropped.includes(e.key));
  assert.equal(existsSync(record), false, 'the bad record is gone');
  assert.equal(existsSync(memo), false, 'and its memo');
  assert.equal((await new Cache(c.root).lookupAll([e.key])).size, 0);
});

test('a big memo naming another key vouches for nothing: the record is checked in full', async () => {
  const { c, e, record, memo } = await big();
  const m = await fs.readFile(memo, 'utf8');
  await fs.writeFile(memo, m.replace(e.key, K('other')));
  const text = await fs.readFile(record, 'utf8');
  await fs.writeFile(record, text.replace(e.files[0]!.sha256, e.files[1]!.sha256));
  assert.equal((await new Cache(c.root).lookupAll([e.key])).size, 0);
});
