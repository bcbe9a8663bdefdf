// Files as OCI 1.1 artifacts, in the form the `oras` CLI writes and reads: an image
// manifest with an artifactType, the empty config `{}`, and one layer per file named
// by org.opencontainers.image.title. Used by release publishing and meant for the
// remote build cache too.
//
// Push: HEAD every blob and upload only the missing ones (large ones in chunks, by
// registry.ts), then PUT the manifest by tag last, so a tag never names a manifest
// whose blobs are not all there. Pull: GET the manifest, then stream each layer to
// disk while hashing it; a file appears under its name only once its sha256 and
// size match the descriptor.
import { createHash } from 'node:crypto';
import { createWriteStream, promises as fs } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { sha256 } from '../engine/canonical.js';
import { BuildError } from '../engine/errors.js';
import { isSafeSubjectName } from '../engine/provenance.js';
import { sha256File } from '../lib/digest.js';
import { checkEchoedDigest, connectRegistry, MT, parseRef, RegistryDigestMismatchError, RegistryError, uploadBlob, type PushOptions, type RegistryClient } from './registry.js';

export const EMPTY_CONFIG_MEDIA_TYPE = 'application/vnd.oci.empty.v1+json';
export const TITLE = 'org.opencontainers.image.title';
const EMPTY = Buffer.from('{}');
const EMPTY_DIGEST = `sha256:${sha256(EMPTY)}`;
/** Default per-request bound: a registry that stops answering fails the push instead of hanging it. */
export const DEFAULT_TIMEOUT_MS = 120_000;

/** A file to push: where it is on disk, the name it gets in the artifact (a relative path). */
export interface ArtifactFile {
  path: string;
  name: string;
  /** Default application/octet-stream. */
  mediaType?: string;
  /** Hex sha256 when already known (it is still checked while uploading). */
  sha256?: string;
  size?: number;
}

export interface OciDescriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  artifactType?: string;
}

export interface ArtifactOptions extends PushOptions {
  artifactType: string;
  /** Manifest annotations (keep them deterministic: the manifest digest depends on them). */
  annotations?: Record<string, string>;
  subject?: OciDescriptor;
}

export interface ArtifactPushResult {
  ref: string;
  /** Digest and size of the manifest the tag names. */
  digest: string;
  size: number;
  layers: OciDescriptor[];
  /** Blob digests uploaded / already in the registry. */
  pushed: string[];
  skipped: string[];
  /** false when the tag already named this very manifest (nothing was written). */
  tagged: boolean;
}

/** Descriptors for files (hashing those whose sha256 or size is not given), in the given order. */
export async function describeFiles(files: ArtifactFile[]): Promise<OciDescriptor[]> {
  const seen = new Set<string>();
  const out: OciDescriptor[] = [];
  for (const f of files) {
    if (!isSafeSubjectName(f.name)) throw new BuildError(`artifact file name ${JSON.stringify(f.name)} is not a safe relative path`);
    if (seen.has(f.name)) throw new BuildError(`artifact file name ${f.name} is given twice`);
    seen.add(f.name);
    const size = f.size ?? (await fs.stat(f.path)).size;
    const hex = f.sha256 ?? (await sha256File(f.path));
    out.push({ mediaType: f.mediaType ?? 'application/octet-stream', digest: `sha256:${hex}`, size, annotations: { [TITLE]: f.name } });
  }
  return out;
}

/** The artifact manifest (pure; key order fixed so the same inputs give the same digest). */
export function artifactManifest(artifactType: string, layers: OciDescriptor[], annotations?: Record<string, string>, subject?: OciDescriptor): Buffer {
  const m: Record<string, unknown> = {
    schemaVersion: 2,
    mediaType: MT.ociManifest,
    artifactType,
    config: { mediaType: EMPTY_CONFIG_MEDIA_TYPE, digest: EMPTY_DIGEST, size: EMPTY.length },
    // oras rejects an artifact without layers; an empty file set still gets the empty blob.
    layers: layers.length ? layers : [{ mediaType: EMPTY_CONFIG_MEDIA_TYPE, digest: EMPTY_DIGEST, size: EMPTY.length }],
  };
  if (subject) m.subject = { mediaType: subject.mediaType, digest: subject.digest, size: subject.size };
  if (annotations && Object.keys(annotations).length) m.annotations = Object.fromEntries(Object.entries(annotations).sort(([a], [b]) => (a < b ? -1 : 1)));
  return Buffer.from(JSON.stringify(m));
}

