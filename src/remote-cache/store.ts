// The remote cache: cache entries as OCI artifacts in a registry, through the
// same client and credentials as `pipeline push` (src/registry/). Wired into the
// engine by the CLI as a RemoteStore.
//
// Nothing pulled is trusted: the manifest must be one of ours, the record must
// name the key it was looked up under (and its parts must hash to it, and its
// seal hold), every blob must hash to its descriptor while it streams in, and
// the local cache re-hashes everything on commit against the record. A bad entry
// is one warning and a local build; it never reaches images/.
//
// Nothing here fails a build: an unreachable, slow or erroring registry is one
// warning, then the remote is off for the rest of the run and everything is built
// locally; a failed push is reported and the built artifacts stand.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { CacheCorruptError, type Cache, type Entry } from '../engine/cache.js';
import { sha256 } from '../engine/canonical.js';
import type { RemoteStore } from '../engine/remote.js';
import { safeRemove } from '../engine/fsutil.js';
import { getManifest, pullArtifact, pushArtifact, type ArtifactFile, type RemoteManifest } from '../registry/artifact.js';
import { connectRegistry, parseRef, RegistryDigestMismatchError, RegistryError, type PushOptions } from '../registry/registry.js';
import { CACHE_ARTIFACT_TYPE, cacheTag, checkRemoteEntry, FILE_MEDIA_TYPE, RECORD_MEDIA_TYPE, RECORD_TITLE, recordBytes, recordLayer, type RemoteCacheLocation } from './entry.js';

export type RemoteCacheMode = 'read' | 'readwrite';

export interface RemoteCacheOptions {
  mode: RemoteCacheMode;
  /** One line per problem; the CLI prints it as a warning. */
  warn: (msg: string) => void;
  log?: (msg: string) => void;
  /** Bound on each lookup request (ms); a registry that does not answer in time is off. */
  timeoutMs?: number;
  /** Bound on each blob transfer request (ms). */
  transferTimeoutMs?: number;
  chunkSize?: number;
  insecure?: boolean;
  /** Optional trust on top of the digests: see sign.ts. */
  trust?: EntryTrust;
}

/** Signing of pushed records and checking of pulled ones (over the record's digest). */
export interface EntryTrust {
  /** Files to push next to the record (a signature bundle), or none. */
  sign?(tag: string, record: Buffer, dir: string): Promise<ArtifactFile[]>;
  /** With a verify key: undefined when the entry's signature holds, else why not. */
  check?(tag: string, record: Buffer, m: RemoteManifest, fetchLayer: (digest: string) => Promise<Buffer>): Promise<string | undefined>;
}

export interface RemoteCacheStats {
  pulled: { stage: string; key: string; bytes: number; seconds: number }[];
  pushed: { stage: string; key: string; uploaded: number; bytes: number; skippedBlobs: number }[];
  rejected: { stage: string; key: string; reason: string }[];
  pushFailed: { stage: string; key: string; reason: string }[];
  /** Why the remote was switched off for the rest of the run, if it was. */
  unavailable?: string;
  bytesDown: number;
  bytesUp: number;
}

const DEFAULT_TIMEOUT_MS = 15_000;
const DEFAULT_TRANSFER_TIMEOUT_MS = 600_000;

export class RegistryRemoteStore implements RemoteStore {
  readonly stats: RemoteCacheStats = { pulled: [], pushed: [], rejected: [], pushFailed: [], bytesDown: 0, bytesUp: 0 };
  /** Keys whose remote copy was bad: not pushed again (the registry keeps the blobs it has). */
  private readonly bad = new Set<string>();

  constructor(
    readonly location: RemoteCacheLocation,
    private readonly opts: RemoteCacheOptions,
  ) {}

  get readOnly(): boolean {
    return this.opts.mode === 'read';
  }

  private ref(key: string): string {
    return `${this.location.repo}:${cacheTag(key)}`;
  }

