// Parallel emitters from one rootfs (issue: raw, iso, qcow2, ipxe), measured in one run:
//   - wall time of `build amd64 raw iso qcow2 ipxe` with the rootfs and initramfs
//     cached and every emitter forced to rerun, against the sum of the emitter
//     stage times (parallel efficiency = sum / wall);
//   - the time of each emitter alone.
// Emitters are forced to rerun by deleting their cache records (the blobs stay).
// Usage: node --import tsx bench/emitters.ts [--spec FILE] [--jobs N]
import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

const ROOT = path.resolve(import.meta.dirname, '..');
const args = process.argv.slice(2);
const spec = args.includes('--spec') ? path.resolve(args[args.indexOf('--spec') + 1]!) : path.join(ROOT, 'fixtures', 'minimal.yaml');
const jobs = args.includes('--jobs') ? args[args.indexOf('--jobs') + 1]! : String(os.availableParallelism());
const cache = process.env.PIPELINE_TEST_CACHE ?? '/var/tmp/pipeline-test-cache';
const variants = ['raw', 'iso', 'qcow2', 'ipxe'];
const out = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-bench-emit-'));

interface StageRes { name: string; kind: string; status: string; seconds: number; startedAt?: number; endedAt?: number }

function run(argv: string[]): { wall: number; stages: StageRes[] } {
  const t0 = performance.now();
  const r = spawnSync(process.execPath, [path.join(ROOT, 'bin', 'pipeline.js'), ...argv, '-f', spec, '--out', out, '--jobs', jobs, '--json'], {
    env: { ...process.env, PIPELINE_CACHE_DIR: cache },
    encoding: 'utf8',
    maxBuffer: 64 << 20,
  });
  const wall = (performance.now() - t0) / 1000;
  if (r.status !== 0) throw new Error(`pipeline ${argv.join(' ')} failed:\n${r.stderr}`);
  const summary = r.stdout.split('\n').filter((l) => l.startsWith('{"event"')).map((l) => JSON.parse(l)).find((e) => e.event === 'summary');
  return { wall, stages: summary.stages };
}

function keys(vs: string[]): Map<string, string> {
  const r = spawnSync(process.execPath, [path.join(ROOT, 'bin', 'pipeline.js'), 'plan', 'amd64', ...vs, '-f', spec, '--json'], { env: { ...process.env, PIPELINE_CACHE_DIR: cache }, encoding: 'utf8' });
  return new Map((JSON.parse(r.stdout).stages as { name: string; key: string }[]).map((s) => [s.name, s.key]));
}

async function forget(stages: string[], k: Map<string, string>): Promise<void> {
  for (const s of stages) await fs.rm(path.join(cache, 'entries', `${k.get(s)}.json`), { force: true });
}

run(['build', 'amd64', ...variants]); // warm everything upstream
const k = keys(variants);
const emitters = ['raw', 'iso', 'qcow2', 'ipxe'];
await forget(emitters, k);
const par = run(['build', 'amd64', ...variants]);
const built = par.stages.filter((s) => s.status === 'built');
const sum = built.reduce((a, s) => a + s.seconds, 0);
const overlaps = built.filter((a) => built.some((b) => b !== a && a.startedAt! < b.endedAt! && b.startedAt! < a.endedAt!)).map((s) => s.name);

const alone: [string, number][] = [];
for (const e of emitters) {
  await forget([e], k);
  const r = run(['build', 'amd64', e]);
  alone.push([e, r.stages.find((s) => s.name === e)!.seconds]);
}

console.log(`parallel emitters — ${path.relative(ROOT, spec)}, amd64, --jobs ${jobs}, ${os.availableParallelism()} cores`);
console.log(`  build amd64 ${variants.join(' ')} (emitters rerun, rootfs+initramfs cached): wall ${par.wall.toFixed(1)} s`);
for (const s of built) console.log(`    ${s.name.padEnd(8)} ${s.seconds.toFixed(1)} s  [${s.startedAt!.toFixed(1)} → ${s.endedAt!.toFixed(1)}]`);
console.log(`  sum of emitter stage times ${sum.toFixed(1)} s; parallel efficiency (sum / wall) ${(sum / par.wall).toFixed(2)}× (ideal ${jobs}×)`);
console.log(`  stages that overlapped another: ${overlaps.join(', ') || 'none'}`);
console.log('  each emitter alone:');
for (const [e, s] of alone) console.log(`    ${e.padEnd(8)} ${s.toFixed(1)} s`);
await fs.rm(out, { recursive: true, force: true });
