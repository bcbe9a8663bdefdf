import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Cache, CacheCorruptError, defaultCacheRoot, parseRecord, processStartTime, tmpOwner, type Entry } from '../../src/engine/cache.js';
import { ENGINE_KEY_VERSION, keyOf, type KeyParts } from '../../src/engine/compile.js';

const parts = (n: number | string): KeyParts => ({ engine: ENGINE_KEY_VERSION, kind: 'text', version: '1', arch: 'amd64', sourceDateEpoch: 0, params: { n }, tools: {}, assets: {}, inputs: {} });
/** Records must be filed under the key their parts hash to. */
const K = (n: number | string) => keyOf(parts(n));
const HELLO = '2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824';

async function fresh(): Promise<Cache> {
  const c = new Cache(path.join(await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-cache-')), 'c'));
  await c.init();
  return c;
}

async function put(c: Cache, n: number | string, files: Record<string, string | Buffer>, stage = 's'): Promise<Entry> {
  const out = await c.staging('out');
  for (const [name, v] of Object.entries(files)) {
    await fs.mkdir(path.dirname(path.join(out, name)), { recursive: true });
    await fs.writeFile(path.join(out, name), v);
  }
  const e = await c.commit(K(n), stage, parts(n), out, { k: 1 });
  await fs.rm(out, { recursive: true, force: true });
  return e;
}

/** Overwrite a read-only cache file in place (same inode), as a stray process would. */
async function scribble(file: string, data: string | Buffer): Promise<void> {
  await fs.chmod(file, 0o644);
  await fs.writeFile(file, data);
  await fs.chmod(file, 0o444);
}

async function flipByte(file: string, at = 0): Promise<void> {
  const b = await fs.readFile(file);
  b[at] = b[at]! ^ 0x01;
  await scribble(file, b);
}

test('default root follows PIPELINE_CACHE_DIR, then XDG_CACHE_HOME', () => {
  assert.equal(defaultCacheRoot({ PIPELINE_CACHE_DIR: '/x/y' }), '/x/y');
  assert.equal(defaultCacheRoot({ XDG_CACHE_HOME: '/xdg' }), '/xdg/pipeline');
});

test('commit stores digest-named read-only blobs and a record; identical content is stored once', async () => {
  const c = await fresh();
  await put(c, 1, { 'a.txt': 'hello', 'sub/b.bin': Buffer.alloc(5000, 7) });
  await put(c, 2, { 'same.txt': 'hello' });
  const e = (await c.lookup(K(1)))!;
  assert.deepEqual(e.files.map((f) => f.path), ['a.txt', 'sub/b.bin']);
  assert.equal(e.files[0]!.sha256, HELLO);
  const st = await fs.stat(c.blobPath(e.files[0]!.sha256));
  assert.equal(st.mode & 0o777, 0o444);
  const du = await c.du();
  assert.equal(du.blobs, 2);
  assert.equal(du.entries, 2);
  const tree = await c.materialize(e);
  assert.equal(await fs.readFile(path.join(tree, 'sub/b.bin')).then((b) => b.length), 5000);
});

test('a record whose blob vanished is a miss for lookup, and CacheCorruptError (not ENOENT) for verify', async () => {
  const c = await fresh();
  const e = await put(c, 1, { 'a.txt': 'hello' });
  await fs.rm(c.blobPath(HELLO));
  assert.equal(await c.lookup(K(1)), undefined);
  await assert.rejects(c.verify(e), (err: unknown) => {
    assert.ok(err instanceof CacheCorruptError);
    assert.match(err.message, /blob missing for stage s file a\.txt .*expected sha256 2cf24dba\S+ \(5 bytes\), found no file/);
    assert.deepEqual(err.dropped, [K(1)]);
    return true;
  });
  assert.equal((await c.lookupAll([K(1)])).size, 0, 'the record was dropped: a miss, rebuilt next time');
});

test('commit refuses non-regular files', async () => {
  const c = await fresh();
  const out = await c.staging('out');
  await fs.symlink('/etc/passwd', path.join(out, 'link'));
  await assert.rejects(c.commit(K(1), 'st', parts(1), out, {}), /not a regular file/);
  assert.equal(await c.lookup(K(1)), undefined);
});

test('parseRecord: bad JSON, a key or parts that do not match the file name, a broken seal and unsafe paths are no record', async () => {
  const c = await fresh();
  await put(c, 1, { 'a.txt': 'hello' });
  const text = await fs.readFile(path.join(c.root, 'entries', `${K(1)}.json`), 'utf8');
  const ok = parseRecord(K(1), text);
  assert.ok('entry' in ok && ok.sealed);
  const bad = (t: string, key = K(1)) => {
    const r = parseRecord(key, t);
    assert.ok('problem' in r, `accepted: ${t.slice(0, 80)}`);
    return r.problem;
  };
  assert.match(bad('garbage'), /not valid JSON/);
  assert.match(bad(text, K(2)), /key field does not match its file name/);
  const v = JSON.parse(text);
  assert.match(bad(JSON.stringify({ ...v, parts: parts(2) })), /key parts do not hash to its key/);
  assert.match(bad(JSON.stringify({ ...v, meta: { k: 2 } })), /seal does not match/, 'a changed meta value is caught by the seal');
  assert.match(bad(JSON.stringify({ ...v, files: [{ ...v.files[0], executable: true }] })), /seal does not match/);
  assert.match(bad(JSON.stringify({ ...v, files: [{ ...v.files[0], path: '../../etc/x' }] })), /bad or duplicate file path/);
  assert.match(bad(JSON.stringify({ ...v, recordSha257: v.recordSha256 })), /unknown field/);
  // Every single-byte change of a record is either rejected or leaves it as it was.
  for (let i = 0; i < text.length; i++) {
    const t = text.slice(0, i) + String.fromCharCode(text.charCodeAt(i) ^ 0x01) + text.slice(i + 1);
    assert.ok('problem' in parseRecord(K(1), t), `byte ${i} flipped was accepted`);
  }
  // Records written before seals are still read (the shared cache is not rebuilt for them).
  const { recordSha256: _, ...legacy } = v;
  const r = parseRecord(K(1), JSON.stringify(legacy));
  assert.ok('entry' in r && !r.sealed);
  // ... and sealed the first time they are read, so later damage is caught.
  const file = path.join(c.root, 'entries', `${K(1)}.json`);
  await fs.writeFile(file, JSON.stringify(legacy));
  await fs.rm(path.join(c.root, 'tmp'), { recursive: true }); // a build looks records up before init
  assert.ok(await c.lookup(K(1)));
  const resealed = parseRecord(K(1), await fs.readFile(file, 'utf8'));
  assert.ok('entry' in resealed && resealed.sealed);
});

test('lookupAll reads a plan once; a garbage record is a miss and is removed', async () => {
  const c = await fresh();
  await put(c, 1, { 'a.txt': 'hello' });
  await put(c, 2, { 'b.txt': 'bye' });
  await fs.writeFile(path.join(c.root, 'entries', `${K(2)}.json`), '{"key": garbage');
  const m = await c.lookupAll([K(1), K(2), K(3), K(1)]);
  assert.deepEqual([...m.keys()], [K(1)]);
  assert.equal(existsSync(path.join(c.root, 'entries', `${K(2)}.json`)), false);
});

test('a flipped byte in a blob two records share: both records and the blob are dropped, with stage, file and both digests', async () => {
  const c = await fresh();
  const a = await put(c, 'initramfs', { 'initrd.img': 'initrd bytes' }, 'initramfs');
  const b = await put(c, 'ipxe', { 'initrd.img': 'initrd bytes', 'boot.ipxe': '#!ipxe' }, 'ipxe');
  await c.verify(a); // memos written: the flip must still be seen (ctime moves)
  const sha = a.files[0]!.sha256;
  await flipByte(c.blobPath(sha), 3);
  await assert.rejects(c.verify(a), (err: unknown) => {
    assert.ok(err instanceof CacheCorruptError);
    assert.match(err.message, new RegExp(`blob corrupt for stage initramfs file initrd\\.img .*expected sha256 ${sha} \\(12 bytes\\), found sha256 [0-9a-f]{64}`));
    assert.deepEqual(new Set(err.dropped), new Set([a.key, b.key]));
    return true;
  });
  assert.equal(existsSync(c.blobPath(sha)), false);
  assert.equal((await c.lookupAll([a.key, b.key])).size, 0, 'the other record is a miss too, not a crash later');
  // The rebuild lands cleanly.
  await put(c, 'initramfs', { 'initrd.img': 'initrd bytes' }, 'initramfs');
  const b2 = await put(c, 'ipxe', { 'initrd.img': 'initrd bytes', 'boot.ipxe': '#!ipxe' }, 'ipxe');
  await c.verify(b2);
  assert.equal(await fs.readFile(path.join(await c.materialize(b2), 'initrd.img'), 'utf8'), 'initrd bytes');
});

test('the verified memo: a tampered memo means a re-hash, never acceptance of a changed blob', async () => {
  const c = await fresh();
  const e = await put(c, 1, { 'a.txt': 'hello world' });
  const sha = e.files[0]!.sha256;
  const memo = path.join(c.root, 'verified', e.key);
  const text = await fs.readFile(memo, 'utf8');
  assert.match(text, new RegExp(`^pipeline-verified/2 ${e.key} [0-9a-f]{64}\n${sha} `), 'commit leaves one memo per entry, holding the record digest and the sha');
  // Garbage in the memo (another process, which has checked nothing yet): re-hashed, found good, memo restored.
  await fs.writeFile(memo, text.replace(/.$/s, 'x'));
  await new Cache(c.root).verify(e);
  assert.equal(await fs.readFile(memo, 'utf8'), text);
  // A blob changed in place with its memo rewritten to the old text: ctime moved, so it is re-hashed.
  await flipByte(c.blobPath(sha));
  await fs.writeFile(memo, text);
  await assert.rejects(new Cache(c.root).verify(e), CacheCorruptError);
  // Rebuilt by this process, which remembers it as checked: a change is still seen.
  const e2 = await put(c, 1, { 'a.txt': 'hello world' });
  await c.verify(e2);
  await flipByte(c.blobPath(sha));
  await assert.rejects(c.verify(e2), CacheCorruptError);
});

test('one verified memo per entry, whatever its blob count; blobs two entries share are checked through each', async () => {
  const c = await fresh();
  const files: Record<string, string> = {};
  for (let i = 0; i < 50; i++) files[`objects/${i}`] = `object ${i}`;
  const a = await put(c, 'a', { ...files, 'shared.img': 'shared bytes' });
  const b = await put(c, 'b', { 'shared.img': 'shared bytes', 'own.txt': 'b' });
  assert.deepEqual((await fs.readdir(path.join(c.root, 'verified'))).sort(), [a.key, b.key].sort());
  assert.equal((await fs.readFile(path.join(c.root, 'verified', a.key), 'utf8')).trimEnd().split('\n').length, 1 + 51);
  // Each memo vouches for the shared blob; a change to it is caught through either entry, memos forged back or not.
  const memos = await Promise.all([a, b].map((e) => fs.readFile(path.join(c.root, 'verified', e.key), 'utf8')));
  const shared = a.files.find((f) => f.path === 'shared.img')!.sha256;
  await flipByte(c.blobPath(shared), 2);
  await Promise.all([a, b].map((e, i) => fs.writeFile(path.join(c.root, 'verified', e.key), memos[i]!)));
  await assert.rejects(new Cache(c.root).verify(b), (err: unknown) => err instanceof CacheCorruptError && new Set(err.dropped).size === 2 && err.dropped.includes(a.key));
  assert.equal(existsSync(path.join(c.root, 'verified', a.key)), false, 'dropped records take their memos with them');
});

test('a memo that vouches for only some blobs re-hashes the rest; an old per-blob memo is no memo', async () => {
  const c = await fresh();
  const e = await put(c, 1, { 'x.txt': 'x', 'y.txt': 'y' });
  const memo = path.join(c.root, 'verified', e.key);
  const text = await fs.readFile(memo, 'utf8');
  const [head, l1, l2] = text.trimEnd().split('\n');
  await fs.writeFile(memo, `${head}\n${l2}\n${l1!.replace(/\d$/, (d) => String((Number(d) + 1) % 10))}\n`);
  await new Cache(c.root).verify(e);
  assert.equal(await fs.readFile(memo, 'utf8'), text, 'rewritten whole');
  // An older cache: verified/<sha> per blob, no entry memo. Its blob changed: caught.
  await fs.rm(memo);
  const x = e.files.find((f) => f.path === 'x.txt')!.sha256;
  await fs.writeFile(path.join(c.root, 'verified', x), `${l1}\n`);
  await scribble(c.blobPath(x), 'z');
  await assert.rejects(new Cache(c.root).verify(e), CacheCorruptError);
});

test('the memo vouches for a record text once checked: the same text is read back as is, any other byte is checked in full', async () => {
  const c = await fresh();
  const e = await put(c, 1, { 'a.txt': 'alpha', 'b.txt': 'beta' });
  const memo = path.join(c.root, 'verified', e.key);
  const file = path.join(c.root, 'entries', `${e.key}.json`);
  const text = await fs.readFile(file, 'utf8');
  assert.ok((await fs.readFile(memo, 'utf8')).startsWith(`pipeline-verified/2 ${e.key} ${createHash('sha256').update(text).digest('hex')}\n`));
  assert.deepEqual((await new Cache(c.root).lookupAll([e.key])).get(e.key), e, 'vouched for: the same entry');
  // A changed byte in the record (a file's digest) no longer matches the memo: parsed in full, the seal fails, a miss.
  await fs.writeFile(file, text.replace(e.files[0]!.sha256, e.files[1]!.sha256));
  assert.equal((await new Cache(c.root).lookupAll([e.key])).size, 0);
  assert.equal(existsSync(file), false, 'the bad record is dropped');
});

test('gc removes memos of gone entries and per-blob memos of older caches', async () => {
  const c = await fresh();
  const a = await put(c, 1, { 'a.txt': 'aaaa' });
  const b = await put(c, 2, { 'b.txt': 'bbbb' });
  await fs.writeFile(path.join(c.root, 'verified', a.files[0]!.sha256), 'old per-blob memo\n');
  await c.dropRecord(a.key);
  await c.gc(1 << 30);
  assert.deepEqual(await fs.readdir(path.join(c.root, 'verified')), [b.key]);
});

test('trees: a replaced, extra or missing tree file is re-made from the blobs; a changed tree inode is a corrupt blob', async () => {
  const c = await fresh();
  const e = await put(c, 1, { 'a.txt': 'hello', 'd/b.txt': 'bee' });
  const tree = await c.materialize(e);
  // A different inode with other bytes (rm + write): not the blob, re-made.
  await fs.rm(path.join(tree, 'a.txt'));
  await fs.writeFile(path.join(tree, 'a.txt'), 'evil!');
  assert.equal(await fs.readFile(path.join(await c.materialize(e), 'a.txt'), 'utf8'), 'hello');
  await fs.writeFile(path.join(tree, 'extra'), 'x');
  await c.materialize(e);
  assert.equal(existsSync(path.join(tree, 'extra')), false);
  await fs.rm(path.join(tree, 'd/b.txt'));
  assert.equal(await fs.readFile(path.join(await c.materialize(e), 'd/b.txt'), 'utf8'), 'bee');
  // In place (same inode as the blob): the blob itself changed.
  await flipByte(path.join(tree, 'd/b.txt'));
  await assert.rejects(c.materialize(e), (err: unknown) => err instanceof CacheCorruptError && /file d\/b\.txt/.test(err.message));
  assert.equal(existsSync(tree), false, 'the bad tree went with its record');
});

test('commit replaces an existing (possibly corrupt) blob of the same name with the fresh bytes', async () => {
  const c = await fresh();
  await put(c, 1, { 'a.txt': 'hello' });
  await scribble(c.blobPath(HELLO), 'HELLO');
  const e = await put(c, 2, { 'b.txt': 'hello' });
  assert.equal(await fs.readFile(c.blobPath(HELLO), 'utf8'), 'hello');
  await c.verify(e);
});

test('commit keeps an existing blob that is what its name says (same inode: trees linked to it stay valid)', async () => {
  const c = await fresh();
  await put(c, 1, { 'a.txt': 'hello' });
  const ino = (await fs.stat(c.blobPath(HELLO))).ino;
  await put(c, 2, { 'b.txt': 'hello' });
  assert.equal((await fs.stat(c.blobPath(HELLO))).ino, ino);
  // Another process, which has not checked it: hashed once, kept.
  await put(new Cache(c.root), 3, { 'c.txt': 'hello' });
  assert.equal((await fs.stat(c.blobPath(HELLO))).ino, ino);
});

test('history that is garbage or does not hash to its key is ignored, not a crash', async () => {
  const c = await fresh();
  await c.recordBuild({ spec: { name: 'sp', file: 'x', sha256: 'y' }, arch: 'amd64', stages: [{ name: 'st', key: K(1), parts: parts(1) }] } as never, [K(1)]);
  assert.equal((await c.readHistory('sp', 'amd64', 'st'))!.key, K(1));
  const file = path.join(c.root, 'history', 'sp', 'amd64', 'st.json');
  const text = await fs.readFile(file, 'utf8');
  await fs.writeFile(file, text.replace('"n":1', '"n":2'));
  assert.equal(await c.readHistory('sp', 'amd64', 'st'), undefined);
  await fs.writeFile(file, '{"parts": 3');
  assert.equal(await c.readHistory('sp', 'amd64', 'st'), undefined);
});

test('gc evicts least recently used entries to the cap and the cache keeps working at it', async () => {
  const c = await fresh();
  const kb = (n: number) => Buffer.alloc(1024, n);
  for (let i = 0; i < 5; i++) {
    await put(c, i, { f: kb(i) });
    const t = new Date(2020, 0, 1 + i);
    await fs.utimes(path.join(c.root, 'entries', `${K(i)}.json`), t, t);
  }
  await c.touch(K(0)); // used just now: newest
  const r = await c.gc(2048 + 100);
  assert.deepEqual(r.evicted, [K(1), K(2), K(3)]);
  assert.ok(await c.lookup(K(0)));
  assert.ok(await c.lookup(K(4)));
  assert.equal((await c.du()).bytes, 2048);
  // At the cap, new entries still land; the next gc makes room again.
  await put(c, 5, { f: kb(5) });
  assert.ok(await c.lookup(K(5)));
  const r2 = await c.gc(2048 + 100);
  assert.equal(r2.evicted.length, 1);
  assert.ok(await c.lookup(K(5)));
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

test('tmp owners: pid and start time; a reused pid is not the owner', async () => {
  const start = processStartTime(process.pid)!;
  assert.match(start, /^\d+$/);
  assert.deepEqual(tmpOwner(`out-base-12-345-${'a'.repeat(12)}`), { pid: 12, start: '345' });
  assert.deepEqual(tmpOwner('.x.json.12.345.abcd0123.tmp'), { pid: 12, start: '345' });
  assert.deepEqual(tmpOwner('out-x-77-abcdef'), { pid: 77 });
  const c = await fresh();
  const mine = await c.staging('out-mine');
  // Our pid, another start time: a dead build whose pid we happen to have now.
  const reused = path.join(c.root, 'tmp', `work-x-${process.pid}-${Number(start) + 1}-${'b'.repeat(12)}`);
  await fs.mkdir(reused);
  const removed = await c.cleanStaging();
  assert.deepEqual(removed, [path.basename(reused)]);
  assert.ok(existsSync(mine));
});

test('cleanStaging removes a SIGKILLed owner\'s dirs and keeps a live one\'s', async () => {
  const c = await fresh();
  const holder = (label: string) => {
    // A real process that takes a staging dir from this cache and holds it.
    const script = `import { Cache } from ${JSON.stringify(path.resolve('src/engine/cache.ts'))};
      const d = await new Cache(${JSON.stringify(c.root)}).staging(${JSON.stringify(label)});
      const fs = await import('node:fs/promises');
      await fs.writeFile(d + '/big', Buffer.alloc(1 << 20));
      console.log(d);
      setInterval(() => {}, 1000);`;
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    return new Promise<{ child: typeof child; dir: string }>((resolve, reject) => {
      child.stdout.once('data', (d) => resolve({ child, dir: String(d).trim() }));
      child.once('exit', (code) => reject(new Error(`holder exited ${code}`)));
    });
  };
  const dead = await holder('out-dead');
  const live = await holder('out-live');
  try {
    const gone = new Promise((r) => dead.child.once('exit', r));
    dead.child.kill('SIGKILL');
    await gone;
    assert.ok(existsSync(dead.dir));
    await c.cleanStaging();
    assert.equal(existsSync(dead.dir), false, 'a killed owner\'s staging dir is removed');
    assert.ok(existsSync(live.dir), 'a live owner\'s staging dir is kept');
  } finally {
    live.child.kill('SIGKILL');
  }
});

test('verifyAll: clean is clean; a bad blob, a garbage record and a foreign tree file are listed with digests; --repair drops them', async () => {
  const c = await fresh();
  const a = await put(c, 1, { 'initrd.img': 'shared' }, 'initramfs');
  const b = await put(c, 2, { 'initrd.img': 'shared', 'boot.ipxe': 'x' }, 'ipxe');
  await put(c, 3, { 'z.txt': 'zzz' }, 'other');
  const tree = await c.materialize(b);
  assert.deepEqual((await c.verifyAll()).problems, []);

  const sha = a.files[0]!.sha256;
  await flipByte(c.blobPath(sha));
  await fs.writeFile(path.join(c.root, 'entries', `${K(3)}.json`), 'garbage');
  const r = await c.verifyAll();
  const blob = r.problems.find((p) => p.what === 'blob')!;
  assert.equal(blob.expected, `sha256 ${sha}`);
  assert.match(blob.found!, /^sha256 [0-9a-f]{64}$/);
  assert.notEqual(blob.found, blob.expected);
  assert.deepEqual(blob.records!.map((x) => x.stage).sort(), ['initramfs', 'ipxe']);
  assert.ok(r.problems.some((p) => p.what === 'record' && /not valid JSON/.test(p.message)));
  assert.ok(existsSync(c.blobPath(sha)), 'without --repair nothing is dropped');

  await c.verifyAll({ repair: true });
  assert.deepEqual((await c.verifyAll()).problems, []);
  assert.equal((await c.lookupAll([a.key, b.key, K(3)])).size, 0);
  assert.equal(existsSync(tree), false);

  // A tree file that is not its blob (different inode, other bytes).
  const b2 = await put(c, 2, { 'initrd.img': 'shared', 'boot.ipxe': 'x' }, 'ipxe');
  const t2 = await c.materialize(b2);
  await fs.rm(path.join(t2, 'boot.ipxe'));
  await fs.writeFile(path.join(t2, 'boot.ipxe'), 'y');
  const rt = await c.verifyAll();
  assert.equal(rt.problems.length, 1);
  assert.equal(rt.problems[0]!.what, 'tree');
  assert.equal(rt.problems[0]!.expected, `sha256 ${b2.files.find((f) => f.path === 'boot.ipxe')!.sha256}`);
  assert.match(rt.problems[0]!.found!, /^sha256 /);
});

test('verifyAll re-hashes the .deb store: a changed .deb is listed with both digests and dropped on repair, a good one stays', async () => {
  const c = await fresh();
  const debs = path.join(c.root, 'debs', 'sha256');
  await fs.mkdir(debs, { recursive: true });
  const good = Buffer.from('!<arch>\ngood deb\n');
  const bad = Buffer.from('!<arch>\nbad deb\n');
  const goodSha = createHash('sha256').update(good).digest('hex');
  const badSha = createHash('sha256').update(bad).digest('hex');
  await fs.writeFile(c.debPath(goodSha), good);
  await fs.writeFile(c.debPath(badSha), bad);
  assert.deepEqual((await c.verifyAll()).problems, []);
  await flipByte(c.debPath(badSha));
  const r = await c.verifyAll();
  assert.equal(r.problems.length, 1);
  assert.equal(r.problems[0]!.what, 'deb');
  assert.equal(r.problems[0]!.expected, `sha256 ${badSha}`);
  assert.match(r.problems[0]!.found!, /^sha256 [0-9a-f]{64}$/);
  await c.verifyAll({ repair: true });
  assert.equal(existsSync(c.debPath(badSha)), false);
  assert.equal(existsSync(c.debPath(goodSha)), true);
  assert.deepEqual((await c.verifyAll()).problems, []);
});
