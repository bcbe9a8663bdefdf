// Spec loading: YAML text -> validated Spec, with every problem reported at a
// file:line:column. Pure apart from loadSpecFile's single read.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import YAML, { isMap, isPair, isScalar, isSeq, LineCounter, type Document, type Node as YamlNode } from 'yaml';
import type { z } from 'zod';
import { SpecSchema, type Spec, type StageSpec } from '../../schema/spec.js';
import { sha256 } from './canonical.js';
import { SpecError, type SpecIssue, type SourceLocation } from './errors.js';
import type { Arch, StageModule } from '../stage.js';

export type Kinds = ReadonlyMap<string, StageModule>;
type PathSeg = string | number;

export interface LoadedSpec {
  spec: Spec;
  file: string;
  dir: string;
  sha256: string;
  /** Map a spec path to a source location (for errors found later, e.g. at compile time). */
  locate(p: PathSeg[], opts?: { key?: boolean }): SourceLocation;
}

/** How a spec path is shown in messages: relative to the working directory when inside it. */
export function displayPath(file: string): string {
  const rel = path.relative(process.cwd(), file);
  return rel && !rel.startsWith('..') && !path.isAbsolute(rel) ? rel : file;
}

export function loadSpecFile(file: string, kinds: Kinds): LoadedSpec {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw new SpecError([
      { loc: { file: displayPath(file), line: 1, col: 1 }, path: '', message: err.code === 'ENOENT' ? 'spec file not found' : `cannot read spec: ${err.message}` },
    ]);
  }
  const loaded = parseSpec(text, displayPath(file), kinds);
  return { ...loaded, file: path.resolve(file) };
}