  private reqOpts(transfer: boolean): PushOptions {
    return {
      insecure: this.opts.insecure,
      chunkSize: this.opts.chunkSize,
      log: this.opts.log,
      timeoutMs: transfer ? (this.opts.transferTimeoutMs ?? DEFAULT_TRANSFER_TIMEOUT_MS) : (this.opts.timeoutMs ?? DEFAULT_TIMEOUT_MS),
    };
  }

  /** The first failure to talk to the registry at all turns the remote off, with one warning. */
  private off(e: unknown, doing: string): undefined {
    if (this.stats.unavailable === undefined) {
      this.stats.unavailable = errText(e);
      this.opts.warn(`remote cache ${this.location.repo} is not usable (${doing}: ${this.stats.unavailable}); going on without it for the rest of this run (stages are built locally)`);
    }
    return undefined;
  }

  private reject(stage: string, key: string, reason: string): undefined {
    this.bad.add(key);
    this.stats.rejected.push({ stage, key, reason });
    this.opts.warn(`remote cache entry for stage ${stage} (${cacheTag(key).slice(0, 18)}…) rejected: ${reason}; building it locally`);
    return undefined;
  }

  /** Is the entry for key in the registry (a tag lookup only)? undefined when the registry is not usable. */
  async has(key: string): Promise<boolean | undefined> {
    if (this.stats.unavailable !== undefined) return undefined;
    try {
      const c = await connectRegistry(parseRef(this.ref(key)), this.reqOpts(false));
      const m = await getManifest(c, cacheTag(key));
      return m !== undefined && m.json.artifactType === CACHE_ARTIFACT_TYPE;
    } catch (e) {
      return this.off(e, 'looking up entries');
    }
  }

  async fetch(key: string, stage: string, cache: Cache): Promise<Entry | undefined> {
    if (this.stats.unavailable !== undefined) return undefined;
    const t0 = performance.now();
    const tag = cacheTag(key);
    let m: RemoteManifest | undefined;
    let record: Buffer;
    let c;
    try {
      c = await connectRegistry(parseRef(this.ref(key)), this.reqOpts(false));
      m = await getManifest(c, tag);
    } catch (e) {
      return this.off(e, `looking up stage ${stage}`);
    }
    if (!m) return undefined; // a plain miss
    const rl = recordLayer(m.json);
    if ('problem' in rl) return this.reject(stage, key, rl.problem);
    const fetchLayer = async (digest: string) => {
      const res = await c.request('GET', `/v2/${c.repository}/blobs/${digest}`);
      if (res.status !== 200) await c.fail(res, `reading blob ${digest}`);
      const b = Buffer.from(await res.arrayBuffer());
      if (`sha256:${sha256(b)}` !== digest) throw new RegistryDigestMismatchError(digest, `sha256:${sha256(b)}`, `blob ${digest} arrived with other content`);
      return b;
    };
    // The small record first: a wrong key or a broken record costs no big download.
    try {
      record = await fetchLayer(rl.digest);
    } catch (e) {
      if (e instanceof RegistryDigestMismatchError || (e instanceof RegistryError && e.reason === 'protocol')) return this.reject(stage, key, errText(e));
      return this.off(e, `reading the record of stage ${stage}`);
    }
    const chk = checkRemoteEntry(key, m.json, record);
    if ('problem' in chk) return this.reject(stage, key, chk.problem);
    if (this.opts.trust?.check) {
      const why = await this.opts.trust.check(tag, record, m, fetchLayer).catch((e: unknown) => errText(e));
      if (why) return this.reject(stage, key, why);
    }
    const want = chk.entry;
    const dir = await cache.staging(`pull-${stage}`);
    try {
      let pulled;
      try {
        pulled = await pullArtifact(this.ref(key), dir, { ...this.reqOpts(true), expectDigest: m.digest });
      } catch (e) {
        if (e instanceof RegistryError && e.reason === 'unreachable') return this.off(e, `pulling stage ${stage}`);
        return this.reject(stage, key, errText(e));
      }
      // Only the record's files go into the cache: the record and any signature are not outputs.
      const keep = new Set(want.files.map((f) => f.path));
      for (const f of pulled.files) if (!keep.has(f.name)) await fs.rm(f.path, { force: true });
      for (const f of want.files) await fs.chmod(path.join(dir, f.path), f.executable ? 0o755 : 0o644);
      await pruneEmptyDirs(dir);
      let entry: Entry;
      try {
        entry = await cache.commit(key, stage, want.parts, dir, want.meta, { expect: want.files });
      } catch (e) {
        if (e instanceof CacheCorruptError) return this.reject(stage, key, e.message);
        throw e;
      }
      const bytes = pulled.files.reduce((s, f) => s + f.size, 0) + record.length;
      this.stats.bytesDown += bytes;
      this.stats.pulled.push({ stage, key, bytes, seconds: (performance.now() - t0) / 1000 });
      return entry;
    } catch (e) {
      // Local trouble (disk full…) while importing: a miss, built locally.
      this.opts.warn(`could not import the remote cache entry for stage ${stage}: ${errText(e)}; building it locally`);
      return undefined;
    } finally {
      await safeRemove(dir);
    }
  }

