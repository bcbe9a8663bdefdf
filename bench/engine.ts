// Engine benchmark, measured in one run and printed as figures and ratios:
//   cold build, warm no-op, one-param-changed rebuild of `amd64 ipxe`, and the
//   compile time of a generated 200-stage spec.
// Usage: node --import tsx bench/engine.ts [--spec FILE] [--skip-cold]
//   --skip-cold reuses the shared test cache (the cold figure is then omitted).
import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { compile } from '../src/engine/compile.js';
import { parseSpec } from '../src/engine/spec.js';
import { testKinds } from '../test/helpers/test-kinds.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const args = process.argv.slice(2);
const specArg = args.includes('--spec') ? path.resolve(args[args.indexOf('--spec') + 1]!) : path.join(ROOT, 'pipelines', 'powernode.yaml');
const skipCold = args.includes('--skip-cold');

function timeCli(argv: string[], env: Record<string, string>, cwd: string): { seconds: number; executed: string[] } {
  const t0 = performance.now();
  const r = spawnSync(process.execPath, [path.join(ROOT, 'bin', 'pipeline.js'), ...argv, '--json'], { cwd, env: { ...process.env, ...env }, encoding: 'utf8', maxBuffer: 64 << 20 });
  const seconds = (performance.now() - t0) / 1000;
  if (r.status !== 0) throw new Error(`pipeline ${argv.join(' ')} failed (${r.status}):\n${r.stderr}`);
  const summary = r.stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l)).find((e) => e.event === 'summary');
  return { seconds, executed: summary.executed };
}

function compileBench(): { ms: number } {
  const kinds = testKinds();
  const lines = ['name: big', 'arches: [amd64]', 'stages:', '  s0: { kind: text, with: { content: "0" } }', '  t0: { kind: text, with: { content: "t" } }'];
  for (let i = 1; i < 200; i++) lines.push(`  s${i}: { kind: concat, inputs: { a: s${i - 1}, b: t0 } }`);
  lines.push('variants:', '  v: [s199]');
  const text = lines.join('\n');
  const facts = { toolVersions: { sh: 'dash' }, assetDigests: {}, sourceDateEpoch: 0 };
  for (let i = 0; i < 5; i++) compile(parseSpec(text, 'big.yaml', kinds), 'amd64', ['v'], kinds, facts); // warm up the JIT
  const n = 50;
  const t0 = performance.now();
  for (let i = 0; i < n; i++) compile(parseSpec(text, 'big.yaml', kinds), 'amd64', ['v'], kinds, facts);
  return { ms: (performance.now() - t0) / n };
}

const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-bench-'));
const cache = skipCold ? (process.env.PIPELINE_TEST_CACHE ?? '/var/tmp/pipeline-test-cache') : path.join(work, 'cache');
const env = { PIPELINE_CACHE_DIR: cache };
const spec = path.join(work, path.basename(specArg));
await fs.writeFile(spec, await fs.readFile(specArg, 'utf8'));
// Spec copies must resolve repo assets (dracut modules) from the package: they do (fallback).

const rows: [string, number][] = [];
let cold: number | undefined;
if (!skipCold) {
  const c = timeCli(['build', 'amd64', 'ipxe', '-f', spec], env, work);
  cold = c.seconds;
  rows.push([`cold build (${c.executed.length} stages run)`, c.seconds]);
} else timeCli(['build', 'amd64', 'ipxe', '-f', spec], env, work);

const warm: number[] = [];
for (let i = 0; i < 5; i++) {
  const w = timeCli(['build', 'amd64', 'ipxe', '-f', spec], env, work);
  if (w.executed.length) throw new Error(`warm build ran stages: ${w.executed.join(', ')}`);
  warm.push(w.seconds);
}
warm.sort((a, b) => a - b);
const warmMedian = warm[2]!;
rows.push(['warm no-op build (median of 5, whole CLI process)', warmMedian]);

const text = await fs.readFile(spec, 'utf8');
const changed = text.replace(/cmdline: "([^"]*)"/, (_m, c: string) => `cmdline: "${c} bench.nonce=${process.pid}"`);
if (changed === text) throw new Error('could not find a cmdline var to change in the spec');
await fs.writeFile(spec, changed);
const one = timeCli(['build', 'amd64', 'ipxe', '-f', spec], env, work);
rows.push([`one param changed (reran: ${one.executed.join(', ')})`, one.seconds]);
await fs.writeFile(spec, text);

const comp = compileBench();

console.log(`pipeline engine benchmark — ${path.relative(ROOT, specArg)}, amd64 ipxe, ${os.availableParallelism()} cores`);
for (const [k, v] of rows) console.log(`  ${k.padEnd(58)} ${v.toFixed(3)} s`);
console.log(`  ${'compile a generated 200-stage spec (parse+validate+keys)'.padEnd(58)} ${comp.ms.toFixed(2)} ms`);
if (cold) console.log(`  ratio warm/cold: ${(warmMedian / cold).toFixed(5)}   one-param/cold: ${(one.seconds / cold).toFixed(4)}`);
console.log(`  targets: warm no-op ≤ 0.3 s (${warmMedian <= 0.3 ? 'met' : 'MISSED'}), one emitter rerun ≤ 2 s (${one.seconds <= 2 ? 'met' : 'MISSED'})`);
await fs.rm(work, { recursive: true, force: true });
