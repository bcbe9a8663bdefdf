// P4 — every variant at once: `build amd64 --all` with the rootfs and initramfs
// (every mmdebstrap and dracut stage) cached and every emitter forced, against the
// run's own critical path (the longest chain of stage times through the DAG).
// Target: wall ≤ 1.3× the critical path, and the rootfs unpacked once, shared.
// Usage (root): node --import tsx bench/all-variants.ts [--spec FILE] [--cache-dir DIR] [--out DIR] [--rounds N]
// Emitters are forced by removing their cache records (the blobs stay) and the
// shared unpacked rootfs, so each round pays for one unpack.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { arg, CLI, header, load, median, pipeline, run, s } from './lib.js';

const arch = arg('--arch', 'amd64');
const cacheDir = path.resolve(arg('--cache-dir', '/var/tmp/pipeline-bench/cache'));
const out = path.resolve(arg('--out', '/var/tmp/pipeline-bench/images'));
const rounds = Number(arg('--rounds', '1'));
const spec = arg('--spec', '');
// --spec: a frozen copy of the spec (and its dracut modules, via moduleDirs) keeps keys
// still while the checkout changes under a long benchmark.
const specArgs = spec ? ['-f', path.resolve(spec)] : [];
const common = ['--cache-dir', cacheDir, '--out', out, ...specArgs];
const UPSTREAM = new Set(['mmdebstrap', 'dracut']);

interface PlanStage {
  name: string;
  kind: string;
  key: string;
  inputs: Record<string, string>;
}

/** Longest chain of stage seconds ending at each stage; the max is the critical path. */
export function criticalPath(stages: PlanStage[], seconds: ReadonlyMap<string, number>): { seconds: number; chain: string[] } {
  const by = new Map(stages.map((x) => [x.name, x]));
  const memo = new Map<string, { seconds: number; chain: string[] }>();
  const visit = (n: string): { seconds: number; chain: string[] } => {
    const hit = memo.get(n);
    if (hit) return hit;
    let best = { seconds: 0, chain: [] as string[] };
    for (const i of Object.values(by.get(n)!.inputs)) {
      const c = visit(i);
      if (c.seconds > best.seconds) best = c;
    }
    const r = { seconds: best.seconds + (seconds.get(n) ?? 0), chain: [...best.chain, n] };
    memo.set(n, r);
    return r;
  };
  return stages.map((x) => visit(x.name)).reduce((a, b) => (b.seconds > a.seconds ? b : a), { seconds: 0, chain: [] });
}

header(`P4 build ${arch} --all, upstream cached, every emitter forced (${rounds} round(s), cache ${cacheDir})`);
const fill = pipeline(['build', arch, '--all', ...common]);
if (fill.executed.length) console.log(`  (filled the cache first: ran ${fill.executed.join(', ')} in ${s(fill.wall)})`);
const plan = JSON.parse(run(process.execPath, [CLI, 'plan', arch, '--all', '--json', '--cache-dir', cacheDir, ...specArgs]).stdout) as { stages: PlanStage[]; spec: { name: string } };
const emitters = plan.stages.filter((x) => !UPSTREAM.has(x.kind));
const upstream = plan.stages.filter((x) => UPSTREAM.has(x.kind));

const ratios: number[] = [];
for (let i = 0; i < rounds; i++) {
  for (const e of emitters) {
    await fs.rm(path.join(cacheDir, 'entries', `${e.key}.json`), { force: true });
    await fs.rm(path.join(cacheDir, 'trees', e.key), { recursive: true, force: true });
  }
  for (const u of upstream) await fs.rm(path.join(cacheDir, 'unpacked', u.key), { recursive: true, force: true });
  const r = pipeline(['build', arch, '--all', ...common]);
  const ran = new Set(r.executed);
  const missing = emitters.filter((e) => !ran.has(e.name)).map((e) => e.name);
  const extra = upstream.filter((u) => ran.has(u.name)).map((u) => u.name);
  if (missing.length || extra.length) throw new Error(`not the intended run: emitters not run ${missing.join(', ') || '-'}; upstream run ${extra.join(', ') || '-'}`);
  const secs = new Map(r.stages.filter((x) => x.status === 'built').map((x) => [x.name, x.seconds]));
  const cp = criticalPath(plan.stages, secs);
  // How often a rootfs was unpacked this round: tar --extract lines in the stage logs.
  const logDir = path.join(cacheDir, 'logs', plan.spec.name, arch);
  let unpacks = 0;
  for (const e of emitters) {
    const text = await fs.readFile(path.join(logDir, `${e.name}.log`), 'utf8').catch(() => '');
    unpacks += text.split('\n').filter((l) => l.startsWith('$ tar ') && l.includes('--extract') && l.includes('--same-owner')).length;
  }
  const ratio = r.wall / cp.seconds;
  ratios.push(ratio);
  console.log(`  round ${i + 1}: wall ${s(r.wall)}, critical path ${s(cp.seconds)} (${cp.chain.filter((n) => secs.has(n)).join(' → ')}), ratio ${ratio.toFixed(2)}×; rootfs unpacked ${unpacks}×; load ${load()}`);
  console.log(`    stages: ${[...secs].map(([n, t]) => `${n} ${s(t)}`).join(', ')}; sum ${s([...secs.values()].reduce((a, b) => a + b, 0))}`);
}
const m = median(ratios);
console.log(`P4 wall / critical path = ${m.toFixed(2)}× (target ≤ 1.3×) ${m <= 1.3 ? 'MET' : 'NOT MET'}; load average at end ${load()}`);
