// The compiler: spec + arch + variants -> a plan (the DAG of just the stages those
// variants need), each stage's cache key computed before anything runs.
// Pure: every fact from the outside world (tool versions, asset digests, the
// epoch) comes in through `Facts`, so a 200-stage spec compiles in milliseconds.
import type { Spec } from '../../schema/spec.js';
import { canonicalize, sha256 } from './canonical.js';
import { SpecError, UsageError } from './errors.js';
import { dotted, resolveParams, variantInfo, type Kinds, type LoadedSpec } from './spec.js';
import type { Arch, StageModule, ToolSpec } from '../stage.js';

/** Bump when the engine changes how it stores or interprets outputs. */
export const ENGINE_KEY_VERSION = 'pipeline-cache/1';

export interface Facts {
  /** Tool name -> version string, for every tool the plan's stages run. */
  toolVersions: Record<string, string>;
  /** Asset path (as a stage declared it) -> content digest. */
  assetDigests: Record<string, string>;
  sourceDateEpoch: number;
  /** The spec's lock, when there is one (src/lock/ implements it): locked stages install exactly what it names. */
  lock?: LockProvider;
}

/** A stage's part of the lock: its digest names one exact package set and goes into the key. */
export interface StageLock {
  digest: string;
  /** What the run needs (the locked .debs); opaque to the engine. */
  section: unknown;
}

/**
 * The lock as the compiler sees it. Pure: given a stage's resolved params it
 * returns the stage's lock (undefined for kinds a lock does not cover) or
 * throws a UsageError when the lock is stale for the stage ("run `pipeline lock`").
 */
export interface LockProvider {
  file: string;
  stage(name: string, kind: string, arch: Arch, params: unknown): StageLock | undefined;
}

/** Everything a cache key is made of, kept whole so `explain` can diff it. */
export interface KeyParts {
  engine: string;
  kind: string;
  version: string;
  arch: Arch;
  sourceDateEpoch: number;
  params: unknown;
  tools: Record<string, string>;
  assets: Record<string, string>;
  inputs: Record<string, string>;
  /** Locked stages only: the digest of the stage's lock section (absent, the key is what it was before locks). */
  lock?: string;
}

export interface PlanStage {
  name: string;
  kind: string;
  mod: StageModule;
  params: unknown;
  /** input name -> producing stage name */
  inputs: Record<string, string>;
  heavy: boolean;
  tools: ToolSpec[];
  parts: KeyParts;
  key: string;
  /** The stage's lock, for a locked stage. */
  lock?: StageLock;
}

export interface Plan {
  spec: { name: string; file: string; sha256: string };
  arch: Arch;
  variants: string[];
  sourceDateEpoch: number;
  /** variant -> stages whose files are published for it */
  sinks: Record<string, string[]>;
  /** Topological order: every stage after its inputs. */
  stages: PlanStage[];
}

export interface Requirements {
  stages: string[];
  tools: ToolSpec[];
  assets: string[];
  /** asset -> the first stage that declared it (for error locations) */
  assetOwners: Record<string, string>;
}

interface Target {
  order: string[];
  sinks: Record<string, string[]>;
  params: Map<string, unknown>;
}

