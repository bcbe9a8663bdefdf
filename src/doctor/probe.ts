// Host probing for `pipeline doctor`: the qemu boot probes (KVM and TCG) on top of
// the build's own cheap preflight probes (src/engine/preflight.ts). Every function
// here gathers facts; turning facts into findings and text is pure and lives in
// doctor.ts and the engine's preflight.
import { createHash } from 'node:crypto';
import { constants as fsc, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ARCH } from '../arch.js';
import { writeAtomic } from '../engine/cache.js';
import { spawnProcess } from '../engine/process.js';
import { probePreflight, type PreflightFacts, type PreflightProbeOptions } from '../engine/preflight.js';
import { probeTools } from '../engine/tools.js';

// ---------------------------------------------------------------------------
// Facts

export interface BootProbe {
  accel: 'kvm' | 'tcg';
  /** The marker came out of the serial port: the payload reached 64-bit long mode. */
  ok: boolean;
  /** The real-mode marker came out: BIOS ran and handed over to the boot sector. */
  reachedRealMode: boolean;
  /** The payload printed LONG_MODE_CHAR: paging and the 64-bit switch worked. */
  reachedLongMode: boolean;
  /** Blocks of the long-mode test loop finished (of PROBE_BLOCKS). */
  blocks: number;
  timedOut: boolean;
  timeoutMs: number;
  exitCode: number | null;
  signal: string | null;
  /** Last lines qemu wrote to stderr. */
  stderr: string;
  /** The boot-sector file qemu was given (removed after the probe). */
  payload: string;
  /** Pid of the qemu process (gone when the probe returns). */
  pid?: number;
  detail: string;
}

export interface KvmFacts {
  /** /dev/kvm exists. */
  device: boolean;
  /** /dev/kvm is readable and writable by us. */
  accessible: boolean;
  qemu?: string;
  /** Probe boot under KVM (absent when there is no usable /dev/kvm or no qemu). */
  probe?: BootProbe;
  /** The same probe under software emulation. */
  tcg?: BootProbe;
  /** The result came from the cache, not a fresh boot. */
  cached: boolean;
}

export interface HostFacts extends PreflightFacts {
  /** Only when the qemu probes ran (probeHost with boot, not preflight). */
  kvm?: KvmFacts;
}

export interface ProbeOptions extends PreflightProbeOptions {
  /** Run the qemu boot probes (default true). */
  boot?: boolean;
}

// ---------------------------------------------------------------------------
// Pure helpers

export const PROBE_MARKER = 'PIPELINE-PROBE-OK';
export const PROBE_REAL_MARKER = 'PIPELINE-PROBE-REAL';
/** Bump when the payload or qemu arguments change: it is part of the probe cache key. */
export const PROBE_VERSION = 'accel-probe/2';
/** Printed on COM1 as soon as the payload runs in 64-bit mode. */
export const LONG_MODE_CHAR = 'L';
/** Blocks of 1M memory writes the payload does in 64-bit mode (a '.' on serial after each). */
export const PROBE_BLOCKS = 16;

/**
 * A 512-byte x86 boot sector, hand-assembled. It prints PROBE_REAL_MARKER on COM1 in
 * real mode, then does what every kernel does first (page tables, PAE, EFER.LME,
 * paging, far jump into a 64-bit code segment) and prints PROBE_MARKER from long mode,
 * then exits qemu through isa-debug-exit.
 * In between it does a little real work in long mode (see below). A 16-bit-only payload is not enough: on
 * this kind of nested host KVM runs real mode fine but hangs on the switch to long
 * mode, which is exactly where a Linux kernel hangs too.
 */
