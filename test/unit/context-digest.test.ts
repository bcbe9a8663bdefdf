import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Cache } from '../../src/engine/cache.js';
import { keyOf, type KeyParts } from '../../src/engine/compile.js';
import { recordedSha256 } from '../../src/engine/context.js';
import { contentSeed } from '../../src/lib/diskbuild.js';

test('recordedSha256: a cache input file\'s digest comes from its record (the same seed as hashing it); others are undefined', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-ctxdigest-'));
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const parts: KeyParts = { engine: 't', kind: 'text', version: '1', arch: 'amd64', sourceDateEpoch: 0, params: {}, tools: {}, assets: {}, inputs: {} };
  const key = keyOf(parts);
  const out = await cache.staging('out');
  await fs.writeFile(path.join(out, 'rootfs.tar'), 'pretend tar');
  const entry = await cache.commit(key, 'rootfs', parts, out, {});
  const treeDir = await cache.materialize(entry);
  const inputs = { rootfs: { dir: treeDir, files: ['rootfs.tar'], meta: {}, key, kind: 'mmdebstrap' } };
  const tar = path.join(treeDir, 'rootfs.tar');
  const want = createHash('sha256').update('pretend tar').digest('hex');
  assert.equal(await recordedSha256(inputs, tar), want);
  // Not an input file, or an input outside a cache: unknown, so the caller hashes.
  assert.equal(await recordedSha256(inputs, path.join(dir, 'elsewhere.tar')), undefined);
  const loose = path.join(dir, 'loose');
  await fs.mkdir(loose);
  await fs.writeFile(path.join(loose, 'rootfs.tar'), 'pretend tar');
  assert.equal(await recordedSha256({ rootfs: { dir: loose, files: ['rootfs.tar'], meta: {}, key: 'x', kind: 'test' } }, path.join(loose, 'rootfs.tar')), undefined);
  // The seed is the same whether the digest was known or hashed.
  const known = await contentSeed('t', [tar], { a: 1 }, (f) => recordedSha256(inputs, f));
  assert.equal(known, await contentSeed('t', [tar], { a: 1 }));
  // And it is the record that is used: a record naming another digest moves the seed.
  assert.notEqual(await contentSeed('t', [tar], { a: 1 }, async () => 'f'.repeat(64)), known);
  await fs.rm(dir, { recursive: true, force: true });
});
