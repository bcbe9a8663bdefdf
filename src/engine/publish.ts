// Publishing: copy a variant's files out of the cache into images/<variant>/<arch>/
// with SHA256SUMS, build-manifest.json and the provenance statement. The new
// directory is assembled beside the old one and swapped in by rename, so readers
// never see a half-written set. A memo of what was published (every entry's stat
// fingerprint) makes republishing an unchanged set cost a stat per file.
import { createHash } from 'node:crypto';
import { createReadStream, lstatSync, promises as fs, readdirSync } from 'node:fs';
import path from 'node:path';
import { stableJson } from './canonical.js';
import { ownedName, ownerGone, writeAtomic, type Entry } from './cache.js';
import type { Plan } from './compile.js';
import { BuildError } from './errors.js';
import { hashFile } from '../lib/digest.js';
import { safeRemove, within } from './fsutil.js';
import { PACKAGE_ROOT } from './kinds.js';
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
  const closure = closureOf(plan, sinks);
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
  const stages = plan.stages.filter((s) => closure.has(s.name));
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

function closureOf(plan: Plan, sinks: string[]): Set<string> {
  const by = new Map(plan.stages.map((s) => [s.name, s]));
  const out = new Set<string>();
  const visit = (n: string) => {
    if (out.has(n)) return;
    out.add(n);
    for (const r of Object.values(by.get(n)!.inputs)) visit(r);
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

/** Every file and directory under dir (relative; '' is dir itself) with its fingerprint; undefined if dir is absent. */
async function fingerprints(dir: string): Promise<Map<string, string> | undefined> {
  const out = new Map<string, string>();
  // Synchronous on purpose: a composefs object store holds ~16k files, and the
  // thread-pool round trip of an async lstat costs several times the syscall.
  const walk = (rel: string): void => {
    const abs = rel ? path.join(dir, rel) : dir;
    out.set(rel, fingerprint(lstatSync(abs, { bigint: true })));
    for (const e of readdirSync(abs, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) walk(r);
      else out.set(r, fingerprint(lstatSync(path.join(abs, e.name), { bigint: true })));
    }
  };
  try {
    walk('');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  return out;
}

function memoFile(memoDir: string, dest: string): string {
  return path.join(memoDir, `${createHash('sha256').update(dest).digest('hex')}.json`);
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
  if (!memo || !now || memo.manifest !== createHash('sha256').update(manifestText).digest('hex')) return false;
  const names = Object.keys(memo.entries);
  return names.length === now.size && names.every((n) => now.get(n) === memo.entries[n]!.fp);
}

async function writeMemo(memoDir: string, dest: string, manifestText: string, verified: Map<string, string>): Promise<void> {
  const now = await fingerprints(dest);
  if (!now) return;
  const entries: PublishMemo['entries'] = {};
  for (const [rel, fp] of now) entries[rel] = verified.has(rel) ? { fp, sha256: verified.get(rel) } : { fp };
  const memo: PublishMemo = { v: 1, dest, manifest: createHash('sha256').update(manifestText).digest('hex'), entries };
  await fs.mkdir(memoDir, { recursive: true });
  // A hint: a lost or torn memo only costs a full publish next time, so no fsync.
  await writeAtomic(memoFile(memoDir, dest), JSON.stringify(memo), memoDir, { durable: false });
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
export async function unchangedPublication(plan: Plan, variant: string, entries: ReadonlyMap<string, Entry>, opts: Pick<PublishOptions, 'outRoot' | 'builderVersion' | 'memoDir' | 'sign'>): Promise<Published | undefined> {
  if (opts.sign || !opts.memoDir) return undefined;
  const manifest = makeManifest(plan, variant, entries, opts.builderVersion, false);
  const dest = within(within(opts.outRoot, variant), plan.arch);
  const memo = await readMemo(opts.memoDir, dest);
  const now = memo ? await fingerprints(dest) : undefined;
  return wholeSetUnchanged(memo, now, stableJson(manifest)) ? { variant, dir: dest, manifest } : undefined;
}

export async function publish(plan: Plan, variant: string, entries: ReadonlyMap<string, Entry>, opts: PublishOptions): Promise<Published> {
  const manifest = makeManifest(plan, variant, entries, opts.builderVersion, !!opts.sign);
  const manifestText = stableJson(manifest);
  const parent = within(opts.outRoot, variant);
  const dest = within(parent, plan.arch);
  // Unchanged since we published it: nothing to copy, hash or write. A signed
  // publish always re-signs (the key may have changed).
  const memo = opts.memoDir ? await readMemo(opts.memoDir, dest) : undefined;
  const before = memo ? await fingerprints(dest) : undefined;
  if (!opts.sign && wholeSetUnchanged(memo, before, manifestText)) return { variant, dir: dest, manifest };
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
  if (opts.memoDir) await writeMemo(opts.memoDir, dest, manifestText, new Map(manifest.outputs.map((o) => [o.path, o.sha256]))).catch(() => {});
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