function withTimeout(opts: PushOptions): PushOptions {
  return { ...opts, timeoutMs: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS };
}

function tagOf(ref: string): { r: ReturnType<typeof parseRef>; tag: string } {
  const r = parseRef(ref);
  if (!r.tag) throw new BuildError(`artifact reference ${ref} has no tag`);
  return { r, tag: r.tag };
}

/** HEAD each blob, upload the missing ones; returns the digests uploaded and skipped. */
export async function ensureBlobs(c: RegistryClient, blobs: { digest: string; size: number; path: string; bytes?: Buffer }[], opts: PushOptions): Promise<{ pushed: string[]; skipped: string[] }> {
  const log = opts.log ?? (() => {});
  const chunkSize = opts.chunkSize ?? 16 * 1024 * 1024;
  const pushed: string[] = [];
  const skipped: string[] = [];
  const done = new Set<string>();
  for (const b of blobs) {
    if (done.has(b.digest)) continue;
    done.add(b.digest);
    const head = await c.request('HEAD', `/v2/${c.repository}/blobs/${b.digest}`);
    await head.body?.cancel();
    if (head.status === 200) {
      skipped.push(b.digest);
      continue;
    }
    if (head.status !== 404) await c.fail(head, `checking blob ${b.digest}`);
    log(`blob ${b.digest} uploading (${b.size} bytes${b.size > chunkSize ? `, chunks of ${chunkSize}` : ''})`);
    await uploadBlob(c, b, chunkSize, log);
    pushed.push(b.digest);
  }
  return { pushed, skipped };
}

/** PUT a manifest (or index) under a tag or digest, checking the digest the registry echoes. */
export async function putManifest(c: RegistryClient, reference: string, bytes: Buffer, mediaType: string, log: (l: string) => void = () => {}): Promise<string> {
  const digest = `sha256:${sha256(bytes)}`;
  const res = await c.request('PUT', `/v2/${c.repository}/manifests/${reference}`, { headers: { 'content-type': mediaType, 'content-length': String(bytes.length) }, body: bytes });
  if (res.status !== 201) await c.fail(res, `putting manifest ${digest} as ${reference}`);
  await res.body?.cancel();
  checkEchoedDigest(res, digest, `manifest ${reference}`, c.host, log);
  return digest;
}

export interface RemoteManifest {
  digest: string;
  mediaType: string;
  bytes: Buffer;
  json: { mediaType?: string; artifactType?: string; annotations?: Record<string, string>; layers?: OciDescriptor[]; manifests?: OciDescriptor[]; config?: OciDescriptor };
}

const ACCEPT = [MT.ociManifest, MT.ociIndex, MT.dockerManifest, MT.dockerList].join(', ');

/** GET a manifest by tag or digest; undefined when the registry does not have it (404). */
export async function getManifest(c: RegistryClient, reference: string): Promise<RemoteManifest | undefined> {
  const res = await c.request('GET', `/v2/${c.repository}/manifests/${reference}`, { headers: { accept: ACCEPT } });
  if (res.status === 404) {
    await res.body?.cancel();
    return undefined;
  }
  if (res.status !== 200) await c.fail(res, `reading manifest ${reference}`);
  const bytes = Buffer.from(await res.arrayBuffer());
  const digest = `sha256:${sha256(bytes)}`;
  // By digest the bytes must hash to it; by tag the registry's echo must agree with them.
  const expected = reference.startsWith('sha256:') ? reference : res.headers.get('docker-content-digest');
  if (expected && expected !== digest) throw new RegistryDigestMismatchError(expected, digest, `registry ${c.host}: manifest ${reference} hashes to ${digest}, not ${expected}`);
  let json: RemoteManifest['json'];
  try {
    json = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw new RegistryError('protocol', `registry ${c.host}: manifest ${reference} is not JSON`);
  }
  const mediaType = json.mediaType ?? res.headers.get('content-type')?.split(';')[0] ?? MT.ociManifest;
  return { digest, mediaType, bytes, json };
}

/** Look a tag up without pulling anything else. */
export async function resolveTag(ref: string, opts: PushOptions = {}): Promise<RemoteManifest | undefined> {
  const { r, tag } = tagOf(ref);
  const c = await connectRegistry(r, withTimeout(opts));
  return getManifest(c, tag);
}

