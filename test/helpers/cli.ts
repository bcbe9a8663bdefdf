// Runs the real CLI (bin/pipeline.js -> dist/, as users run it) in a child process.
import { spawn } from 'node:child_process';
import path from 'node:path';
import { ROOT } from './paths.js';

export { ROOT };
export const BIN = path.join(ROOT, 'bin', 'pipeline.js');
/** Integration tests share one cache so the rootfs is built once per machine. */
export const TEST_CACHE = process.env.PIPELINE_TEST_CACHE ?? '/var/tmp/pipeline-test-cache';

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
  /** JSON-lines events when --json was given. */
  events: Record<string, unknown>[];
}

export function cli(args: string[], opts: { cwd?: string; env?: Record<string, string>; timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BIN, ...args], {
      cwd: opts.cwd ?? ROOT,
      env: { ...process.env, PIPELINE_CACHE_DIR: TEST_CACHE, ...opts.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const t = setTimeout(() => child.kill('SIGTERM'), opts.timeoutMs ?? 30 * 60 * 1000);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(t);
      const events: Record<string, unknown>[] = [];
      for (const l of stdout.split('\n')) {
        if (!l.startsWith('{"event"')) continue;
        events.push(JSON.parse(l) as Record<string, unknown>);
      }
      resolve({ code: code ?? -1, stdout, stderr, events });
    });
  });
}

export function summary(r: CliResult): { executed: string[]; cached: string[]; ok: boolean } {
  const s = r.events.find((e) => e.event === 'summary');
  if (!s) throw new Error(`no summary event; exit ${r.code}\nstderr:\n${r.stderr}\nstdout:\n${r.stdout}`);
  return s as unknown as { executed: string[]; cached: string[]; ok: boolean };
}
