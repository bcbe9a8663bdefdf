// stageComposefsRoot: the root partition's staging tree for `raw` with `root: composefs`
// holds exactly the composefs input's image, layers and objects, hard-linked, dirs 0755.
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { stageComposefsRoot } from '../../outputs/_composefs-root.js';
import type { RunContext } from '../../src/stage.js';

const D = (c: string) => c.repeat(64);

test('the staging tree is the input\'s image, layers and objects as hard links, nothing else', async () => {
  const base = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-cfs-root-'));
  const input = path.join(base, 'in');
  const files = ['image.cfs', `layers/${D('b')}.cfs`, 'objects/ab/cdef', 'objects/ab/0123', 'objects/ff/99', 'tree.dump'];
  for (const f of files) {
    await fs.mkdir(path.dirname(path.join(input, f)), { recursive: true });
    await fs.writeFile(path.join(input, f), f);
    await fs.chmod(path.join(input, f), 0o444);
  }
  const work = path.join(base, 'work');
  await fs.mkdir(work);
  const ctx = { workDir: work, inputs: { rootfs: { dir: input, files, meta: { imageDigest: D('a'), layers: [{ digest: D('b') }] }, key: D('c'), kind: 'composefs' } } } as unknown as RunContext<unknown>;
  const r = await stageComposefsRoot(ctx);
  assert.equal(r.imageDigest, D('a'));
  assert.deepEqual(r.layers, [D('b')]);
  assert.deepEqual(r.seedFiles, [path.join(r.tree, 'image.cfs'), path.join(r.tree, 'layers', `${D('b')}.cfs`)]);
  const got = (await fs.readdir(r.tree, { recursive: true, withFileTypes: true })).filter((d) => d.isFile()).map((d) => path.relative(r.tree, path.join(d.parentPath, d.name))).sort();
  assert.deepEqual(got, files.filter((f) => f !== 'tree.dump').sort());
  for (const f of got) assert.equal((await fs.stat(path.join(r.tree, f))).ino, (await fs.stat(path.join(input, f))).ino, `${f} is a hard link`);
  for (const d of ['', 'objects', 'objects/ab', 'objects/ff', 'layers']) assert.equal((await fs.stat(path.join(r.tree, d))).mode & 0o777, 0o755, `${d || '.'} is 0755`);
  await fs.rm(base, { recursive: true, force: true });
});
