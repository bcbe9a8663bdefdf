// Spec loading: YAML text -> validated Spec, with every problem reported at a
// file:line:column. Pure apart from loadSpecFile's single read.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import jsyaml from 'js-yaml';
import { createRequire } from 'node:module';
import type * as Yaml from 'yaml';
import type { Document, Node as YamlNode } from 'yaml';
import { config as zodConfig, type z } from 'zod';
import { SpecSchema, type Spec, type StageSpec } from '../../schema/spec.js';
import { sha256 } from './canonical.js';
import { SpecError, type SpecIssue, type SourceLocation } from './errors.js';
import type { Arch, StageModule } from '../stage.js';

export type Kinds = ReadonlyMap<string, StageModule>;

// A CLI run parses a spec (and each stage's params) once: zod's JIT (a generated
// function per object schema) costs more to build than it saves on one parse,
// and V8's code cache cannot keep it. Same results, interpreted.
zodConfig({ jitless: true });

// The yaml library (positions, error recovery) is needed only when something must
// be located: loaded on first use, it costs a valid spec's fast path nothing.
let yamlLib: typeof Yaml | undefined;
const yaml = (): typeof Yaml => (yamlLib ??= createRequire(import.meta.url)('yaml') as typeof Yaml);
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
  let bytes: Buffer;
  try {
    bytes = readFileSync(file);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    const message = err.code === 'ENOENT' ? 'spec file not found' : err.code === 'EISDIR' ? 'expected a YAML file, found a directory' : `cannot read spec: ${err.message}`;
    throw new SpecError([{ loc: { file: displayPath(file), line: 1, col: 1 }, path: '', message }]);
  }
  const loaded = parseSpec(decodeSpec(bytes, displayPath(file)), displayPath(file), kinds);
  return { ...loaded, file: path.resolve(file), dir: path.dirname(path.resolve(file)) };
}

/**
 * Bytes -> text, refusing invalid UTF-8 at the first bad byte (a silent U+FFFD
 * would change a package name or path without anyone noticing). A BOM is kept,
 * as readFileSync(…, 'utf8') kept it, so the spec digest is unchanged.
 */
export function decodeSpec(bytes: Uint8Array, file: string): string {
  const bad = firstInvalidUtf8(bytes);
  if (bad < 0) return new TextDecoder('utf-8', { ignoreBOM: true }).decode(bytes);
  const lineStart = bytes.lastIndexOf(0x0a, bad - 1) + 1;
  const line = countByte(bytes, 0x0a, bad) + 1;
  const before = new TextDecoder('utf-8', { ignoreBOM: true }).decode(bytes.subarray(lineStart, bad));
  const hex = bytes[bad]!.toString(16).padStart(2, '0');
  throw new SpecError([{ loc: { file, line, col: [...before].length + 1 }, path: '', message: `invalid UTF-8 (a sequence starting with byte 0x${hex}); expected UTF-8 text` }]);
}

function countByte(bytes: Uint8Array, b: number, end: number): number {
  let n = 0;
  for (let i = 0; i < end; i++) if (bytes[i] === b) n++;
  return n;
}

/** Offset of the first byte that is not part of a well-formed UTF-8 sequence, or -1. */
export function firstInvalidUtf8(b: Uint8Array): number {
  let i = 0;
  while (i < b.length) {
    const c = b[i]!;
    if (c < 0x80) {
      i++;
      continue;
    }
    let n: number;
    let lo = 0x80;
    let hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) n = 1;
    else if (c >= 0xe0 && c <= 0xef) {
      n = 2;
      if (c === 0xe0) lo = 0xa0; // overlong
      if (c === 0xed) hi = 0x9f; // surrogates
    } else if (c >= 0xf0 && c <= 0xf4) {
      n = 3;
      if (c === 0xf0) lo = 0x90;
      if (c === 0xf4) hi = 0x8f;
    } else return i;
    for (let k = 1; k <= n; k++) {
      const d = b[i + k];
      if (d === undefined || d < (k === 1 ? lo : 0x80) || d > (k === 1 ? hi : 0xbf)) return i;
    }
    i += n + 1;
  }
  return -1;
}

