import assert from 'node:assert/strict';
import { existsSync, promises as fs, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Cache } from '../../src/engine/cache.js';
import { compile, type Facts, type PlanStage } from '../../src/engine/compile.js';
import { BuildError } from '../../src/engine/errors.js';
import { PriorityPool, remainingPaths, runPlan, type Reporter, type StageResult } from '../../src/engine/scheduler.js';
import { parseSpec } from '../../src/engine/spec.js';
import { testKinds } from '../helpers/test-kinds.js';

const kinds = testKinds();
const facts: Facts = { toolVersions: { sh: 'dash' }, assetDigests: {}, sourceDateEpoch: 0 };

async function tmp(): Promise<string> {
  return fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-sched-'));
}

function plan(text: string, variants: string[]) {
  return compile(parseSpec(text, 'spec.yaml', kinds), 'amd64', variants, kinds, facts);
}

/** Counts how many stages run at the same time (no clocks involved). */
function concurrency(): Reporter & { max: number; heavyMax: number } {
  let cur = 0;
  let heavy = 0;
  const r = {
    max: 0,
    heavyMax: 0,
    start(st: PlanStage) {
      cur++;
      if (st.heavy) heavy++;
      r.max = Math.max(r.max, cur);
      r.heavyMax = Math.max(r.heavyMax, heavy);
    },
    done(st: PlanStage, res: StageResult) {
      if (res.status === 'built' || res.status === 'failed' || (res.status === 'cancelled' && res.startedAt !== undefined)) {
        cur--;
        if (st.heavy) heavy--;
      }
    },
  };
  return r;
}

const PAR = `name: p
arches: [amd64]
stages:
  a: { kind: text, with: { content: a, sleep: 0.3 } }
  b: { kind: text, with: { content: b, sleep: 0.3 } }
  c: { kind: text, with: { content: c, sleep: 0.3 } }
  ab: { kind: concat, inputs: { a: a, b: b } }
  abc: { kind: concat, inputs: { a: ab, b: c } }
variants:
  v: [abc]
`;

test('independent stages run at the same time, bounded by jobs; a rebuild runs nothing', async () => {
  const dir = await tmp();
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const p = plan(PAR, ['v']);
  const rep = concurrency();
  const r1 = await runPlan(p, { cache, specDir: dir, jobs: 2, reporter: rep, logDir: path.join(dir, 'logs') });
  assert.equal(rep.max, 2);
  assert.deepEqual(r1.results.map((r) => r.status), ['built', 'built', 'built', 'built', 'built']);
  const out = r1.entries.get('abc')!;
  assert.equal(await fs.readFile(cache.blobPath(out.files[0]!.sha256), 'utf8'), 'a+b+c');

  const rep3 = concurrency();
  const dir3 = await tmp();
  const c3 = new Cache(path.join(dir3, 'cache'));
  await c3.init();
  await runPlan(p, { cache: c3, specDir: dir, jobs: 3, reporter: rep3, logDir: path.join(dir3, 'logs') });
  assert.equal(rep3.max, 3);

  const r2 = await runPlan(p, { cache, specDir: dir, jobs: 2, logDir: path.join(dir, 'logs') });
  assert.deepEqual(r2.results.filter((r) => r.status === 'built'), []);
  // Only the sink is needed; upstream hits are not even verified or materialised.
  assert.equal(r2.results.find((r) => r.name === 'abc')!.status, 'cached');
});

test('changing one param reruns only that stage and what is downstream of it', async () => {
  const dir = await tmp();
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  await runPlan(plan(PAR, ['v']), { cache, specDir: dir, jobs: 2, logDir: dir });
  const r = await runPlan(plan(PAR.replace('content: c,', 'content: C,'), ['v']), { cache, specDir: dir, jobs: 2, logDir: dir });
  const built = r.results.filter((x) => x.status === 'built').map((x) => x.name);
  assert.deepEqual(built, ['c', 'abc']);
});

