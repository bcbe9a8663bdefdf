// RunContext.rootfsTree: an input handed out by the cache (<cache>/trees/<key>) is
// unpacked once under <cache>/unpacked/<key> and shared by every stage that asks,
// however many ask at once; gc drops it with its entry. Inputs from elsewhere are
// unpacked in the stage's own scratch. Real tar, so root.
import assert from 'node:assert/strict';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Cache } from '../../src/engine/cache.js';
import { forgetUnpacked, makeRunContext } from '../../src/engine/context.js';
import { runProcess } from '../../src/engine/process.js';
import type { StageInput } from '../../src/stage.js';

const isRoot = process.getuid?.() === 0;

async function fixture() {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-rootfs-tree-'));
  const src = path.join(dir, 'src');
  await fs.mkdir(path.join(src, 'etc'), { recursive: true });
  await fs.writeFile(path.join(src, 'etc', 'hostname'), 'node\n');
  const key = 'a'.repeat(64);
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const trees = path.join(cache.root, 'trees', key);
  await fs.mkdir(trees, { recursive: true });
  await runProcess('tar', ['-C', src, '-cf', path.join(trees, 'rootfs.tar'), '.']);
  return { dir, cache, key, trees };
}

function ctxFor(dir: string, name: string, rootfs: StageInput, execs: string[][]) {
  return makeRunContext({
    name,
    arch: 'amd64',
    params: {},
    sourceDateEpoch: 0,
    outDir: path.join(dir, `out-${name}`),
    workDir: path.join(dir, `work-${name}`),
    inputs: { rootfs },
    specDir: dir,
    signal: new AbortController().signal,
    exec: (cmd, args, o) => {
      execs.push([cmd, ...args]);
      return runProcess(cmd, args, o);
    },
    log: () => {},
  }).ctx;
}

test('a cached rootfs is unpacked once under the cache and shared by concurrent stages; gc drops it with its entry', { skip: !isRoot && 'needs root (tar keeps owners)' }, async () => {
  const { dir, cache, key, trees } = await fixture();
  const input: StageInput = { dir: trees, files: ['rootfs.tar'], meta: {}, key, kind: 'mmdebstrap' };
  const execs: string[][] = [];
  const [a, b] = await Promise.all([ctxFor(dir, 'raw', input, execs).rootfsTree(), ctxFor(dir, 'iso', input, execs).rootfsTree()]);
  assert.equal(a, b);
  assert.equal(a, path.join(cache.unpackedPath(key), 'tree'));
  assert.equal(await fs.readFile(path.join(a, 'etc', 'hostname'), 'utf8'), 'node\n');
  assert.equal(execs.filter((e) => e[0] === 'tar').length, 1);
  // A later stage (another build) finds it complete and does not unpack again.
  assert.equal(await ctxFor(dir, 'oci', input, execs).rootfsTree(), a);
  assert.equal(execs.filter((e) => e[0] === 'tar').length, 1);
  // Another build process reuses the tree as it is...
  forgetUnpacked();
  assert.equal(await ctxFor(dir, 'oci', input, execs).rootfsTree(), a);
  assert.equal(execs.filter((e) => e[0] === 'tar').length, 1);
  // ...but a tree changed since it was unpacked (it is shared read-only) is unpacked again.
  await fs.writeFile(path.join(a, 'etc', 'hostname'), 'evil\n');
  forgetUnpacked();
  const again = await ctxFor(dir, 'qcow2', input, execs).rootfsTree();
  assert.equal(await fs.readFile(path.join(again, 'etc', 'hostname'), 'utf8'), 'node\n');
  assert.equal(execs.filter((e) => e[0] === 'tar').length, 2);
  // No record for the key: gc removes the unpacked tree.
  await cache.gc(1 << 30);
  assert.equal(existsSync(cache.unpackedPath(key)), false);
});

test('an input that is not a cache tree is unpacked in the stage\'s own scratch', { skip: !isRoot && 'needs root (tar keeps owners)' }, async () => {
  const { dir, trees } = await fixture();
  const loose = path.join(dir, 'loose');
  await fs.mkdir(loose);
  await fs.copyFile(path.join(trees, 'rootfs.tar'), path.join(loose, 'rootfs.tar'));
  const execs: string[][] = [];
  const t = await ctxFor(dir, 'raw', { dir: loose, files: ['rootfs.tar'], meta: {}, key: 'fixture', kind: 'mmdebstrap' }, execs).rootfsTree();
  assert.equal(t, path.join(dir, 'work-raw', 'rootfs-rootfs'));
  assert.equal(await fs.readFile(path.join(t, 'etc', 'hostname'), 'utf8'), 'node\n');
});
