// Publishing: copy a variant's files out of the cache into images/<variant>/<arch>/
// with SHA256SUMS, build-manifest.json and the provenance statement. The new
// directory is assembled beside the old one and swapped in by rename, so readers
// never see a half-written set.
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, promises as fs } from 'node:fs';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { stableJson } from './canonical.js';
import { ownedName, ownerGone, type Entry } from './cache.js';
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
}

/** Copy src to dst and return what was copied (sha256 and size), hashing the bytes as they go by. */
export async function copyHashed(src: string, dst: string): Promise<{ sha256: string; size: number }> {
  const h = createHash('sha256');
  let size = 0;
  await pipeline(
    createReadStream(src),
    async function* (chunks: AsyncIterable<Buffer>) {
      for await (const c of chunks) {
        h.update(c);
        size += c.length;
        yield c;
      }
    },
    createWriteStream(dst, { mode: 0o600 }),
  );
  return { sha256: h.digest('hex'), size };
}

export async function publish(plan: Plan, variant: string, entries: ReadonlyMap<string, Entry>, opts: PublishOptions): Promise<Published> {
  const manifest = makeManifest(plan, variant, entries, opts.builderVersion, !!opts.sign);
  const parent = within(opts.outRoot, variant);
  const dest = within(parent, plan.arch);
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
    await fs.writeFile(path.join(tmp, MANIFEST_NAME), stableJson(manifest));
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
