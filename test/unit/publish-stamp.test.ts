// The publish stamp (issue 10, P1): the no-op check reads one small file and a stat
// per published entry (or one `find` for a big tree), no manifest built, no memo
// JSON parsed. It must see every change the memo sees: a file changed in place
// (same size, mtime put back), replaced by another inode with the same bytes and
// mtime, removed, added, chmod'ed, and records that changed under the same names.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Cache, checkedRecordDigest } from '../../src/engine/cache.js';
import { stableJson } from '../../src/engine/canonical.js';
import { compile, type Facts } from '../../src/engine/compile.js';
import { findFingerprints, publish, treeFingerprints, unchangedPublication, type PublishOptions } from '../../src/engine/publish.js';
import { runPlan } from '../../src/engine/scheduler.js';
import { parseSpec } from '../../src/engine/spec.js';
import { testKinds } from '../helpers/test-kinds.js';

const kinds = testKinds();
const facts: Facts = { toolVersions: { sh: 'dash' }, assetDigests: {}, sourceDateEpoch: 0 };
const spec = (b: string, many = 0) => `name: p
arches: [amd64]
stages:
  a: { kind: text, with: { name: a.txt, content: "alpha bytes" } }
  b: { kind: text, with: { name: b.txt, content: "${b}" } }
  m: { kind: shell, with: { script: 'cd "$1" && for d in $(seq 0 ${Math.max(0, Math.ceil(many / 100) - 1)}); do mkdir -p objects/$d; for i in $(seq 1 ${Math.min(many, 100)}); do echo "$d/$i" > objects/$d/$i; done; done' } }
variants:
  v: [a, b]
  big: [m]
`;

async function setup() {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-publish-stamp-'));
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const build = async (b: string, variant = 'v', many = 0) => {
    const plan = compile(parseSpec(spec(b, many), 'spec.yaml', kinds), 'amd64', [variant], kinds, facts);
    const r = await runPlan(plan, { cache, specDir: dir, jobs: 2, logDir: path.join(dir, 'logs') });
    return { plan, entries: r.entries };
  };
  const memoDir = path.join(dir, 'cache', 'published');
  const opts: PublishOptions = {
    outRoot: path.join(dir, 'images'),
    blobPath: (s) => cache.blobPath(s),
    builderVersion: 't',
    onCorrupt: (s) => cache.dropBlob(s),
    memoDir,
    recordDigest: (k) => checkedRecordDigest(cache, k),
  };
  const stampOf = (dest: string) => path.join(memoDir, `${createHash('sha256').update(dest).digest('hex')}.stamp`);
  const memoOf = (dest: string) => path.join(memoDir, `${createHash('sha256').update(dest).digest('hex')}.json`);
  return { dir, cache, build, opts, stampOf, memoOf };
}

test('an unchanged set is answered by the stamp alone (the memo is not read), with the manifest it published', async () => {
  const { build, opts, stampOf, memoOf } = await setup();
  const { plan, entries } = await build('beta bytes');
  const first = await publish(plan, 'v', entries, opts);
  assert.equal(JSON.parse(await fs.readFile(stampOf(first.dir), 'utf8')).walker, 'js');
  // Garbage in the memo: only the stamp can say "unchanged" now.
  await fs.writeFile(memoOf(first.dir), 'not json');
  const same = await unchangedPublication(plan, 'v', entries, opts);
  assert.ok(same, 'the stamp vouches for the untouched set');
  assert.equal(stableJson(same.manifest), await fs.readFile(path.join(first.dir, 'build-manifest.json'), 'utf8'));
});

/** Each way of changing a published set, done so that size and mtime stay as they were. */
const tampers: [string, (dir: string) => Promise<void>][] = [
  [
    'a file changed in place, same size, mtime put back',
    async (dir) => {
      const f = path.join(dir, 'b.txt');
      const st = await fs.stat(f);
      await fs.writeFile(f, 'BETA bytes');
      await fs.utimes(f, st.atime, st.mtime);
    },
  ],
  [
    'a file replaced by another inode with the same bytes and mtime',
    async (dir) => {
      const f = path.join(dir, 'b.txt');
      const st = await fs.stat(f);
      await fs.writeFile(`${f}.new`, await fs.readFile(f));
      await fs.utimes(`${f}.new`, st.atime, st.mtime);
      await fs.chmod(`${f}.new`, st.mode & 0o7777);
      await fs.rename(`${f}.new`, f);
    },
  ],
  ['a file removed', (dir) => fs.rm(path.join(dir, 'b.txt'))],
  ['a file added', (dir) => fs.writeFile(path.join(dir, 'extra.txt'), 'x')],
  ['a file chmod-ed', (dir) => fs.chmod(path.join(dir, 'a.txt'), 0o666)],
];