/** Aliases expanded into more nodes than this are refused (an alias bomb). */
const MAX_ALIAS_COUNT = 100;

/**
 * Text -> validated spec. A valid spec takes the fast path (js-yaml, several times
 * faster than the yaml library when cold); its source positions are only built,
 * with the yaml library, if something later needs a location. Anything the fast
 * path declines or rejects is parsed again with positions, so every error is
 * reported, located, by one parser.
 */
export function parseSpec(text: string, file: string, kinds: Kinds): LoadedSpec {
  const fast = fastValue(text);
  if (fast) {
    const parsed = SpecSchema.safeParse(fast.value ?? {}, { error: zodMessage });
    if (parsed.success) {
      let locator: LoadedSpec['locate'] | undefined;
      const locate: LoadedSpec['locate'] = (p, opts) => (locator ??= sourceOf(text, file).locate)(p, opts);
      if (!checkSpec(parsed.data, kinds, locate).length) return { spec: parsed.data, file, dir: path.dirname(path.resolve(file)), sha256: sha256(text), locate };
    }
  }
  return parseLocated(text, file, kinds);
}

// The fast path resolves plain scalars exactly as the yaml library's YAML 1.2 core
// schema does (same patterns, same conversions), so both give the same values.
const coreTypes = [
  new jsyaml.Type('tag:yaml.org,2002:null', { kind: 'scalar', resolve: (s: string) => /^(?:~|[Nn]ull|NULL)?$/.test(s), construct: () => null }),
  new jsyaml.Type('tag:yaml.org,2002:bool', { kind: 'scalar', resolve: (s: string) => /^(?:[Tt]rue|TRUE|[Ff]alse|FALSE)$/.test(s), construct: (s: string) => s[0] === 't' || s[0] === 'T' }),
  new jsyaml.Type('tag:yaml.org,2002:int', {
    kind: 'scalar',
    resolve: (s: string) => /^[-+]?[0-9]+$/.test(s) || /^0o[0-7]+$/.test(s) || /^0x[0-9a-fA-F]+$/.test(s),
    construct: (s: string) => (s.startsWith('0o') ? parseInt(s.slice(2), 8) : s.startsWith('0x') ? parseInt(s.slice(2), 16) : parseInt(s, 10)),
  }),
  new jsyaml.Type('tag:yaml.org,2002:float', {
    kind: 'scalar',
    resolve: (s: string) => /^(?:[-+]?\.(?:inf|Inf|INF)|\.nan|\.NaN|\.NAN)$/.test(s) || /^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$/.test(s) || /^[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)$/.test(s),
    construct: (s: string) => (/^[-+]?\.(?:inf|Inf|INF)$/.test(s) ? (s[0] === '-' ? -Infinity : Infinity) : /nan$/i.test(s) ? NaN : parseFloat(s)),
  }),
];
const FAST_SCHEMA = jsyaml.FAILSAFE_SCHEMA.extend({ implicit: coreTypes });
// Anchors, aliases, tags and directives take the located path: it bounds alias
// expansion, and the two parsers are only known to agree on plain documents.
// So do complex keys (`? k`, `[a]: v`), which the two libraries stringify differently.
const FAST_DECLINE = /(?:^|[\s[{,:?-])[&*!]|^%|\t|\r(?!\n)|(?:^|[\s[{,])\?(?:\s|$)|[\]}]:(?:\s|$)/m;

export function fastValue(text: string): { value: unknown } | undefined {
  if (FAST_DECLINE.test(text) || !singleLineScalars(text)) return undefined;
  let value: unknown;
  try {
    value = jsyaml.load(text, { schema: FAST_SCHEMA });
  } catch {
    return undefined;
  }
  return declined(value, MAX_DEPTH) ? undefined : { value };
}

/**
 * Whether every quoted scalar and flow collection closes on the line it opens on,
 * and every closing quote is followed by a separator. js-yaml is lenient where
 * the yaml library is not (a quote or bracket left open swallows the following
 * lines), so only documents without such constructs take the fast path. Linear;
 * block scalar (| >) contents are skipped.
 */
export function singleLineScalars(text: string): boolean {
  let blockParent = -1; // indentation of the line that opened a block scalar, or -1
  for (const line of text.split('\n')) {
    let i = 0;
    while (line[i] === ' ') i++;
    if (blockParent >= 0) {
      if (i >= line.length || i > blockParent) continue;
      blockParent = -1;
    }
    const indent = i;
    const flows: string[] = []; // open [ and { on this line
    let keyPos = false; // at the start of a flow map entry (a key)
    let valueStart = true;
    for (; i < line.length; i++) {
      const c = line[i]!;
      if (c === ' ') continue;
      if (c === '#' && (i === 0 || line[i - 1] === ' ')) break;
      if (valueStart && (c === '"' || c === "'")) {
        let j = i + 1;
        for (; j < line.length; j++) {
          if (c === '"' && line[j] === '\\') j++;
          else if (line[j] === c) {
            if (c === "'" && line[j + 1] === "'") j++;
            else break;
          }
        }
        if (j >= line.length) return false; // continues on the next line
        if (j + 1 < line.length && !' ,]}:'.includes(line[j + 1]!)) return false;
        i = j;
        valueStart = false;
        continue;
      }
      if (valueStart && (c === '[' || c === '{')) {
        if (keyPos) return false; // a collection as a flow map key
        flows.push(c);
        keyPos = c === '{';
        continue;
      }
      if (flows.length > 0 && (c === ']' || c === '}')) {
        if (line[i + 1] === '#') return false; // a comment needs a space before it
        flows.pop();
        valueStart = false;
        keyPos = false;
        continue;
      }
      if (flows.length > 0 && c === ',') {
        valueStart = true;
        keyPos = flows[flows.length - 1] === '{';
        continue;
      }
      const next = line[i + 1];
      if (c === ':' && (next === undefined || next === ' ' || (flows.length > 0 && ',[]{}'.includes(next)))) {
        valueStart = true;
        keyPos = false;
        continue;
      }
      if (c === '-' && valueStart && flows.length === 0 && (next === undefined || next === ' ')) {
        continue;
      }
      if (valueStart && (c === '|' || c === '>') && flows.length === 0) {
        // A block scalar header: | or > with optional indentation/chomping indicators.
        let j = i + 1;
        while (j < line.length && /[0-9+-]/.test(line[j]!)) j++;
        while (line[j] === ' ') j++;
        if (j >= line.length || line[j] === '#') {
          blockParent = indent;
          break;
        }
      }
      valueStart = false;
      keyPos = false;
    }
    if (flows.length > 0) return false; // a flow collection continues on the next line
  }
  return true;
}

/**
 * Too deep for later passes, or a key the two parsers treat differently: a null
 * key (`~:`, `null:`, an empty key) is "null" to js-yaml and "" to the yaml library.
 */
function declined(v: unknown, left: number): boolean {
  if (v === null || typeof v !== 'object') return false;
  if (left <= 0) return true;
  if (Array.isArray(v)) return v.some((x) => declined(x, left - 1));
  // The yaml library also refuses implicit keys over 1024 characters; js-yaml does not.
  for (const [k, x] of Object.entries(v)) if (k === 'null' || k === '' || k.length > 1000 || declined(x, left - 1)) return true;
  return false;
}

interface Source {
  doc: Document;
  at(offset: number, length?: number): SourceLocation;
  locate: LoadedSpec['locate'];
}

/** The yaml library's document with positions, and how to turn a spec path into file:line:col. */
function sourceOf(text: string, file: string): Source {
  const lc = new (yaml().LineCounter)();
  // uniqueKeys: false — the library's own check is quadratic per map; ours (structure) is linear.
  const doc = yaml().parseDocument(text, { lineCounter: lc, prettyErrors: false, uniqueKeys: false });
  const lines = text.split('\n');
  const at = (offset: number, length = 1): SourceLocation => {
    const { line, col } = lc.linePos(Math.max(0, Math.min(offset, text.length)));
    return { file, line: Math.max(1, line), col: Math.max(1, col), lineText: lines[line - 1], length: Math.max(1, Math.min(length, (lines[line - 1]?.length ?? 0) - col + 1)) };
  };
  return { doc, at, locate: (p, opts = {}) => locateIn(doc, p, at, opts.key ?? false) };
}

/** The located path: every problem becomes a SpecIssue at its file:line:col. */
function parseLocated(text: string, file: string, kinds: Kinds): LoadedSpec {
  const { doc, at, locate } = sourceOf(text, file);

  if (doc.errors.length) {
    const unclosed = unclosedFlows(text);
    // The parser reports a stack overflow once per level it could not descend.
    const overflow = doc.errors.find((e) => /call stack/i.test(e.message));
    const errors = overflow ? [overflow] : doc.errors;
    throw new SpecError(
      errors.map((e) => {
        if (e === overflow) return { loc: at(e.pos[0]), path: '', message: `nested too deeply for the parser; expected at most ${MAX_DEPTH} levels of nesting` };
        // The parser notices an unclosed [ or { only where it gives up, often lines
        // later; point at the bracket that was opened instead.
        const open = /end with an? [\]}]|flow (sequence|map|collection)/i.test(e.message) ? unclosed.shift() : undefined;
        if (open !== undefined) {
          const ch = text[open]!;
          return { loc: at(open, 1), path: '', message: `unclosed "${ch}": expected a matching "${ch === '[' ? ']' : '}'}" (on the same line, or indented more than its key)` };
        }
        const loc = at(e.pos[0], e.pos[1] - e.pos[0]);
        // `${var}` inside [ ] or { } reads as a flow mapping; the fix is quoting.
        const hint = /\$\{/.test(loc.lineText ?? '') && /flow/i.test(e.message) ? ' (hint: quote strings that contain ${...} inside [ ] or { })' : '';
        return { loc, path: '', message: yamlMessage(e.code, e.message) + hint };
      }),
    );
  }
  const { dups, tooDeep } = structure(doc);
  if (tooDeep) throw new SpecError([{ loc: at(tooDeep.range?.[0] ?? 0), path: '', message: `nested more than ${MAX_DEPTH} levels deep; expected a flatter spec` }]);
  if (dups.length) throw new SpecError(dups.map((k) => ({ loc: at(k.range![0], k.range![1] - k.range![0]), path: '', message: `duplicate key "${keyName(k)}": expected each name only once in a map` })));
  let raw: unknown;
  try {
    raw = doc.toJS({ maxAliasCount: MAX_ALIAS_COUNT });
  } catch (e) {
    // The library refuses alias bombs (and unresolvable aliases) with no position.
    const alias = firstAlias(doc);
    throw new SpecError([{ loc: alias ? at(alias.range![0], alias.range![1] - alias.range![0]) : at(0), path: '', message: `${/alias count/i.test((e as Error).message) ? `aliases expand to too many nodes (more than ${MAX_ALIAS_COUNT} per anchor)` : (e as Error).message}; expected a spec without alias bombs` }]);
  }
  const parsed = SpecSchema.safeParse(raw ?? {}, { error: zodMessage });
  if (!parsed.success) throw new SpecError(zodIssues(parsed.error.issues, [], locate));
  const spec = parsed.data;
  const issues = checkSpec(spec, kinds, locate);
  if (issues.length) throw new SpecError(issues);
  return { spec, file, dir: path.dirname(path.resolve(file)), sha256: sha256(text), locate };
}

/** Collections nested deeper than this are refused (later passes recurse over the value). */
const MAX_DEPTH = 64;

function keyName(k: unknown): string {
  return yaml().isScalar(k) ? String(k.value) : k == null ? '' : String(k);
}

/**
 * One linear pass: keys that repeat within a map (each after its first occurrence;
 * one Set per map, where the yaml library's own check is quadratic), and the first
 * collection nested deeper than MAX_DEPTH.
 */
function structure(doc: Document): { dups: YamlNode[]; tooDeep?: YamlNode } {
  const dups: YamlNode[] = [];
  let tooDeep: YamlNode | undefined;
  const deep = (path: readonly unknown[], node: YamlNode) => {
    // path holds the ancestors: collections, and pairs between map levels.
    if (path.length >= MAX_DEPTH && path.filter((p) => yaml().isMap(p) || yaml().isSeq(p)).length >= MAX_DEPTH) {
      tooDeep = node;
      return yaml().visit.BREAK;
    }
    return undefined;
  };
  yaml().visit(doc, {
    Map(_, map, path) {
      const seen = new Set<string>();
      for (const pair of map.items) {
        const k = pair.key;
        // Keys become JS object keys, so 1 and "1" collide too.
        const name = keyName(k);
        if (seen.has(name) && k && typeof k === 'object' && (k as YamlNode).range) dups.push(k as YamlNode);
        seen.add(name);
      }
      return deep(path, map);
    },
    Seq(_, seq, path) {
      return deep(path, seq);
    },
  });
  return { dups, tooDeep };
}

function firstAlias(doc: Document): YamlNode | undefined {
  let found: YamlNode | undefined;
  yaml().visit(doc, {
    Alias(_, node) {
      found = node;
      return yaml().visit.BREAK;
    },
  });
  return found;
}

/** Offsets of the [ and { that the CST shows were never closed, in source order. */
export function unclosedFlows(text: string): number[] {
  const out: number[] = [];
  const walk = (v: unknown, depth: number): void => {
    if (depth > 200 || v === null || typeof v !== 'object') return;
    if (Array.isArray(v)) {
      for (const x of v) walk(x, depth + 1);
      return;
    }
    const t = v as { type?: string; start?: { source?: string; offset?: number }; end?: { source?: string }[] };
    if (t.type === 'flow-collection' && t.start && typeof t.start.offset === 'number') {
      const close = t.start.source === '[' ? ']' : '}';
      if (!t.end?.some((e) => e.source === close)) out.push(t.start.offset);
    }
    for (const [k, x] of Object.entries(v)) if (k !== 'start' && k !== 'end') walk(x, depth + 1);
  };
  try {
    for (const tok of new (yaml().Parser)().parse(text)) walk(tok, 0);
  } catch {
    // Only used to improve a message; the parse errors stand on their own.
  }
  return out.sort((a, b) => a - b);
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
    if (yaml().isMap(node)) {
      const pair = node.items.find((it) => yaml().isPair(it) && yaml().isScalar(it.key) && String(it.key.value) === String(seg));
      if (!pair) break;
      keyNode = pair.key as YamlNode;
      node = pair.value;
    } else if (yaml().isSeq(node) && typeof seg === 'number' && node.items[seg]) {
      keyNode = undefined;
      node = node.items[seg];
    } else break;
  }
  const target = (wantKey && keyNode) || (node as YamlNode | null) || keyNode;
  const range = (target as YamlNode | undefined)?.range ?? (keyNode?.range as [number, number, number] | undefined);
  if (!range) return at(0);
  // Point at scalars whole; at collections, just their first character.
  const len = yaml().isScalar(target) ? range[1] - range[0] : 1;
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
      if (best?.length && depth(best) > 0) {
        out.push(...zodIssues(best, p, locate, relocate));
        continue;
      }
    }
    const message = is.message.startsWith('missing required key') && p.length ? is.message.replace('missing required key', `missing required key "${String(p[p.length - 1])}"`) : is.message;
    out.push({ loc: locate(where), path: dotted(p), message });
  }
  return out;
}

