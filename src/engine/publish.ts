// Publishing: copy a variant's files out of the cache into images/<variant>/<arch>/
// with SHA256SUMS, build-manifest.json and the provenance statement. The new
// directory is assembled beside the old one and swapped in by rename, so readers
// never see a half-written set. A memo of what was published (every entry's stat
// fingerprint) makes republishing an unchanged set cost a stat per file, and a
// stamp (one small file) lets the no-op build know that without building the
// manifest or reading the memo.
import { createHash } from 'node:crypto';
import { createReadStream, lstatSync, promises as fs, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { canonicalize, sha256, stableJson } from './canonical.js';
import { ownedName, ownerGone, writeAtomic, type Entry } from './cache.js';
import type { Plan, PlanStage } from './compile.js';
import { BuildError } from './errors.js';
import { hashFile } from '../lib/digest.js';
import { safeRemove, within } from './fsutil.js';
import { PACKAGE_ROOT } from './kinds.js';
import { spawnProcess } from './process.js';
import {
  BUNDLE_NAME,
  MANIFEST_NAME,
  METADATA_FILES,
  STATEMENT_NAME,
  SUMS_NAME,
  type BuildManifest,
  type DebPackage,
  type OutputRecord,
} from './manifest-types.js';
import { buildStatement, statementBytes } from './provenance.js';

export const BUILDER_ID = 'https://github.com/pipeline-build/pipeline';

export interface Published {
  variant: string;
  dir: string;
  manifest: BuildManifest;
}

/** The manifest for one variant: pure, from the plan and the cache entries. */
export function makeManifest(plan: Plan, variant: string, entries: ReadonlyMap<string, Entry>, builderVersion: string, signed = false): BuildManifest {
  const sinks = plan.sinks[variant]!;
  const outputs: OutputRecord[] = [];
  const seen = new Map<string, string>();
  for (const s of sinks) {
    for (const f of entries.get(s)!.files) {
      const prev = seen.get(f.path);
      if (prev) throw new Error(`variant ${variant}: stages ${prev} and ${s} both produce ${f.path}`);
      if ((METADATA_FILES as readonly string[]).includes(f.path)) throw new Error(`variant ${variant}: stage ${s} produces ${f.path}, a name reserved for build metadata`);
      seen.set(f.path, s);
      outputs.push({ path: f.path, size: f.size, sha256: f.sha256, fsverity: f.fsverity, stage: s });
    }
  }
  outputs.sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  const meta: Record<string, Record<string, unknown>> = {};
  const packages = new Map<string, DebPackage>();
  const tools: Record<string, string> = {};
  const stages = closureOf(plan, sinks);
  for (const st of stages) {
    const m = entries.get(st.name)?.meta ?? {};
    const { packages: pk, ...rest } = m as { packages?: DebPackage[] };
    meta[st.name] = rest;
    for (const p of pk ?? []) packages.set(`${p.name}:${p.arch}`, p);
    Object.assign(tools, st.parts.tools);
  }
  return {
    schema: 'pipeline.build-manifest/v1',
    builder: { id: BUILDER_ID, version: builderVersion },
    spec: { name: plan.spec.name, path: specPathForManifest(plan.spec.file), sha256: plan.spec.sha256 },
    variant,
    arch: plan.arch,
    sourceDateEpoch: plan.sourceDateEpoch,
    stages: stages.map((s) => ({ name: s.name, kind: s.kind, version: s.parts.version, key: s.key, inputs: s.parts.inputs, tools: s.parts.tools, params: s.parts.params })),
    resolved: { meta, packages: [...packages.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)), tools },
    outputs,
    // The manifest is itself a subject of the statement, so it names the bundle up front.
    attestation: signed ? { statement: STATEMENT_NAME, bundle: BUNDLE_NAME } : { statement: STATEMENT_NAME },
  };
}

/**
 * The variant's stages, inputs first, in the order compile's closure() gives a plan
 * of this variant alone: the manifest must not depend on which other variants were
 * built with it (filtering plan.stages did: `build amd64 --all` published another
 * stage order for `verified` than `build amd64 verified`, and each republished).
 */
