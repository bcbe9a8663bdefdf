// `pipeline doctor` and the build preflight. assessHost and formatDoctor are pure:
// probe facts in, findings and text out. The I/O (probing) is in probe.ts.
import { ARCHES, type Arch, type StageModule, type ToolSpec } from '../stage.js';
import { debianArch, probeAccel, probeHost, QEMU_USER, type HostFacts, type ToolFact } from './probe.js';

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
}

/** One apt-get line for every missing tool: packages deduplicated and sorted. */
export function aptInstallLine(missing: { apt: string }[]): string {
  return `apt-get install -y ${[...new Set(missing.map((t) => t.apt))].sort().join(' ')}`;
}

const BINFMT_PACKAGES = 'apt-get install -y binfmt-support qemu-user-static';
const BINFMT_MOUNT = 'mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc';

function rootFinding(f: HostFacts, needs: Needs): Finding {
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

function usernsFinding(f: HostFacts): Finding {
  if (f.userns.usable) return { level: 'ok', what: 'user namespaces', detail: f.userns.detail };
  let fix: string | undefined;
  if (f.userns.unprivilegedClone === 0) fix = 'sysctl -w kernel.unprivileged_userns_clone=1';
  else if (f.userns.maxUserNamespaces === 0) fix = 'sysctl -w user.max_user_namespaces=15000';
  // Only fatal through mmdebstrap, which rootFinding already judges.
  return { level: 'warn', what: 'user namespaces', detail: `not usable: ${f.userns.detail}`, fix };
}

function binfmtFindings(f: HostFacts, needs: Needs): Finding[] {
  const out: Finding[] = [];
  for (const arch of Object.keys(f.binfmt.entries).sort() as Arch[]) {
    const e = f.binfmt.entries[arch]!;
    const what = `${arch} emulation`;
    const needed = needs.arches.includes(arch);
    if (f.binfmt.mounted && f.binfmt.enabled && e.registered && e.enabled) {
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

function loopFinding(f: HostFacts, needs: Needs): Finding {
  if (f.loop.control && f.loop.free) return { level: 'ok', what: 'loop devices', detail: `/dev/loop-control present, ${f.loop.detail}` };
  return {
    level: needs.needsLoop ? 'error' : 'warn',
    what: 'loop devices',
    detail: `${f.loop.detail}${needs.needsLoop ? '; this build needs them' : ''}`,
    fix: f.loop.control ? undefined : 'modprobe loop',
  };
}

function kvmFindings(f: HostFacts): Finding[] {
  const k = f.kvm;
  if (!k) return [];
  const out: Finding[] = [];
  const cached = k.cached ? ' (cached probe)' : '';
  if (!k.qemu) {
    out.push({ level: 'warn', what: 'qemu', detail: 'qemu-system-x86_64 not found; boot tests cannot run', fix: 'apt-get install -y qemu-system-x86' });
    return out;
  }
  if (!k.device) out.push({ level: 'warn', what: 'kvm', detail: 'no /dev/kvm; using software emulation (TCG)' });
  else if (!k.accessible) out.push({ level: 'warn', what: 'kvm', detail: `/dev/kvm is not accessible to ${f.user}; using software emulation (TCG)`, fix: `usermod -aG kvm ${f.user}` });
  else if (k.probe?.ok) out.push({ level: 'ok', what: 'kvm', detail: `KVM boots a test payload; qemu will use -accel kvm${cached}` });
  else out.push({ level: 'warn', what: 'kvm', detail: `KVM present but does not boot; using software emulation (TCG)${k.probe ? ` — ${k.probe.detail}` : ''}${cached}` });
  if (k.tcg?.ok) out.push({ level: 'ok', what: 'tcg', detail: `software emulation boots a test payload${cached}` });
  else out.push({ level: 'warn', what: 'tcg', detail: `software emulation does not boot a test payload${k.tcg ? `: ${k.tcg.detail}` : ''}; boot tests will fail${cached}` });
  return out;
}

function toolFindings(f: HostFacts, needs: Needs): Finding[] {
  const byName = new Map<string, ToolFact>(f.tools.map((t) => [t.name, t]));
  const wanted = new Map<string, ToolSpec>();
  for (const t of needs.tools) wanted.set(t.name, t);
  const optional = new Map<string, ToolSpec>();
  for (const t of needs.optionalTools ?? []) if (!wanted.has(t.name)) optional.set(t.name, t);
  const names = [...new Set([...wanted.keys(), ...optional.keys()])].sort();
  const missingFix = (pool: Map<string, ToolSpec>) => {
    const missing = [...pool.keys()].filter((n) => !byName.get(n)?.path).map((n) => pool.get(n)!);
    return missing.length ? aptInstallLine(missing) : undefined;
  };
  const fix = missingFix(wanted);
  const optionalFix = missingFix(optional);
  return names.map((name): Finding => {
    const t = byName.get(name);
    const isOptional = !wanted.has(name);
    if (!t) return { level: 'warn', what: name, detail: 'was not checked' };
    if (!t.path && isOptional) return { level: 'warn', what: name, detail: 'not found (optional)', fix: optionalFix };
    if (!t.path) return { level: 'error', what: name, detail: 'not found', fix };
    if (t.error) return { level: 'error', what: name, detail: `found at ${t.path}, but reading its version failed: ${t.error}` };
    if (t.versionKnown === false) return { level: 'warn', what: name, detail: `found at ${t.path}, but it prints no version; its content hash stands in` };
    return { level: 'ok', what: name, detail: t.version ?? '' };
  });
}

/** Turn probe facts into findings for a build that needs `needs`. Pure. */
export function assessHost(facts: HostFacts, needs: Needs): Finding[] {
  return [
    rootFinding(facts, needs),
    usernsFinding(facts),
    ...binfmtFindings(facts, needs),
    loopFinding(facts, needs),
    ...kvmFindings(facts),
    ...toolFindings(facts, needs),
  ];
}

const SYMBOL: Record<Level, string> = { ok: '✓', warn: '!', error: '✗' };
const COLOUR: Record<Level, string> = { ok: '\x1b[32m', warn: '\x1b[33m', error: '\x1b[31m' };

/**
 * One line per finding: `✓ root: running as root (mmdebstrap mode=root)`. A fix shared
 * by several findings (one apt-get line for all missing tools) is printed once, after
 * the last of them. Colour only when asked (the CLI asks when stdout is a TTY). Pure.
 */
export function formatDoctor(findings: Finding[], opts: { color?: boolean } = {}): string {
  const uses = new Map<string, number>();
  for (const f of findings) if (f.fix) uses.set(f.fix, (uses.get(f.fix) ?? 0) + 1);
  const seen = new Map<string, number>();
  const lines: string[] = [];
  for (const f of findings) {
    const sym = opts.color ? `${COLOUR[f.level]}${SYMBOL[f.level]}\x1b[0m` : SYMBOL[f.level];
    const shared = f.fix !== undefined && uses.get(f.fix)! > 1;
    lines.push(`${sym} ${f.what}: ${f.detail}${f.fix && !shared ? ` — ${f.fix}` : ''}`);
    if (f.fix && shared) {
      const n = (seen.get(f.fix) ?? 0) + 1;
      seen.set(f.fix, n);
      if (n === uses.get(f.fix)) lines.push(`  fix: ${f.fix}`);
    }
  }
  return lines.join('\n') + (lines.length ? '\n' : '');
}

/**
 * Build preflight: the cheap probes only (no qemu), so a build that cannot run fails
 * before any stage starts. Returns the error findings; empty means go.
 */
export async function preflight(needs: Needs & { cacheDir?: string }): Promise<Finding[]> {
  const facts = await probeHost({ tools: needs.tools, arches: needs.arches, cacheDir: needs.cacheDir, boot: false });
  return assessHost(facts, needs).filter((f) => f.level === 'error');
}

/** qemu accelerator for boot tests: KVM only if the (cached) probe boot under KVM worked. */
export async function chooseAccel(cacheDir: string): Promise<'kvm' | 'tcg'> {
  const k = await probeAccel(cacheDir);
  return k.device && k.accessible && k.probe?.ok ? 'kvm' : 'tcg';
}

/** qemu system emulators boot tests use, per guest arch. */
export const QEMU_SYSTEM: Record<Arch, ToolSpec> = {
  amd64: { name: 'qemu-system-x86_64', apt: 'qemu-system-x86' },
  arm64: { name: 'qemu-system-aarch64', apt: 'qemu-system-arm' },
};

/**
 * Every tool the known stage kinds run with their default params (kinds whose params
 * have required fields are asked with what parses; the rest are skipped), plus the qemu
 * emulators for boot tests. For `doctor` without a spec.
 */
export function knownTools(kinds: Iterable<StageModule>, arches: readonly Arch[] = ARCHES): ToolSpec[] {
  const tools = new Map<string, ToolSpec>();
  for (const mod of kinds) {
    const parsed = mod.params.safeParse({});
    if (!parsed.success) continue;
    for (const arch of arches) {
      if (mod.arches && !mod.arches.includes(arch)) continue;
      try {
        for (const t of mod.tools(parsed.data as never, arch)) tools.set(t.name, t);
      } catch {
        // tools() may need params the defaults do not give
      }
    }
  }
  for (const arch of arches) tools.set(QEMU_SYSTEM[arch].name, QEMU_SYSTEM[arch]);
  return [...tools.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/**
 * `pipeline doctor`: probe everything (including the qemu boots), print the report,
 * return the exit code (1 if anything would stop a build).
 */
export async function runDoctor(
  opts: { cacheDir?: string; tools?: ToolSpec[]; arches?: Arch[]; color?: boolean; out?: NodeJS.WritableStream } = {},
): Promise<number> {
  const out = opts.out ?? process.stdout;
  // Without a spec only the host's own arch is required; the others are reported as warnings.
  const hostArch = debianArch(process.arch);
  const required = opts.arches ?? (hostArch ? [hostArch] : []);
  let tools = opts.tools;
  let optionalTools: ToolSpec[] = [];
  if (!tools) {
    const kinds = [...(await (await import('../engine/kinds.js')).loadKinds()).values()];
    tools = knownTools(kinds, required);
    optionalTools = knownTools(kinds, ARCHES.filter((a) => !required.includes(a)));
  }
  const facts = await probeHost({ tools: [...tools, ...optionalTools], arches: ARCHES, cacheDir: opts.cacheDir });
  const needs: Needs = { tools, optionalTools, arches: required };
  const findings = assessHost(facts, needs);
  const color = opts.color ?? (out === process.stdout && process.stdout.isTTY === true && !process.env.NO_COLOR);
  out.write(formatDoctor(findings, { color }));
  return findings.some((f) => f.level === 'error') ? 1 : 0;
}

/** Entry point for `pipeline doctor`. */
export async function doctorCommand(opts: { cacheDir: string }): Promise<number> {
  return runDoctor({ cacheDir: opts.cacheDir });
}