export function parseSpec(text: string, file: string, kinds: Kinds): LoadedSpec {
  const lc = new LineCounter();
  const doc = YAML.parseDocument(text, { lineCounter: lc, prettyErrors: false, uniqueKeys: true });
  const lines = text.split('\n');
  const at = (offset: number, length = 1): SourceLocation => {
    const { line, col } = lc.linePos(offset);
    return { file, line, col, lineText: lines[line - 1], length: Math.max(1, Math.min(length, (lines[line - 1]?.length ?? 0) - col + 1)) };
  };
  const locate = (p: PathSeg[], opts: { key?: boolean } = {}): SourceLocation => locateIn(doc, p, at, opts.key ?? false);

  if (doc.errors.length) {
    throw new SpecError(
      doc.errors.map((e) => {
        const loc = at(e.pos[0], e.pos[1] - e.pos[0]);
        // `${var}` inside [ ] or { } reads as a flow mapping; the fix is quoting.
        const hint = /\$\{/.test(loc.lineText ?? '') && /flow/i.test(e.message) ? ' (hint: quote strings that contain ${...} inside [ ] or { })' : '';
        return { loc, path: '', message: yamlMessage(e.code, e.message) + hint };
      }),
    );
  }
  const raw = doc.toJS({ maxAliasCount: 100 });
  const parsed = SpecSchema.safeParse(raw ?? {});
  if (!parsed.success) throw new SpecError(zodIssues(parsed.error.issues, [], locate));
  const spec = parsed.data;
  const issues = checkSpec(spec, kinds, locate);
  if (issues.length) throw new SpecError(issues);
  return { spec, file, dir: path.dirname(path.resolve(file)), sha256: sha256(text), locate };
}

function yamlMessage(code: string, message: string): string {
  if (code === 'DUPLICATE_KEY') return 'duplicate key: each name may appear only once in a map';
  // The yaml library appends a position ("at line 3, column 5:") that we already print.
  return message.replace(/ at line \d+, column \d+:?[\s\S]*$/, '');
}

/** Find the YAML node for a path; fall back to the deepest existing ancestor. */
function locateIn(
  doc: Document,
  p: PathSeg[],
  at: (offset: number, len?: number) => SourceLocation,
  wantKey: boolean,
): SourceLocation {
  let node: unknown = doc.contents;
  let keyNode: YamlNode | undefined;
  for (const seg of p) {
    if (isMap(node)) {
      const pair = node.items.find((it) => isPair(it) && isScalar(it.key) && String(it.key.value) === String(seg));
      if (!pair) break;
      keyNode = pair.key as YamlNode;
      node = pair.value;
    } else if (isSeq(node) && typeof seg === 'number' && node.items[seg]) {
      keyNode = undefined;
      node = node.items[seg];
    } else break;
  }
  const target = (wantKey && keyNode) || (node as YamlNode | null) || keyNode;
  const range = (target as YamlNode | undefined)?.range ?? (keyNode?.range as [number, number, number] | undefined);
  if (!range) return at(0);
  // Point at scalars whole; at collections, just their first character.
  const len = isScalar(target) ? range[1] - range[0] : 1;
  return at(range[0], len);
}

export function dotted(p: PathSeg[]): string {
  return p.map((s, i) => (typeof s === 'number' ? `[${s}]` : (i ? '.' : '') + s)).join('');
}

function zodIssues(issues: z.core.$ZodIssue[], prefix: PathSeg[], locate: LoadedSpec['locate'], relocate?: (p: PathSeg[]) => PathSeg[]): SpecIssue[] {
  const out: SpecIssue[] = [];
  for (const is of issues) {
    const p = [...prefix, ...(is.path as PathSeg[])];
    const where = relocate ? relocate(p) : p;
    if (is.code === 'unrecognized_keys') {
      for (const k of is.keys) {
        out.push({ loc: locate([...where, k], { key: true }), path: dotted([...p, k]), message: `unknown key "${k}"` });
      }
      continue;
    }
    if (is.code === 'invalid_union') {
      // Report the branch that got furthest rather than "invalid input".
      const best = is.errors.map((branch) => branch).sort((a, b) => depth(b) - depth(a))[0];
      if (best?.length) {
        out.push(...zodIssues(best, p, locate, relocate));
        continue;
      }
    }
    const missing = is.code === 'invalid_type' && (is as { input?: unknown }).input === undefined;
    out.push({ loc: locate(where), path: dotted(p), message: missing ? `missing required key (${is.message.replace(/^Invalid input: /, '')})` : is.message.replace(/^Invalid input: /, '') });
  }
  return out;
}

function depth(issues: z.core.$ZodIssue[]): number {
  return Math.max(0, ...issues.map((i) => i.path.length));
}


// ---------------------------------------------------------------------------
// Semantic checks: kinds, references, inputs, cycles, variants, params per arch.

function checkSpec(spec: Spec, kinds: Kinds, locate: LoadedSpec['locate']): SpecIssue[] {
  const issues: SpecIssue[] = [];
  const names = Object.keys(spec.stages);
  const push = (p: PathSeg[], message: string, key = false) => issues.push({ loc: locate(p, { key }), path: dotted(p), message });

  for (const [name, st] of Object.entries(spec.stages)) {
    const mod = kinds.get(st.kind);
    if (!mod) {
      push(['stages', name, 'kind'], `unknown stage kind "${st.kind}"; expected one of: ${[...kinds.keys()].sort().join(', ')}`);
      continue;
    }
    for (const [inName, ref] of Object.entries(st.inputs)) {
      if (!mod.inputs.includes(inName)) {
        push(['stages', name, 'inputs', inName], `kind "${st.kind}" has no input "${inName}"; it takes: ${mod.inputs.join(', ') || '(none)'}`, true);
      }
      if (!spec.stages[ref]) push(['stages', name, 'inputs', inName], `unknown stage "${ref}"; defined stages: ${names.join(', ')}`);
      else if (ref === name) push(['stages', name, 'inputs', inName], `stage "${name}" cannot take itself as input`);
    }
    for (const need of mod.inputs) {
      if (!(need in st.inputs)) push(['stages', name, 'inputs'], `kind "${st.kind}" needs input "${need}" (inputs: { ${need}: <stage> })`);
    }
    for (const arch of spec.arches) {
      if (mod.arches && !mod.arches.includes(arch)) continue; // only an error if a variant asks for it (compile time)
      const r = resolveParams(spec, name, st, mod, arch);
      for (const i of r.issues) issues.push({ ...i, loc: locate(i.where), message: spec.arches.length > 1 ? `${i.message} (arch ${arch})` : i.message });
    }
  }
  const cycle = findCycle(spec);
  if (cycle) push(['stages', cycle[0], 'inputs'], `dependency cycle: ${cycle.join(' -> ')}`);

  for (const [vname, v] of Object.entries(spec.variants)) {
    const stages = Array.isArray(v) ? v : v.stages;
    stages.forEach((s, i) => {
      const p = Array.isArray(v) ? ['variants', vname, i] : ['variants', vname, 'stages', i];
      if (!spec.stages[s]) push(p, `unknown stage "${s}"; defined stages: ${names.join(', ')}`);
    });
    if (!Array.isArray(v) && v.arches) {
      v.arches.forEach((a, i) => {
        if (!spec.arches.includes(a)) push(['variants', vname, 'arches', i], `arch "${a}" is not in the pipeline's arches (${spec.arches.join(', ')})`);
      });
    }
  }
  // Deduplicate identical messages from per-arch checks.
  const seen = new Set<string>();
  return issues.filter((i) => {
    const k = `${i.loc.line}:${i.loc.col}:${i.message}`;
    return seen.has(k) ? false : (seen.add(k), true);
  });
}

export function findCycle(spec: Spec): string[] | null {
  const state = new Map<string, 1 | 2>();
  const stack: string[] = [];
  const visit = (n: string): string[] | null => {
    if (state.get(n) === 2) return null;
    if (state.get(n) === 1) return [...stack.slice(stack.indexOf(n)), n];
    state.set(n, 1);
    stack.push(n);
    for (const ref of Object.values(spec.stages[n]?.inputs ?? {})) {
      if (!spec.stages[ref]) continue;
      const c = visit(ref);
      if (c) return c;
    }
    stack.pop();
    state.set(n, 2);
    return null;
  };
  for (const n of Object.keys(spec.stages)) {
    const c = visit(n);
    if (c) return c;
  }
  return null;
}

// ---------------------------------------------------------------------------
// Per-arch resolution: merge overrides, substitute ${vars}, validate with the kind's schema.

export interface ResolvedParams {
  params: unknown;
  issues: { where: PathSeg[]; path: string; message: string }[];
}

export function resolveParams(spec: Spec, name: string, st: StageSpec, mod: StageModule, arch: Arch): ResolvedParams {
  const override = st.arch?.[arch]?.with ?? {};
  const merged = deepMerge(st.with, override);
  const issues: ResolvedParams['issues'] = [];
  // Where a value at path p came from: the arch override if it sets p, else the base block.
  const origin = (p: PathSeg[]): PathSeg[] => {
    if (hasPath(override, p)) return ['stages', name, 'arch', arch, 'with', ...p];
    if (hasPath(st.with, p) || p.length === 0) return ['stages', name, 'with', ...p];
    return hasPath(st.with, p.slice(0, 1)) ? ['stages', name, 'with', p[0]!] : ['stages', name, 'with'];
  };
  const substituted = substitute(merged, spec, arch, [], (p, message) => issues.push({ where: origin(p), path: dotted(['stages', name, 'with', ...p]), message }));
  if (issues.length) return { params: undefined, issues };
  const r = mod.params.safeParse(substituted);
  if (!r.success) {
    for (const is of r.error.issues) {
      const p = is.path as PathSeg[];
      if (is.code === 'unrecognized_keys') {
        for (const k of is.keys) issues.push({ where: origin([...p, k]), path: dotted(['stages', name, 'with', ...p, k]), message: `unknown parameter "${k}" for kind "${mod.kind}"` });
        continue;
      }
      const missing = is.code === 'invalid_type' && (is as { input?: unknown }).input === undefined;
      issues.push({
        where: origin(p),
        path: dotted(['stages', name, 'with', ...p]),
        message: missing ? `missing required parameter for kind "${mod.kind}" (${is.message.replace(/^Invalid input: /, '')})` : is.message.replace(/^Invalid input: /, ''),
      });
    }
    return { params: undefined, issues };
  }
  return { params: r.data, issues };
}

function hasPath(obj: unknown, p: PathSeg[]): boolean {
  let cur = obj;
  for (const s of p) {
    if (cur === null || typeof cur !== 'object' || !(String(s) in (cur as object))) return false;
    cur = (cur as Record<string, unknown>)[String(s)];
  }
  return true;
}

/** Objects merge key by key; arrays and scalars in the override replace the base. */
export function deepMerge(base: unknown, over: unknown): unknown {
  if (isPlain(base) && isPlain(over)) {
    const out: Record<string, unknown> = { ...base };
    for (const [k, v] of Object.entries(over)) out[k] = k in out ? deepMerge(out[k], v) : v;
    return out;
  }
  return over === undefined ? base : over;
}

function isPlain(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

const VAR_RE = /\$\$\{|\$\{([^}]*)\}/g;

/** Expand ${var} (and the built-in ${arch}) in every string; `$${` is a literal `${`. */
export function substitute(value: unknown, spec: Spec, arch: Arch, p: PathSeg[], report: (p: PathSeg[], msg: string) => void): unknown {
  if (typeof value === 'string') return expandString(value, spec, arch, (msg) => report(p, msg));
  if (Array.isArray(value)) return value.map((v, i) => substitute(v, spec, arch, [...p, i], report));
  if (isPlain(value)) {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = substitute(v, spec, arch, [...p, k], report);
    return out;
  }
  return value;
}

export function expandString(s: string, spec: Spec, arch: Arch, report: (msg: string) => void, seen: string[] = []): string {
  return s.replace(VAR_RE, (m, name: string | undefined) => {
    if (m === '$${') return '${';
    if (name === 'arch') return arch;
    if (!name || !(name in spec.vars)) {
      report(`unknown variable \${${name ?? ''}}; defined: arch${Object.keys(spec.vars).length ? ', ' + Object.keys(spec.vars).join(', ') : ''}`);
      return m;
    }
    if (seen.includes(name)) {
      report(`variable cycle: ${[...seen, name].join(' -> ')}`);
      return m;
    }
    const v = spec.vars[name];
    let val: unknown = v;
    if (isPlain(v)) {
      if (!(arch in v)) {
        report(`variable \${${name}} has no value for arch ${arch}`);
        return m;
      }
      val = v[arch];
    }
    return expandString(String(val), spec, arch, report, [...seen, name]);
  });
}

/** The variants a spec declares, normalised. */
export function variantInfo(spec: Spec, variant: string): { stages: string[]; arches: Arch[]; bootTest?: Spec['boot_test'] } | undefined {
  const v = spec.variants[variant];
  if (!v) return undefined;
  if (Array.isArray(v)) return { stages: v, arches: spec.arches, bootTest: spec.boot_test };
  return { stages: v.stages, arches: v.arches ?? spec.arches, bootTest: v.boot_test ?? spec.boot_test };
}
