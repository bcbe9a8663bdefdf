// Comparison half of `pipeline repro`: given what two from-scratch builds of the
// same plan produced, say whether they match and, when not, where they first
// diverge. No filesystem access here: the I/O layer (repro.ts) reads cache entries
// and hands over streams, so every rule below is unit-testable.
import type { Readable } from 'node:stream';
import tar from 'tar-stream';
import { diffParts, type KeyParts } from '../engine/compile.js';
import { hashStream } from '../lib/digest.js';

// ---------------------------------------------------------------------------
// Stage outputs

/** One output file of a stage as the cache entry records it. */
export interface FileSummary {
  path: string;
  size: number;
  sha256: string;
  executable: boolean;
}

/** One stage of one build: its key and (when the build committed it) its outputs. */
export interface SideStage {
  name: string;
  kind: string;
  key: string;
  /** Key parts from the cache entry; absent when the entry is missing. */
  parts?: KeyParts;
  /** Undefined when the build has no entry for the stage (it failed or never ran). */
  files?: FileSummary[];
}

export type FileChange = 'content' | 'size' | 'executable' | 'only-in-a' | 'only-in-b';

export interface FileDiff {
  path: string;
  changes: FileChange[];
  a?: { size: number; sha256: string; executable: boolean };
  b?: { size: number; sha256: string; executable: boolean };
  /** First byte offset where the contents differ (filled in by the I/O layer). */
  firstOffset?: number;
  /** For tar archives: the members that differ (filled in by the I/O layer). */
  tar?: TarDiff;
}

export interface StageDiff {
  name: string;
  kind: string;
  keyA: string;
  keyB: string;
  /** Human-readable differences between the two key part sets (empty when the keys match). */
  keyDiffs: string[];
  /** Which side has no cache entry for the stage. */
  missing?: 'a' | 'b' | 'both';
  identical: boolean;
  files: FileDiff[];
  /** How many files the stage produced (side a, else b). */
  fileCount: number;
  /** Divergent stages this one inherits from: its divergent inputs and, through them, theirs. */
  divergentUpstream: string[];
}

export interface Comparison {
  identical: boolean;
  /** Every stage's key is the same in both builds. */
  keysIdentical: boolean;
  stages: StageDiff[];
  /** The first stage in DAG order whose key or outputs differ. */
  firstDivergent?: string;
  /**
   * Divergent stages whose inputs are all identical: each is a nondeterminism
   * source of its own (the first divergent stage is always one).
   */
  sources: string[];
}

function fileInfo(f: FileSummary) {
  return { size: f.size, sha256: f.sha256, executable: f.executable };
}

/** File-level differences between two stage output lists (both sorted or not). */
export function diffFiles(a: FileSummary[], b: FileSummary[]): FileDiff[] {
  const byA = new Map(a.map((f) => [f.path, f]));
  const byB = new Map(b.map((f) => [f.path, f]));
  const names = [...new Set([...byA.keys(), ...byB.keys()])].sort(cmp);
  const out: FileDiff[] = [];
  for (const n of names) {
    const fa = byA.get(n);
    const fb = byB.get(n);
    if (!fa) out.push({ path: n, changes: ['only-in-b'], b: fileInfo(fb!) });
    else if (!fb) out.push({ path: n, changes: ['only-in-a'], a: fileInfo(fa) });
    else {
      const changes: FileChange[] = [];
      if (fa.sha256 !== fb.sha256) changes.push('content');
      if (fa.size !== fb.size) changes.push('size');
      if (fa.executable !== fb.executable) changes.push('executable');
      if (changes.length) out.push({ path: n, changes, a: fileInfo(fa), b: fileInfo(fb) });
    }
  }
  return out;
}

/**
 * Compare two builds stage by stage. `a` gives the DAG order (a plan's stage list is
 * topological); stages only `b` knows are appended. Inputs are found through the
 * key parts (input name -> producer key), so no plan object is needed.
 */