function closureOf(plan: Plan, sinks: string[]): PlanStage[] {
  const by = new Map(plan.stages.map((s) => [s.name, s]));
  const out: PlanStage[] = [];
  const seen = new Set<string>();
  const visit = (n: string) => {
    if (seen.has(n)) return;
    seen.add(n);
    const st = by.get(n)!;
    for (const k of Object.keys(st.inputs).sort()) visit(st.inputs[k]!);
    out.push(st);
  };
  sinks.forEach(visit);
  return out;
}

/** A stable spec path: relative to the pipeline package when inside it, else the file name. */
function specPathForManifest(file: string): string {
  const abs = path.resolve(file);
  const rel = path.relative(PACKAGE_ROOT, abs);
  return rel.startsWith('..') || path.isAbsolute(rel) ? path.basename(abs) : rel;
}

export function sumsFile(outputs: { path: string; sha256: string }[]): string {
  return outputs.map((o) => `${o.sha256}  ${o.path}\n`).join('');
}

export interface PublishOptions {
  outRoot: string;
  blobPath: (sha: string) => string;
  builderVersion: string;
  /** Signs the staged dir (writes the bundle) before it is swapped in. */
  sign?: (dir: string) => Promise<void>;
  /** Called with a blob that did not hash to its record while copying (drop it so the next build rebuilds). */
  onCorrupt?: (sha: string) => Promise<unknown>;
  /**
   * Where publish memos live (the build passes <cache>/published). Without it every
   * publish copies and hashes every file.
   */
  memoDir?: string;
  /**
   * The sha256 of the record text an entry was read from (the cache knows it for every
   * record it checked). With it, a publish also leaves a stamp (below) and the no-op
   * check needs no manifest built; undefined for a key: no stamp.
   */
  recordDigest?: (key: string) => string | undefined;
}

/**
 * What a publish left in dest: the manifest it published and, for every file and
 * directory, its stat fingerprint (device, inode, size, mtime and ctime in ns) and,
 * for artifacts, the sha256 it was verified against while copied out of the cache.
 * A later publish trusts an entry only while its fingerprint is unchanged: any write,
 * chmod, utimes or link moves ctime, which cannot be set back.
 */
interface PublishMemo {
  v: 1;
  dest: string;
  manifest: string;
  entries: Record<string, { fp: string; sha256?: string }>;
}

function fingerprint(st: { dev: bigint; ino: bigint; size: bigint; mtimeNs: bigint; ctimeNs: bigint; mode: bigint }): string {
  return [st.dev, st.ino, st.size, st.mtimeNs, st.ctimeNs, st.mode].join(':');
}

/**
 * Visit every file and directory under dir (relative path, '' for dir itself; each
 * directory before its entries, in readdir order) with its fingerprint; false if dir
 * is absent. Synchronous on purpose: a composefs object store holds ~12k files, and
 * the thread-pool round trip of an async lstat costs several times the syscall.
 */
function walkTree(dir: string, visit: (rel: string, fp: string) => void): boolean {
  const walk = (abs: string, rel: string): void => {
    const st = lstatSync(abs, { bigint: true });
    visit(rel, fingerprint(st));
    if (st.isDirectory()) for (const n of readdirSync(abs)) walk(`${abs}/${n}`, rel ? `${rel}/${n}` : n);
  };
  try {
    walk(dir, '');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw e;
  }
  return true;
}

/** Every file and directory under dir with its fingerprint (walk order); undefined if dir is absent. */
export async function treeFingerprints(dir: string): Promise<Map<string, string> | undefined> {
  const out = new Map<string, string>();
  return walkTree(dir, (rel, fp) => out.set(rel, fp)) ? out : undefined;
}

/** One digest over a tree's fingerprints in walk order (the stamp's), and how many entries. */
function treeDigest(lines: string[]): { tree: string; count: number } {
  return { tree: sha256(lines.join('')), count: lines.length };
}
const treeLine = (rel: string, fp: string) => `${rel}\0${fp}\n`;