export function bootSector(): Buffer {
  const b: number[] = [];
  const at = () => b.length;
  const emit = (...xs: number[]) => void b.push(...xs);
  const ORG = 0x7c00;
  const patch16 = (off: number, v: number) => {
    b[off] = v & 0xff;
    b[off + 1] = (v >> 8) & 0xff;
  };
  // Print the NUL-terminated string at DS:(E)SI to port DX. Same bytes in 16- and 64-bit mode.
  const printLoop = () => emit(0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8); // lodsb; test al,al; jz +3; out dx,al; jmp -8

  // --- 16-bit real mode
  emit(0xfa, 0xfc); // cli; cld
  emit(0x31, 0xc0); // xor ax,ax
  emit(0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0); // mov ds,ax; mov es,ax; mov ss,ax
  emit(0xbc, 0x00, 0x7c); // mov sp,0x7c00
  const realMsgRef = at() + 1;
  emit(0xbe, 0, 0); // mov si,realMsg
  emit(0xba, 0xf8, 0x03); // mov dx,0x3f8 (COM1 data register; qemu needs no UART setup)
  printLoop();
  // Identity-map the first 2 MiB: PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x3000 (one 2 MiB page).
  emit(0xbf, 0x00, 0x10); // mov di,0x1000
  emit(0xb9, 0x00, 0x18); // mov cx,0x1800 (words: 0x3000 bytes)
  emit(0x31, 0xc0); // xor ax,ax
  emit(0xf3, 0xab); // rep stosw
  emit(0xc7, 0x06, 0x00, 0x10, 0x03, 0x20); // mov word [0x1000],0x2003 (present|rw)
  emit(0xc7, 0x06, 0x00, 0x20, 0x03, 0x30); // mov word [0x2000],0x3003
  emit(0xc7, 0x06, 0x00, 0x30, 0x83, 0x00); // mov word [0x3000],0x0083 (present|rw|2M)
  emit(0x0f, 0x20, 0xe0); // mov eax,cr4
  emit(0x66, 0x83, 0xc8, 0x20); // or eax,0x20 (PAE)
  emit(0x0f, 0x22, 0xe0); // mov cr4,eax
  emit(0x66, 0xb8, 0x00, 0x10, 0x00, 0x00); // mov eax,0x1000
  emit(0x0f, 0x22, 0xd8); // mov cr3,eax
  emit(0x66, 0xb9, 0x80, 0x00, 0x00, 0xc0); // mov ecx,0xc0000080 (EFER)
  emit(0x0f, 0x32); // rdmsr
  emit(0x66, 0x0d, 0x00, 0x01, 0x00, 0x00); // or eax,0x100 (LME)
  emit(0x0f, 0x30); // wrmsr
  const gdtrRef = at() + 3;
  emit(0x0f, 0x01, 0x16, 0, 0); // lgdt [gdtr]
  emit(0x0f, 0x20, 0xc0); // mov eax,cr0
  emit(0x66, 0x0d, 0x01, 0x00, 0x00, 0x80); // or eax,0x80000001 (PE|PG)
  emit(0x0f, 0x22, 0xc0); // mov cr0,eax
  const longRef = at() + 1;
  emit(0xea, 0, 0, 0x08, 0x00); // jmp 0x08:long

  // --- 64-bit long mode
  const long = at();
  emit(0x66, 0xb8, 0x10, 0x00); // mov ax,0x10
  emit(0x8e, 0xd8, 0x8e, 0xc0, 0x8e, 0xd0); // mov ds,ax; mov es,ax; mov ss,ax
  emit(0x66, 0xba, 0xf8, 0x03); // mov dx,0x3f8
  emit(0xb0, LONG_MODE_CHAR.charCodeAt(0), 0xee); // mov al,'L'; out dx,al: we are in 64-bit mode
  // Real work in 64-bit mode: 16 blocks of 1M byte writes over 1-2 MiB, a '.' after each.
  // A KVM that enters long mode but runs orders of magnitude slower than software
  // emulation (seen on nested hosts: the kernel decompressor crawls for minutes) must
  // fail the probe, and the dots tell a crawl from a hang.
  emit(0xbf, 0x00, 0x00, 0x10, 0x00); // mov edi,0x100000
  emit(0xbb, PROBE_BLOCKS, 0x00, 0x00, 0x00); // mov ebx,PROBE_BLOCKS
  const outer = at();
  emit(0xb9, 0x00, 0x00, 0x10, 0x00); // mov ecx,0x100000
  const inner = at();
  emit(0x88, 0x0f); // mov [rdi],cl
  emit(0xff, 0xc7); // inc edi
  emit(0x81, 0xe7, 0xff, 0xff, 0x1f, 0x00); // and edi,0x1fffff
  emit(0x81, 0xcf, 0x00, 0x00, 0x10, 0x00); // or edi,0x100000 (stay in 1-2 MiB, clear of code and page tables)
  emit(0xff, 0xc9); // dec ecx
  emit(0x75, (inner - (at() + 2)) & 0xff); // jnz inner
  emit(0xb0, 0x2e, 0xee); // mov al,'.'; out dx,al
  emit(0xff, 0xcb); // dec ebx
  emit(0x75, (outer - (at() + 2)) & 0xff); // jnz outer
  const okMsgRef = at() + 1;
  emit(0xbe, 0, 0, 0, 0); // mov esi,okMsg
  printLoop();
  emit(0xe6, 0xf4); // out 0xf4,al: isa-debug-exit, qemu quits
  emit(0xf4, 0xeb, 0xfd); // hlt; jmp hlt (if there is no debug-exit device)

  // --- data
  while (at() % 8) emit(0);
  const gdt = at();
  emit(0, 0, 0, 0, 0, 0, 0, 0); // null descriptor
  emit(0, 0, 0, 0, 0, 0x9a, 0x20, 0); // 0x08: code, present, ring 0, L=1 (64-bit)
  emit(0, 0, 0, 0, 0, 0x92, 0x00, 0); // 0x10: data, present, writable
  const gdtr = at();
  emit(23, 0, (ORG + gdt) & 0xff, (ORG + gdt) >> 8, 0, 0); // limit, base
  const realMsg = at();
  emit(...Buffer.from(`${PROBE_REAL_MARKER}\r\n\0`, 'latin1'));
  const okMsg = at();
  emit(...Buffer.from(`${PROBE_MARKER}\r\n\0`, 'latin1'));

  patch16(realMsgRef, ORG + realMsg);
  patch16(gdtrRef, ORG + gdtr);
  patch16(longRef, ORG + long);
  patch16(okMsgRef, ORG + okMsg); // upper 16 bits of the imm32 stay 0
  if (b.length > 510) throw new Error(`internal: boot sector code is ${b.length} bytes`);
  const out = Buffer.alloc(512);
  Buffer.from(b).copy(out);
  out[510] = 0x55;
  out[511] = 0xaa;
  return out;
}

