// Host probing for `pipeline doctor` and the build preflight: the I/O half. Every
// function here gathers facts; turning facts into findings and text is pure and
// lives in doctor.ts.
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { constants as fsc, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ARCHES, type Arch, type ToolSpec } from '../stage.js';

// ---------------------------------------------------------------------------
// Facts

export interface ToolFact {
  name: string;
  apt: string;
  /** Where it was found on PATH; undefined when missing. */
  path?: string;
  /** Version line (or a content hash when the tool prints none). */
  version?: string;
  /** False when the tool printed nothing usable and the hash stands in. */
  versionKnown?: boolean;
  /** Running `<tool> <versionArgs>` failed (timeout, could not start). */
  error?: string;
  /** The version came from the memo without spawning the tool. */
  memo?: boolean;
}

export interface BinfmtEntry {
  /** binfmt_misc entry name, e.g. qemu-aarch64. */
  name: string;
  registered: boolean;
  enabled: boolean;
  interpreter?: string;
  flags?: string;
  /** binfmt-support knows the entry (/usr/share/binfmts/<name>): the emulator package is installed. */
  installed: boolean;
}

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

export interface HostFacts {
  uid: number;
  root: boolean;
  user: string;
  /** Debian architecture of this machine, if it is one we build for. */
  hostArch?: Arch;
  machine: string;
  kernel: string;
  userns: { usable: boolean; detail: string; maxUserNamespaces?: number; unprivilegedClone?: number };
  mmdebstrap: { modes: ('root' | 'unshare')[]; detail: string };
  binfmt: {
    mounted: boolean;
    /** Global switch /proc/sys/fs/binfmt_misc/status. */
    enabled: boolean;
    updateBinfmts: boolean;
    /** Entries for foreign architectures, by arch. */
    entries: Partial<Record<Arch, BinfmtEntry>>;
  };
  loop: { control: boolean; free?: string; detail: string };
  /** Only when the qemu probes ran (probeHost with boot, not preflight). */
  kvm?: KvmFacts;
  tools: ToolFact[];
}

export interface ProbeOptions {
  tools?: ToolSpec[];
  arches?: readonly Arch[];
  /** Where the KVM probe result and the tool-version memo live; no memo without it. */
  cacheDir?: string;
  /** Run the qemu boot probes (default true). preflight turns them off. */
  boot?: boolean;
  /** PATH to search tools on (default process.env.PATH). */
  pathEnv?: string;
}

// ---------------------------------------------------------------------------
// Pure helpers

export const QEMU_USER: Record<Arch, string> = { amd64: 'qemu-x86_64', arm64: 'qemu-aarch64' };

export function debianArch(nodeArch: string): Arch | undefined {
  return nodeArch === 'x64' ? 'amd64' : nodeArch === 'arm64' ? 'arm64' : undefined;
}

/** The first line that looks like a version (has a digit), else the first non-empty line. */
export function firstMeaningfulLine(text: string): string | undefined {
  const lines = text
    .replace(/\x1b\[[0-9;]*m/g, '')
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l.length > 0);
  const line = lines.find((l) => /\d/.test(l)) ?? lines[0];
  return line === undefined ? undefined : line.slice(0, 200);
}

/** Parse /proc/sys/fs/binfmt_misc/<entry>. */
export function parseBinfmtEntry(text: string): { enabled: boolean; interpreter?: string; flags?: string } {
  const lines = text.split('\n').map((l) => l.trim());
  const interp = lines.find((l) => l.startsWith('interpreter '));
  const flags = lines.find((l) => l.startsWith('flags:'));
  return {
    enabled: lines[0] === 'enabled',
    interpreter: interp ? interp.slice('interpreter '.length).trim() : undefined,
    flags: flags !== undefined ? flags.slice('flags:'.length).trim() : undefined,
  };
}

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
const TERM_GRACE_MS = 2000;

function killGroup(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(-pid, sig);
  } catch {
    // ESRCH: already gone.
  }
}

/**
 * Run a program (argument array) in its own process group and capture its output.
 * Never throws. On timeout (or once `until` sees what it wants) the group gets
 * SIGTERM, then SIGKILL after a grace period; it resolves only after the process has
 * exited and been reaped, so nothing outlives the call.
 */