/**
 * The publish stamp (issue 10, P1): what the no-op check reads instead of the memo,
 * whose JSON for a composefs store is ~3 MB, and instead of building the manifest
 * (~4 MB of stable JSON) to compare digests. One small file per published dir:
 *   inputs    a digest of everything makeManifest reads (the plan's part, and each
 *             closure stage's record digest: same records, same manifest), and of
 *             makeManifest's own code, so no manifest is built to know it is the same;
 *   manifest  the sha256 of the manifest published;
 *   tree      one sha256 over every entry's path and fingerprint (device, inode,
 *             size, mtime and ctime in ns, mode) in walk order, and their count.
 * What it sees, like the memo and the cache's blob memo: any write, truncate, chmod,
 * utimes, rename, link, unlink or new file in dest moves the ctime of the file or of
 * its directory, which cannot be set back; a file replaced by another (even with the
 * same bytes, size and mtime) has another inode or ctime. What it cannot see: changes
 * below the file system (writes to the block device, a restored snapshot with the
 * same inode numbers and times), and a system clock set back to the exact ns. Those
 * are for `pipeline verify`/SHA256SUMS. A stamp that does not match only costs the
 * memo's full check; readdir order changing is such a miss, never a false match.
 * A big tree (a composefs store, ~12k entries) is fingerprinted by a child `find`
 * (walker 'find': the same fields from fstatat, at ~2 µs an entry against ~4 µs for
 * lstatSync), started while the build loads the spec (prefetchStampTrees).
 */
interface PublishStamp {
  v: 1;
  dest: string;
  inputs: string;
  manifest: string;
  walker: 'js' | 'find';
  tree: string;
  count: number;
}

/** From this many entries a tree is fingerprinted by `find` (below it, starting a process costs more than the walk). */
const FIND_MIN = 2000;
// Path relative to the start ('' for it), then type, device, inode, size, mtime and ctime (s.ns), permission bits.
const FIND_FORMAT = '%P\\0%y %D %i %s %T@ %C@ %m\\n';

/** The 'find' walker's digest of dest (and with keep, its output), or undefined when find is missing or failed (dest absent, unreadable). */
async function findTree(dest: string, keep = false): Promise<{ tree: string; count: number; out?: string } | undefined> {
  // Not isolated: a read-only walk that ends by itself needs no PID namespace (probing for one costs a process).
  const r = await spawnProcess('find', [dest, '-printf', FIND_FORMAT], { capture: true, isolate: false, env: { LC_ALL: 'C' } });
  if (r.exitCode !== 0 || r.spawnError) return undefined;
  let count = 0;
  for (let i = r.stdout.indexOf('\n'); i >= 0; i = r.stdout.indexOf('\n', i + 1)) count++;
  return { tree: sha256(r.stdout), count, ...(keep ? { out: r.stdout } : {}) };
}

/** The same fingerprints as treeFingerprints, as `find` reports them (undefined if find failed or printed something unexpected). */
export async function findFingerprints(dir: string): Promise<Map<string, string> | undefined> {
  const t = await findTree(dir, true);
  return t && parseFindTree(t.out!);
}

const FIND_TYPE: Record<string, number> = { f: 0o100000, d: 0o040000, l: 0o120000, p: 0o010000, s: 0o140000, c: 0o020000, b: 0o060000 };

/**
 * find's output read back as fingerprints (same form as fingerprint()); undefined for
 * anything unexpected. "s.nnnnnnnnn0" times are ns with a point and a trailing zero.
 */
function parseFindTree(out: string): Map<string, string> | undefined {
  const fps = new Map<string, string>();
  const ns = (t: string) => (/^\d+\.\d{9}0$/.test(t) ? BigInt(t.slice(0, -1).replace('.', '')).toString() : undefined);
  for (const line of out.split('\n')) {
    if (!line) continue;
    const z = line.indexOf('\0');
    const f = line.slice(z + 1).split(' ');
    const type = FIND_TYPE[f[0]!];
    const [m, c] = [ns(f[4] ?? ''), ns(f[5] ?? '')];
    if (z < 0 || f.length !== 7 || type === undefined || m === undefined || c === undefined || !/^[0-7]+$/.test(f[6]!)) return undefined;
    fps.set(line.slice(0, z), [f[1], f[2], f[3], m, c, type + parseInt(f[6]!, 8)].join(':'));
  }
  return fps;
}

