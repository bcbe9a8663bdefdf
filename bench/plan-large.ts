// `plan` of a generated 2,000-stage spec through the CLI (node bin/pipeline.js),
// the way a user runs it: process start, kind discovery, parse, path checks,
// tool-version memo, compile and JSON output. Target: ≤ 0.5 s.
// Usage: npx tsc -p tsconfig.json && node --import tsx bench/plan-large.ts [--stages N]
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

const ROOT = path.resolve(import.meta.dirname, '..');
const TARGET_S = 0.5;
const args = process.argv.slice(2);
const stages = args.includes('--stages') ? Number(args[args.indexOf('--stages') + 1]) : 2000;

/** Groups of 4 real stages: rootfs -> initramfs -> kernel-initrd and ipxe. */
export function largeSpec(n: number): string {
  const lines = ['name: large', 'arches: [amd64, arm64]', 'vars:', '  console: { amd64: ttyS0, arm64: ttyAMA0 }', 'stages:'];
  const sinks: string[] = [];
  for (let i = 0; i < n / 4; i++) {
    lines.push(
      `  r${i}: { kind: mmdebstrap, with: { packages: ["linux-image-\${arch}", dracut-core, pkg${i}] } }`,
      `  d${i}: { kind: dracut, inputs: { rootfs: r${i} }, with: { modules: [powernode], drivers: [virtio_blk] } }`,
      `  k${i}: { kind: kernel-initrd, inputs: { boot: d${i} }, with: { cmdline: "console=\${console} n=${i}" } }`,
      `  x${i}: { kind: ipxe, inputs: { boot: d${i} }, with: { cmdline: "console=\${console} n=${i}" } }`,
    );
    sinks.push(`k${i}`, `x${i}`);
  }
  lines.push('variants:', `  all: [${sinks.join(', ')}]`, '');
  return lines.join('\n');
}

const dir = mkdtempSync(path.join(os.tmpdir(), 'plan-large-'));
try {
  const spec = path.join(dir, 'large.yaml');
  writeFileSync(spec, largeSpec(stages));
  const cache = path.join(dir, 'cache');
  mkdirSync(cache); // an existing cache, as after a first build: tool versions are memoised there
  // CPU time (user+sys) of the child is printed too: on a shared machine the wall
  // time mostly measures the other load. bash's `times` reports the child's.
  const run = () => {
    const t0 = performance.now();
    const r = spawnSync('bash', ['-c', '"$@" > "$OUT"; s=$?; times >&2; exit $s', 'bash', process.execPath, path.join(ROOT, 'bin', 'pipeline.js'), 'plan', 'amd64', 'all', '-f', spec, '--json'], {
      cwd: dir,
      env: { ...process.env, PIPELINE_CACHE_DIR: cache, OUT: path.join(dir, 'plan.json') },
      encoding: 'utf8',
    });
    const s = (performance.now() - t0) / 1000;
    if (r.status !== 0) throw new Error(`plan failed (${r.status}):\n${r.stderr}`);
    // `times` prints the shell's own line, then the children's: "0m0.512s 0m0.061s".
    const child = r.stderr.trim().split('\n').pop()!.match(/(\d+)m([\d.]+)s (\d+)m([\d.]+)s/)!;
    const cpu = Number(child[1]) * 60 + Number(child[2]) + Number(child[3]) * 60 + Number(child[4]);
    const planned = JSON.parse(readFileSync(path.join(dir, 'plan.json'), 'utf8')).stages.length as number;
    return { s, cpu, planned };
  };
  run(); // warm the tool-version memo and the file cache
  // `times` is cumulative over the shell's children; each run has its own shell.
  const runs = [run(), run(), run()];
  const wall = runs.map((r) => r.s).sort((a, b) => a - b)[1]!;
  const cpu = runs.map((r) => r.cpu).sort((a, b) => a - b)[1]!;
  console.log(`plan of a ${stages}-stage spec (${runs[0]!.planned} stages planned) via the CLI: wall ${wall.toFixed(3)} s, CPU ${cpu.toFixed(3)} s (medians of 3; load average ${os.loadavg()[0]!.toFixed(1)} on ${os.availableParallelism()} cores)`);
  console.log(`target ${TARGET_S} s; ratio to target: wall ${(wall / TARGET_S).toFixed(2)}, CPU ${(cpu / TARGET_S).toFixed(2)}`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
