// The one place that starts external programs. Argument arrays only (never a shell
// string). Every child gets its own process group, and where the host allows it a
// PID namespace tied to this process's life, so nothing a child starts can outlive
// us, even when we are killed with SIGKILL. Stages get a minimal environment.
import { spawn } from 'node:child_process';
import { accessSync, constants as fsConstants, readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { StageError, type ExecOptions, type ExecResult } from '../stage.js';

export interface ProcessOptions extends ExecOptions {
  /** Environment the child starts from (default: process.env); `env` entries apply on top, undefined removes. */
  baseEnv?: Readonly<Record<string, string | undefined>>;
  signal?: AbortSignal;
  /** Receives stdout (unless capture) and stderr text as it arrives. */
  onOutput?: (chunk: string, stream: 'stdout' | 'stderr') => void;
  /** Tail of the caller's log for error reports; defaults to our own last lines. */
  logTail?: () => string;
  /** With capture: stop the process (SIGTERM, then SIGKILL after the grace) once stdout satisfies this. Not an error. */
  until?: (stdout: string) => boolean;
  /** Keep at most this many characters of captured stdout and of stderr. */
  maxCapture?: number;
  /** Run inside a PID namespace that dies with us (default true; see isolation()). */
  isolate?: boolean;
}

/** Everything about a finished process; spawnProcess never rejects. */
export interface ProcessResult {
  stdout: string;
  stderr: string;
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  /** `until` matched and we stopped the process. */
  stoppedEarly: boolean;
  /** The caller's AbortSignal fired and we stopped the process. */
  aborted: boolean;
  /** The program could not be started (not found, not executable, …). */
  spawnError?: string;
  notFound?: boolean;
  /** Process id of the group leader we spawned (the namespace wrapper when isolated). */
  pid?: number;
  /** Last lines of output (stdout unless captured, and stderr), for error reports. */
  tail: string;
}

/** The one grace period: SIGTERM to the process group, then SIGKILL this much later. */
export const KILL_GRACE_MS = 5000;
/** How long to wait for pipes to drain after the child exits (a grandchild may hold them). */
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

// ---------------------------------------------------------------------------
// The environment stages see

/** Used when the host PATH has no absolute entry at all. */
export const FALLBACK_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
const PROXY_VARS = ['http_proxy', 'https_proxy', 'no_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'NO_PROXY'] as const;
const SECRET_RE = /SECRET|TOKEN|PASSWORD|KEY|CREDENTIAL/i;

/** Why a host variable may never reach a stage, or undefined when it may. */
export function forbiddenEnvName(name: string): string | undefined {
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(name)) return 'not a valid variable name';
  if (name.startsWith('PIPELINE_')) return "PIPELINE_* variables configure pipeline itself (signing key, registry password, …)";
  if (SECRET_RE.test(name)) return 'its name says it holds a secret (SECRET, TOKEN, PASSWORD, KEY, CREDENTIAL)';
  return undefined;
}

/**
 * The host PATH without relative or empty entries (they would resolve against the
 * stage's cwd). Not a fixed PATH: tool versions in cache keys are read from the
 * binaries found on the host PATH (doctor/probe.ts), so stages must find the same ones.
 */
export function sanitizePath(hostPath: string | undefined): string {
  const dirs = [...new Set((hostPath ?? '').split(':').filter((d) => d.startsWith('/')))];
  return dirs.length ? dirs.join(':') : FALLBACK_PATH;
}

/** TMPDIR passes only as an absolute, plain path to an existing directory that others cannot swap files in. */
function safeTmpdir(v: string | undefined): string | undefined {
  if (!v || !/^\/[A-Za-z0-9._/-]*$/.test(v) || v.split('/').includes('..')) return undefined;
  try {
    const st = statSync(v);
    if (!st.isDirectory()) return undefined;
    // World-writable without the sticky bit: anyone could replace our temp files.
    if (st.mode & 0o002 && !(st.mode & 0o1000)) return undefined;
    return v;
  } catch {
    return undefined;
  }
}

/**
 * The environment every stage tool starts from: an allow-list, never the host's
 * whole environment (which may hold PIPELINE_SIGNING_KEY, registry passwords, CI
 * tokens that would otherwise reach maintainer scripts in the target chroot).
 * `declared` is the kind's StageModule.env; a declared name that could carry a
 * secret is refused with an error rather than silently dropped, so the kind's
 * author learns at once instead of debugging a missing variable.
 */
export function stageEnv(
  host: Readonly<Record<string, string | undefined>>,
  o: { sourceDateEpoch: number; home: string; declared?: readonly string[]; kind?: string },
): Record<string, string> {
  const env: Record<string, string> = {
    PATH: sanitizePath(host.PATH),
    LC_ALL: 'C.UTF-8',
    TZ: 'UTC',
    SOURCE_DATE_EPOCH: String(o.sourceDateEpoch),
    // The stage's scratch dir: no host dotfiles are read, nothing is left in ~.
    HOME: o.home,
  };
  const tmp = safeTmpdir(host.TMPDIR);
  if (tmp) env.TMPDIR = tmp;
  // Proxy URLs may carry credentials, but without them nothing reaches the mirror.
  for (const k of PROXY_VARS) if (host[k]) env[k] = host[k]!;
  for (const name of o.declared ?? []) {
    const why = forbiddenEnvName(name);
    if (why) throw new StageError(`kind ${o.kind ?? '?'} declares env "${name}", which never reaches a stage: ${why}`);
    const v = host[name];
    if (v !== undefined) env[name] = v;
  }
  return env;
}

function mergeEnv(base: Readonly<Record<string, string | undefined>>, extra?: Record<string, string | undefined>): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(base)) if (v !== undefined) env[k] = v;
  for (const [k, v] of Object.entries(extra ?? {})) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  return env;
}

