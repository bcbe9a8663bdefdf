// Digests a stage hands to the cache (noteOutputDigests) and blobs it links instead
// of writing (storedBlob): commit takes a note only for the very file it was made
// for, unchanged; a link is trusted only when the stage compared the bytes; and the
// composefs object store reuses cache blobs without changing a single output byte.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Cache, noteOutputDigests, storedBlob, SYNCFS_MIN } from '../../src/engine/cache.js';
import { ENGINE_KEY_VERSION, keyOf, type KeyParts } from '../../src/engine/compile.js';
import { hashBytes, hashFile } from '../../src/lib/digest.js';
import { readTarTree } from '../../src/lib/tarfs.js';
import { writeObjectStore } from '../../stages/composefs.js';

const parts = (n: number | string): KeyParts => ({ engine: ENGINE_KEY_VERSION, kind: 'text', version: '1', arch: 'amd64', sourceDateEpoch: 0, params: { n }, tools: {}, assets: {}, inputs: {} });
const K = (n: number | string) => keyOf(parts(n));

async function fresh(): Promise<Cache> {
  const c = new Cache(path.join(await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-noted-')), 'c'));
  await c.init();
  return c;
}

/** Well-formed digests that are not the file's: a note taken at its word shows up in the record. */
const LIE = { sha256: 'a'.repeat(64), fsverity: 'b'.repeat(64) };

test('a note for an unchanged file is taken; after a write or chmod the file is hashed', async () => {
  const c = await fresh();
  const out = await c.staging('out');
  const data = Buffer.from('output bytes\n');
  for (const f of ['kept', 'written', 'chmodded']) await fs.writeFile(path.join(out, f), data);
  for (const f of ['kept', 'written', 'chmodded']) noteOutputDigests(path.join(out, f), { size: data.length, ...LIE });
  await new Promise((r) => setTimeout(r, 20)); // past the coarse timestamp tick
  await fs.appendFile(path.join(out, 'written'), 'x');
  await fs.chmod(path.join(out, 'chmodded'), 0o600);
  const e = await c.commit(K(1), 's', parts(1), out, {});
  const by = new Map(e.files.map((f) => [f.path, f]));
  assert.equal(by.get('kept')!.sha256, LIE.sha256, 'the note for the untouched file is used');
  const real = hashBytes(Buffer.concat([data, Buffer.from('x')]), { fsverity: true });
  assert.equal(by.get('written')!.sha256, real.sha256);
  assert.equal(by.get('written')!.fsverity, real.fsverity);
  assert.equal(by.get('chmodded')!.sha256, hashBytes(data).sha256);
});

test('a note is used once: the same path committed again is hashed', async () => {
  const c = await fresh();
  const data = Buffer.from('again\n');
  const out1 = await c.staging('out');
  await fs.writeFile(path.join(out1, 'f'), data);
  noteOutputDigests(path.join(out1, 'f'), { size: data.length, ...LIE });
  const first = await c.commit(K(2), 's', parts(2), out1, {});
  assert.equal(first.files[0]!.sha256, LIE.sha256);
  // Same path, no new note (a stage that wrote it without noting): the true digests.
  await fs.writeFile(path.join(out1, 'f'), data);
  const second = await c.commit(K(3), 's', parts(3), out1, {});
  assert.equal(second.files[0]!.sha256, hashBytes(data).sha256);
});

test('noteOutputDigests refuses malformed digests and a size that is not the file\'s', async () => {
  const c = await fresh();
  const out = await c.staging('out');
  await fs.writeFile(path.join(out, 'f'), 'four');
  assert.throws(() => noteOutputDigests(path.join(out, 'f'), { size: 4, sha256: 'x', fsverity: LIE.fsverity }), /malformed/);
  assert.throws(() => noteOutputDigests(path.join(out, 'f'), { size: 5, ...LIE }), /not a 5-byte regular file/);
});

test('storedBlob: only for a dir inside a cache\'s staging area', async () => {
  const c = await fresh();
  const out = await c.staging('out');
  const sha = hashBytes(Buffer.from('x')).sha256;
  assert.equal(storedBlob(path.join(out, 'objects'), sha), c.blobPath(sha));
  assert.equal(storedBlob(os.tmpdir(), sha), undefined);
  assert.equal(storedBlob(path.join(c.root, 'blobs'), sha), undefined);
  assert.equal(storedBlob(out, 'not-a-digest'), undefined);
});

test('a noted hard link to its blob is committed without touching the blob; changed after the note, it is hashed', async () => {
  const c = await fresh();
  const data = Buffer.alloc(9000, 3);
  const h = hashBytes(data, { fsverity: true });
  const o1 = await c.staging('out');
  await fs.writeFile(path.join(o1, 'obj'), data);
  await c.commit(K(4), 's', parts(4), o1, {});
  const blob = c.blobPath(h.sha256);
  const ino = (await fs.stat(blob)).ino;

  const o2 = await c.staging('out');
  await fs.link(blob, path.join(o2, 'obj'));
  noteOutputDigests(path.join(o2, 'obj'), { size: data.length, sha256: h.sha256, fsverity: h.fsverity! });
  const e = await c.commit(K(5), 's', parts(5), o2, {});
  assert.deepEqual(e.files[0], { path: 'obj', size: data.length, sha256: h.sha256, fsverity: h.fsverity, executable: false });
  assert.equal((await fs.stat(blob)).ino, ino, 'the blob stays the same inode');
  assert.equal((await fs.stat(blob)).nlink, 1, 'the staging link is gone');
  await c.verify(e, { full: true });

  // The blob changed in place after the stage's note (its ctime moved): the note is
  // not taken; the linked file (the blob's inode) is hashed and the record says what it holds.
  const o3 = await c.staging('out');
  await fs.link(blob, path.join(o3, 'obj'));
  noteOutputDigests(path.join(o3, 'obj'), { size: data.length, sha256: h.sha256, fsverity: h.fsverity! });
  await new Promise((r) => setTimeout(r, 20));
  await fs.chmod(blob, 0o644);
  const bad = Buffer.from(data);
  bad[0] = 9;
  await fs.writeFile(blob, bad);
  const e3 = await c.commit(K(6), 's', parts(6), o3, {});
  assert.equal(e3.files[0]!.sha256, hashBytes(bad).sha256, 'a changed file is hashed, never recorded under its old note');
});

/** A rootfs tar with objects (> 64 bytes), a duplicate and an inlined file. */
async function rootfsTar(dir: string): Promise<string> {
  const src = path.join(dir, 'src');
  await fs.mkdir(path.join(src, 'usr/bin'), { recursive: true });
  await fs.writeFile(path.join(src, 'usr/bin/a'), Buffer.alloc(100_000, 1));
  await fs.writeFile(path.join(src, 'usr/bin/b'), Buffer.alloc(5000, 2));
  await fs.writeFile(path.join(src, 'usr/bin/b-copy'), Buffer.alloc(5000, 2));
  await fs.writeFile(path.join(src, 'usr/bin/small'), 'inlined');
  const tar = path.join(dir, 'rootfs.tar');
  execFileSync('tar', ['-c', '-f', tar, '--sort=name', '--owner=0', '--group=0', '--numeric-owner', '--format=pax', '-C', src, '.']);
  return tar;
}

test('composefs object store over a cache: blobs of equal bytes are linked, a corrupt blob is not, records are identical', async () => {
  const c = await fresh();
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-noted-tar-'));
  const tar = await rootfsTar(dir);
  const tree = await readTarTree(tar);
  const storeOnce = async (n: number) => {
    const out = await c.staging('out');
    const s = await writeObjectStore(tree, tar, path.join(out, 'objects'));
    const objects = (await fs.readdir(path.join(out, 'objects'), { recursive: true, withFileTypes: true })).filter((d) => d.isFile()).map((d) => path.join(d.parentPath, d.name));
    const inodes = new Map<string, number>();
    for (const f of objects) inodes.set(path.relative(out, f), (await fs.stat(f)).ino);
    const e = await c.commit(K(n), 'composefs', parts(n), out, {});
    return { s, e, inodes };
  };
  const first = await storeOnce(10);
  assert.equal(first.s.objects, 2);
  for (const f of first.e.files) {
    const h = await hashFile(c.blobPath(f.sha256), { fsverity: true });
    assert.equal(h.sha256, f.sha256);
    assert.equal(h.fsverity, f.fsverity);
    assert.equal(path.basename(f.path), f.fsverity.slice(2), 'objects are named by their fs-verity digest');
  }
  const second = await storeOnce(11);
  assert.deepEqual(second.e.files, first.e.files);
  for (const f of second.e.files) assert.equal(second.inodes.get(f.path), (await fs.stat(c.blobPath(f.sha256))).ino, `${f.path} was linked, not written`);

  // Same size, other bytes: compared, not linked; the fresh bytes replace the bad blob.
  const big = first.e.files.find((f) => f.size === 100_000)!;
  const blob = c.blobPath(big.sha256);
  const badIno = (await fs.stat(blob)).ino;
  await fs.chmod(blob, 0o644);
  await fs.writeFile(blob, Buffer.alloc(100_000, 7));
  await fs.chmod(blob, 0o444);
  const third = await storeOnce(12);
  assert.deepEqual(third.e.files, first.e.files);
  assert.notEqual(third.inodes.get(big.path), badIno, 'the corrupt blob was not linked');
  assert.equal((await hashFile(blob)).sha256, big.sha256, 'the corrupt blob was replaced by the right bytes');
  await c.verify(third.e, { full: true });
  await fs.rm(dir, { recursive: true, force: true });
});

test(`a commit of at least ${SYNCFS_MIN} new blobs (one syncfs for all): every blob stored read-only, the record verifies`, async () => {
  const c = await fresh();
  const out = await c.staging('out');
  const n = SYNCFS_MIN + 8;
  for (let i = 0; i < n; i++) await fs.writeFile(path.join(out, `f${i}`), `file ${i}\n`);
  await fs.writeFile(path.join(out, 'dup'), 'file 0\n'); // same bytes as f0: one blob
  const e = await c.commit(K(20), 's', parts(20), out, {});
  assert.equal(e.files.length, n + 1);
  for (const f of e.files) assert.equal((await fs.stat(c.blobPath(f.sha256))).mode & 0o777, 0o444);
  assert.equal((await c.du()).blobs, n);
  await c.verify((await c.lookup(K(20)))!, { full: true });
});

test('a failed syncfs: no blob renamed, no record', async (t) => {
  // A `sync` that fails as syncfs(2) would on an I/O error, first on PATH.
  const bin = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-failing-sync-'));
  await fs.writeFile(path.join(bin, 'sync'), '#!/bin/sh\necho "sync: error syncing: Input/output error" >&2\nexit 1\n', { mode: 0o755 });
  const PATH = process.env.PATH;
  process.env.PATH = `${bin}:${PATH}`;
  t.after(() => {
    process.env.PATH = PATH;
    return fs.rm(bin, { recursive: true, force: true });
  });
  const c = await fresh();
  const out = await c.staging('out');
  for (let i = 0; i < SYNCFS_MIN; i++) await fs.writeFile(path.join(out, `f${i}`), `file ${i}\n`);
  await assert.rejects(c.commit(K(21), 's', parts(21), out, {}), /sync exited with code 1/);
  assert.equal(await c.lookup(K(21)), undefined);
  assert.equal((await c.du()).blobs, 0, 'nothing reached blobs/ before the sync');
  // Below the threshold the per-file fsync path does not need `sync`.
  const small = await c.staging('out');
  await fs.writeFile(path.join(small, 'one'), 'one\n');
  await c.commit(K(22), 's', parts(22), small, {});
  assert.ok(await c.lookup(K(22)));
});

test('composefs layers: a second store into the same objects/ with a shared object counts it, keeps one copy, commits', async () => {
  const c = await fresh();
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-noted-layer-'));
  const base = await rootfsTar(dir);
  const lsrc = path.join(dir, 'layer');
  await fs.mkdir(path.join(lsrc, 'etc'), { recursive: true });
  await fs.writeFile(path.join(lsrc, 'etc/same-as-base'), Buffer.alloc(5000, 2)); // = usr/bin/b
  await fs.writeFile(path.join(lsrc, 'etc/own'), Buffer.alloc(3000, 5));
  const ltar = path.join(dir, 'layer.tar');
  execFileSync('tar', ['-c', '-f', ltar, '--sort=name', '--owner=0', '--group=0', '--numeric-owner', '--format=pax', '-C', lsrc, '.']);
  const out = await c.staging('out');
  const objects = path.join(out, 'objects');
  const s1 = await writeObjectStore(await readTarTree(base), base, objects);
  const s2 = await writeObjectStore(await readTarTree(ltar), ltar, objects);
  assert.equal(s1.objects, 2);
  assert.equal(s2.objects, 2, 'the shared object counts for the layer too, as before');
  assert.equal(s2.bytes, 8000);
  const e = await c.commit(K(30), 'composefs', parts(30), out, {});
  assert.equal(e.files.length, 3);
  for (const f of e.files) assert.equal((await hashFile(c.blobPath(f.sha256), { fsverity: true })).fsverity, f.fsverity);
  await fs.rm(dir, { recursive: true, force: true });
});
