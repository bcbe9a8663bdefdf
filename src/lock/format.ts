// The lock file: for every mmdebstrap stage × arch, the mirror state it was
// resolved against and every .deb it installs. Pure (no I/O): format, parse with
// file:line:col errors, per-stage digests, and the "old → new" diff.
//
// A line format rather than JSON/YAML: one package per line, sorted, so a
// `git diff` of a lock shows exactly the packages that moved.
import path from 'node:path';
import { canonicalize, sha256 } from '../engine/canonical.js';
import { SpecError, type SpecIssue } from '../engine/errors.js';

export const LOCK_FORMAT = 1;

export interface LockedDeb {
  name: string;
  version: string;
  arch: string;
  /** Priority from the mirror's Packages index ("-" when absent); the flat repo keeps it so priority-based variants select the same set. */
  priority: string;
  sha256: string;
  size: number;
  /** Path under the mirror, e.g. pool/main/h/hello/hello_2.10-3_amd64.deb. */
  path: string;
}

/** What the stage asked for: a lock section is valid only for the same request. */
export interface LockRequest {
  mirror: string;
  suite: string;
  components: string[];
  variant: string;
  packages: string[];
}

export interface LockSection extends LockRequest {
  stage: string;
  arch: string;
  /** sha256 of the mirror's InRelease the set was resolved from, and its Date: field. */
  inRelease: { sha256: string; date: string };
  debs: LockedDeb[];
}

export interface LockFile {
  spec: string;
  sections: LockSection[];
}

/** The lock file for a spec: `<spec basename>.lock` next to it (pipeline.yaml → pipeline.lock). */
export function lockPathFor(specFile: string): string {
  return path.join(path.dirname(specFile), path.basename(specFile).replace(/\.ya?ml$/i, '') + '.lock');
}

export function sectionId(stage: string, arch: string): string {
  return `${stage} ${arch}`;
}

const cmp = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);

export function sortDebs(debs: LockedDeb[]): LockedDeb[] {
  return [...debs].sort((a, b) => cmp(a.name, b.name) || cmp(a.arch, b.arch) || cmp(a.version, b.version));
}

function normalized(s: LockSection): LockSection {
  return { ...s, components: [...s.components], packages: [...s.packages], debs: sortDebs(s.debs) };
}

/** What goes into the stage's cache key: names one exact package set from one mirror state. */
export function sectionDigest(s: LockSection): string {
  return sha256(canonicalize(normalized(s)));
}

export function requestOf(p: { mirror: string; suite: string; components: string[]; variant: string; packages: string[] }): LockRequest {
  return { mirror: p.mirror, suite: p.suite, components: [...p.components], variant: p.variant, packages: [...p.packages] };
}

/** Differences between a spec stage's request and what its lock section was resolved for (empty when they agree). */
export function requestMismatch(want: LockRequest, locked: LockRequest): string[] {
  const out: string[] = [];
  for (const f of ['mirror', 'suite', 'variant'] as const) if (want[f] !== locked[f]) out.push(`${f} is ${want[f]} in the spec but ${locked[f]} in the lock`);
  if (want.components.join(' ') !== locked.components.join(' ')) out.push(`components are ${want.components.join(' ')} in the spec but ${locked.components.join(' ')} in the lock`);
  const have = new Set(locked.packages);
  const added = want.packages.filter((p) => !have.has(p));
  const removed = locked.packages.filter((p) => !want.packages.includes(p));
  if (added.length) out.push(`package${added.length > 1 ? 's' : ''} ${added.join(', ')} not in the lock`);
  if (removed.length) out.push(`package${removed.length > 1 ? 's' : ''} ${removed.join(', ')} locked but no longer in the spec`);
  return out;
}

// Fields are separated by single spaces; none of them may hold whitespace (the
// InRelease date, last on its line, is the exception).
const TOKEN = /^\S+$/;