export function compareStages(a: SideStage[], b: SideStage[]): Comparison {
  const byB = new Map(b.map((s) => [s.name, s]));
  const names = [...a.map((s) => s.name), ...b.filter((s) => !a.some((x) => x.name === s.name)).map((s) => s.name)];
  const byA = new Map(a.map((s) => [s.name, s]));
  const nameOfKey = new Map<string, string>();
  for (const s of [...a, ...b]) if (!nameOfKey.has(s.key)) nameOfKey.set(s.key, s.name);

  const divergent = new Set<string>();
  const upstreamOf = new Map<string, Set<string>>();
  const stages: StageDiff[] = [];
  for (const n of names) {
    const sa = byA.get(n);
    const sb = byB.get(n);
    const keyA = sa?.key ?? '';
    const keyB = sb?.key ?? '';
    const keyDiffs = keyA === keyB ? [] : sa?.parts && sb?.parts ? diffParts(sa.parts, sb.parts) : [`key ${short(keyA)} -> ${short(keyB)}`];
    if (keyA !== keyB && !keyDiffs.length) keyDiffs.push('key format changed');
    const missing = !sa?.files && !sb?.files ? 'both' : !sa?.files ? 'a' : !sb?.files ? 'b' : undefined;
    const files = sa?.files && sb?.files ? diffFiles(sa.files, sb.files) : [];
    const identical = !missing && keyA === keyB && files.length === 0;

    // Transitive upstream divergence, through either side's recorded inputs.
    const ups = new Set<string>();
    const inputKeys = [...Object.values(sa?.parts?.inputs ?? {}), ...Object.values(sb?.parts?.inputs ?? {})];
    for (const k of inputKeys) {
      const inName = nameOfKey.get(k);
      if (!inName || inName === n) continue;
      // An identical input hands over the same bytes whatever happened above it,
      // so divergence only propagates through divergent inputs.
      if (!divergent.has(inName)) continue;
      ups.add(inName);
      for (const u of upstreamOf.get(inName) ?? []) ups.add(u);
    }
    upstreamOf.set(n, ups);
    if (!identical) divergent.add(n);
    stages.push({
      name: n,
      kind: sa?.kind ?? sb?.kind ?? '?',
      keyA,
      keyB,
      keyDiffs,
      ...(missing ? { missing } : {}),
      identical,
      files,
      fileCount: (sa?.files ?? sb?.files ?? []).length,
      divergentUpstream: [...ups].sort(cmp),
    });
  }
  const bad = stages.filter((s) => !s.identical);
  return {
    identical: bad.length === 0,
    keysIdentical: stages.every((s) => s.keyA === s.keyB),
    stages,
    firstDivergent: bad[0]?.name,
    sources: bad.filter((s) => s.divergentUpstream.length === 0).map((s) => s.name),
  };
}

// ---------------------------------------------------------------------------
// Tar members

export interface TarMember {
  name: string;
  type: string;
  size: number;
  mode: number;
  uid: number;
  gid: number;
  uname: string;
  gname: string;
  /** Seconds since the epoch (ustar resolution). */
  mtime: number;
  linkname: string;
  devmajor: number;
  devminor: number;
  /** sha256 of the member's data (regular files; '' otherwise). */
  sha256: string;
  /** pax records other than path/linkpath (xattrs, sub-second times, …), sorted. */
  pax: Record<string, string>;
  /** Position in the archive. */
  index: number;
}

export type MemberAttr = 'content' | 'type' | 'size' | 'mode' | 'uid' | 'gid' | 'uname' | 'gname' | 'mtime' | 'linkname' | 'device' | `pax.${string}`;

export interface MemberDiff {
  name: string;
  /** Attributes that differ, or `only-in-a` / `only-in-b`. */
  attrs: (MemberAttr | 'only-in-a' | 'only-in-b')[];
  /** The differing values, side a and side b (mode in octal). */
  a?: Record<string, string | number>;
  b?: Record<string, string | number>;
}

export interface TarDiff {
  membersA: number;
  membersB: number;
  /** Same members, but in a different order in the archive. */
  orderDiffers: boolean;
  /** Number of members that differ (the list below may be capped). */
  differing: number;
  members: MemberDiff[];
  /** How many attribute differences of each kind, e.g. { mtime: 812, content: 3 }. */
  attrCounts: Record<string, number>;
}