// ---------------------------------------------------------------------------
// Messages: what was expected and what was found, in the spec's terms.

type AnyDef = { type: string; [k: string]: unknown };
const defOf = (s: unknown): AnyDef | undefined => (s as { _zod?: { def?: AnyDef } } | undefined)?._zod?.def;

/** "a string", "an array of strings", "one of: a, b", … for a zod schema. */
export function describeSchema(s: unknown, plural = false, depthLeft = 4): string {
  const d = defOf(s);
  const w = (one: string, many: string) => (plural ? many : one);
  if (!d || depthLeft <= 0) return w('a value', 'values');
  switch (d.type) {
    case 'string':
      return w('a string', 'strings');
    case 'number':
    case 'int':
      return w('a number', 'numbers');
    case 'boolean':
      return w('true or false', 'booleans');
    case 'null':
      return w('null', 'nulls');
    case 'array':
      return w(`an array of ${describeSchema(d.element, true, depthLeft - 1)}`, `arrays of ${describeSchema(d.element, true, depthLeft - 1)}`);
    case 'object':
    case 'record':
      return w('a map (key: value)', 'maps (key: value)');
    case 'enum': {
      const vals = Object.values((d.entries ?? {}) as Record<string, unknown>);
      return `${plural ? 'values, each ' : ''}one of: ${vals.map((v) => JSON.stringify(v)).join(', ')}`;
    }
    case 'literal':
      return ((d.values ?? []) as unknown[]).map((v) => JSON.stringify(v)).join(' or ');
    case 'union':
      return ((d.options ?? []) as unknown[]).map((o) => describeSchema(o, plural, depthLeft - 1)).join(' or ');
    case 'optional':
    case 'default':
    case 'prefault':
    case 'nullable':
    case 'nonoptional':
    case 'readonly':
    case 'catch':
      return describeSchema(d.innerType, plural, depthLeft - 1);
    case 'pipe':
      return describeSchema(d.in, plural, depthLeft - 1);
    default:
      return w(`a ${d.type}`, `${d.type} values`);
  }
}