function sameFingerprints(a: ReadonlyMap<string, string>, b: ReadonlyMap<string, string>): boolean {
  if (a.size !== b.size) return false;
  for (const [rel, fp] of a) if (b.get(rel) !== fp) return false;
  return true;
}

/** The tree digest by the walker a stamp names. */
async function stampTree(dest: string, walker: PublishStamp['walker']): Promise<{ tree: string; count: number } | undefined> {
  if (walker === 'find') {
    const early = prefetched.get(dest);
    prefetched.delete(dest);
    return early ?? findTree(dest);
  }
  const lines: string[] = [];
  return walkTree(dest, (rel, fp) => lines.push(treeLine(rel, fp))) ? treeDigest(lines) : undefined;
}

/** dest -> its 'find' digest, started early (one use: taken by the stamp check). */
const prefetched = new Map<string, Promise<{ tree: string; count: number } | undefined>>();

/**
 * Start the stamp check's `find` over each of dests whose stamp names that walker, so
 * the walk runs beside the build's own start-up (spec, tool versions, records) on
 * another core. Only a head start: the check itself is unchanged.
 */
export function prefetchStampTrees(memoDir: string, dests: string[]): void {
  for (const dest of dests) {
    // A walk left from an earlier build in this process is stale: always a fresh one.
    prefetched.delete(dest);
    if (readStamp(memoDir, dest)?.walker === 'find') prefetched.set(dest, findTree(dest));
  }
}

function stampFile(memoDir: string, dest: string): string {
  return path.join(memoDir, `${sha256(dest)}.stamp`);
}

/** The code that decides the published metadata: edited (same version), old stamps no longer match. */
let codeDigest: string | undefined;
function manifestCode(): string {
  return (codeDigest ??= sha256([STAMP_FORMAT, makeManifest, closureOf, specPathForManifest, sumsFile, buildStatement, statementBytes, stableJson].map(String).join('\n')));
}
const STAMP_FORMAT = 'pipeline-publish-stamp/1';

/**
 * A digest of what the (unsigned) manifest of variant is made of, without making it:
 * undefined when a closure stage's record digest is not known.
 */
export function manifestInputs(plan: Plan, variant: string, entries: ReadonlyMap<string, Entry>, builderVersion: string, recordDigest: (key: string) => string | undefined): string | undefined {
  const stages = closureOf(plan, plan.sinks[variant]!);
  const rows: unknown[] = [];
  for (const st of stages) {
    const record = entries.get(st.name)?.key === st.key ? recordDigest(st.key) : undefined;
    if (!record) return undefined;
    rows.push([st.name, st.kind, st.key, st.parts, record]);
  }
  const spec = { name: plan.spec.name, path: specPathForManifest(plan.spec.file), sha256: plan.spec.sha256 };
  return sha256(canonicalize({ code: manifestCode(), builder: [BUILDER_ID, builderVersion], spec, variant, arch: plan.arch, sde: plan.sourceDateEpoch, sinks: plan.sinks[variant], stages: rows }));
}

function readStamp(memoDir: string, dest: string): PublishStamp | undefined {
  try {
    const s = JSON.parse(readFileSync(stampFile(memoDir, dest), 'utf8')) as PublishStamp;
    return s && s.v === 1 && s.dest === dest && (s.walker === 'js' || s.walker === 'find') ? s : undefined;
  } catch {
    return undefined;
  }
}