/** Read a tar stream to the end and list its members with their data digests. */
export async function listTarMembers(input: Readable): Promise<TarMember[]> {
  const ex = tar.extract();
  const done = new Promise<void>((resolve, reject) => {
    input.on('error', reject);
    ex.on('error', reject);
    ex.on('finish', resolve);
  });
  input.pipe(ex);
  const out: TarMember[] = [];
  for await (const entry of ex) {
    const h = entry.header;
    const rawPax = (h.pax ?? {}) as Record<string, string>;
    const body = await hashStream(entry as AsyncIterable<Buffer>);
    const pax: Record<string, string> = {};
    for (const k of Object.keys(rawPax).sort()) if (k !== 'path' && k !== 'linkpath') pax[k] = rawPax[k]!;
    const type = h.type ?? 'file';
    out.push({
      name: h.name,
      type,
      size: h.size ?? body.size,
      mode: h.mode ?? 0,
      uid: h.uid ?? 0,
      gid: h.gid ?? 0,
      uname: h.uname ?? '',
      gname: h.gname ?? '',
      mtime: h.mtime ? Math.floor(h.mtime.getTime() / 1000) : 0,
      linkname: h.linkname ?? '',
      devmajor: h.devmajor ?? 0,
      devminor: h.devminor ?? 0,
      sha256: type === 'file' || type === 'contiguous-file' ? body.sha256 : '',
      pax,
      index: out.length,
    });
  }
  await done;
  return out;
}

function memberAttrs(a: TarMember, b: TarMember): { attrs: MemberAttr[]; va: Record<string, string | number>; vb: Record<string, string | number> } {
  const attrs: MemberAttr[] = [];
  const va: Record<string, string | number> = {};
  const vb: Record<string, string | number> = {};
  const put = (attr: MemberAttr, x: string | number, y: string | number) => {
    attrs.push(attr);
    va[attr] = x;
    vb[attr] = y;
  };
  if (a.type !== b.type) put('type', a.type, b.type);
  if (a.sha256 !== b.sha256) put('content', a.sha256, b.sha256);
  if (a.size !== b.size) put('size', a.size, b.size);
  if (a.mode !== b.mode) put('mode', octal(a.mode), octal(b.mode));
  if (a.uid !== b.uid) put('uid', a.uid, b.uid);
  if (a.gid !== b.gid) put('gid', a.gid, b.gid);
  if (a.uname !== b.uname) put('uname', a.uname, b.uname);
  if (a.gname !== b.gname) put('gname', a.gname, b.gname);
  if (a.mtime !== b.mtime) put('mtime', a.mtime, b.mtime);
  if (a.linkname !== b.linkname) put('linkname', a.linkname, b.linkname);
  if (a.devmajor !== b.devmajor || a.devminor !== b.devminor) put('device', `${a.devmajor}:${a.devminor}`, `${b.devmajor}:${b.devminor}`);
  for (const k of [...new Set([...Object.keys(a.pax), ...Object.keys(b.pax)])].sort(cmp)) {
    if (a.pax[k] !== b.pax[k]) put(`pax.${k}`, a.pax[k] ?? '(none)', b.pax[k] ?? '(none)');
  }
  return { attrs, va, vb };
}

/**
 * Member-level differences between two archives. A name that occurs several times
 * is matched occurrence by occurrence. `limit` caps the listed members (the counts
 * still cover all of them).
 */
export function diffTarMembers(a: TarMember[], b: TarMember[], limit = 200): TarDiff {
  const keyed = (list: TarMember[]) => {
    const seen = new Map<string, number>();
    const m = new Map<string, TarMember>();
    for (const x of list) {
      const n = seen.get(x.name) ?? 0;
      seen.set(x.name, n + 1);
      m.set(n ? `${x.name}\0${n}` : x.name, x);
    }
    return m;
  };
  const ma = keyed(a);
  const mb = keyed(b);
  const members: MemberDiff[] = [];
  const attrCounts: Record<string, number> = {};
  let differing = 0;
  const add = (d: MemberDiff) => {
    differing++;
    for (const x of d.attrs) attrCounts[x] = (attrCounts[x] ?? 0) + 1;
    if (members.length < limit) members.push(d);
  };
  // Walk in side a's archive order, then members only b has in its order.
  for (const [k, x] of ma) {
    const y = mb.get(k);
    if (!y) {
      add({ name: x.name, attrs: ['only-in-a'] });
      continue;
    }
    const { attrs, va, vb } = memberAttrs(x, y);
    if (attrs.length) add({ name: x.name, attrs, a: va, b: vb });
  }
  for (const [k, y] of mb) if (!ma.has(k)) add({ name: y.name, attrs: ['only-in-b'] });
  const orderA = a.map((x) => x.name).join('\0');
  const orderB = b.map((x) => x.name).join('\0');
  const sameSet = a.length === b.length && [...ma.keys()].every((k) => mb.has(k));
  return { membersA: a.length, membersB: b.length, orderDiffers: sameSet && orderA !== orderB, differing, members, attrCounts };
}

// ---------------------------------------------------------------------------
// Published image directories

export interface ImageFile {
  path: string;
  size: number;
  mode: number;
  mtime: number;
  sha256: string;
}

