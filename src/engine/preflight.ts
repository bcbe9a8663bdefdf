// Can this machine run the stages a build will run? The cheap host probes (no qemu
// boots) and the pure judgement of their facts, with the exact fix for each problem.
// The build runs it before any stage starts; `pipeline doctor` reports the same
// findings plus its qemu probes.
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ARCH, ARCHES, hostArch, type Arch, type ToolSpec } from '../stage.js';
import { spawnProcess } from './process.js';
import { aptInstallLine, findOnPath, firstMeaningfulLine, probeTools, type PackageNeed, type ToolFact } from './tools.js';

// ---------------------------------------------------------------------------
// Facts

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

export interface PreflightFacts {
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
  tools: ToolFact[];
  /** Installed or not, for each package asked about; undefined when dpkg-query is not available. */
  packages?: Record<string, boolean>;
}

export interface PreflightProbeOptions {
  tools?: ToolSpec[];
  /** Debian packages to look up with dpkg-query. */
  packages?: string[];
  arches?: readonly Arch[];
  /** Where the tool-version memo lives; no memo without it. */
  cacheDir?: string;
  /** PATH to search tools on (default process.env.PATH). */
  pathEnv?: string;
}

// ---------------------------------------------------------------------------
// Pure helpers

/** binfmt entry names of the qemu-user emulators, from the arch table. */
export const QEMU_USER = Object.fromEntries(ARCHES.map((a) => [a, ARCH[a].qemuUser])) as Record<Arch, string>;

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

/** Installed packages from `dpkg-query -W -f '${Package}\t${Status}\n'` output. */
export function parseDpkgQuery(text: string): Set<string> {
  const out = new Set<string>();
  for (const line of text.split('\n')) {
    const [name, status] = line.split('\t');
    if (name && status?.trim() === 'install ok installed') out.add(name);
  }
  return out;
}

/** binfmt_misc runs this arch's binaries right now. */
export function canExecute(facts: PreflightFacts, arch: Arch): boolean {
  if (facts.hostArch === arch) return true;
  const e = facts.binfmt.entries[arch];
  return !!(facts.binfmt.mounted && facts.binfmt.enabled && e?.registered && e.enabled);
}

// ---------------------------------------------------------------------------
// Cheap probes

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

const sbinPath = (pathEnv?: string) => pathEnv ?? `${process.env.PATH ?? ''}:/usr/sbin:/sbin`;