/** Stamp dest as published from `inputs` (its tree as fingerprinted in `now`); a hint like the memo. */
async function writeStamp(memoDir: string, dest: string, inputs: string, manifestDigest: string, now: Map<string, string>): Promise<void> {
  let stamp: PublishStamp;
  if (now.size >= FIND_MIN) {
    // Walked again by find: stamped only if it saw exactly `now` (what the memo vouches for).
    const t = await findTree(dest, true);
    const seen = t && parseFindTree(t.out!);
    if (!t || !seen || !sameFingerprints(seen, now)) return;
    stamp = { v: 1, dest, inputs, manifest: manifestDigest, walker: 'find', tree: t.tree, count: t.count };
  } else {
    const lines: string[] = [];
    for (const [rel, fp] of now) lines.push(treeLine(rel, fp));
    stamp = { v: 1, dest, inputs, manifest: manifestDigest, walker: 'js', ...treeDigest(lines) };
  }
  await fs.mkdir(memoDir, { recursive: true });
  await writeAtomic(stampFile(memoDir, dest), JSON.stringify(stamp), memoDir, { durable: false });
}

/** dest exactly as the stamp left it: same inputs, every entry's fingerprint unchanged, nothing added or removed. */
async function stampHolds(stamp: PublishStamp | undefined, dest: string, inputs: string): Promise<boolean> {
  if (!stamp || stamp.inputs !== inputs) return false;
  const t = await stampTree(dest, stamp.walker);
  return !!t && t.count === stamp.count && t.tree === stamp.tree;
}

function memoFile(memoDir: string, dest: string): string {
  return path.join(memoDir, `${sha256(dest)}.json`);
}

async function readMemo(memoDir: string, dest: string): Promise<PublishMemo | undefined> {
  try {
    const m = JSON.parse(await fs.readFile(memoFile(memoDir, dest), 'utf8')) as PublishMemo;
    return m && m.v === 1 && m.dest === dest && typeof m.entries === 'object' ? m : undefined;
  } catch {
    return undefined;
  }
}

/** Files of dest still exactly as the memo recorded them: path -> the sha256 they were verified against. */
function unchangedFiles(memo: PublishMemo | undefined, now: Map<string, string> | undefined): Map<string, string> {
  const out = new Map<string, string>();
  if (!memo || !now) return out;
  for (const [rel, e] of Object.entries(memo.entries)) if (e.sha256 && now.get(rel) === e.fp) out.set(rel, e.sha256);
  return out;
}

/** The whole published set is the one this manifest describes, untouched since. */
function wholeSetUnchanged(memo: PublishMemo | undefined, now: Map<string, string> | undefined, manifestText: string): boolean {
  if (!memo || !now || memo.manifest !== sha256(manifestText)) return false;
  const names = Object.keys(memo.entries);
  return names.length === now.size && names.every((n) => now.get(n) === memo.entries[n]!.fp);
}

async function writeMemo(memoDir: string, dest: string, manifestText: string, verified: Map<string, string>, inputs?: string): Promise<void> {
  // The old stamp goes first: it must never outlive the set it describes.
  await fs.rm(stampFile(memoDir, dest), { force: true });
  const now = await treeFingerprints(dest);
  if (!now) return;
  const entries: PublishMemo['entries'] = {};
  for (const [rel, fp] of now) entries[rel] = verified.has(rel) ? { fp, sha256: verified.get(rel) } : { fp };
  const memo: PublishMemo = { v: 1, dest, manifest: sha256(manifestText), entries };
  await fs.mkdir(memoDir, { recursive: true });
  // A hint: a lost or torn memo only costs a full publish next time, so no fsync.
  await writeAtomic(memoFile(memoDir, dest), JSON.stringify(memo), memoDir, { durable: false });
  if (inputs) await writeStamp(memoDir, dest, inputs, memo.manifest, now);
}

/** Granularity of the holes copyHashed leaves: a multiple of every filesystem block size here. */
const HOLE = 64 * 1024;
const ZEROS = Buffer.alloc(HOLE);

/**
 * Copy src to dst and return what was copied (sha256 and size), hashing the bytes as
 * they go by. Runs of zeros are not written but left as holes (issue 10: a disk image
 * is mostly empty space, 1.1 GB written for ~0.7 GB of data): the same bytes, sparse.
 */