// ---------------------------------------------------------------------------
// Finding programs and isolating them

/** execvp's lookup: the path of cmd on PATH, or why it cannot be run. */
export function resolveCommand(cmd: string, pathVar: string | undefined, cwd = process.cwd()): { path: string } | { error: 'not found' | 'not executable' } {
  const candidates = cmd.includes('/') ? [path.resolve(cwd, cmd)] : (pathVar ?? FALLBACK_PATH).split(':').map((d) => path.resolve(cwd, d || '.', cmd));
  let sawFile = false;
  for (const c of candidates) {
    try {
      if (!statSync(c).isFile()) continue;
      sawFile = true;
      accessSync(c, fsConstants.X_OK);
      return { path: c };
    } catch {
      // keep looking
    }
  }
  return { error: sawFile ? 'not executable' : 'not found' };
}

interface Isolation {
  /** Prepended to the real command line. */
  prefix: string[];
}

let isolationProbe: Promise<Isolation | undefined> | undefined;

/**
 * How children are tied to our life:
 *   setpriv --pdeathsig KILL -- unshare --pid --fork --kill-child -- cmd args…
 * setpriv sets PR_SET_PDEATHSIG, so the kernel SIGKILLs unshare when the thread that
 * spawned it dies (Node spawns on the main thread, so: when we die); unshare's
 * --kill-child does the same for its child, the namespace's init (cmd), and when a
 * PID namespace's init dies the kernel kills everything left in it. So kill -9 of
 * pipeline takes down every process of every running tool, however it forked,
 * setsid'd or daemonised. unshare passes cmd's exit code through and re-raises the
 * signal that killed it, and prints nothing, so results and output are unchanged.
 * (Checked for real: test/integration/stage-processes.test.ts kills the CLI.)
 *
 * What does change, for the command itself only (its children are ordinary):
 * it is its namespace's init, so getpid() is 1, signals it sends itself are
 * ignored, orphans are reparented to it, and signals from outside arrive only if it
 * handles them (see terminateNamespaceInit for SIGTERM). Pids that tools print or
 * write are namespace pids. A SIGKILL of the command from elsewhere (OOM killer)
 * shows as exit 1 plus an unshare message, as unshare cannot re-raise SIGKILL. And
 * a kill -9 of us in the microseconds between fork and setpriv's prctl is not
 * covered: that child never gets the death signal.
 *
 * Only as root: a PID namespace needs CAP_SYS_ADMIN, and as non-root it would need
 * a user namespace too, which changes the uid every tool sees (mmdebstrap, tar
 * owners). There, and wherever the probe fails (a container without the
 * capability, no setpriv), children run as before: detached in their own process
 * group, cleaned up on cancellation and after exit, but not after a SIGKILL of us.
 */