function target(loaded: LoadedSpec, arch: string, variants: string[], kinds: Kinds): Target {
  const spec = loaded.spec;
  if (!spec.arches.includes(arch as Arch)) {
    throw new UsageError(`unknown arch "${arch}" for pipeline ${spec.name}; it builds: ${spec.arches.join(', ')}`);
  }
  if (!variants.length) throw new UsageError(`no variant given; ${spec.name} has: ${Object.keys(spec.variants).join(', ')}`);
  const sinks: Record<string, string[]> = {};
  for (const v of variants) {
    const info = variantInfo(spec, v);
    if (!info) throw new UsageError(`unknown variant "${v}" in ${spec.name}; it has: ${Object.keys(spec.variants).join(', ')}`);
    if (!info.arches.includes(arch as Arch)) throw new UsageError(`variant "${v}" is not built for ${arch}; it is for: ${info.arches.join(', ')}`);
    sinks[v] = info.stages;
  }
  const order = closure(spec, Object.values(sinks).flat());
  const params = new Map<string, unknown>();
  for (const name of order) {
    const st = spec.stages[name]!;
    const mod = kinds.get(st.kind)!;
    if (mod.arches && !mod.arches.includes(arch as Arch)) {
      throw new SpecError([{ loc: loaded.locate(['stages', name, 'kind']), path: `stages.${name}.kind`, message: `kind "${st.kind}" does not support ${arch}; it supports: ${mod.arches.join(', ')}` }]);
    }
    const r = resolveParams(spec, name, st, mod, arch as Arch);
    if (r.issues.length) throw new SpecError(r.issues.map((i) => ({ loc: loaded.locate(i.where), path: i.path, message: i.message })));
    params.set(name, r.params);
  }
  // Cross-stage checks once every stage's params are known (inputs come first in order).
  for (const name of order) {
    const st = spec.stages[name]!;
    const mod = kinds.get(st.kind)!;
    if (!mod.checkInputs) continue;
    const ins = Object.fromEntries(Object.entries(st.inputs).map(([k, ref]) => [k, { kind: spec.stages[ref]!.kind, params: params.get(ref) }]));
    const msgs = mod.checkInputs(params.get(name) as never, ins, arch as Arch);
    if (msgs.length) throw new SpecError(msgs.map((message) => ({ loc: loaded.locate(['stages', name, 'inputs']), path: `stages.${name}.inputs`, message })));
  }
  return { order, sinks, params };
}

// requirements() and compile() both ask each stage for its tools and assets; a
// kind's assets() may list directories (dracut), so ask once per resolved params
// object (resolveParams returns the same object for the same stage and arch).
const hooksCache = new WeakMap<object, Map<string, { tools: ToolSpec[]; assets: string[] }>>();

function stageHooks(mod: StageModule, params: unknown, arch: Arch): { tools: ToolSpec[]; assets: string[] } {
  const compute = () => ({ tools: mod.tools(params as never, arch), assets: mod.assets?.(params as never, arch) ?? [] });
  if (params === null || typeof params !== 'object') return compute();
  let byArch = hooksCache.get(params);
  if (!byArch) hooksCache.set(params, (byArch = new Map()));
  const k = `${mod.kind}\0${arch}`;
  let hit = byArch.get(k);
  if (!hit) byArch.set(k, (hit = compute()));
  return hit;
}

/** Stages reachable from the sinks, inputs first; deterministic for a given spec. */
export function closure(spec: Spec, sinks: string[]): string[] {
  const out: string[] = [];
  const seen = new Set<string>();
  const visit = (n: string) => {
    if (seen.has(n)) return;
    seen.add(n);
    const st = spec.stages[n]!;
    for (const k of Object.keys(st.inputs).sort()) visit(st.inputs[k]!);
    out.push(n);
  };
  for (const s of sinks) visit(s);
  return out;
}

/** What the I/O layer must look up before compile: tool versions and asset digests. */
export function requirements(loaded: LoadedSpec, arch: string, variants: string[], kinds: Kinds): Requirements {
  const t = target(loaded, arch, variants, kinds);
  const tools = new Map<string, ToolSpec>();
  const assets = new Set<string>();
  const assetOwners: Record<string, string> = {};
  for (const name of t.order) {
    const mod = kinds.get(loaded.spec.stages[name]!.kind)!;
    const hooks = stageHooks(mod, t.params.get(name), arch as Arch);
    for (const tool of hooks.tools) tools.set(tool.name, tool);
    for (const a of hooks.assets) {
      assets.add(a);
      assetOwners[a] ??= name;
    }
  }
  // Byte-wise, not localeCompare: the same under any locale, and the first
  // localeCompare of a process builds ICU's collator (~5-9 ms of a no-op build).
  return { stages: t.order, tools: [...tools.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)), assets: [...assets].sort(), assetOwners };
}