/** "a number (3)", "a string (\"x\")", "an array (2 items)", … for a parsed YAML value. */
export function describeValue(v: unknown): string {
  if (v === null) return 'an empty value (null)';
  if (Array.isArray(v)) return `an array (${v.length} item${v.length === 1 ? '' : 's'})`;
  switch (typeof v) {
    case 'string':
      return `a string (${JSON.stringify(v.length > 40 ? v.slice(0, 40) + '…' : v)})`;
    case 'number':
      return `a number (${v})`;
    case 'boolean':
      return `${v} (a boolean)`;
    case 'object':
      return 'a map (key: value)';
    default:
      return typeof v;
  }
}

type RawIssue = { code: string; input?: unknown; inst?: unknown; expected?: string; origin?: string; minimum?: unknown; maximum?: unknown; inclusive?: boolean; format?: string; pattern?: unknown; values?: unknown[]; message?: string };

/** zod error map: every message says what was expected and what was found. */
export function zodMessage(raw: z.core.$ZodRawIssue): string | undefined {
  const iss = raw as unknown as RawIssue;
  const found = describeValue(iss.input);
  switch (iss.code) {
    case 'invalid_type':
      if (iss.input === undefined) return `missing required key (expected ${describeSchema(iss.inst)})`;
      return `expected ${describeSchema(iss.inst)}, found ${found}`;
    case 'invalid_value':
      return `expected one of: ${(iss.values ?? []).map((v) => JSON.stringify(v)).join(', ')}; found ${found}`;
    case 'invalid_format':
      return iss.pattern ? `expected a string matching ${String(iss.pattern)}, found ${found}` : `expected a valid ${iss.format}, found ${found}`;
    case 'too_small':
    case 'too_big': {
      const lim = iss.code === 'too_small' ? iss.minimum : iss.maximum;
      const cmp = iss.code === 'too_small' ? (iss.inclusive === false ? 'more than' : 'at least') : iss.inclusive === false ? 'fewer than' : 'at most';
      if (iss.origin === 'array') return `expected ${cmp} ${lim} item${lim === 1 ? '' : 's'}, found ${found}`;
      if (iss.origin === 'string') return `expected ${cmp} ${lim} character${lim === 1 ? '' : 's'}, found ${found}`;
      const rel = iss.code === 'too_small' ? (iss.inclusive === false ? '>' : '≥') : iss.inclusive === false ? '<' : '≤';
      return `expected a number ${rel} ${String(lim)}, found ${found}`;
    }
    case 'invalid_union':
      return `expected ${describeSchema(iss.inst)}, found ${found}`;
    case 'not_multiple_of':
      return `expected a whole number, found ${found}`;
    default:
      return undefined;
  }
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
      const takes = [...mod.inputs, ...(mod.optionalInputs ?? [])];
      if (!takes.includes(inName)) {
        push(['stages', name, 'inputs', inName], `kind "${st.kind}" has no input "${inName}"; it takes: ${takes.join(', ') || '(none)'}`, true);
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
  /** Spec path of the node a param path (inside `with`) came from, for locating later checks. */
  origin(p: PathSeg[]): PathSeg[];
}

// A parsed spec is never changed, so a stage's params for an arch are resolved
// once and shared by the parser's checks, the path checks and compile (which
// otherwise redid the zod work up to four times per stage).
const resolvedCache = new WeakMap<StageSpec, Map<string, { spec: Spec; mod: StageModule; r: ResolvedParams }>>();

export function resolveParams(spec: Spec, name: string, st: StageSpec, mod: StageModule, arch: Arch): ResolvedParams {
  let byArch = resolvedCache.get(st);
  if (!byArch) resolvedCache.set(st, (byArch = new Map()));
  const hit = byArch.get(`${name}\0${arch}`);
  if (hit && hit.spec === spec && hit.mod === mod) return hit.r;
  const r = resolveParamsUncached(spec, name, st, mod, arch);
  byArch.set(`${name}\0${arch}`, { spec, mod, r });
  return r;
}

function resolveParamsUncached(spec: Spec, name: string, st: StageSpec, mod: StageModule, arch: Arch): ResolvedParams {
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
  if (issues.length) return { params: undefined, issues, origin };
  const r = mod.params.safeParse(substituted, { error: zodMessage });
  if (!r.success) {
    for (const is of r.error.issues) {
      const p = is.path as PathSeg[];
      if (is.code === 'unrecognized_keys') {
        for (const k of is.keys) issues.push({ where: origin([...p, k]), path: dotted(['stages', name, 'with', ...p, k]), message: `unknown parameter "${k}" for kind "${mod.kind}"` });
        continue;
      }
      const missing = is.message.startsWith('missing required key');
      issues.push({
        where: origin(p),
        path: dotted(['stages', name, 'with', ...p]),
        message: missing ? is.message.replace('missing required key', `missing required parameter "${String(p[p.length - 1] ?? '')}" for kind "${mod.kind}"`) : is.message,
      });
    }
    return { params: undefined, issues, origin };
  }
  return { params: r.data, issues, origin };
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
  // One path stack, copied only when something is reported (this runs for every
  // stage and arch of a spec).
  const stack = [...p];
  const walk = (v: unknown): unknown => {
    if (typeof v === 'string') return v.includes('$') ? expandString(v, spec, arch, (msg) => report([...stack], msg)) : v;
    if (Array.isArray(v)) {
      return v.map((x, i) => {
        stack.push(i);
        const r = walk(x);
        stack.pop();
        return r;
      });
    }
    if (isPlain(v)) {
      const out: Record<string, unknown> = {};
      for (const [k, x] of Object.entries(v)) {
        stack.push(k);
        out[k] = walk(x);
        stack.pop();
      }
      return out;
    }
    return v;
  };
  return walk(value);
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