  async store(entry: Entry, cache: Cache): Promise<void> {
    if (this.readOnly || this.stats.unavailable !== undefined || this.bad.has(entry.key)) return;
    const tag = cacheTag(entry.key);
    const dir = await cache.staging(`push-${entry.stage}`);
    try {
      const rec = recordBytes(entry);
      const recFile = path.join(dir, RECORD_TITLE);
      await fs.writeFile(recFile, rec);
      const files: ArtifactFile[] = [
        { path: recFile, name: RECORD_TITLE, mediaType: RECORD_MEDIA_TYPE, sha256: sha256(rec), size: rec.length },
        ...(this.opts.trust?.sign ? await this.opts.trust.sign(tag, rec, dir) : []),
        // Straight from the blob store; uploadBlob re-hashes while sending, so a blob
        // corrupted on local disk fails the push instead of poisoning the registry.
        ...entry.files.map((f) => ({ path: cache.blobPath(f.sha256), name: f.path, mediaType: FILE_MEDIA_TYPE, sha256: f.sha256, size: f.size })),
      ];
      const r = await pushArtifact(this.ref(entry.key), files, { ...this.reqOpts(true), artifactType: CACHE_ARTIFACT_TYPE });
      const sizes = new Map(r.layers.map((l) => [l.digest, l.size]));
      const uploaded = r.pushed.reduce((s, d) => s + (sizes.get(d) ?? 0), 0);
      this.stats.bytesUp += uploaded;
      this.stats.pushed.push({ stage: entry.stage, key: entry.key, uploaded, bytes: entry.files.reduce((s, f) => s + f.size, 0), skippedBlobs: r.skipped.length });
    } catch (e) {
      const reason = errText(e);
      this.stats.pushFailed.push({ stage: entry.stage, key: entry.key, reason });
      if (e instanceof RegistryError && e.reason === 'unreachable') this.off(e, `pushing stage ${entry.stage}`);
      else this.opts.warn(`pushing stage ${entry.stage} to the remote cache failed: ${reason}; the build's own artifacts are not affected`);
    } finally {
      await safeRemove(dir);
    }
  }
}

function errText(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Directories left empty after removing non-output files (commit allows only files). */
async function pruneEmptyDirs(dir: string): Promise<boolean> {
  let empty = true;
  for (const d of await fs.readdir(dir, { withFileTypes: true })) {
    if (d.isDirectory() && (await pruneEmptyDirs(path.join(dir, d.name)))) await fs.rmdir(path.join(dir, d.name));
    else empty = false;
  }
  return empty;
}