test('heavy stages run one at a time', async () => {
  const dir = await tmp();
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const spec = `name: h
arches: [amd64]
stages:
  h1: { kind: heavy-sleep, with: { seconds: 0.2 } }
  h2: { kind: heavy-sleep, with: { seconds: 0.3 } }
  l1: { kind: text, with: { content: x, sleep: 0.4 } }
  j: { kind: concat, inputs: { a: h1, b: h2 } }
  k: { kind: concat, inputs: { a: j, b: l1 } }
variants:
  v: [k]
`;
  const rep = concurrency();
  await runPlan(plan(spec, ['v']), { cache, specDir: dir, jobs: 4, reporter: rep, logDir: dir });
  assert.equal(rep.heavyMax, 1);
  assert.equal(rep.max, 2, 'a light stage still runs beside the heavy one');
});

// The sleep records its pid as the host sees it (/proc is the host's): $! would be
// its pid inside the stage's PID namespace (src/engine/process.ts).
const FAIL = (pidFile: string) => `name: f
arches: [amd64]
stages:
  bad: { kind: shell, with: { script: "echo partial > $1/half; echo about to fail; sleep 0.3; exit 3" } }
  slow: { kind: shell, with: { script: "(read pid _ < /proc/self/stat; echo $pid > ${pidFile}; exec sleep 100) & echo started > $1/x; wait" } }
  j: { kind: concat, inputs: { a: bad, b: slow } }
variants:
  v: [j]
`;

/** Running (a zombie waiting for init to reap it counts as dead). */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

test('a failing stage cancels the others: processes killed, nothing partial kept', async () => {
  const dir = await tmp();
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const pidFile = path.join(dir, 'sleep.pid');
  const p = plan(FAIL(pidFile), ['v']);
  await assert.rejects(
    runPlan(p, { cache, specDir: dir, jobs: 2, logDir: path.join(dir, 'logs') }),
    (e: unknown) => {
      assert.ok(e instanceof BuildError);
      assert.match(e.message, /stage bad \(shell\) failed: sh exited with code 3/);
      assert.match(e.detail, /about to fail/);
      const results = (e as unknown as { results: StageResult[] }).results;
      assert.equal(results.find((r) => r.name === 'slow')!.status, 'cancelled');
      return true;
    },
  );
  const pid = Number(await fs.readFile(pidFile, 'utf8'));
  assert.equal(alive(pid), false, 'the grandchild sleep was killed with its process group');
  assert.deepEqual(await fs.readdir(path.join(cache.root, 'entries')), []);
  assert.deepEqual(await fs.readdir(path.join(cache.root, 'tmp')), [], 'staging dirs removed');
  assert.deepEqual(await fs.readdir(path.join(cache.root, 'blobs', 'sha256')), [], 'no blob from the half-written output');
});

test('an outer abort (Ctrl-C) stops running stages and keeps nothing', async () => {
  const dir = await tmp();
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const pidFile = path.join(dir, 'sleep.pid');
  const spec = FAIL(pidFile).replace('exit 3', 'exit 0');
  const ac = new AbortController();
  const started = runPlan(plan(spec, ['v']), { cache, specDir: dir, jobs: 2, signal: ac.signal, logDir: dir });
  while (!existsSync(pidFile)) await new Promise((r) => setTimeout(r, 20));
  ac.abort(new Error('SIGINT'));
  await assert.rejects(started, /interrupted/);
  assert.equal(alive(Number(await fs.readFile(pidFile, 'utf8'))), false);
  const entries = await fs.readdir(path.join(cache.root, 'entries'));
  // `bad` may have finished before the abort; `slow` and `j` never complete.
  assert.ok(entries.length <= 1);
  assert.deepEqual(await fs.readdir(path.join(cache.root, 'tmp')), []);
});