export function qemuProbeArgs(accel: 'kvm' | 'tcg', payload: string): string[] {
  return [
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-machine', 'pc',
    '-accel', accel,
    '-m', '16',
    '-serial', 'stdio',
    '-monitor', 'none',
    '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x04',
    '-drive', `format=raw,file=${payload}`,
    '-no-reboot',
  ];
}

// ---------------------------------------------------------------------------
// Processes

export interface Captured {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  /** `until` matched and we stopped the process. */
  stoppedEarly: boolean;
  spawnError?: string;
  pid?: number;
}

const MAX_CAPTURE = 1 << 20;

/**
 * Run a program (argument array) through the one process runner and capture its
 * output. Never throws. On timeout (or once `until` sees what it wants) the process
 * is stopped (SIGTERM, then SIGKILL after the runner's grace); it resolves only
 * after the process has exited and been reaped, so nothing outlives the call.
 */
export async function capture(
  cmd: string,
  args: string[],
  opts: { timeoutMs: number; until?: (stdout: string) => boolean; env?: NodeJS.ProcessEnv } = { timeoutMs: 10000 },
): Promise<Captured> {
  const r = await spawnProcess(cmd, args, { capture: true, maxCapture: MAX_CAPTURE, timeoutMs: opts.timeoutMs, until: opts.until, baseEnv: opts.env ?? process.env });
  return {
    code: r.exitCode,
    signal: r.signal,
    stdout: r.stdout,
    stderr: r.stderr,
    timedOut: r.timedOut,
    stoppedEarly: r.stoppedEarly,
    ...(r.spawnError ? { spawnError: r.spawnError } : {}),
    pid: r.pid,
  };
}

// ---------------------------------------------------------------------------
// qemu boot probes (KVM and TCG)

const KVM_TIMEOUT_MS = 8000;
const TCG_TIMEOUT_MS = 20000;
// The probe payload is an x86 boot sector (BIOS -> real -> long mode).
const QEMU = ARCH.amd64.qemuSystem.name;