/**
 * Push files as an artifact under ref's tag. Blobs the registry has are skipped;
 * the manifest is put last, and not at all when the tag already names it.
 */
export async function pushArtifact(ref: string, files: ArtifactFile[], opts: ArtifactOptions): Promise<ArtifactPushResult> {
  const { r, tag } = tagOf(ref);
  const o = withTimeout(opts);
  const log = o.log ?? (() => {});
  const layers = await describeFiles(files);
  const manifest = artifactManifest(opts.artifactType, layers, opts.annotations, opts.subject);
  const digest = `sha256:${sha256(manifest)}`;
  const c = await connectRegistry(r, o);
  const blobs = [{ digest: EMPTY_DIGEST, size: EMPTY.length, path: '(empty config)', bytes: EMPTY }, ...layers.map((l, i) => ({ digest: l.digest, size: l.size, path: files[i]!.path }))];
  const { pushed, skipped } = await ensureBlobs(c, blobs, o);
  const existing = await c.request('HEAD', `/v2/${r.repository}/manifests/${tag}`, { headers: { accept: MT.ociManifest } });
  await existing.body?.cancel();
  const tagged = !(existing.status === 200 && existing.headers.get('docker-content-digest') === digest);
  if (tagged) {
    await putManifest(c, tag, manifest, MT.ociManifest, log);
    log(`manifest ${digest} -> ${r.host}/${r.repository}:${tag}`);
  }
  return { ref: `${r.host}/${r.repository}:${tag}`, digest, size: manifest.length, layers, pushed, skipped, tagged };
}

export interface PulledFile {
  name: string;
  path: string;
  sha256: string;
  size: number;
}

/**
 * Pull the artifact ref names into destDir: every layer with a title is streamed to
 * destDir/<title> and its sha256 and size checked before it takes that name.
 * `expectDigest` pins the manifest (a tag moved meanwhile is an error).
 */
export async function pullArtifact(ref: string, destDir: string, opts: PushOptions & { expectDigest?: string } = {}): Promise<{ digest: string; manifest: RemoteManifest; files: PulledFile[] }> {
  const { r, tag } = tagOf(ref);
  const c = await connectRegistry(r, withTimeout(opts));
  const m = await getManifest(c, opts.expectDigest ?? tag);
  if (!m) throw new RegistryError('protocol', `registry ${r.host} has no artifact ${r.repository}:${tag}`);
  if (m.json.manifests) throw new RegistryError('protocol', `${ref} is an image index, not an artifact`);
  const files: PulledFile[] = [];
  for (const l of m.json.layers ?? []) {
    const name = l.annotations?.[TITLE];
    if (name === undefined) continue; // oras skips untitled layers too
    if (!isSafeSubjectName(name)) throw new RegistryError('protocol', `${ref}: layer title ${JSON.stringify(name)} is not a safe relative path`);
    const dst = path.join(destDir, name);
    await fs.mkdir(path.dirname(dst), { recursive: true });
    const res = await c.request('GET', `/v2/${r.repository}/blobs/${l.digest}`);
    if (res.status !== 200 || !res.body) await c.fail(res, `reading blob ${l.digest} (${name})`);
    const tmp = `${dst}.part-${process.pid}`;
    const h = createHash('sha256');
    let size = 0;
    try {
      await pipeline(
        Readable.fromWeb(res.body as import('node:stream/web').ReadableStream<Uint8Array>),
        async function* (chunks: AsyncIterable<Buffer>) {
          for await (const ch of chunks) {
            h.update(ch);
            size += ch.length;
            yield ch;
          }
        },
        createWriteStream(tmp, { mode: 0o644 }),
      );
      const got = `sha256:${h.digest('hex')}`;
      if (got !== l.digest || size !== l.size) {
        throw new RegistryDigestMismatchError(l.digest, got, `${ref}: ${name} arrived as ${got} (${size} bytes), the manifest says ${l.digest} (${l.size} bytes)`);
      }
      await fs.rename(tmp, dst);
    } catch (e) {
      await fs.rm(tmp, { force: true });
      throw e;
    }
    files.push({ name, path: dst, sha256: l.digest.slice(7), size });
  }
  return { digest: m.digest, manifest: m, files };
}
