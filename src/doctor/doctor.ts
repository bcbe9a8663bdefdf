// `pipeline doctor`: what this machine offers, in plain words. The build's own
// preflight (src/engine/preflight.ts) judges root, emulation, loop devices, tools and
// packages; doctor adds the qemu boot probes and looks at every kind, not one plan.
// assessHost and formatDoctor are pure: probe facts in, findings and text out.
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { canExecute, hostFindings, installFindings, type Finding, type Level, type Needs, type PreflightFacts } from '../engine/preflight.js';
import { allVariants } from '../engine/build.js';
import { requirements } from '../engine/compile.js';
import { loadKinds, PACKAGE_ROOT, type Kinds } from '../engine/kinds.js';
import { loadSpecFile } from '../engine/spec.js';
import { runtimePackages } from '../engine/tools.js';
import { ARCH, ARCHES, type Arch, type StageModule, type ToolSpec } from '../stage.js';
import { probeAccel, probeHost, type HostFacts } from './probe.js';
import { chooseScratch, memAvailable } from '../engine/scratch.js';
import { hostKeyringFiles, suiteKeyFindings } from './keyring.js';

function kvmFindings(f: HostFacts): Finding[] {
  const k = f.kvm;
  if (!k) return [];
  const out: Finding[] = [];
  const cached = k.cached ? ' (cached probe)' : '';
  if (!k.qemu) {
    out.push({ level: 'warn', what: 'qemu', detail: `${ARCH.amd64.qemuSystem.name} not found; boot tests cannot run`, fix: `apt-get install -y ${ARCH.amd64.qemuSystem.apt}` });
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

/** Turn probe facts into findings for a build that needs `needs`. Pure. */
export function assessHost(facts: HostFacts, needs: Needs): Finding[] {
  return [...hostFindings(facts, needs), ...kvmFindings(facts), ...installFindings(facts, needs)];
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

/** qemu accelerator for boot tests: KVM only if the (cached) probe boot under KVM worked. */
export async function chooseAccel(cacheDir: string): Promise<'kvm' | 'tcg'> {
  const k = await probeAccel(cacheDir);
  return k.device && k.accessible && k.probe?.ok ? 'kvm' : 'tcg';
}

/** qemu system emulators boot tests use, per guest arch. */
export const QEMU_SYSTEM = Object.fromEntries(ARCHES.map((a) => [a, ARCH[a].qemuSystem])) as Record<Arch, ToolSpec>;

/** Add tools to a by-name map, merging a tool's runtime packages (they differ per arch). */
function addTools(into: Map<string, ToolSpec>, tools: ToolSpec[]): void {
  for (const t of tools) {
    const packages = [...new Set([...(into.get(t.name)?.packages ?? []), ...(t.packages ?? [])])].sort();
    into.set(t.name, packages.length ? { ...t, packages } : t);
  }
}

/**
 * Every tool the kinds run for these arches, with their default params. A kind whose
 * params have required fields is skipped, or with `unparsed` asked with none at all
 * (what it runs whatever the spec says).
 */
function kindTools(kinds: Iterable<StageModule>, arches: readonly Arch[], opts: { unparsed?: boolean } = {}): Map<string, ToolSpec> {
  const tools = new Map<string, ToolSpec>();
  for (const mod of kinds) {
    const parsed = mod.params.safeParse({});
    if (!parsed.success && !opts.unparsed) continue;
    for (const arch of arches) {
      if (mod.arches && !mod.arches.includes(arch)) continue;
      try {
        addTools(tools, mod.tools((parsed.success ? parsed.data : {}) as never, arch));
      } catch {
        // tools() may need params the defaults do not give; the specs' own stages cover it
      }
    }
  }
  return tools;
}

const byName = (a: ToolSpec, b: ToolSpec) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);

/**
 * Every tool the known stage kinds run with their default params (kinds whose params
 * have required fields are skipped), plus the qemu emulators for boot tests. For
 * `doctor` without a spec.
 */
export function knownTools(kinds: Iterable<StageModule>, arches: readonly Arch[] = ARCHES): ToolSpec[] {
  const tools = kindTools(kinds, arches);
  for (const arch of arches) tools.set(QEMU_SYSTEM[arch].name, QEMU_SYSTEM[arch]);
  return [...tools.values()].sort(byName);
}

/**
 * The Debian packages builds on this machine need: every kind's tools for every arch
 * (ToolSpec.apt) and their runtime packages (ToolSpec.packages), plus those of
 * `extra` tools (the stages of the shipped specs, with their real params). Sorted.
 * `pipeline doctor --apt-packages` prints it for scripts/setup.
 */
export function aptPackages(kinds: Iterable<StageModule>, extra: ToolSpec[] = []): string[] {
  const tools = kindTools(kinds, ARCHES, { unparsed: true });
  addTools(tools, extra);
  const out = new Set<string>();
  for (const t of tools.values()) for (const p of [t.apt, ...(t.packages ?? [])]) out.add(p);
  return [...out].sort();
}

/**
 * The tools of every stage the shipped specs (pipelines/*.yaml) build, for every arch
 * each declares, with the params they really use: a tool that only some params bring
 * in is found here. (Test fixtures are left out: some use test-only kinds.)
 */
export function shippedSpecTools(kinds: Kinds): ToolSpec[] {
  const tools = new Map<string, ToolSpec>();
  const dir = path.join(PACKAGE_ROOT, 'pipelines');
  for (const f of existsSync(dir) ? readdirSync(dir).filter((n) => n.endsWith('.yaml')).sort() : []) {
    const loaded = loadSpecFile(path.join(dir, f), kinds);
    for (const arch of loaded.spec.arches) addTools(tools, requirements(loaded, arch, allVariants(loaded, arch), kinds).tools);
  }
  return [...tools.values()];
}

/**
 * What doctor holds this machine to: the kinds' tools and runtime packages for every
 * arch it can build right now (its own, and a foreign one binfmt_misc already runs:
 * there a missing package such as arch-test is what breaks the build), as errors;
 * those of the other arches as warnings.
 */
export function doctorNeeds(kinds: Iterable<StageModule>, facts: PreflightFacts): Needs {
  const all = [...kinds];
  const arches = ARCHES.filter((a) => canExecute(facts, a));
  const tools = knownTools(all, arches);
  const optionalTools = knownTools(all, ARCHES.filter((a) => !arches.includes(a)));
  return { tools, optionalTools, arches, packages: runtimePackages(tools), optionalPackages: runtimePackages(optionalTools) };
}

/**
 * `pipeline doctor`: probe everything (including the qemu boots), print the report,
 * return the exit code (1 if anything would stop a build).
 */
export async function runDoctor(opts: { cacheDir?: string; color?: boolean; out?: NodeJS.WritableStream } = {}): Promise<number> {
  const out = opts.out ?? process.stdout;
  const kinds = [...(await loadKinds()).values()];
  const all = knownTools(kinds, ARCHES);
  const facts = await probeHost({ tools: all, packages: runtimePackages(all).map((p) => p.apt), arches: ARCHES, cacheDir: opts.cacheDir });
  const findings = [...assessHost(facts, doctorNeeds(kinds, facts)), scratchFinding(kinds), ...suiteKeyFindings(hostKeyringFiles())];
  const color = opts.color ?? (out === process.stdout && process.stdout.isTTY === true && !process.env.NO_COLOR);
  out.write(formatDoctor(findings, { color }));
  return findings.some((f) => f.level === 'error') ? 1 : 0;
}

/** Where the biggest declared build root (mmdebstrap's) would go now: RAM or disk, and why. */
export function scratchFinding(kinds: StageModule[], o: { memAvailable?: number; mode?: string; root?: boolean } = {}): Finding {
  const want = Math.max(0, ...kinds.map((k) => k.memoryWorkDir ?? 0)) || undefined;
  const c = chooseScratch({ want, memAvailable: o.memAvailable ?? memAvailable(), reserved: 0, mode: o.mode ?? process.env.PIPELINE_SCRATCH, root: o.root ?? process.getuid?.() === 0 });
  return { level: 'ok', what: 'build roots', detail: c.memory ? `chroots build in RAM (tmpfs, ${c.why})` : `chroots build on disk: ${c.why}` };
}

/** Entry point for `pipeline doctor` (and `--apt-packages`, which only lists and probes nothing). */
export async function doctorCommand(opts: { cacheDir: string; aptPackages?: boolean }): Promise<number> {
  if (opts.aptPackages) {
    const kinds = await loadKinds();
    process.stdout.write(aptPackages(kinds.values(), shippedSpecTools(kinds)).map((p) => `${p}\n`).join(''));
    return 0;
  }
  return runDoctor({ cacheDir: opts.cacheDir });
}
