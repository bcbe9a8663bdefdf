// The cache owns its bookkeeping: a build reads each record once (lookupAll),
// passes the result to the scheduler, and writes history and LRU use through
// one call (recordBuild).
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { build } from '../../src/engine/build.js';
import { Cache } from '../../src/engine/cache.js';

const SPEC = `name: books
arches: [amd64]
source_date_epoch: 1704067200
stages:
  base: { kind: fixed-text, with: { name: t.txt, content: "x" } }
  copy: { kind: collect, inputs: { src: base } }
variants:
  v: [copy]
`;

test('a build looks each key up once, through lookupAll, and records history and use through recordBuild', async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-books-'));
  const spec = path.join(dir, 'spec.yaml');
  await fs.writeFile(spec, SPEC);
  const prev = process.env.PIPELINE_KINDS_PATH;
  process.env.PIPELINE_KINDS_PATH = path.resolve('fixtures/kinds');
  t.after(() => (prev === undefined ? delete process.env.PIPELINE_KINDS_PATH : (process.env.PIPELINE_KINDS_PATH = prev)));
  const calls = { lookupAll: [] as string[][], lookup: 0, writeHistory: 0, touch: 0, recordBuild: 0 };
  const proto = Cache.prototype as unknown as Record<string, (...a: unknown[]) => unknown>;
  for (const m of ['lookupAll', 'lookup', 'writeHistory', 'touch', 'recordBuild'] as const) {
    const orig = proto[m]!;
    t.mock.method(proto, m, function (this: unknown, ...a: unknown[]) {
      if (m === 'lookupAll') calls.lookupAll.push([...(a[0] as Iterable<string>)]);
      else calls[m]++;
      return orig.apply(this, a);
    });
  }
  const opts = { arch: 'amd64', variants: ['v'], file: spec, cacheDir: path.join(dir, 'cache'), outDir: path.join(dir, 'images') };
  const first = await build(opts);
  const keys = first.prepared.plan.stages.map((s) => s.key);
  assert.deepEqual(calls.lookupAll, [keys]);
  assert.equal(calls.lookup, 0);
  assert.equal(calls.recordBuild, 1);
  assert.equal(calls.writeHistory, 2, 'history for each stage, from recordBuild');
  const c = new Cache(path.join(dir, 'cache'));
  assert.equal((await c.readHistory('books', 'amd64', 'copy'))!.key, keys[1]);

  calls.lookupAll = [];
  const second = await build(opts);
  assert.deepEqual(calls.lookupAll, [keys], 'a no-op build reads the plan once too');
  assert.equal(calls.lookup, 0);
  assert.deepEqual(second.outcome.results.map((r) => r.status), ['cached', 'cached']);
  assert.equal(calls.touch, 2 + 2, 'one LRU touch per entry per build');
});