export async function copyHashed(src: string, dst: string): Promise<{ sha256: string; size: number }> {
  const h = createHash('sha256');
  let size = 0;
  const out = await fs.open(dst, 'w', 0o600);
  try {
    for await (const c of createReadStream(src, { highWaterMark: 16 * HOLE }) as AsyncIterable<Buffer>) {
      h.update(c);
      // Write each run of non-zero HOLE-sized blocks at its offset.
      let run = -1;
      for (let at = 0; at < c.length; at += HOLE) {
        const end = Math.min(at + HOLE, c.length);
        const zero = c.subarray(at, end).equals(ZEROS.subarray(0, end - at));
        if (!zero && run < 0) run = at;
        if (zero && run >= 0) {
          await out.write(c, run, at - run, size + run);
          run = -1;
        }
      }
      if (run >= 0) await out.write(c, run, c.length - run, size + run);
      size += c.length;
    }
    // A trailing hole: the size comes from truncate, not from a write.
    await out.truncate(size);
  } finally {
    await out.close();
  }
  return { sha256: h.digest('hex'), size };
}

/**
 * The variant as it was last published, if dest still holds exactly that (memo'd
 * fingerprints, same manifest) and nothing is signed: publishing it again would do
 * nothing. The build asks before running, so such a variant's sinks need no blob
 * check at all (nothing is read from them).
 */
export async function unchangedPublication(plan: Plan, variant: string, entries: ReadonlyMap<string, Entry>, opts: Pick<PublishOptions, 'outRoot' | 'builderVersion' | 'memoDir' | 'sign' | 'recordDigest'>): Promise<Published | undefined> {
  if (opts.sign || !opts.memoDir) return undefined;
  const dest = within(within(opts.outRoot, variant), plan.arch);
  // The stamp: one small file and a stat per published entry, no manifest built.
  const inputs = opts.recordDigest && manifestInputs(plan, variant, entries, opts.builderVersion, opts.recordDigest);
  if (inputs && (await stampHolds(readStamp(opts.memoDir, dest), dest, inputs))) return lazyPublished(variant, dest, () => makeManifest(plan, variant, entries, opts.builderVersion, false));
  const manifest = makeManifest(plan, variant, entries, opts.builderVersion, false);
  const memo = await readMemo(opts.memoDir, dest);
  const now = memo ? await treeFingerprints(dest) : undefined;
  if (!wholeSetUnchanged(memo, now, stableJson(manifest))) return undefined;
  // Unchanged, but no stamp said so (an older cache, a lost stamp): the next check is cheap.
  if (inputs) await writeStamp(opts.memoDir, dest, inputs, memo!.manifest, now!).catch(() => {});
  return { variant, dir: dest, manifest };
}

/** A Published whose manifest is made only if someone reads it (push, release): a no-op does not. */
function lazyPublished(variant: string, dir: string, make: () => BuildManifest): Published {
  let manifest: BuildManifest | undefined;
  return {
    variant,
    dir,
    get manifest() {
      return (manifest ??= make());
    },
  };
}

