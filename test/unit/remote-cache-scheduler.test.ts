// The engine's remote hook, with a real store standing in for the registry: a
// second local cache directory behind the RemoteStore interface (the registry
// implementation is tested against a real registry in test/integration/). Checks
// what the scheduler asks for and in which order, what it reports as pulled, what
// it hands over to push, and that read-only and failing stores change nothing else.
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Cache, type Entry } from '../../src/engine/cache.js';
import { compile, type Facts } from '../../src/engine/compile.js';
import type { RemoteStore } from '../../src/engine/remote.js';
import { runPlan } from '../../src/engine/scheduler.js';
import { parseSpec } from '../../src/engine/spec.js';
import { testKinds } from '../helpers/test-kinds.js';

const kinds = testKinds();
const facts: Facts = { toolVersions: { sh: 'dash' }, assetDigests: {}, sourceDateEpoch: 0 };
const SPEC = `name: r
arches: [amd64]
stages:
  a: { kind: text, with: { content: a } }
  b: { kind: text, with: { content: b } }
  ab: { kind: concat, inputs: { a: a, b: b } }
  top: { kind: concat, inputs: { a: ab, b: b } }
variants:
  mid: [ab]
  top: [top]
`;
const plan = (variants: string[]) => compile(parseSpec(SPEC, 'spec.yaml', kinds), 'amd64', variants, kinds, facts);

/** A RemoteStore backed by another cache directory: fetch copies an entry's blobs in and commits them against the record. */
class DirStore implements RemoteStore {
  asked: string[] = [];
  stored: string[] = [];
  constructor(
    readonly remote: Cache,
    readonly readOnly = false,
  ) {}
  async fetch(key: string, stage: string, cache: Cache): Promise<Entry | undefined> {
    this.asked.push(stage);
    const e = await this.remote.lookup(key);
    if (!e) return undefined;
    const dir = await cache.staging('pull');
    for (const f of e.files) {
      await fs.mkdir(path.dirname(path.join(dir, f.path)), { recursive: true });
      await fs.copyFile(this.remote.blobPath(f.sha256), path.join(dir, f.path));
    }
    return cache.commit(key, stage, e.parts, dir, e.meta, { expect: e.files });
  }
  async store(entry: Entry, cache: Cache): Promise<void> {
    this.stored.push(entry.stage);
    const dir = await this.remote.staging('push');
    for (const f of entry.files) await fs.copyFile(cache.blobPath(f.sha256), path.join(dir, f.path));
    await this.remote.commit(entry.key, entry.stage, entry.parts, dir, entry.meta);
  }
}

async function fresh(root: string, name: string): Promise<Cache> {
  const c = new Cache(path.join(root, name));
  await c.init();
  return c;
}

test('a job pulls what another pushed, most downstream first, and never looks upstream of a pulled stage', async () => {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-remote-sched-'));
  const remote = await fresh(root, 'remote');
  // Job 1: builds `mid` and pushes a, b, ab.
  const s1 = new DirStore(remote);
  const c1 = await fresh(root, 'c1');
  const r1 = await runPlan(plan(['mid']), { cache: c1, specDir: root, jobs: 2, logDir: path.join(root, 'l1'), remote: s1 });
  assert.deepEqual(r1.results.map((r) => r.status), ['built', 'built', 'built']);
  assert.deepEqual(s1.asked, ['ab', 'b', 'a'], 'looked up downstream first');
  assert.deepEqual(s1.stored.sort(), ['a', 'ab', 'b']);

  // Job 2: `top` needs ab and b; ab is pulled, so a is never looked at; b is pulled too.
  const s2 = new DirStore(remote);
  const c2 = await fresh(root, 'c2');
  const r2 = await runPlan(plan(['top']), { cache: c2, specDir: root, jobs: 2, logDir: path.join(root, 'l2'), remote: s2 });
  const st = Object.fromEntries(r2.results.map((r) => [r.name, r.status]));
  assert.deepEqual(st, { a: 'unused', b: 'pulled', ab: 'pulled', top: 'built' });
  assert.deepEqual(s2.asked, ['top', 'ab', 'b']);
  assert.deepEqual(s2.stored, ['top'], 'only what this job built is pushed');
  // The pulled entries are real local entries now: a second run is all cached, no remote needed.
  const r3 = await runPlan(plan(['top']), { cache: c2, specDir: root, jobs: 2, logDir: path.join(root, 'l3') });
  assert.deepEqual(Object.fromEntries(r3.results.map((r) => [r.name, r.status])), { a: 'unused', b: 'cached', ab: 'cached', top: 'cached' });
  await fs.rm(root, { recursive: true, force: true });
});

test('read-only stores are never handed a stage; a store that finds nothing changes nothing', async () => {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-remote-sched-'));
  const ro = new DirStore(await fresh(root, 'remote'), true);
  const r = await runPlan(plan(['top']), { cache: await fresh(root, 'c'), specDir: root, jobs: 2, logDir: path.join(root, 'l'), remote: ro });
  assert.ok(r.results.every((x) => x.status === 'built'));
  assert.deepEqual(ro.stored, []);
  assert.equal(ro.asked.length, 4);
  await fs.rm(root, { recursive: true, force: true });
});

test('an import that does not match its record is refused: no record is written', async () => {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-remote-sched-'));
  const remote = await fresh(root, 'remote');
  const c1 = await fresh(root, 'c1');
  await runPlan(plan(['mid']), { cache: c1, specDir: root, jobs: 2, logDir: path.join(root, 'l1'), remote: new DirStore(remote) });
  const key = plan(['mid']).stages.find((s) => s.name === 'ab')!.key;
  const e = (await remote.lookup(key))!;
  const c2 = await fresh(root, 'c2');
  const dir = await c2.staging('pull');
  await fs.writeFile(path.join(dir, e.files[0]!.path), 'other bytes');
  await assert.rejects(c2.commit(key, 'ab', e.parts, dir, e.meta, { expect: e.files }), /does not match its record/);
  assert.equal(await c2.lookup(key), undefined);
  await fs.rm(root, { recursive: true, force: true });
});