export function formatLock(lock: LockFile): string {
  const lines = [
    '# Exact Debian packages per mmdebstrap stage and arch, written by `pipeline lock`.',
    '# Refresh with `pipeline lock --update`; fill the .deb store with `pipeline fetch`.',
    `lock ${LOCK_FORMAT}`,
    `spec ${lock.spec}`,
  ];
  const sections = [...lock.sections].sort((a, b) => cmp(a.stage, b.stage) || cmp(a.arch, b.arch));
  for (const s of sections) {
    lines.push('', `stage ${s.stage} ${s.arch}`);
    lines.push(`mirror ${s.mirror}`, `suite ${s.suite}`, `components ${s.components.join(' ')}`, `variant ${s.variant}`);
    lines.push(['packages', ...s.packages].join(' '));
    lines.push(`inrelease ${s.inRelease.sha256} ${s.inRelease.date}`);
    for (const d of sortDebs(s.debs)) lines.push(`deb ${d.name} ${d.version} ${d.arch} ${d.priority} ${d.sha256} ${d.size} ${d.path}`);
  }
  for (const l of lines) if (/[\n\r]/.test(l)) throw new Error(`internal: lock line holds a newline: ${JSON.stringify(l)}`);
  return lines.join('\n') + '\n';
}

const HEX64 = /^[0-9a-f]{64}$/;
const NAME = /^[a-z0-9][a-z0-9+.-]*$/;
const VERSION = /^[A-Za-z0-9.+~:-]+$/;

/** Parse a lock file; every problem is reported with its line and column (SpecError, exit 2). */
export function parseLock(text: string, file: string): LockFile {
  const issues: SpecIssue[] = [];
  const src = text.split('\n');
  const at = (ln: number, col: number, len: number, message: string) =>
    issues.push({ loc: { file, line: ln + 1, col: col + 1, lineText: src[ln], length: len }, path: '', message });
  let spec: string | undefined;
  let version: number | undefined;
  const sections: LockSection[] = [];
  let cur: (Partial<LockSection> & { debs: LockedDeb[]; line: number }) | undefined;
  const seen = new Set<string>();
  const finish = () => {
    if (!cur) return;
    const missing = (['mirror', 'suite', 'components', 'variant', 'packages', 'inRelease'] as const).filter((f) => cur![f] === undefined);
    if (missing.length) at(cur.line, 0, src[cur.line]!.length, `stage section lacks: ${missing.map((m) => (m === 'inRelease' ? 'inrelease' : m)).join(', ')}`);
    else sections.push({ stage: cur.stage!, arch: cur.arch!, mirror: cur.mirror!, suite: cur.suite!, components: cur.components!, variant: cur.variant!, packages: cur.packages!, inRelease: cur.inRelease!, debs: cur.debs });
    cur = undefined;
  };
  src.forEach((raw, ln) => {
    const line = raw.replace(/\r$/, '');
    if (!line.trim() || line.startsWith('#')) return;
    // Columns of each field, for located errors.
    const fields: { v: string; col: number }[] = [];
    for (const m of line.matchAll(/\S+/g)) fields.push({ v: m[0], col: m.index! });
    const [kw, ...rest] = fields;
    const bad = (i: number, message: string) => {
      const f = fields[i] ?? { v: ' ', col: line.length };
      at(ln, f.col, f.v.length, message);
    };
    const want = (n: number, what: string) => {
      if (rest.length !== n) {
        bad(rest.length < n ? fields.length : n + 1, `expected ${what}`);
        return false;
      }
      return true;
    };
    const needSection = () => {
      if (!cur) bad(0, `"${kw!.v}" outside a stage section (start one with "stage <name> <arch>")`);
      return !!cur;
    };
    switch (kw!.v) {
      case 'lock':
        if (!want(1, 'the format number: lock 1')) return;
        version = Number(rest[0]!.v);
        if (version !== LOCK_FORMAT) bad(1, `unsupported lock format ${rest[0]!.v} (this pipeline reads ${LOCK_FORMAT})`);
        return;
      case 'spec':
        if (want(1, 'the spec name: spec <name>')) spec = rest[0]!.v;
        return;
      case 'stage': {
        finish();
        if (!want(2, 'stage <name> <arch>')) return;
        const id = sectionId(rest[0]!.v, rest[1]!.v);
        if (seen.has(id)) bad(1, `stage ${rest[0]!.v} ${rest[1]!.v} is locked twice`);
        seen.add(id);
        cur = { stage: rest[0]!.v, arch: rest[1]!.v, debs: [], line: ln };
        return;
      }
      case 'mirror':
      case 'suite':
      case 'variant':
        if (!needSection() || !want(1, `${kw!.v} <value>`)) return;
        cur![kw!.v as 'mirror' | 'suite' | 'variant'] = rest[0]!.v;
        return;
      case 'components':
        if (!needSection()) return;
        if (!rest.length) return void bad(1, 'expected at least one component');
        cur!.components = rest.map((f) => f.v);
        return;
      case 'packages':
        if (!needSection()) return;
        cur!.packages = rest.map((f) => f.v);
        return;
      case 'inrelease': {
        if (!needSection()) return;
        if (rest.length < 2) return void bad(fields.length, 'expected inrelease <sha256> <date>');
        if (!HEX64.test(rest[0]!.v)) return void bad(1, 'expected a sha256 (64 lowercase hex digits)');
        cur!.inRelease = { sha256: rest[0]!.v, date: line.slice(rest[1]!.col).trim() };
        return;
      }
      case 'deb': {
        if (!needSection() || !want(7, 'deb <name> <version> <arch> <priority> <sha256> <size> <pool path>')) return;
        const [name, ver, arch, prio, sha, size, p] = rest.map((f) => f.v) as [string, string, string, string, string, string, string];
        if (!NAME.test(name)) return void bad(1, `not a Debian package name: ${name}`);
        if (!VERSION.test(ver)) return void bad(2, `not a Debian version: ${ver}`);
        if (!NAME.test(arch)) return void bad(3, `not an architecture: ${arch}`);
        if (!HEX64.test(sha)) return void bad(5, 'expected a sha256 (64 lowercase hex digits)');
        if (!/^[1-9][0-9]*$/.test(size)) return void bad(6, 'expected a size in bytes');
        if (p.startsWith('/') || p.split('/').includes('..') || !p.endsWith('.deb')) return void bad(7, 'expected a relative pool path ending in .deb');
        if (cur!.debs.some((d) => d.name === name && d.arch === arch)) return void bad(1, `${name}:${arch} is locked twice in this stage`);
        cur!.debs.push({ name, version: ver, arch, priority: prio, sha256: sha, size: Number(size), path: p });
        return;
      }
      default:
        bad(0, `unknown line "${kw!.v}" (expected lock, spec, stage, mirror, suite, components, variant, packages, inrelease or deb)`);
    }
  });
  finish();
  if (version === undefined && !issues.length) at(0, 0, 1, 'not a pipeline lock: no "lock 1" line');
  if (spec === undefined && !issues.length) at(0, 0, 1, 'no "spec <name>" line');
  if (issues.length) throw new SpecError(issues);
  return { spec: spec!, sections };
}