export interface ImageFileDiff {
  path: string;
  changes: ('content' | 'size' | 'mode' | 'mtime' | 'only-in-a' | 'only-in-b')[];
  /** First differing byte (filled in by the I/O layer). */
  firstOffset?: number;
  /** Why a difference is expected and not counted (e.g. signatures). */
  ignored?: string;
}

/** Differences between two published image dirs; `ignore` maps a path to why it may differ. */
export function diffImageFiles(a: ImageFile[], b: ImageFile[], ignore: Record<string, string> = {}): ImageFileDiff[] {
  const byA = new Map(a.map((f) => [f.path, f]));
  const byB = new Map(b.map((f) => [f.path, f]));
  const out: ImageFileDiff[] = [];
  for (const p of [...new Set([...byA.keys(), ...byB.keys()])].sort(cmp)) {
    const x = byA.get(p);
    const y = byB.get(p);
    const changes: ImageFileDiff['changes'] = [];
    if (!x) changes.push('only-in-b');
    else if (!y) changes.push('only-in-a');
    else {
      if (x.sha256 !== y.sha256) changes.push('content');
      if (x.size !== y.size) changes.push('size');
      if ((x.mode & 0o7777) !== (y.mode & 0o7777)) changes.push('mode');
      if (x.mtime !== y.mtime) changes.push('mtime');
    }
    if (changes.length) out.push({ path: p, changes, ...(ignore[p] ? { ignored: ignore[p] } : {}) });
  }
  return out;
}

// ---------------------------------------------------------------------------
// Report text

export interface ReproBuildInfo {
  label: 'a' | 'b';
  umask: string;
  env: Record<string, string | null>;
  faketime?: string;
  dir: string;
  seconds: number;
  /** Set when a first attempt had to be abandoned (e.g. under faketime). */
  note?: string;
}

export interface ImageComparison {
  variant: string;
  identical: boolean;
  files: ImageFileDiff[];
}

export interface ReproReport {
  schema: 'pipeline.repro-report/v1';
  spec: string;
  pipeline: string;
  arch: string;
  variants: string[];
  identical: boolean;
  sourceDateEpoch: { value: number; source: string };
  clock: { mode: 'faketime' | 'none'; offset?: string; note: string };
  builds: ReproBuildInfo[];
  keysIdentical: boolean;
  firstDivergent: string | null;
  sources: string[];
  stages: StageDiff[];
  images: ImageComparison[];
  diffoscope: { ran: boolean; note: string; a?: string; b?: string; exitCode?: number; output?: string; truncated?: boolean; outputFile?: string };
  kept: string | null;
}

function duration(s: number): string {
  return s < 120 ? `${s.toFixed(1)}s` : `${Math.floor(s / 60)}m${String(Math.round(s % 60)).padStart(2, '0')}s`;
}

function envText(b: ReproBuildInfo): string {
  const parts = [`umask ${b.umask}`];
  for (const [k, v] of Object.entries(b.env)) parts.push(v === null ? `${k} unset` : `${k}=${v}`);
  if (b.faketime) parts.push(`faketime ${b.faketime}`);
  return parts.join(', ');
}

function fileLine(f: FileDiff): string {
  const bits: string[] = [f.changes.join(', ')];
  if (f.firstOffset !== undefined && f.firstOffset >= 0) bits.push(`first difference at byte ${f.firstOffset}`);
  if (f.a && f.b && f.a.size !== f.b.size) bits.push(`${f.a.size} vs ${f.b.size} bytes`);
  return `${f.path}: ${bits.join('; ')}`;
}

function memberLine(m: MemberDiff): string {
  if (!m.a || !m.b) return `${m.name}: ${m.attrs.join(', ')}`;
  const vals = m.attrs
    .filter((x) => x !== 'content')
    .map((x) => `${x} ${m.a![x]} vs ${m.b![x]}`)
    .join(', ');
  return `${m.name}: ${m.attrs.includes('content') ? 'content' : ''}${m.attrs.includes('content') && vals ? '; ' : ''}${vals}`;
}