/** Boot the probe sector under qemu with the given accelerator; kill qemu if it does not finish in time. */
export async function runBootProbe(accel: 'kvm' | 'tcg', opts: { timeoutMs?: number; qemu?: string } = {}): Promise<BootProbe> {
  const timeoutMs = opts.timeoutMs ?? (accel === 'kvm' ? KVM_TIMEOUT_MS : TCG_TIMEOUT_MS);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-accel-probe-'));
  const payload = path.join(dir, 'boot.img');
  try {
    await fs.writeFile(payload, bootSector());
    const r = await capture(opts.qemu ?? QEMU, qemuProbeArgs(accel, payload), { timeoutMs, until: (out) => out.includes(PROBE_MARKER) });
    const ok = r.stdout.includes(PROBE_MARKER);
    const reachedRealMode = r.stdout.includes(PROBE_REAL_MARKER);
    const errLines = r.stderr
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l && !/warning: host doesn't support requested feature|terminating on signal/.test(l));
    // What the payload printed after the real-mode line: 'L', then a '.' per block, then the marker.
    const afterReal = reachedRealMode ? r.stdout.slice(r.stdout.indexOf(PROBE_REAL_MARKER) + PROBE_REAL_MARKER.length).split(PROBE_MARKER)[0]! : '';
    const blocks = (afterReal.match(/\./g) ?? []).length;
    const reachedLongMode = afterReal.includes(LONG_MODE_CHAR);
    const secs = `${timeoutMs / 1000} s`;
    let detail: string;
    if (ok) detail = `boots a test payload into 64-bit mode and runs its test loop`;
    else if (r.spawnError) detail = r.spawnError;
    else if (r.timedOut && reachedLongMode) detail = `reached 64-bit mode but ran only ${blocks} of ${PROBE_BLOCKS} blocks of the test loop in ${secs} (software emulation runs all in well under a second); qemu killed`;
    else if (r.timedOut && reachedRealMode) detail = `got through the BIOS but did not reach 64-bit mode in ${secs}; qemu killed`;
    else if (r.timedOut) detail = `the BIOS did not hand over to the boot sector within ${secs}; qemu killed`;
    else detail = `qemu ${r.signal ? `was killed by ${r.signal}` : `exited with code ${r.code}`}${errLines.length ? `: ${errLines[errLines.length - 1]}` : ''}`;
    return {
      accel,
      ok,
      reachedRealMode,
      reachedLongMode,
      blocks,
      timedOut: r.timedOut,
      timeoutMs,
      exitCode: r.code,
      signal: r.signal,
      stderr: errLines.slice(-5).join('\n'),
      payload,
      pid: r.pid,
      detail,
    };
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

const ACCEL_FORMAT = 'accel-probe/1';

async function cpuModel(): Promise<string> {
  const text = await fs.readFile('/proc/cpuinfo', 'utf8').catch(() => '');
  const m = /^model name\s*:\s*(.*)$/m.exec(text) ?? /^CPU part\s*:\s*(.*)$/m.exec(text);
  return m?.[1]?.trim() ?? os.machine();
}

/**
 * KVM facts with a probe boot under KVM and under TCG. The result is cached in
 * cacheDir keyed by qemu version + kernel release (+ CPU model and the probe itself),
 * so only the first build on a host pays for a hung KVM probe.
 */
export async function probeAccel(cacheDir?: string, opts: { force?: boolean } = {}): Promise<KvmFacts> {
  const device = await fs.access('/dev/kvm').then(() => true, () => false);
  let accessible = false;
  if (device) {
    try {
      await fs.access('/dev/kvm', fsc.R_OK | fsc.W_OK);
      accessible = true;
    } catch {
      accessible = false;
    }
  }
  const [qemuFact] = await probeTools([{ name: QEMU, apt: 'qemu-system-x86' }], cacheDir);
  const qemu = qemuFact?.version;
  if (!qemu) return { device, accessible, cached: false };

  const key = createHash('sha256')
    .update(JSON.stringify([ACCEL_FORMAT, PROBE_VERSION, qemu, os.release(), await cpuModel(), device, accessible, bootSector().toString('hex')]))
    .digest('hex');
  const file = cacheDir ? path.join(cacheDir, 'host', 'accel-probe.json') : undefined;
  if (file && !opts.force) {
    try {
      const j = JSON.parse(await fs.readFile(file, 'utf8')) as { key?: string; probe?: BootProbe; tcg?: BootProbe };
      if (j.key === key) return { device, accessible, qemu, probe: j.probe, tcg: j.tcg, cached: true };
    } catch {
      // no or unreadable cache: probe again
    }
  }
  // One at a time: two qemus on a 2-core host would slow the TCG one into its timeout.
  const probe = device && accessible ? await runBootProbe('kvm') : undefined;
  const tcg = await runBootProbe('tcg');
  // A spawn failure says nothing lasting about the host; do not cache it.
  if (file && !/not found/.test(tcg.detail)) {
    await fs.mkdir(path.dirname(file), { recursive: true });
    await writeAtomic(file, JSON.stringify({ key, qemu, kernel: os.release(), probe, tcg }, null, 1) + '\n');
  }
  return { device, accessible, qemu, probe, tcg, cached: false };
}

// ---------------------------------------------------------------------------

/** Everything doctor reports. With boot: false no qemu is started. */
export async function probeHost(opts: ProbeOptions = {}): Promise<HostFacts> {
  const [pre, kvm] = await Promise.all([probePreflight(opts), opts.boot === false ? Promise.resolve(undefined) : probeAccel(opts.cacheDir)]);
  return { ...pre, kvm };
}