export async function publish(plan: Plan, variant: string, entries: ReadonlyMap<string, Entry>, opts: PublishOptions): Promise<Published> {
  const manifest = makeManifest(plan, variant, entries, opts.builderVersion, !!opts.sign);
  const manifestText = stableJson(manifest);
  const parent = within(opts.outRoot, variant);
  const dest = within(parent, plan.arch);
  prefetched.delete(dest); // a walk from before this publish must not answer a later check
  // Unchanged since we published it: nothing to copy, hash or write. A signed
  // publish always re-signs (the key may have changed).
  const memo = opts.memoDir ? await readMemo(opts.memoDir, dest) : undefined;
  const before = memo ? await treeFingerprints(dest) : undefined;
  const inputs = !opts.sign && opts.recordDigest ? manifestInputs(plan, variant, entries, opts.builderVersion, opts.recordDigest) : undefined;
  if (!opts.sign && wholeSetUnchanged(memo, before, manifestText)) {
    if (inputs) await writeStamp(opts.memoDir!, dest, inputs, memo!.manifest, before!).catch(() => {});
    return { variant, dir: dest, manifest };
  }
  const reusable = unchangedFiles(memo, before);
  await fs.mkdir(parent, { recursive: true });
  // A killed publish leaves its staging beside dest; its owner (pid, start time) is in the name.
  for (const n of await fs.readdir(parent)) if (n.startsWith(`.${plan.arch}.tmp-`) && ownerGone(n)) await safeRemove(path.join(parent, n));
  const tmp = path.join(parent, ownedName(`.${plan.arch}.tmp-`));
  await fs.mkdir(tmp);
  const mtime = new Date(plan.sourceDateEpoch * 1000);
  try {
    const execs = new Set<string>();
    for (const s of plan.sinks[variant]!) for (const f of entries.get(s)!.files) if (f.executable) execs.add(f.path);
    for (const o of manifest.outputs) {
      const dst = within(tmp, o.path);
      await fs.mkdir(path.dirname(dst), { recursive: true });
      // The file already published from this blob and untouched since (its memo'd
      // fingerprint holds): link it instead of copying and hashing it again.
      if (reusable.get(o.path) === o.sha256) {
        const linked = await fs.link(within(dest, o.path), dst).then(() => true, () => false);
        if (linked) {
          await fs.chmod(dst, execs.has(o.path) ? 0o755 : 0o644);
          continue;
        }
      }
      // Hash while copying: what lands in images/ is exactly what was hashed, and
      // it must be what the record says, whatever happened to the cache meanwhile.
      const got = await copyHashed(opts.blobPath(o.sha256), dst).catch((e: NodeJS.ErrnoException) => {
        if (e.code === 'ENOENT') return { sha256: 'no file (the blob is missing)', size: 0 };
        throw e;
      });
      if (got.sha256 !== o.sha256 || got.size !== o.size) {
        await opts.onCorrupt?.(o.sha256);
        throw new BuildError(
          `publish: stage ${o.stage} file ${o.path}: cache blob ${o.sha256.slice(0, 12)} is corrupt: expected sha256 ${o.sha256} (${o.size} bytes), found ${got.sha256.length === 64 ? `sha256 ${got.sha256}` : got.sha256} (${got.size} bytes); nothing was published and the entry was dropped, run the build again to rebuild it`,
        );
      }
      await fs.chmod(dst, execs.has(o.path) ? 0o755 : 0o644);
    }
    await fs.writeFile(path.join(tmp, SUMS_NAME), sumsFile(manifest.outputs));
    await fs.writeFile(path.join(tmp, MANIFEST_NAME), manifestText);
    const subjects = [...manifest.outputs.map((o) => ({ name: o.path, sha256: o.sha256 }))];
    for (const meta of [SUMS_NAME, MANIFEST_NAME]) subjects.push({ name: meta, sha256: (await hashFile(path.join(tmp, meta))).sha256 });
    await fs.writeFile(path.join(tmp, STATEMENT_NAME), statementBytes(buildStatement(manifest, subjects)));
    if (opts.sign) await opts.sign(tmp);
    // Metadata files were created under the caller's umask; artifacts were chmod'ed above.
    for (const f of METADATA_FILES) await fs.chmod(path.join(tmp, f), 0o644).catch((e: NodeJS.ErrnoException) => {
      if (e.code !== 'ENOENT') throw e;
    });
    await setTimes(tmp, mtime);
    await swapIn(tmp, dest);
  } catch (e) {
    await safeRemove(tmp);
    throw e;
  }
  if (opts.memoDir) await writeMemo(opts.memoDir, dest, manifestText, new Map(manifest.outputs.map((o) => [o.path, o.sha256])), inputs).catch(() => {});
  return { variant, dir: dest, manifest };
}

async function setTimes(dir: string, t: Date): Promise<void> {
  for (const e of await fs.readdir(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) await setTimes(p, t);
    await fs.utimes(p, t, t);
  }
  await fs.chmod(dir, 0o755);
}

/** Replace dest with src using renames only; the old tree is removed afterwards. */
export async function swapIn(src: string, dest: string): Promise<void> {
  const old = `${src}.old`;
  let moved = false;
  try {
    await fs.rename(dest, old);
    moved = true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
  try {
    await fs.rename(src, dest);
  } catch (e) {
    if (moved) await fs.rename(old, dest).catch(() => {});
    throw e;
  }
  if (moved) await safeRemove(old);
}
