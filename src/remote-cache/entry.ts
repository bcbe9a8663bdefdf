// One cache entry as one OCI artifact (pure): the names, the layers, and the
// checks a pulled manifest and record must pass before any byte of them is
// allowed into the local cache.
import { parseRecord, recordSeal, type Entry } from '../engine/cache.js';
import { UsageError } from '../engine/errors.js';

export const CACHE_ARTIFACT_TYPE = 'application/vnd.pipeline.cache.entry.v1';
export const RECORD_MEDIA_TYPE = 'application/vnd.pipeline.cache.record.v1+json';
export const FILE_MEDIA_TYPE = 'application/octet-stream';
/** An optional Sigstore bundle over the record digest (see sign.ts). */
export const BUNDLE_MEDIA_TYPE = 'application/vnd.dev.sigstore.bundle.v0.3+json';
const NOT_FILES = new Set([RECORD_MEDIA_TYPE, BUNDLE_MEDIA_TYPE]);
/** Title of the record layer; stage outputs are regular files under their own paths. */
export const RECORD_TITLE = 'pipeline-cache-record.json';
export const TITLE = 'org.opencontainers.image.title';

/** The tag an entry is filed under. 70 characters: registries allow 128. */
export function cacheTag(key: string): string {
  if (!/^[0-9a-f]{64}$/.test(key)) throw new Error(`internal: not a cache key: ${key}`);
  return `cache-${key}`;
}

export interface RemoteCacheLocation {
  /** host[:port]/repository, as `pipeline push` refs are written (no tag). */
  repo: string;
  host: string;
  repository: string;
}

/** oci://host[:port]/repo (the scheme may be left out). */
export function parseRemoteCacheUrl(url: string): RemoteCacheLocation {
  const rest = url.replace(/^oci:\/\//, '');
  if (/^[a-z]+:\/\//i.test(rest)) throw new UsageError(`--remote-cache ${url}: expected oci://HOST[:PORT]/REPOSITORY`);
  const slash = rest.indexOf('/');
  const repository = slash > 0 ? rest.slice(slash + 1).replace(/\/+$/, '') : '';
  if (slash <= 0 || !repository || /[@:]/.test(repository)) throw new UsageError(`--remote-cache ${url}: expected oci://HOST[:PORT]/REPOSITORY (no tag: entries are tagged by key)`);
  return { repo: `${rest.slice(0, slash)}/${repository}`, host: rest.slice(0, slash), repository };
}

/** The record as uploaded: exactly the sealed form the local cache stores. */
export function recordBytes(entry: Entry): Buffer {
  return Buffer.from(JSON.stringify({ ...entry, recordSha256: recordSeal(entry) }));
}

export interface ManifestLayer {
  mediaType?: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

export interface CacheManifest {
  artifactType?: string;
  layers?: ManifestLayer[];
}

/** What a manifest says before the record is read: the record layer, or why it is not one of ours. */
export function recordLayer(m: CacheManifest): ManifestLayer | { problem: string } {
  if (m.artifactType !== CACHE_ARTIFACT_TYPE) return { problem: `artifactType is ${JSON.stringify(m.artifactType)}, not ${CACHE_ARTIFACT_TYPE}` };
  const recs = (m.layers ?? []).filter((l) => l.mediaType === RECORD_MEDIA_TYPE);
  if (recs.length !== 1) return { problem: `${recs.length} record layers` };
  if (recs[0]!.size > 16 * 1024 * 1024) return { problem: 'the record layer is implausibly large' };
  return recs[0]!;
}

/**
 * The entry a pulled record describes, checked against the key it was looked up
 * under (the record must name it and its parts must hash to it, and its seal must
 * hold) and against the manifest (one layer per file: same path, digest, size;
 * nothing else). The record's bytes were already checked against its layer digest.
 */
export function checkRemoteEntry(key: string, m: CacheManifest, record: Buffer): { entry: Entry } | { problem: string } {
  const r = parseRecord(key, record.toString('utf8'));
  if ('problem' in r) return { problem: `record: ${r.problem}${r.expected ? ` (expected ${r.expected}, found ${r.found})` : ''}` };
  if (!r.sealed) return { problem: 'record has no seal' };
  const files = (m.layers ?? []).filter((l) => !NOT_FILES.has(l.mediaType ?? ''));
  if (files.length !== r.entry.files.length) return { problem: `${files.length} file layers for ${r.entry.files.length} files in the record` };
  const byTitle = new Map(files.map((l) => [l.annotations?.[TITLE], l]));
  for (const f of r.entry.files) {
    const l = byTitle.get(f.path);
    if (!l) return { problem: `no layer for ${f.path}` };
    if (l.digest !== `sha256:${f.sha256}` || l.size !== f.size) return { problem: `layer for ${f.path} is ${l.digest} (${l.size} bytes), the record says sha256:${f.sha256} (${f.size} bytes)` };
  }
  return { entry: r.entry };
}