export function findSection(lock: LockFile, stage: string, arch: string): LockSection | undefined {
  return lock.sections.find((s) => s.stage === stage && s.arch === arch);
}

/** "package: old → new" per changed package between two sections (added and removed too), sorted by package. */
export function diffSections(prev: LockSection | undefined, next: LockSection | undefined): string[] {
  const key = (d: LockedDeb) => `${d.name}:${d.arch}`;
  const a = new Map((prev?.debs ?? []).map((d) => [key(d), d]));
  const b = new Map((next?.debs ?? []).map((d) => [key(d), d]));
  const names = [...new Set([...a.keys(), ...b.keys()])].sort((x, y) => {
    const [xn, xa] = x.split(':') as [string, string];
    const [yn, ya] = y.split(':') as [string, string];
    return cmp(xn, yn) || cmp(xa, ya);
  });
  const out: string[] = [];
  for (const n of names) {
    const x = a.get(n);
    const y = b.get(n);
    const label = (x ?? y)!.arch === 'all' || (x ?? y)!.arch === (next ?? prev)!.arch ? (x ?? y)!.name : n;
    if (!x) out.push(`${label}: (added) → ${y!.version}`);
    else if (!y) out.push(`${label}: ${x.version} → (removed)`);
    else if (x.version !== y.version) out.push(`${label}: ${x.version} → ${y.version}`);
    else if (x.sha256 !== y.sha256) out.push(`${label}: ${x.version} → ${y.version} (same version, different .deb: sha256 ${x.sha256.slice(0, 12)} → ${y.sha256.slice(0, 12)})`);
  }
  return out;
}

/**
 * What a locked mmdebstrap stage receives at run time, next to its params (the
 * engine adds it after the cache key is made; the key holds sectionDigest).
 */
export const LOCKED_RUN = '__locked';
export interface LockedRun {
  section: LockSection;
  /** Cache root: the .deb store is Cache.debPath under it. */
  cacheRoot: string;
}