async function probeUserns(): Promise<PreflightFacts['userns']> {
  const unprivilegedClone = await readInt('/proc/sys/kernel/unprivileged_userns_clone');
  const maxUserNamespaces = await readInt('/proc/sys/user/max_user_namespaces');
  // Not inside the runner's PID namespace: the probe is about this process's own rights.
  const r = await spawnProcess('unshare', ['--user', '--map-root-user', 'true'], { capture: true, timeoutMs: 5000, isolate: false });
  const usable = !r.spawnError && !r.timedOut && r.exitCode === 0;
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
  else detail = `unshare --user --map-root-user failed: ${firstMeaningfulLine(r.stderr) ?? `exit ${r.exitCode}`}${sysctl ? ` (${sysctl})` : ''}`;
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

async function probeMmdebstrap(root: boolean, user: string, uid: number, userns: PreflightFacts['userns'], pathEnv?: string): Promise<PreflightFacts['mmdebstrap']> {
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

async function probeBinfmt(foreign: Arch[], pathEnv?: string): Promise<PreflightFacts['binfmt']> {
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
  return { mounted, enabled: status?.trim() === 'enabled', updateBinfmts: !!(await findOnPath('update-binfmts', sbinPath(pathEnv))), entries };
}

async function probeLoop(pathEnv?: string): Promise<PreflightFacts['loop']> {
  const control = await exists('/dev/loop-control');
  if (!control) return { control, detail: 'no /dev/loop-control (loop module not loaded, or a container without loop devices)' };
  const losetup = await findOnPath('losetup', sbinPath(pathEnv));
  if (!losetup) return { control, detail: '/dev/loop-control present, but losetup is not installed' };
  const r = await spawnProcess(losetup, ['-f'], { capture: true, timeoutMs: 5000, isolate: false });
  const free = r.exitCode === 0 ? firstMeaningfulLine(r.stdout) : undefined;
  if (free) return { control, free, detail: `free loop device ${free}` };
  return { control, detail: `losetup -f failed: ${firstMeaningfulLine(r.stderr) ?? r.spawnError ?? `exit ${r.exitCode}`}` };
}

/** Which of these packages are installed, by dpkg's database; undefined without dpkg-query. */
async function probePackages(names: string[]): Promise<Record<string, boolean> | undefined> {
  if (!names.length) return {};
  // Listing everything exits 0; asking for an unknown package by name would not.
  const r = await spawnProcess('dpkg-query', ['-W', '-f', '${Package}\t${Status}\n'], { capture: true, timeoutMs: 15000, isolate: false });
  if (r.exitCode !== 0) return undefined;
  const installed = parseDpkgQuery(r.stdout);
  return Object.fromEntries([...new Set(names)].sort().map((n) => [n, installed.has(n)]));
}

/** The host facts the build's preflight judges (no qemu is started). */
export async function probePreflight(opts: PreflightProbeOptions = {}): Promise<PreflightFacts> {
  const uid = process.getuid?.() ?? -1;
  const root = uid === 0;
  let user = String(uid);
  try {
    user = os.userInfo().username;
  } catch {
    // no passwd entry (containers): the uid will do
  }
  const host = hostArch();
  const foreign = [...new Set(opts.arches ?? ARCHES)].filter((a) => a !== host).sort();
  const [userns, binfmt, loop, tools, packages] = await Promise.all([
    probeUserns(),
    probeBinfmt(foreign, opts.pathEnv),
    probeLoop(opts.pathEnv),
    probeTools(opts.tools ?? [], opts.cacheDir, opts.pathEnv),
    probePackages(opts.packages ?? []),
  ]);
  const mmdebstrap = await probeMmdebstrap(root, user, uid, userns, opts.pathEnv);
  return { uid, root, user, hostArch: host, machine: os.machine(), kernel: os.release(), userns, mmdebstrap, binfmt, loop, tools, packages };
}

// ---------------------------------------------------------------------------
// Findings (pure)

export type Level = 'ok' | 'warn' | 'error';

export interface Finding {
  level: Level;
  /** Short subject: "root", "mkcomposefs", "kvm". */
  what: string;
  /** Plain words, one line. */
  detail: string;
  /** The exact command(s) that fix it. */
  fix?: string;
}

export interface Needs {
  tools: ToolSpec[];
  arches: Arch[];
  needsRoot?: boolean;
  needsLoop?: boolean;
  /** Reported too, but missing ones are warnings (e.g. arm64-only tools when doctor runs without a spec). */
  optionalTools?: ToolSpec[];
  /** Debian packages the tools need at run time that have no executable to look for (ToolSpec.packages). */
  packages?: PackageNeed[];
  /** Like optionalTools: reported, but missing ones are warnings. */
  optionalPackages?: PackageNeed[];
}

const BINFMT_PACKAGES = 'apt-get install -y binfmt-support qemu-user-static';
const BINFMT_MOUNT = 'mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc';

function rootFinding(f: PreflightFacts, needs: Needs): Finding {
  const usesMmdebstrap = needs.tools.some((t) => t.name === 'mmdebstrap');
  if (f.root) return { level: 'ok', what: 'root', detail: `running as root (mmdebstrap ${f.mmdebstrap.detail})` };
  const who = `running as ${f.user} (uid ${f.uid})`;
  if (needs.needsRoot) return { level: 'error', what: 'root', detail: `${who}; this build needs root`, fix: 'run the build as root (e.g. with sudo)' };
  if (f.mmdebstrap.modes.includes('unshare')) return { level: 'ok', what: 'root', detail: `${who}; mmdebstrap will use mode=unshare` };
  if (usesMmdebstrap) {
    return {
      level: 'error',
      what: 'root',
      detail: `${who}, and mmdebstrap cannot run: mode=root needs root, ${f.mmdebstrap.detail}`,
      fix: `run the build as root, or: apt-get install -y uidmap && usermod --add-subuids 100000-165535 --add-subgids 100000-165535 ${f.user}`,
    };
  }
  return { level: 'warn', what: 'root', detail: `${who}; stages that need root will fail` };
}

function usernsFinding(f: PreflightFacts): Finding {
  if (f.userns.usable) return { level: 'ok', what: 'user namespaces', detail: f.userns.detail };
  let fix: string | undefined;
  if (f.userns.unprivilegedClone === 0) fix = 'sysctl -w kernel.unprivileged_userns_clone=1';
  else if (f.userns.maxUserNamespaces === 0) fix = 'sysctl -w user.max_user_namespaces=15000';
  // Only fatal through mmdebstrap, which rootFinding already judges.
  return { level: 'warn', what: 'user namespaces', detail: `not usable: ${f.userns.detail}`, fix };
}

function binfmtFindings(f: PreflightFacts, needs: Needs): Finding[] {
  const out: Finding[] = [];
  for (const arch of Object.keys(f.binfmt.entries).sort() as Arch[]) {
    const e = f.binfmt.entries[arch]!;
    const what = `${arch} emulation`;
    const needed = needs.arches.includes(arch);
    if (canExecute(f, arch)) {
      const how = [e.interpreter, e.flags !== undefined ? `flags ${e.flags || '-'}` : undefined].filter(Boolean).join(', ');
      out.push({ level: 'ok', what, detail: `binfmt_misc runs ${arch} binaries through ${e.name}${how ? ` (${how})` : ''}` });
      continue;
    }
    let problem: string;
    if (!f.binfmt.mounted) problem = 'binfmt_misc is not mounted';
    else if (!f.binfmt.enabled) problem = 'binfmt_misc is switched off';
    else if (!e.registered) problem = `${e.name} is not registered with binfmt_misc`;
    else problem = `${e.name} is registered but disabled`;
    const steps: string[] = [];
    if (!e.installed || !f.binfmt.updateBinfmts) steps.push(BINFMT_PACKAGES);
    if (!f.binfmt.mounted) steps.push(BINFMT_MOUNT);
    if (f.binfmt.mounted && !f.binfmt.enabled) steps.push('echo 1 > /proc/sys/fs/binfmt_misc/status');
    steps.push(`update-binfmts --enable ${QEMU_USER[arch]}`);
    out.push({
      level: needed ? 'error' : 'warn',
      what,
      detail: `${problem}; ${needed ? `${arch} builds need it` : `only ${arch} builds need it`}`,
      fix: steps.join(' && '),
    });
  }
  return out;
}

function loopFinding(f: PreflightFacts, needs: Needs): Finding {
  if (f.loop.control && f.loop.free) return { level: 'ok', what: 'loop devices', detail: `/dev/loop-control present, ${f.loop.detail}` };
  return {
    level: needs.needsLoop ? 'error' : 'warn',
    what: 'loop devices',
    detail: `${f.loop.detail}${needs.needsLoop ? '; this build needs them' : ''}`,
    fix: f.loop.control ? undefined : 'modprobe loop',
  };
}

/** Root, user namespaces, foreign-arch emulation, loop devices. */
export function hostFindings(f: PreflightFacts, needs: Needs): Finding[] {
  return [rootFinding(f, needs), usernsFinding(f), ...binfmtFindings(f, needs), loopFinding(f, needs)];
}

/**
 * One finding per tool and per runtime package. Everything required that is missing
 * shares one apt-get line (printed once); the optional ones share another.
 */
export function installFindings(f: PreflightFacts, needs: Needs): Finding[] {
  const byName = new Map<string, ToolFact>(f.tools.map((t) => [t.name, t]));
  const wanted = new Map(needs.tools.map((t) => [t.name, t]));
  const optional = new Map((needs.optionalTools ?? []).filter((t) => !wanted.has(t.name)).map((t) => [t.name, t]));
  const wantedPkgs = new Map((needs.packages ?? []).map((p) => [p.apt, p]));
  const optionalPkgs = new Map((needs.optionalPackages ?? []).filter((p) => !wantedPkgs.has(p.apt)).map((p) => [p.apt, p]));
  // Only what was looked up and not found is missing (not what was never asked about).
  const toolMissing = (n: string) => byName.has(n) && !byName.get(n)!.path;
  const pkgMissing = (n: string) => f.packages?.[n] === false;
  const fixFor = (tools: Map<string, ToolSpec>, pkgs: Map<string, PackageNeed>) => {
    const missing = [...[...tools.values()].filter((t) => toolMissing(t.name)), ...[...pkgs.values()].filter((p) => pkgMissing(p.apt))];
    return missing.length ? aptInstallLine(missing) : undefined;
  };
  const fix = fixFor(wanted, wantedPkgs);
  const optionalFix = fixFor(optional, optionalPkgs);

  const tools = [...new Set([...wanted.keys(), ...optional.keys()])].sort().map((name): Finding => {
    const t = byName.get(name);
    const isOptional = !wanted.has(name);
    if (!t) return { level: 'warn', what: name, detail: 'was not checked' };
    if (!t.path && isOptional) return { level: 'warn', what: name, detail: 'not found (optional)', fix: optionalFix };
    if (!t.path) return { level: 'error', what: name, detail: 'not found', fix };
    if (t.error) return { level: 'error', what: name, detail: `found at ${t.path}, but reading its version failed: ${t.error}` };
    if (t.versionKnown === false) return { level: 'warn', what: name, detail: `found at ${t.path}, but it prints no version; its content hash stands in` };
    return { level: 'ok', what: name, detail: t.version ?? '' };
  });
  const pkgs = [...new Set([...wantedPkgs.keys(), ...optionalPkgs.keys()])].sort().map((name): Finding => {
    const p = wantedPkgs.get(name) ?? optionalPkgs.get(name)!;
    const isOptional = !wantedPkgs.has(name);
    const installed = f.packages?.[name];
    if (f.packages === undefined) return { level: 'warn', what: name, detail: 'cannot check: dpkg-query is not available' };
    if (installed === undefined) return { level: 'warn', what: name, detail: 'was not checked' };
    if (installed) return { level: 'ok', what: name, detail: `installed (${p.by} needs it)` };
    if (isOptional) return { level: 'warn', what: name, detail: `not installed (optional; ${p.by} needs it)`, fix: optionalFix };
    return { level: 'error', what: name, detail: `not installed; ${p.by} needs it`, fix };
  });
  return [...tools, ...pkgs];
}

/** Turn preflight facts into findings for a build that needs `needs`. Pure. */
export function assessPreflight(facts: PreflightFacts, needs: Needs): Finding[] {
  return [...hostFindings(facts, needs), ...installFindings(facts, needs)];
}

/**
 * Build preflight: the cheap probes only (no qemu), so a build that cannot run fails
 * before any stage starts. Returns the error findings; empty means go.
 */
export async function preflight(needs: Needs & { cacheDir?: string }): Promise<Finding[]> {
  const facts = await probePreflight({
    tools: needs.tools,
    packages: (needs.packages ?? []).map((p) => p.apt),
    arches: needs.arches,
    cacheDir: needs.cacheDir,
  });
  return assessPreflight(facts, needs).filter((f) => f.level === 'error');
}