export function isolation(): Promise<Isolation | undefined> {
  isolationProbe ??= (async () => {
    if (process.getuid?.() !== 0) return undefined;
    const search = `${process.env.PATH ?? ''}:/usr/bin:/bin:/usr/sbin:/sbin`;
    const setpriv = resolveCommand('setpriv', search);
    const unshare = resolveCommand('unshare', search);
    if (!('path' in setpriv) || !('path' in unshare)) return undefined;
    const prefix = [setpriv.path, '--pdeathsig', 'KILL', '--', unshare.path, '--pid', '--fork', '--kill-child', '--'];
    const ok = await new Promise<boolean>((resolve) => {
      const c = spawn(prefix[0]!, [...prefix.slice(1), unshare.path, '--version'], { stdio: 'ignore' });
      c.on('error', () => resolve(false));
      c.on('exit', (code) => resolve(code === 0));
    });
    return ok ? { prefix } : undefined;
  })();
  return isolationProbe;
}

function killGroup(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(-pid, sig);
  } catch {
    // ESRCH: the group is already gone.
  }
}

const SIGTERM_BIT = 1n << 14n; // bit (15 - 1) of the Sig* masks in /proc/PID/status

/**
 * The command runs as init of its PID namespace, and the kernel drops signals sent
 * to an init that has no handler for them, so a plain SIGTERM would not stop
 * `sleep`, `tar` or `sh` there. Do what the default action would have done: if the
 * init neither handles, ignores nor blocks SIGTERM, SIGKILL the wrapper, whose
 * --kill-child takes the namespace down. (Killing the init itself would make
 * unshare print "sigprocmask unblock failed" and exit 1: it cannot re-raise SIGKILL.)
 */
function terminateNamespaceInit(wrapperPid: number): void {
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid !== wrapperPid) continue;
      const status = readFileSync(`/proc/${d}/status`, 'utf8');
      const mask = (name: string) => BigInt(`0x${new RegExp(`^${name}:\\s*([0-9a-f]+)`, 'm').exec(status)?.[1] ?? '0'}`);
      const takesTerm = (mask('SigCgt') | mask('SigIgn') | mask('SigBlk')) & SIGTERM_BIT;
      if (!takesTerm) process.kill(wrapperPid, 'SIGKILL');
      return;
    } catch {
      // exited while we looked
    }
  }
}

// ---------------------------------------------------------------------------
// Running

/**
 * Spawn `cmd args` in its own process group (and PID namespace, see isolation()).
 * Never rejects: resolves once the process has exited and its pipes are drained,
 * with whatever happened. On abort, timeout or `until`, the group gets SIGTERM and,
 * after KILL_GRACE_MS, SIGKILL; leftovers in the group are killed at exit.
 */
