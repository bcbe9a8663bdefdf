// Run an external program with an argument array (never a shell string), in its
// own process group so cancellation can take down everything it spawned.
import { spawn } from 'node:child_process';
import { StageError, type ExecOptions, type ExecResult } from '../stage.js';

export interface RunProcessOptions extends ExecOptions {
  signal?: AbortSignal;
  /** Receives stdout (unless capture) and stderr text as it arrives. */
  onOutput?: (chunk: string) => void;
  /** Tail of the caller's log for error reports; defaults to our own last lines. */
  logTail?: () => string;
}

/** Grace period between SIGTERM and SIGKILL. */
export const KILL_GRACE_MS = 5000;
/** How long to wait for pipes to drain after the child exits (grandchildren may hold them). */
const DRAIN_MS = 1000;
const TAIL_LINES = 40;

/** Keeps the last n complete lines (plus a partial one) of a text stream. */
export class LineTail {
  private lines: string[] = [];
  private partial = '';
  constructor(private readonly max = TAIL_LINES) {}
  push(chunk: string): void {
    const parts = (this.partial + chunk).split('\n');
    this.partial = parts.pop() ?? '';
    for (const l of parts) {
      this.lines.push(l);
      if (this.lines.length > this.max) this.lines.shift();
    }
  }
  text(): string {
    const all = this.partial ? [...this.lines, this.partial] : this.lines;
    return all.slice(-this.max).join('\n');
  }
}

function mergeEnv(extra?: Record<string, string | undefined>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const [k, v] of Object.entries(extra ?? {})) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  return env;
}

function killGroup(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(-pid, sig);
  } catch {
    // ESRCH: the group is already gone.
  }
}

/**
 * Spawn `cmd args` detached (own process group). Resolves with the result on exit 0;
 * throws StageError on non-zero exit, missing executable, timeout or abort. Never
 * settles before the child has exited, and kills leftover group members on exit so
 * no background process outlives the call.
 */
export function runProcess(cmd: string, args: string[], opts: RunProcessOptions = {}): Promise<ExecResult> {
  return new Promise<ExecResult>((resolve, reject) => {
    const tail = new LineTail();
    const tailText = () => (opts.logTail ? opts.logTail() : tail.text());
    if (opts.signal?.aborted) {
      reject(new StageError(`${cmd} was cancelled before it started`));
      return;
    }
    const child = spawn(cmd, args, {
      cwd: opts.cwd,
      env: mergeEnv(opts.env),
      detached: true,
      stdio: [opts.input !== undefined ? 'pipe' : 'ignore', 'pipe', 'pipe'],
    });

    let stdout = '';
    let stderr = '';
    let stopReason: 'abort' | 'timeout' | undefined;
    let spawnError: NodeJS.ErrnoException | undefined;
    let killTimer: NodeJS.Timeout | undefined;
    let timeoutTimer: NodeJS.Timeout | undefined;
    let settled = false;

    const stop = (why: 'abort' | 'timeout') => {
      if (stopReason || child.pid === undefined || child.exitCode !== null) return;
      stopReason = why;
      killGroup(child.pid, 'SIGTERM');
      killTimer = setTimeout(() => child.pid !== undefined && killGroup(child.pid, 'SIGKILL'), KILL_GRACE_MS);
    };
    const onAbort = () => stop('abort');
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    if (opts.timeoutMs !== undefined && opts.timeoutMs > 0) {
      timeoutTimer = setTimeout(() => stop('timeout'), opts.timeoutMs);
    }

    child.stdout!.setEncoding('utf8');
    child.stderr!.setEncoding('utf8');
    child.stdout!.on('data', (c: string) => {
      if (opts.capture) {
        stdout += c;
      } else {
        tail.push(c);
        opts.onOutput?.(c);
      }
    });
    child.stderr!.on('data', (c: string) => {
      stderr += c;
      // stderr is only kept in full when captured; otherwise bound memory.
      if (!opts.capture && stderr.length > 1 << 20) stderr = stderr.slice(-(1 << 19));
      tail.push(c);
      opts.onOutput?.(c);
    });
    if (opts.input !== undefined && child.stdin) {
      child.stdin.on('error', () => {}); // EPIPE if the child does not read stdin
      child.stdin.end(opts.input);
    }

    const finish = (code: number | null, sig: NodeJS.Signals | null) => {
      if (settled) return;
      settled = true;
      clearTimeout(killTimer);
      clearTimeout(timeoutTimer);
      opts.signal?.removeEventListener('abort', onAbort);
      if (child.pid !== undefined) killGroup(child.pid, 'SIGKILL'); // leftovers
      if (spawnError) {
        const e = spawnError;
        reject(
          e.code === 'ENOENT'
            ? new StageError(`${cmd}: command not found (is it installed and on PATH?)`)
            : new StageError(`${cmd}: could not start: ${e.message}`),
        );
        return;
      }
      if (stopReason === 'abort') {
        reject(new StageError(`${cmd} was cancelled`, tailText()));
        return;
      }
      if (stopReason === 'timeout') {
        reject(new StageError(`${cmd} timed out after ${opts.timeoutMs} ms`, tailText()));
        return;
      }
      if (code !== 0) {
        const what = code === null ? `was killed by ${sig}` : `exited with code ${code}`;
        reject(new StageError(`${cmd} ${what}`, tailText()));
        return;
      }
      resolve({ stdout, stderr, exitCode: 0 });
    };

    child.on('error', (e: NodeJS.ErrnoException) => {
      spawnError = e;
      // With ENOENT no process exists, so 'exit' may never come; 'close' still does.
      if (child.pid === undefined) finish(null, null);
    });
    child.on('exit', (code, sig) => {
      // Give the pipes a moment to drain; a surviving grandchild could hold them open forever.
      const t = setTimeout(() => {
        child.stdout?.destroy();
        child.stderr?.destroy();
        finish(code, sig);
      }, DRAIN_MS);
      child.on('close', () => {
        clearTimeout(t);
        finish(code, sig);
      });
    });
  });
}
