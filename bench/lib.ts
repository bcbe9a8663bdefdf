// What the speed benchmarks (cold-vs-mkosi, noop, all-variants) share: timing a
// whole child process (wall, and the CPU of everything it waited for), the pipeline
// CLI's JSON summary, medians and the machine's load, which matters on a shared
// 2-core machine: ratios are only meaningful when both sides ran in the same run.
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

export const ROOT = path.resolve(import.meta.dirname, '..');
export const CLI = path.join(ROOT, 'bin', 'pipeline.js');

export interface Timed {
  wall: number;
  /** user + system CPU seconds of the child and everything it waited for. */
  cpu: number;
  stdout: string;
  stderr: string;
  status: number | null;
}

/** utime+stime of our waited-for children so far (/proc/self/stat cutime, cstime), in seconds. */
function childCpu(): number {
  const f = readFileSync('/proc/self/stat', 'utf8');
  const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
  // fields 16 and 17 (1-based) are cutime, cstime; rest[0] is field 3.
  return (Number(rest[13]) + Number(rest[14])) / 100;
}

export function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string; check?: boolean } = {}): Timed {
  const c0 = childCpu();
  const t0 = performance.now();
  const r = spawnSync(cmd, args, { cwd: opts.cwd ?? ROOT, env: opts.env ?? process.env, encoding: 'utf8', maxBuffer: 256 << 20 });
  const wall = (performance.now() - t0) / 1000;
  const out: Timed = { wall, cpu: childCpu() - c0, stdout: r.stdout ?? '', stderr: r.stderr ?? '', status: r.status };
  if ((opts.check ?? true) && r.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal}):\n${out.stderr.slice(-4000)}${out.stdout.slice(-2000)}`);
  }
  return out;
}

export interface StageRow {
  name: string;
  kind: string;
  status: string;
  seconds: number;
  startedAt?: number;
  endedAt?: number;
}

export interface CliRun extends Timed {
  stages: StageRow[];
  executed: string[];
}

/** `pipeline <argv> --json`: timed, with the summary's per-stage rows. */
export function pipeline(argv: string[], opts: { env?: NodeJS.ProcessEnv } = {}): CliRun {
  const r = run(process.execPath, [CLI, ...argv, '--json'], opts);
  const summary = r.stdout
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as { event?: string; stages?: StageRow[]; executed?: string[] })
    .find((e) => e.event === 'summary');
  return { ...r, stages: summary?.stages ?? [], executed: summary?.executed ?? [] };
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function load(): string {
  return os
    .loadavg()
    .map((x) => x.toFixed(2))
    .join(' ');
}

export function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}

export const s = (x: number) => `${x.toFixed(x < 10 ? 2 : 1)} s`;

export function header(what: string): void {
  console.log(`${what} — ${os.availableParallelism()} cores, load average at start ${load()}, ${new Date().toISOString()}`);
}
