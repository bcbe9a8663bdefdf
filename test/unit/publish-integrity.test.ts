// Publishing hashes each file as it copies it out of the cache: a blob that does
// not match its record never reaches images/, and its entry is dropped.
import assert from 'node:assert/strict';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Cache, processStartTime } from '../../src/engine/cache.js';
import { compile, type Facts } from '../../src/engine/compile.js';
import { BuildError } from '../../src/engine/errors.js';
import { publish } from '../../src/engine/publish.js';
import { runPlan } from '../../src/engine/scheduler.js';
import { parseSpec } from '../../src/engine/spec.js';
import { testKinds } from '../helpers/test-kinds.js';

const kinds = testKinds();
const facts: Facts = { toolVersions: { sh: 'dash' }, assetDigests: {}, sourceDateEpoch: 0 };
const SPEC = `name: p
arches: [amd64]
stages:
  a: { kind: text, with: { name: a.txt, content: "alpha bytes" } }
  b: { kind: text, with: { name: b.txt, content: "beta bytes" } }
variants:
  v: [a, b]
`;

test('a blob changed after verification is caught while copying: exit-1 error with stage, file and both digests; nothing published', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-publish-'));
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const plan = compile(parseSpec(SPEC, 'spec.yaml', kinds), 'amd64', ['v'], kinds, facts);
  const r = await runPlan(plan, { cache, specDir: dir, jobs: 2, logDir: path.join(dir, 'logs') });
  const outRoot = path.join(dir, 'images');
  const opts = { outRoot, blobPath: (s: string) => cache.blobPath(s), builderVersion: 't', onCorrupt: (s: string) => cache.dropBlob(s) };
  const good = await publish(plan, 'v', r.entries, opts);
  const sums = await fs.readFile(path.join(good.dir, 'SHA256SUMS'), 'utf8');

  const sha = r.entries.get('b')!.files[0]!.sha256;
  const blob = cache.blobPath(sha);
  await fs.chmod(blob, 0o644);
  await fs.writeFile(blob, 'BETA bytes');
  await assert.rejects(publish(plan, 'v', r.entries, opts), (e: unknown) => {
    assert.ok(e instanceof BuildError);
    assert.match(e.message, new RegExp(`stage b file b\\.txt: .*expected sha256 ${sha} \\(10 bytes\\), found sha256 (?!${sha})[0-9a-f]{64} \\(10 bytes\\)`));
    return true;
  });
  // The previous publication is untouched and no staging dir is left beside it.
  assert.equal(await fs.readFile(path.join(good.dir, 'SHA256SUMS'), 'utf8'), sums);
  assert.equal(await fs.readFile(path.join(good.dir, 'b.txt'), 'utf8'), 'beta bytes');
  assert.deepEqual(await fs.readdir(path.join(outRoot, 'v')), ['amd64']);
  // The bad entry was dropped: the next run rebuilds it and publishes the clean bytes.
  assert.equal(existsSync(blob), false);
  const r2 = await runPlan(plan, { cache, specDir: dir, jobs: 2, logDir: path.join(dir, 'logs') });
  assert.deepEqual(r2.results.map((x) => [x.name, x.status]), [['a', 'cached'], ['b', 'built']]);
  const again = await publish(plan, 'v', r2.entries, opts);
  assert.equal(await fs.readFile(path.join(again.dir, 'SHA256SUMS'), 'utf8'), sums);
});

test('publish removes a killed publish\'s staging beside the image dir and keeps a live one\'s', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-publish-'));
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const plan = compile(parseSpec(SPEC, 'spec.yaml', kinds), 'amd64', ['v'], kinds, facts);
  const r = await runPlan(plan, { cache, specDir: dir, jobs: 2, logDir: path.join(dir, 'logs') });
  const parent = path.join(dir, 'images', 'v');
  const start = Number(processStartTime(process.pid));
  // Our pid with another start time: a dead process whose pid was reused.
  const dead = path.join(parent, `.amd64.tmp-${process.pid}-${start + 1}-${'c'.repeat(12)}`);
  const live = path.join(parent, `.amd64.tmp-${process.pid}-${start}-${'d'.repeat(12)}`);
  await fs.mkdir(dead, { recursive: true });
  await fs.writeFile(path.join(dead, 'initrd.img'), 'half');
  await fs.mkdir(live);
  await publish(plan, 'v', r.entries, { outRoot: path.join(dir, 'images'), blobPath: (s) => cache.blobPath(s), builderVersion: 't' });
  assert.deepEqual((await fs.readdir(parent)).sort(), [path.basename(live), 'amd64'].sort());
});
