// Boot an artifact under qemu and judge it by its serial console: all `expect`
// markers seen -> pass; a `forbid` pattern, qemu exiting early, or the timeout -> fail.
// qemu is always killed (process group) before bootTest returns.
import { createWriteStream, type WriteStream } from 'node:fs';
import { runProcess, LineTail } from '../engine/process.js';
import { ARCH, ARCHES, hostArch, type Arch } from '../arch.js';
import type { BootPlan } from '../stage.js';

export interface BootTestOptions {
  expect: string[];
  forbid: string[];
  timeoutMs: number;
  /** Default tcg: KVM on this class of machine hangs or asserts. */
  accel?: 'kvm' | 'tcg';
  memory?: string;
  signal?: AbortSignal;
  onLine?: (line: string) => void;
  /** Full console transcript goes here when set. */
  logFile?: string;
}

export interface BootTestResult {
  ok: boolean;
  matched: string[];
  missing: string[];
  forbidden: string[];
  seconds: number;
  logTail: string;
  /** Why it failed, in words (absent when ok). */
  reason?: string;
}

/** Forbidden patterns when a spec gives none (one list, defined with the spec schema). */
export { DEFAULT_FORBID } from '../../schema/spec.js';

/** The engine's own qemu arguments; the plan's come after (so a plan may override -m). */
export function qemuBaseArgs(accel: 'kvm' | 'tcg', memory: string): string[] {
  // -nographic alone would multiplex the monitor onto stdio; -monitor none keeps
  // stdio for the serial console only, and -display none avoids any UI.
  return ['-display', 'none', '-serial', 'stdio', '-monitor', 'none', '-no-reboot', '-accel', accel, '-m', memory];
}

// Serial output carries ANSI colour/cursor codes (systemd status) and CRs.
// eslint-disable-next-line no-control-regex
const ANSI_RE = /\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>c]/g;
export function cleanLine(s: string): string {
  // eslint-disable-next-line no-control-regex
  return s.replace(ANSI_RE, '').replace(/\r/g, '').replace(/[\x00-\x08\x0b-\x1f\x7f]/g, '');
}

/** Pure console scanner: feed text, ask for state. */
export class ConsoleScanner {
  readonly matched = new Set<string>();
  readonly forbidden: string[] = [];
  private partial = '';
  constructor(
    private readonly expect: string[],
    private readonly forbid: string[],
    private readonly onLine?: (l: string) => void,
  ) {}
  private check(text: string): void {
    for (const e of this.expect) if (!this.matched.has(e) && text.includes(e)) this.matched.add(e);
    for (const f of this.forbid) if (!this.forbidden.includes(f) && text.includes(f)) this.forbidden.push(f);
  }
  push(chunk: string): void {
    const parts = (this.partial + chunk).split('\n');
    this.partial = parts.pop() ?? '';
    for (const raw of parts) {
      const l = cleanLine(raw);
      this.onLine?.(l);
      this.check(l);
    }
    // A marker may be printed without a newline right before power-off.
    if (this.partial) this.check(cleanLine(this.partial));
  }
  get done(): boolean {
    return this.expect.every((e) => this.matched.has(e));
  }
  missing(): string[] {
    return this.expect.filter((e) => !this.matched.has(e));
  }
}

/** The qemu-system binary whose guests KVM can run on this host, if any. */
function nativeQemu(): string | undefined {
  const arch = hostArch();
  return arch && ARCH[arch].qemuSystem.name;
}

/**
 * KVM only runs guests of the host's own arch: an arm64 guest on an amd64 host (or
 * the reverse) is always TCG, whatever the KVM probe said.
 */
export function effectiveAccel(qemu: string, accel: 'kvm' | 'tcg' | undefined): 'kvm' | 'tcg' {
  return accel === 'kvm' && qemu === nativeQemu() ? 'kvm' : 'tcg';
}

export async function bootTest(plan: BootPlan, opts: BootTestOptions): Promise<BootTestResult> {
  const t0 = Date.now();
  const tail = new LineTail(60);
  const scanner = new ConsoleScanner(opts.expect, opts.forbid, opts.onLine);
  const stopper = new AbortController();
  const onOuterAbort = () => stopper.abort();
  opts.signal?.addEventListener('abort', onOuterAbort, { once: true });
  let log: WriteStream | undefined;
  if (opts.logFile) log = createWriteStream(opts.logFile);
  let stoppedBecause: 'done' | 'forbidden' | 'timeout' | undefined;
  const timer = setTimeout(() => {
    stoppedBecause ??= 'timeout';
    stopper.abort();
  }, opts.timeoutMs);

  let exitError: string | undefined;
  try {
    await runProcess(plan.qemu, [...qemuBaseArgs(effectiveAccel(plan.qemu, opts.accel), opts.memory ?? '1024'), ...plan.args], {
      signal: stopper.signal,
      onOutput: (c) => {
        log?.write(c);
        tail.push(c);
        scanner.push(c);
        if (stoppedBecause) return;
        if (scanner.forbidden.length) {
          stoppedBecause = 'forbidden';
          stopper.abort();
        } else if (scanner.done) {
          // Seen everything; no reason to wait for a power-off.
          stoppedBecause = 'done';
          stopper.abort();
        }
      },
    });
  } catch (e) {
    // Expected when we stopped qemu ourselves; otherwise qemu failed on its own.
    if (!stoppedBecause) exitError = (e as Error).message;
  } finally {
    clearTimeout(timer);
    opts.signal?.removeEventListener('abort', onOuterAbort);
    if (log) await new Promise<void>((r) => log!.end(r));
  }

  const missing = scanner.missing();
  const forbidden = [...scanner.forbidden];
  const ok = missing.length === 0 && forbidden.length === 0 && !opts.signal?.aborted;
  let reason: string | undefined;
  if (!ok) {
    if (opts.signal?.aborted) reason = 'cancelled';
    else if (forbidden.length) reason = `forbidden output: ${forbidden.join(', ')}`;
    else if (stoppedBecause === 'timeout') reason = `timed out after ${Math.round(opts.timeoutMs / 1000)} s; missing: ${missing.join(', ')}`;
    else if (exitError) reason = `${exitError}; missing: ${missing.join(', ')}`;
    else reason = `qemu exited before all markers appeared; missing: ${missing.join(', ')}`;
  }
  return {
    ok,
    matched: opts.expect.filter((e) => scanner.matched.has(e)),
    missing,
    forbidden,
    seconds: Math.round((Date.now() - t0) / 100) / 10,
    logTail: tail.text(),
    ...(reason ? { reason } : {}),
  };
}

/** Serial console device of qemu's default machine per arch (for console=). */
export const SERIAL_CONSOLE = Object.fromEntries(ARCHES.map((a) => [a, ARCH[a].serialConsole])) as Record<Arch, string>;

/** qemu binary and machine arguments that boot this arch (firmware and disks come after). */
export function qemuMachine(arch: Arch): { qemu: string; args: string[] } {
  return { qemu: ARCH[arch].qemuSystem.name, args: [...ARCH[arch].qemuMachine] };
}

/** qemu invocation that boots a kernel + initrd directly (no firmware boot path). */
export function directKernelBoot(arch: Arch, kernel: string, initrd: string, cmdline: string, label: string): BootPlan {
  // arm64 `virt` needs no firmware for a direct kernel boot: qemu writes the device
  // tree and enters the Image itself.
  const m = qemuMachine(arch);
  return { qemu: m.qemu, args: [...m.args, '-kernel', kernel, '-initrd', initrd, '-append', cmdline], label };
}