for (const [what, tamper] of tampers) {
  test(`${what}: the stamp does not match, and the next publish repairs the set`, async () => {
    const { build, opts } = await setup();
    const { plan, entries } = await build('beta bytes');
    const first = await publish(plan, 'v', entries, opts);
    await tamper(first.dir);
    assert.equal(await unchangedPublication(plan, 'v', entries, opts), undefined);
    await publish(plan, 'v', entries, opts);
    assert.deepEqual((await fs.readdir(first.dir)).sort(), ['SHA256SUMS', 'a.txt', 'b.txt', 'build-manifest.json', 'provenance.intoto.json']);
    assert.equal(await fs.readFile(path.join(first.dir, 'b.txt'), 'utf8'), 'beta bytes');
    assert.equal((await fs.stat(path.join(first.dir, 'a.txt'))).mode & 0o777, 0o644);
    // Repaired: the stamp answers again.
    assert.ok(await unchangedPublication(plan, 'v', entries, opts));
  });
}

test('another record under a stage (other inputs): the stamp does not match', async () => {
  const { build, opts } = await setup();
  const one = await build('beta bytes');
  await publish(one.plan, 'v', one.entries, opts);
  const two = await build('gamma bytes');
  assert.equal(await unchangedPublication(two.plan, 'v', two.entries, opts), undefined);
  // Without record digests there is no stamp answer, only the memo's full check.
  assert.ok(await unchangedPublication(one.plan, 'v', one.entries, { ...opts, recordDigest: undefined }));
});

test('a big tree is stamped by find, which sees what the in-process walk sees', async () => {
  const { build, opts, stampOf } = await setup();
  const { plan, entries } = await build('beta bytes', 'big', 2100);
  const pub = await publish(plan, 'big', entries, opts);
  const stamp = JSON.parse(await fs.readFile(stampOf(pub.dir), 'utf8'));
  assert.equal(stamp.walker, 'find');
  assert.ok(stamp.count > 2100);
  assert.ok(await unchangedPublication(plan, 'big', entries, opts));
  // The same fingerprints either way (types, modes, ns times, a symlink, a setuid bit).
  const probe = path.join(pub.dir, '..', 'probe');
  await fs.mkdir(path.join(probe, 'd'), { recursive: true });
  await fs.writeFile(path.join(probe, 'd', 'f'), 'x');
  await fs.chmod(path.join(probe, 'd', 'f'), 0o4755);
  await fs.symlink('d/f', path.join(probe, 'l'));
  assert.deepEqual(await findFingerprints(probe), await treeFingerprints(probe));
  // One object changed in place, size and mtime kept: find sees it too.
  const obj = path.join(pub.dir, 'objects', '7', '42');
  const st = await fs.stat(obj);
  await fs.writeFile(obj, '7/43\n');
  await fs.utimes(obj, st.atime, st.mtime);
  assert.equal(await unchangedPublication(plan, 'big', entries, opts), undefined);
  await publish(plan, 'big', entries, opts);
  assert.equal(await fs.readFile(obj, 'utf8'), '7/42\n');
  assert.ok(await unchangedPublication(plan, 'big', entries, opts));
});

test('a variant\'s manifest lists its stages in the same order whatever else is built with it', async () => {
  const { makeManifest } = await import('../../src/engine/publish.js');
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-publish-order-'));
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const src = `name: p
arches: [amd64]
stages:
  s1: { kind: text, with: { name: one.txt, content: "1" } }
  s2: { kind: text, with: { name: two.txt, content: "2" } }
  c: { kind: concat, inputs: { a: s1, b: s2 } }
variants:
  y: [s2]
  x: [c]
`;
  const plan = (vs: string[]) => compile(parseSpec(src, 'spec.yaml', kinds), 'amd64', vs, kinds, facts);
  const both = plan(['y', 'x']);
  const alone = plan(['x']);
  // The plan of both visits s2 first: filtering it gave x another stage order than x alone.
  assert.deepEqual(both.stages.map((s) => s.name), ['s2', 's1', 'c']);
  const r = await runPlan(both, { cache, specDir: dir, jobs: 2, logDir: path.join(dir, 'logs') });
  const m = (p: typeof both) => stableJson(makeManifest(p, 'x', r.entries, 't'));
  assert.equal(m(both), m(alone));
  assert.deepEqual(makeManifest(alone, 'x', r.entries, 't').stages.map((s) => s.name), ['s1', 's2', 'c']);
});

test('a signed publish leaves no stamp: the next unsigned build publishes again', async () => {
  const { build, opts, stampOf } = await setup();
  const { plan, entries } = await build('beta bytes');
  const first = await publish(plan, 'v', entries, opts);
  await fs.access(stampOf(first.dir));
  await publish(plan, 'v', entries, { ...opts, sign: (dir) => fs.writeFile(path.join(dir, 'provenance.sigstore.json'), '{}') });
  await assert.rejects(fs.access(stampOf(first.dir)), { code: 'ENOENT' });
  assert.equal(await unchangedPublication(plan, 'v', entries, opts), undefined);
  await publish(plan, 'v', entries, opts);
  await assert.rejects(fs.access(path.join(first.dir, 'provenance.sigstore.json')), { code: 'ENOENT' });
  assert.ok(await unchangedPublication(plan, 'v', entries, opts));
});