export function capture(
  cmd: string,
  args: string[],
  opts: { timeoutMs: number; until?: (stdout: string) => boolean; env?: NodeJS.ProcessEnv } = { timeoutMs: 10000 },
): Promise<Captured> {
  return new Promise((resolve) => {
    let child;
    try {
      child = spawn(cmd, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ?? process.env });
    } catch (e) {
      resolve({ code: null, signal: null, stdout: '', stderr: '', timedOut: false, stoppedEarly: false, spawnError: (e as Error).message });
      return;
    }
    const pid = child.pid;
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    let stoppedEarly = false;
    let spawnError: string | undefined;
    let exited: { code: number | null; signal: string | null } | undefined;
    let killTimer: NodeJS.Timeout | undefined;
    let settled = false;

    const stop = () => {
      if (pid === undefined || exited || killTimer) return;
      killGroup(pid, 'SIGTERM');
      killTimer = setTimeout(() => killGroup(pid, 'SIGKILL'), TERM_GRACE_MS);
    };
    const timer = setTimeout(() => {
      timedOut = true;
      stop();
    }, opts.timeoutMs);

    child.stdout.setEncoding('utf8');
    child.stderr.setEncoding('utf8');
    child.stdout.on('data', (c: string) => {
      if (stdout.length < MAX_CAPTURE) stdout += c;
      if (!stoppedEarly && !timedOut && opts.until?.(stdout)) {
        stoppedEarly = true;
        stop();
      }
    });
    child.stderr.on('data', (c: string) => {
      if (stderr.length < MAX_CAPTURE) stderr += c;
    });

    const finish = () => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      clearTimeout(killTimer);
      if (pid !== undefined) killGroup(pid, 'SIGKILL'); // leftovers in the group
      resolve({
        code: exited?.code ?? null,
        signal: exited?.signal ?? null,
        stdout,
        stderr,
        timedOut,
        stoppedEarly,
        spawnError,
        pid,
      });
    };
    child.on('error', (e: NodeJS.ErrnoException) => {
      spawnError = e.code === 'ENOENT' ? `${cmd}: not found` : `${cmd}: ${e.message}`;
      if (pid === undefined) finish();
    });
    child.on('exit', (code, signal) => {
      exited = { code, signal };
      // A grandchild could hold the pipes open; do not wait for it forever.
      const t = setTimeout(() => {
        child.stdout.destroy();
        child.stderr.destroy();
        finish();
      }, 1000);
      child.on('close', () => {
        clearTimeout(t);
        finish();
      });
    });
  });
}

async function exists(p: string): Promise<boolean> {
  try {
    await fs.access(p);
    return true;
  } catch {
    return false;
  }
}

async function readText(p: string): Promise<string | undefined> {
  try {
    return await fs.readFile(p, 'utf8');
  } catch {
    return undefined;
  }
}

async function readInt(p: string): Promise<number | undefined> {
  const t = await readText(p);
  if (t === undefined) return undefined;
  const n = Number.parseInt(t.trim(), 10);
  return Number.isFinite(n) ? n : undefined;
}