export function compile(loaded: LoadedSpec, arch: string, variants: string[], kinds: Kinds, facts: Facts): Plan {
  const t = target(loaded, arch, variants, kinds);
  const byName = new Map<string, PlanStage>();
  for (const name of t.order) {
    const st = loaded.spec.stages[name]!;
    const mod = kinds.get(st.kind)!;
    const params = t.params.get(name);
    const hooks = stageHooks(mod, params, arch as Arch);
    const tools = hooks.tools;
    const toolVersions: Record<string, string> = {};
    for (const tool of tools) {
      const v = facts.toolVersions[tool.name];
      if (v === undefined) throw new Error(`internal: no version for tool ${tool.name} (stage ${name})`);
      toolVersions[tool.name] = v;
    }
    const assets: Record<string, string> = {};
    for (const a of hooks.assets) {
      const d = facts.assetDigests[a];
      if (d === undefined) throw new Error(`internal: no digest for asset ${a} (stage ${name})`);
      assets[a] = d;
    }
    const lock = facts.lock?.stage(name, mod.kind, arch as Arch, params);
    const inputKeys: Record<string, string> = {};
    for (const [inName, ref] of Object.entries(st.inputs)) inputKeys[inName] = byName.get(ref)!.key;
    const parts: KeyParts = {
      engine: ENGINE_KEY_VERSION,
      kind: mod.kind,
      version: mod.version,
      arch: arch as Arch,
      sourceDateEpoch: facts.sourceDateEpoch,
      params,
      tools: toolVersions,
      assets,
      inputs: inputKeys,
      ...(lock ? { lock: lock.digest } : {}),
    };
    byName.set(name, { name, kind: mod.kind, mod, params, inputs: { ...st.inputs }, heavy: !!mod.heavy, tools, parts, key: keyOf(parts), ...(lock ? { lock } : {}) });
  }
  return {
    spec: { name: loaded.spec.name, file: loaded.file, sha256: loaded.sha256 },
    arch: arch as Arch,
    variants: [...variants],
    sourceDateEpoch: facts.sourceDateEpoch,
    sinks: t.sinks,
    stages: t.order.map((n) => byName.get(n)!),
  };
}

export function keyOf(parts: KeyParts): string {
  return sha256(canonicalize(parts));
}

/** Human-readable list of what differs between two key part sets (for `explain`). */
export function diffParts(prev: KeyParts, cur: KeyParts): string[] {
  const out: string[] = [];
  const scalar = ['engine', 'kind', 'version', 'arch', 'sourceDateEpoch'] as const;
  for (const f of scalar) if (prev[f] !== cur[f]) out.push(`${f}: ${String(prev[f])} -> ${String(cur[f])}`);
  if (prev.lock !== cur.lock) out.push(`lock: ${short(prev.lock)} -> ${short(cur.lock)}`);
  out.push(...diffValue(prev.params, cur.params, ['params']));
  for (const f of ['tools', 'assets', 'inputs'] as const) {
    const keys = new Set([...Object.keys(prev[f] ?? {}), ...Object.keys(cur[f] ?? {})]);
    for (const k of [...keys].sort()) {
      const a = prev[f]?.[k];
      const b = cur[f]?.[k];
      if (a === b) continue;
      if (f === 'inputs') out.push(`input ${k} changed (${short(a)} -> ${short(b)})`);
      else if (f === 'assets') out.push(`asset ${k} changed`);
      else out.push(`tool ${k}: ${a ?? '(none)'} -> ${b ?? '(none)'}`);
    }
  }
  return out;
}

function short(k: string | undefined): string {
  return k ? k.slice(0, 12) : '(none)';
}

function diffValue(a: unknown, b: unknown, p: (string | number)[]): string[] {
  if (canonicalize(a) === canonicalize(b)) return [];
  const obj = (v: unknown) => v !== null && typeof v === 'object' && !Array.isArray(v);
  if (obj(a) && obj(b)) {
    const ra = a as Record<string, unknown>;
    const rb = b as Record<string, unknown>;
    const keys = [...new Set([...Object.keys(ra), ...Object.keys(rb)])].sort();
    return keys.flatMap((k) => diffValue(ra[k], rb[k], [...p, k]));
  }
  return [`${dotted(p)}: ${JSON.stringify(a)} -> ${JSON.stringify(b)}`];
}