export async function spawnProcess(cmd: string, args: string[], opts: ProcessOptions = {}): Promise<ProcessResult> {
  const env = mergeEnv(opts.baseEnv ?? process.env, opts.env);
  const base = { stdout: '', stderr: '', exitCode: null, signal: null, timedOut: false, stoppedEarly: false, aborted: false, tail: '' };
  if (opts.signal?.aborted) return { ...base, aborted: true };
  // Looked up the way execvp will, so a missing program is named as such even when
  // the wrapper, not the program, is what we spawn.
  const found = resolveCommand(cmd, env.PATH, opts.cwd);
  if ('error' in found) return { ...base, spawnError: `${cmd}: ${found.error}`, notFound: found.error === 'not found' };
  const iso = opts.isolate === false ? undefined : await isolation();
  if (opts.signal?.aborted) return { ...base, aborted: true };
  const argv = iso ? [...iso.prefix, cmd, ...args] : [cmd, ...args];

  return new Promise<ProcessResult>((resolve) => {
    const child = spawn(argv[0]!, argv.slice(1), {
      cwd: opts.cwd,
      env,
      detached: true,
      stdio: [opts.input !== undefined ? 'pipe' : 'ignore', 'pipe', 'pipe'],
    });
    const max = opts.maxCapture ?? Infinity;
    const tail = new LineTail();
    let stdout = '';
    let stderr = '';
    let stopReason: 'abort' | 'timeout' | 'until' | undefined;
    let spawnError: string | undefined;
    let killTimer: NodeJS.Timeout | undefined;
    let timeoutTimer: NodeJS.Timeout | undefined;
    let exited: { code: number | null; sig: NodeJS.Signals | null } | undefined;
    let settled = false;

    const stop = (why: 'abort' | 'timeout' | 'until') => {
      if (stopReason || child.pid === undefined || exited) return;
      stopReason = why;
      const pid = child.pid;
      killGroup(pid, 'SIGTERM');
      if (iso) terminateNamespaceInit(pid);
      killTimer = setTimeout(() => killGroup(pid, 'SIGKILL'), KILL_GRACE_MS);
    };
    const onAbort = () => stop('abort');
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    if (opts.timeoutMs !== undefined && opts.timeoutMs > 0) timeoutTimer = setTimeout(() => stop('timeout'), opts.timeoutMs);

    child.stdout!.setEncoding('utf8');
    child.stderr!.setEncoding('utf8');
    child.stdout!.on('data', (c: string) => {
      if (opts.capture) {
        if (stdout.length < max) stdout += c;
        if (opts.until && !stopReason && opts.until(stdout)) stop('until');
      } else {
        tail.push(c);
        opts.onOutput?.(c, 'stdout');
      }
    });
    child.stderr!.on('data', (c: string) => {
      if (stderr.length < max) stderr += c;
      // stderr is only kept in full when captured; otherwise bound memory.
      if (!opts.capture && stderr.length > 1 << 20) stderr = stderr.slice(-(1 << 19));
      tail.push(c);
      opts.onOutput?.(c, 'stderr');
    });
    if (opts.input !== undefined && child.stdin) {
      child.stdin.on('error', () => {}); // EPIPE if the child does not read stdin
      child.stdin.end(opts.input);
    }

    const finish = () => {
      if (settled) return;
      settled = true;
      clearTimeout(killTimer);
      clearTimeout(timeoutTimer);
      opts.signal?.removeEventListener('abort', onAbort);
      if (child.pid !== undefined) killGroup(child.pid, 'SIGKILL'); // leftovers
      resolve({
        stdout,
        stderr,
        exitCode: exited?.code ?? null,
        signal: exited?.sig ?? null,
        timedOut: stopReason === 'timeout',
        stoppedEarly: stopReason === 'until',
        aborted: stopReason === 'abort',
        ...(spawnError ? { spawnError } : {}),
        pid: child.pid,
        tail: tail.text(),
      });
    };
    child.on('error', (e: NodeJS.ErrnoException) => {
      spawnError = e.code === 'ENOENT' ? `${cmd}: not found` : `${cmd}: ${e.message}`;
      // With no process there is no 'exit'; 'close' may not come either.
      if (child.pid === undefined) finish();
    });
    child.on('exit', (code, sig) => {
      exited = { code, sig };
      // Give the pipes a moment to drain; a surviving grandchild could hold them open forever.
      const t = setTimeout(() => {
        child.stdout?.destroy();
        child.stderr?.destroy();
        finish();
      }, DRAIN_MS);
      child.on('close', () => {
        clearTimeout(t);
        finish();
      });
    });
  });
}

/**
 * Run `cmd args` (see spawnProcess) and throw a StageError carrying the output tail
 * on a non-zero exit, a missing program, a timeout or an abort. Stopping because
 * `until` matched is success.
 */
export async function runProcess(cmd: string, args: string[], opts: ProcessOptions = {}): Promise<ExecResult> {
  const r = await spawnProcess(cmd, args, opts);
  const tail = () => (opts.logTail ? opts.logTail() : r.tail);
  if (r.notFound) throw new StageError(`${cmd}: command not found (is it installed and on PATH?)`);
  if (r.spawnError) throw new StageError(`could not start ${r.spawnError}`);
  if (r.aborted) throw new StageError(r.pid === undefined ? `${cmd} was cancelled before it started` : `${cmd} was cancelled`, tail());
  if (r.timedOut) throw new StageError(`${cmd} timed out after ${opts.timeoutMs} ms`, tail());
  if (r.stoppedEarly) return { stdout: r.stdout, stderr: r.stderr, exitCode: r.exitCode ?? 0 };
  if (r.exitCode !== 0) {
    const what = r.exitCode === null ? `was killed by ${r.signal}` : `exited with code ${r.exitCode}`;
    throw new StageError(`${cmd} ${what}`, tail());
  }
  return { stdout: r.stdout, stderr: r.stderr, exitCode: 0 };
}
