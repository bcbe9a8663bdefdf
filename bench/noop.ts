// P1 — the no-op: every variant, all cached, against a bare `node -e 0`, alternated
// in one run. Target: each build ≤ 3× node's start.
// Usage: node --import tsx bench/noop.ts [--spec FILE] [--cache-dir DIR] [--out DIR] [--rounds N] [--arch amd64]
// The first `build --all` fills the cache if needed (that can take many minutes cold).
import path from 'node:path';
import { arg, CLI, header, load, median, pipeline, run, s } from './lib.js';

const arch = arg('--arch', 'amd64');
const cacheDir = path.resolve(arg('--cache-dir', '/var/tmp/pipeline-bench/cache'));
const out = path.resolve(arg('--out', '/var/tmp/pipeline-bench/images'));
const rounds = Number(arg('--rounds', '7'));
const spec = arg('--spec', '');
// --spec: a frozen copy of the spec (and its dracut modules, via moduleDirs) keeps keys
// still while the checkout changes under a long benchmark.
const specArgs = spec ? ['-f', path.resolve(spec)] : [];
const common = ['--cache-dir', cacheDir, '--out', out, ...specArgs];

header(`P1 no-op (${arch}, ${rounds} rounds, cache ${cacheDir})`);
const warm = pipeline(['build', arch, '--all', ...common]);
if (warm.executed.length) console.log(`  (filled the cache first: ran ${warm.executed.join(', ')} in ${s(warm.wall)})`);
const variants = listVariants();

function listVariants(): string[] {
  const plan = JSON.parse(run(process.execPath, [CLI, 'plan', arch, '--all', '--json', '--cache-dir', cacheDir, ...specArgs]).stdout) as { sinks: Record<string, string[]> };
  return Object.keys(plan.sinks).sort();
}

const cases: { label: string; argv?: string[] }[] = [{ label: 'node -e 0' }, ...variants.map((v) => ({ label: `build ${arch} ${v}`, argv: ['build', arch, v, ...common] })), { label: `build ${arch} --all`, argv: ['build', arch, '--all', ...common] }];
const times = new Map<string, number[]>(cases.map((c) => [c.label, []]));
// CPU (user+sys) too: on a shared, loaded machine wall time mostly measures the queue.
const cpus = new Map<string, number[]>(cases.map((c) => [c.label, []]));
for (let i = 0; i < rounds; i++) {
  for (const c of cases) {
    if (!c.argv) {
      const r = run(process.execPath, ['-e', '0']);
      times.get(c.label)!.push(r.wall);
      cpus.get(c.label)!.push(r.cpu);
      continue;
    }
    const r = pipeline(c.argv);
    if (r.executed.length) throw new Error(`${c.label} was not a no-op: ran ${r.executed.join(', ')}`);
    times.get(c.label)!.push(r.wall);
    cpus.get(c.label)!.push(r.cpu);
  }
}
const base = median(times.get('node -e 0')!);
const cpuBase = median(cpus.get('node -e 0')!);
let worst = 0;
let worstCpu = 0;
for (const c of cases) {
  const m = median(times.get(c.label)!);
  const ratio = m / base;
  if (c.argv) worst = Math.max(worst, ratio);
  const cm = median(cpus.get(c.label)!);
  if (c.argv && cpuBase > 0) worstCpu = Math.max(worstCpu, cm / cpuBase);
  const cpuRatio = c.argv && cpuBase > 0 ? `, cpu ${(cm / cpuBase).toFixed(2)}×` : '';
  console.log(`  ${c.label.padEnd(34)} median ${s(m)}${c.argv ? `  ${ratio.toFixed(2)}× node` : ''}  (cpu ${cm.toFixed(3)} s${cpuRatio})`);
}
// The CPU ratio (10 ms clock ticks) is the steadier one when other jobs share the cores.
console.log(`P1 worst ratio ${worst.toFixed(2)}× (target ≤ 3×) ${worst <= 3 ? 'MET' : 'NOT MET'}; worst cpu ratio ${worstCpu.toFixed(2)}×; load average at end ${load()}`);