/** Write a file so readers never see it half-written: temp file in the same directory, then rename. */
async function writeFileAtomic(file: string, data: string): Promise<void> {
  await fs.mkdir(path.dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  try {
    await fs.writeFile(tmp, data);
    await fs.rename(tmp, file);
  } catch (e) {
    await fs.rm(tmp, { force: true });
    throw e;
  }
}

export async function findOnPath(name: string, pathEnv = process.env.PATH ?? ''): Promise<string | undefined> {
  const candidates = name.includes('/') ? [name] : pathEnv.split(':').filter(Boolean).map((d) => path.join(d, name));
  for (const c of candidates) {
    try {
      const st = await fs.stat(c);
      if (!st.isFile()) continue;
      await fs.access(c, fsc.X_OK);
      return c;
    } catch {
      // not here
    }
  }
  return undefined;
}

// ---------------------------------------------------------------------------
// Tool versions, memoised by binary identity

interface MemoEntry {
  /** realpath, size, mtime, ctime, inode, device, version args: any change means a new binary. */
  stamp: string;
  version: string;
  versionKnown: boolean;
}
type Memo = Record<string, MemoEntry>;

const MEMO_FORMAT = 'tool-versions/1';

function memoFile(cacheDir: string): string {
  return path.join(cacheDir, 'host', 'tool-versions.json');
}

async function readMemo(cacheDir: string | undefined): Promise<Memo> {
  if (!cacheDir) return {};
  const text = await readText(memoFile(cacheDir));
  if (!text) return {};
  try {
    const j = JSON.parse(text) as { format?: string; entries?: Memo };
    return j.format === MEMO_FORMAT && j.entries ? j.entries : {};
  } catch {
    return {};
  }
}

async function stampOf(real: string, args: string[]): Promise<string> {
  // ctime catches an in-place rewrite that kept size and mtime (cp --preserve, touch -r).
  const st = await fs.stat(real, { bigint: true });
  return JSON.stringify([real, String(st.size), String(st.mtimeNs), String(st.ctimeNs), String(st.ino), String(st.dev), args]);
}

async function sha256File(p: string): Promise<string> {
  const h = createHash('sha256');
  const fh = await fs.open(p, 'r');
  try {
    for await (const chunk of fh.createReadStream()) h.update(chunk as Buffer);
  } finally {
    await fh.close().catch(() => {});
  }
  return h.digest('hex');
}

/**
 * Find each tool on PATH and read its version. A memo in cacheDir keyed by the
 * binary's identity means a warm build spawns nothing; any change to the binary
 * (new inode, size, mtime or ctime) reads the version again. Failures (timeouts,
 * spawn errors) are never memoised.
 */
export async function probeTools(tools: ToolSpec[], cacheDir?: string, pathEnv?: string): Promise<ToolFact[]> {
  const unique = new Map<string, ToolSpec>();
  for (const t of tools) unique.set(t.name, t);
  const memo = await readMemo(cacheDir);
  let dirty = false;
  const facts = await Promise.all(
    [...unique.values()].map(async (t): Promise<ToolFact> => {
      const found = await findOnPath(t.name, pathEnv);
      if (!found) return { name: t.name, apt: t.apt };
      const args = t.versionArgs ?? ['--version'];
      let real: string;
      let stamp: string;
      try {
        real = await fs.realpath(found);
        stamp = await stampOf(real, args);
      } catch (e) {
        return { name: t.name, apt: t.apt, path: found, error: `cannot stat: ${(e as Error).message}` };
      }
      const key = `${real}\0${JSON.stringify(args)}`;
      const hit = memo[key];
      if (hit && hit.stamp === stamp) {
        return { name: t.name, apt: t.apt, path: found, version: hit.version, versionKnown: hit.versionKnown, memo: true };
      }
      const r = await capture(found, args, { timeoutMs: 15000, env: { ...process.env, LC_ALL: 'C' } });
      if (r.spawnError || r.timedOut) {
        return { name: t.name, apt: t.apt, path: found, error: r.spawnError ?? `\`${t.name} ${args.join(' ')}\` timed out` };
      }
      // Some tools print their banner on stderr, some exit non-zero on --version.
      let version = firstMeaningfulLine(r.stdout) ?? firstMeaningfulLine(r.stderr);
      let versionKnown = true;
      if (version === undefined) {
        // Nothing to read: the binary's content hash keeps cache keys honest.
        version = `unknown (sha256:${await sha256File(real)})`;
        versionKnown = false;
      }
      // Re-stat: if the binary changed while we ran it, do not memoise a mixed result.
      if ((await stampOf(real, args).catch(() => '')) === stamp) {
        memo[key] = { stamp, version, versionKnown };
        dirty = true;
      }
      return { name: t.name, apt: t.apt, path: found, version, versionKnown, memo: false };
    }),
  );
  if (dirty && cacheDir) {
    // Merge with what another process may have written meanwhile; ours wins per key.
    const latest = await readMemo(cacheDir);
    await writeFileAtomic(memoFile(cacheDir), JSON.stringify({ format: MEMO_FORMAT, entries: { ...latest, ...memo } }, null, 1) + '\n');
  }
  return facts.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/** Versions for compile's cache keys, plus what is missing or unreadable. */
export async function toolVersions(
  tools: ToolSpec[],
  cacheDir?: string,
): Promise<{ versions: Record<string, string>; missing: ToolSpec[]; failed: ToolFact[] }> {
  const facts = await probeTools(tools, cacheDir);
  const versions: Record<string, string> = {};
  const missing: ToolSpec[] = [];
  const failed: ToolFact[] = [];
  for (const f of facts) {
    if (!f.path) missing.push({ name: f.name, apt: f.apt });
    else if (f.error || f.version === undefined) failed.push(f);
    else versions[f.name] = f.version;
  }
  return { versions, missing, failed };
}

// ---------------------------------------------------------------------------
// Cheap probes

async function probeUserns(): Promise<HostFacts['userns']> {
  const unprivilegedClone = await readInt('/proc/sys/kernel/unprivileged_userns_clone');
  const maxUserNamespaces = await readInt('/proc/sys/user/max_user_namespaces');
  const r = await capture('unshare', ['--user', '--map-root-user', 'true'], { timeoutMs: 5000 });
  const usable = !r.spawnError && !r.timedOut && r.code === 0;
  const sysctl = [
    maxUserNamespaces !== undefined ? `max_user_namespaces=${maxUserNamespaces}` : undefined,
    unprivilegedClone !== undefined ? `unprivileged_userns_clone=${unprivilegedClone}` : undefined,
  ]
    .filter(Boolean)
    .join(', ');
  let detail: string;
  if (usable) detail = `unshare --user --map-root-user works${sysctl ? ` (${sysctl})` : ''}`;
  else if (r.spawnError) detail = `cannot run unshare (${r.spawnError})`;
  else if (r.timedOut) detail = 'unshare --user --map-root-user hung';
  else detail = `unshare --user --map-root-user failed: ${firstMeaningfulLine(r.stderr) ?? `exit ${r.code}`}${sysctl ? ` (${sysctl})` : ''}`;
  return { usable, detail, maxUserNamespaces, unprivilegedClone };
}

async function hasSubidEntry(file: string, user: string, uid: number): Promise<boolean> {
  const text = await readText(file);
  if (!text) return false;
  return text.split('\n').some((l) => {
    const [who, , count] = l.split(':');
    return (who === user || who === String(uid)) && Number(count) > 0;
  });
}

async function probeMmdebstrap(root: boolean, user: string, uid: number, userns: HostFacts['userns'], pathEnv?: string): Promise<HostFacts['mmdebstrap']> {
  // mmdebstrap refuses mode=unshare as root and needs newuidmap + subordinate ids otherwise.
  if (root) return { modes: ['root'], detail: 'mode=root' };
  const missing: string[] = [];
  if (!userns.usable) missing.push('usable user namespaces');
  if (!(await findOnPath('newuidmap', pathEnv)) || !(await findOnPath('newgidmap', pathEnv))) missing.push('newuidmap/newgidmap (package uidmap)');
  if (!(await hasSubidEntry('/etc/subuid', user, uid))) missing.push(`an /etc/subuid entry for ${user}`);
  if (!(await hasSubidEntry('/etc/subgid', user, uid))) missing.push(`an /etc/subgid entry for ${user}`);
  if (missing.length === 0) return { modes: ['unshare'], detail: 'mode=unshare' };
  return { modes: [], detail: `mode=unshare needs ${missing.join(', ')}` };
}

async function probeBinfmt(foreign: Arch[], pathEnv?: string): Promise<HostFacts['binfmt']> {
  const dir = '/proc/sys/fs/binfmt_misc';
  const status = await readText(path.join(dir, 'status'));
  const mounted = status !== undefined;
  const entries: Partial<Record<Arch, BinfmtEntry>> = {};
  for (const arch of foreign) {
    const name = QEMU_USER[arch];
    const text = mounted ? await readText(path.join(dir, name)) : undefined;
    const parsed = text !== undefined ? parseBinfmtEntry(text) : undefined;
    entries[arch] = {
      name,
      registered: parsed !== undefined,
      enabled: parsed?.enabled ?? false,
      interpreter: parsed?.interpreter,
      flags: parsed?.flags,
      installed: await exists(path.join('/usr/share/binfmts', name)),
    };
  }
  return { mounted, enabled: status?.trim() === 'enabled', updateBinfmts: !!(await findOnPath('update-binfmts', pathEnv ?? `${process.env.PATH ?? ''}:/usr/sbin:/sbin`)), entries };
}

async function probeLoop(pathEnv?: string): Promise<HostFacts['loop']> {
  const control = await exists('/dev/loop-control');
  if (!control) return { control, detail: 'no /dev/loop-control (loop module not loaded, or a container without loop devices)' };
  const losetup = await findOnPath('losetup', pathEnv ?? `${process.env.PATH ?? ''}:/usr/sbin:/sbin`);
  if (!losetup) return { control, detail: '/dev/loop-control present, but losetup is not installed' };
  const r = await capture(losetup, ['-f'], { timeoutMs: 5000 });
  const free = r.code === 0 ? firstMeaningfulLine(r.stdout) : undefined;
  if (free) return { control, free, detail: `free loop device ${free}` };
  return { control, detail: `losetup -f failed: ${firstMeaningfulLine(r.stderr) ?? r.spawnError ?? `exit ${r.code}`}` };
}

// ---------------------------------------------------------------------------
// qemu boot probes (KVM and TCG)

const KVM_TIMEOUT_MS = 8000;
const TCG_TIMEOUT_MS = 20000;
const QEMU = 'qemu-system-x86_64';

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
  const text = (await readText('/proc/cpuinfo')) ?? '';
  const m = /^model name\s*:\s*(.*)$/m.exec(text) ?? /^CPU part\s*:\s*(.*)$/m.exec(text);
  return m?.[1]?.trim() ?? os.machine();
}

/**
 * KVM facts with a probe boot under KVM and under TCG. The result is cached in
 * cacheDir keyed by qemu version + kernel release (+ CPU model and the probe itself),
 * so only the first build on a host pays for a hung KVM probe.
 */
export async function probeAccel(cacheDir?: string, opts: { force?: boolean } = {}): Promise<KvmFacts> {
  const device = await exists('/dev/kvm');
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
      const j = JSON.parse((await readText(file)) ?? '') as { key?: string; probe?: BootProbe; tcg?: BootProbe };
      if (j.key === key) return { device, accessible, qemu, probe: j.probe, tcg: j.tcg, cached: true };
    } catch {
      // no or unreadable cache: probe again
    }
  }
  // One at a time: two qemus on a 2-core host would slow the TCG one into its timeout.
  const probe = device && accessible ? await runBootProbe('kvm') : undefined;
  const tcg = await runBootProbe('tcg');
  // A spawn failure says nothing lasting about the host; do not cache it.
  if (file && !/not found/.test(tcg.detail)) await writeFileAtomic(file, JSON.stringify({ key, qemu, kernel: os.release(), probe, tcg }, null, 1) + '\n');
  return { device, accessible, qemu, probe, tcg, cached: false };
}

// ---------------------------------------------------------------------------

/** Everything doctor reports. With boot: false (preflight) no qemu is started. */
export async function probeHost(opts: ProbeOptions = {}): Promise<HostFacts> {
  const uid = process.getuid?.() ?? -1;
  const root = uid === 0;
  let user = String(uid);
  try {
    user = os.userInfo().username;
  } catch {
    // no passwd entry (containers): the uid will do
  }
  const hostArch = debianArch(process.arch);
  const foreign = [...new Set(opts.arches ?? ARCHES)].filter((a) => a !== hostArch).sort();
  const [userns, binfmt, loop, tools, kvm] = await Promise.all([
    probeUserns(),
    probeBinfmt(foreign, opts.pathEnv),
    probeLoop(opts.pathEnv),
    probeTools(opts.tools ?? [], opts.cacheDir, opts.pathEnv),
    opts.boot === false ? Promise.resolve(undefined) : probeAccel(opts.cacheDir),
  ]);
  const mmdebstrap = await probeMmdebstrap(root, user, uid, userns, opts.pathEnv);
  return { uid, root, user, hostArch, machine: os.machine(), kernel: os.release(), userns, mmdebstrap, binfmt, loop, kvm, tools };
}