/** The short human report. */
export function formatReport(r: ReproReport, opts: { members?: number; files?: number } = {}): string {
  const maxMembers = opts.members ?? 15;
  const maxFiles = opts.files ?? 20;
  const L: string[] = [];
  L.push(`repro ${r.pipeline} ${r.arch} ${r.variants.join(' ')}: ${r.identical ? 'REPRODUCIBLE — both builds are bit-identical' : 'NOT reproducible'}`);
  L.push(`  SOURCE_DATE_EPOCH=${r.sourceDateEpoch.value} (${r.sourceDateEpoch.source}); clock: ${r.clock.note}`);
  for (const b of r.builds) L.push(`  build ${b.label}: ${duration(b.seconds)}  ${envText(b)}${b.note ? ` (${b.note})` : ''}`);
  const w = Math.max(5, ...r.stages.map((s) => s.name.length));
  const k = Math.max(4, ...r.stages.map((s) => s.kind.length));
  for (const s of r.stages) {
    let status: string;
    if (s.identical) status = `identical (${s.fileCount} file${s.fileCount === 1 ? '' : 's'})`;
    else if (s.missing) status = `no output in build ${s.missing === 'both' ? 'a or b' : s.missing}`;
    else if (s.keyDiffs.length && !s.files.length) status = 'cache keys differ';
    else status = `${s.files.length} of ${s.fileCount} file${s.fileCount === 1 ? '' : 's'} differ${s.keyDiffs.length ? ', cache keys differ' : ''}`;
    const tags: string[] = [];
    if (s.name === r.firstDivergent) tags.push('← first divergent stage');
    else if (!s.identical && s.divergentUpstream.length) tags.push(`(downstream of ${s.divergentUpstream.join(', ')})`);
    else if (!s.identical) tags.push('← another source');
    L.push(`  ${s.identical ? '✓' : '✗'} ${s.name.padEnd(w)}  ${s.kind.padEnd(k)}  ${status}${tags.length ? '  ' + tags.join(' ') : ''}`);
    if (s.identical) continue;
    for (const d of s.keyDiffs) L.push(`      key: ${d}`);
    // Details for the stages that are sources; downstream ones just inherit.
    if (s.divergentUpstream.length && s.name !== r.firstDivergent) continue;
    for (const f of s.files.slice(0, maxFiles)) {
      L.push(`      ${fileLine(f)}`);
      if (f.tar) {
        const counts = Object.entries(f.tar.attrCounts)
          .map(([a, n]) => `${a} ×${n}`)
          .join(', ');
        L.push(`        tar: ${f.tar.differing} of ${Math.max(f.tar.membersA, f.tar.membersB)} members differ${counts ? ` (${counts})` : ''}${f.tar.orderDiffers ? '; member order differs' : ''}`);
        for (const m of f.tar.members.slice(0, maxMembers)) L.push(`          ${memberLine(m)}`);
        if (f.tar.differing > maxMembers) L.push(`          … ${f.tar.differing - maxMembers} more (see the JSON report)`);
      }
    }
    if (s.files.length > maxFiles) L.push(`      … ${s.files.length - maxFiles} more files`);
  }
  for (const im of r.images) {
    const counted = im.files.filter((f) => !f.ignored);
    const head = `  ${counted.length ? '✗' : '✓'} images/${im.variant}/${r.arch}/: ${counted.length ? `${counted.length} file${counted.length === 1 ? '' : 's'} differ` : 'byte-identical'}`;
    L.push(head);
    for (const f of im.files) {
      const off = f.firstOffset !== undefined && f.firstOffset >= 0 ? `, first difference at byte ${f.firstOffset}` : '';
      L.push(`      ${f.path}: ${f.changes.join(', ')}${off}${f.ignored ? ` (not counted: ${f.ignored})` : ''}`);
    }
  }
  if (r.diffoscope.ran) {
    L.push(`  diffoscope ${r.diffoscope.a ?? ''} (exit ${r.diffoscope.exitCode}):`);
    const lines = (r.diffoscope.output ?? '').split('\n').filter(Boolean);
    for (const l of lines.slice(0, 40)) L.push(`    ${l}`);
    if (lines.length > 40 || r.diffoscope.truncated) L.push(`    … (full output ${r.diffoscope.outputFile ? `in ${r.diffoscope.outputFile}` : 'in the JSON report'})`);
  } else if (!r.identical) L.push(`  diffoscope: ${r.diffoscope.note}`);
  if (r.kept) L.push(`  kept both trees in ${r.kept} (a/ and b/)`);
  return L.join('\n') + '\n';
}

function octal(m: number): string {
  return '0' + (m & 0o7777).toString(8);
}

function short(k: string): string {
  return k ? k.slice(0, 12) : '(none)';
}

function cmp(x: string, y: string): number {
  return x < y ? -1 : x > y ? 1 : 0;
}
