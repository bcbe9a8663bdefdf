// Attach the build's signed provenance to a pushed image, as an OCI 1.1
// referrer: an artifact manifest whose `subject` is the image manifest and whose
// one layer is the Sigstore bundle. Registries without the referrers API find it
// through the fallback tag `sha256-<image digest hex>` (OCI distribution spec
// 1.1, "referrers tag schema"), which is what we push.
//
// The bundle is the one `pipeline verify` checks locally: its statement lists
// every file of the layout, including blobs/sha256/<manifest digest>, so the
// image manifest digest is one of its subjects and no second signature is needed.
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { sha256 } from '../engine/canonical.js';
import { BUNDLE_NAME } from '../engine/manifest-types.js';
import { parseRef, pushLayout, type PushOptions } from './registry.js';

export const BUNDLE_MEDIA_TYPE = 'application/vnd.dev.sigstore.bundle.v0.3+json';
const EMPTY_MEDIA_TYPE = 'application/vnd.oci.empty.v1+json';
const EMPTY = Buffer.from('{}');

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

const sha = (b: Buffer) => `sha256:${sha256(b)}`;

/** The referrer manifest (pure): the bundle as the only layer, the image as subject. */
export function referrerManifest(bundle: Buffer, subject: Descriptor): Buffer {
  const m = {
    schemaVersion: 2,
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    artifactType: BUNDLE_MEDIA_TYPE,
    config: { mediaType: EMPTY_MEDIA_TYPE, digest: sha(EMPTY), size: EMPTY.length },
    layers: [{ mediaType: BUNDLE_MEDIA_TYPE, digest: sha(bundle), size: bundle.length }],
    subject: { mediaType: subject.mediaType, digest: subject.digest, size: subject.size },
    annotations: { 'dev.sigstore.bundle.predicateType': 'https://slsa.dev/provenance/v1' },
  };
  return Buffer.from(JSON.stringify(m));
}

/** The fallback tag a referrer of `digest` lives under. */
export function referrersTag(digest: string): string {
  return digest.replace(':', '-');
}

/**
 * Push <imageDir>/provenance.sigstore.json as a referrer of the image `subject`
 * (already pushed to `ref`'s repository). Returns the referrer's tag and digest.
 */
export async function pushBundleReferrer(imageDir: string, ref: string, subject: Descriptor, opts: PushOptions = {}): Promise<{ tag: string; digest: string }> {
  const bundle = await fs.readFile(path.join(imageDir, BUNDLE_NAME));
  const manifest = referrerManifest(bundle, subject);
  const r = parseRef(ref);
  const tag = referrersTag(subject.digest);
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-referrer-'));
  try {
    const blobs = path.join(dir, 'blobs', 'sha256');
    await fs.mkdir(blobs, { recursive: true });
    for (const b of [EMPTY, bundle, manifest]) await fs.writeFile(path.join(blobs, sha(b).slice(7)), b);
    await fs.writeFile(path.join(dir, 'oci-layout'), '{"imageLayoutVersion":"1.0.0"}');
    const desc = { mediaType: 'application/vnd.oci.image.manifest.v1+json', digest: sha(manifest), size: manifest.length, annotations: { 'org.opencontainers.image.ref.name': tag } };
    await fs.writeFile(path.join(dir, 'index.json'), JSON.stringify({ schemaVersion: 2, mediaType: 'application/vnd.oci.image.index.v1+json', manifests: [desc] }));
    const res = await pushLayout(dir, `${r.host}/${r.repository}:${tag}`, opts);
    return { tag, digest: res.digest };
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/** The image manifest descriptor a layout's index.json points at (the pushed subject). */
export async function layoutSubject(layoutDir: string): Promise<Descriptor> {
  const index = JSON.parse(await fs.readFile(path.join(layoutDir, 'index.json'), 'utf8')) as { manifests: Descriptor[] };
  const d = index.manifests[0];
  if (!d) throw new Error(`${layoutDir}/index.json lists no manifest`);
  return { mediaType: d.mediaType, digest: d.digest, size: d.size };
}