test('a corrupted cache blob is detected on reuse and rebuilt', async () => {
  const dir = await tmp();
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const p = plan(PAR, ['v']);
  const r1 = await runPlan(p, { cache, specDir: dir, jobs: 2, logDir: dir });
  const blob = cache.blobPath(r1.entries.get('abc')!.files[0]!.sha256);
  await fs.chmod(blob, 0o644);
  await fs.writeFile(blob, 'tampered');
  const warnings: string[] = [];
  const r2 = await runPlan(p, { cache, specDir: dir, jobs: 2, logDir: dir, reporter: { start() {}, done() {}, line: (_s, l) => warnings.push(l) } });
  assert.match(warnings.join('\n'), /corrupt/);
  assert.equal(r2.results.find((r) => r.name === 'abc')!.status, 'built');
  assert.equal(await fs.readFile(cache.blobPath(r2.entries.get('abc')!.files[0]!.sha256), 'utf8'), 'a+b+c');
});

test('remainingPaths: own estimate plus the longest consumer chain; unknown stages count the known mean', () => {
  const stages: { name: string; inputs: Record<string, string> }[] = [
    { name: 'r', inputs: {} },
    { name: 'short', inputs: { a: 'r' } },
    { name: 'long', inputs: { a: 'r' } },
    { name: 'tail', inputs: { a: 'long' } },
    { name: 'cached', inputs: {} },
  ];
  const run = new Set(['r', 'short', 'long', 'tail']);
  const p = remainingPaths(stages, run, new Map([['short', 5], ['long', 50], ['tail', 30]]));
  assert.equal(p.get('tail'), 30);
  assert.equal(p.get('long'), 80);
  assert.equal(p.get('short'), 5);
  assert.equal(p.get('r'), (5 + 50 + 30) / 3 + 80, 'r: unknown, the mean of the known, then its longest consumer');
  assert.equal(p.has('cached'), false, 'a stage that does not run has no priority');
  // Nothing known (a first build): chain length decides.
  const q = remainingPaths(stages, run, new Map());
  assert.deepEqual([q.get('r'), q.get('long'), q.get('short')], [3, 2, 1]);
});

test('PriorityPool: tasks queued together start highest priority first, bounded by its slots', async () => {
  const pool = new PriorityPool(1);
  const order: string[] = [];
  let running = 0;
  let max = 0;
  const task = (name: string) => async () => {
    running++;
    max = Math.max(max, running);
    order.push(name);
    await new Promise((r) => setTimeout(r, 5));
    running--;
  };
  await Promise.all([pool.run(1, task('low')), pool.run(9, task('high')), pool.run(5, task('mid')), pool.run(5, task('mid2'))]);
  assert.deepEqual(order, ['high', 'mid', 'mid2', 'low']);
  assert.equal(max, 1);
});

test('the stage with the longest remaining path (last run\'s times) starts first, not plan order', async () => {
  const dir = await tmp();
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const spec = `name: o
arches: [amd64]
stages:
  quick: { kind: text, with: { content: q, sleep: 0.05 } }
  slow: { kind: text, with: { content: s, sleep: 0.05 } }
  after: { kind: concat, inputs: { a: slow, b: quick } }
variants:
  v: [after]
`;
  const logDir = path.join(dir, 'logs');
  await fs.mkdir(logDir);
  await fs.writeFile(path.join(logDir, 'durations.json'), JSON.stringify({ quick: 1, slow: 60, after: 1 }));
  const started: string[] = [];
  const r = await runPlan(plan(spec, ['v']), { cache, specDir: dir, jobs: 1, logDir, reporter: { start: (st) => started.push(st.name), done: () => {} } });
  assert.deepEqual(started, ['slow', 'quick', 'after']);
  // This run's times replace the hints.
  const d = JSON.parse(await fs.readFile(path.join(logDir, 'durations.json'), 'utf8')) as Record<string, number>;
  assert.ok(d.slow! < 60 && d.slow! >= 0.05, `slow recorded as ${d.slow}`);
  assert.equal(r.results.filter((x) => x.status === 'built').length, 3);
});
