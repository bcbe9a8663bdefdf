// The release manifest, the tags and the webhook payload: pure functions of what
// the builds published (no clock, no host, stable key order), so the same release
// gives the same bytes, the same digest and hence the same webhook id.
import { sha256, stableJson } from '../engine/canonical.js';
import { UsageError } from '../engine/errors.js';
import { BUNDLE_NAME, MANIFEST_NAME, STATEMENT_NAME, type BuildManifest } from '../engine/manifest-types.js';
import { STATEMENT_TYPE } from '../engine/provenance.js';

export const RELEASE_MANIFEST_NAME = 'release-manifest.json';
export const RELEASE_BUNDLE_NAME = 'release-manifest.sigstore.json';
export const RELEASE_SCHEMA = 'pipeline.release-manifest/v1';
/** in-toto predicate type of the statement that signs the release manifest. */
export const RELEASE_PREDICATE_TYPE = 'https://pipeline.dev/release/v1';
export const ARTIFACT_TYPE_VARIANT = 'application/vnd.pipeline.variant.v1';
export const ARTIFACT_TYPE_RELEASE = 'application/vnd.pipeline.release.v1';
/** Manifest/index annotation naming the spec a release tag was published from (the --force check reads it). */
export const SPEC_ANNOTATION = 'dev.pipeline.spec.sha256';

const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$/;

export type ReleaseKind = 'oci-image' | 'artifact';

export interface ReleaseFile {
  path: string;
  size: number;
  sha256: string;
  fsverity: string;
}

export interface ReleaseEntry {
  arch: string;
  variant: string;
  kind: ReleaseKind;
  /** Registry tag of this entry (image or artifact). */
  tag: string;
  /** Image manifest digest (oci-image only). */
  ociDigest?: string;
  buildManifest: string;
  provenance: { statement: string; bundle?: string };
  files: ReleaseFile[];
}

export interface ReleaseManifest {
  schema: typeof RELEASE_SCHEMA;
  version: string;
  spec: { name: string; sha256: string };
  sourceDateEpoch: number;
  builder: { id: string; version: string };
  /** Multi-arch image indexes, one per image variant. */
  indexes: { variant: string; tag: string; digest: string }[];
  /** Tag of the artifact that holds this manifest and its bundle. */
  manifestTag: string;
  entries: ReleaseEntry[];
}

/** What one published image dir contributes (read by the caller from images/<variant>/<arch>/). */
export interface PublishedDir {
  arch: string;
  variant: string;
  dir: string;
  manifest: BuildManifest;
  /** Hex sha256 of build-manifest.json, provenance.intoto.json and the bundle (when signed). */
  digests: { buildManifest: string; statement: string; bundle?: string };
  /** The layout's image manifest, when the dir is an OCI image layout. */
  image?: { digest: string; size: number; mediaType: string; platform: { os: string; architecture: string; variant?: string } };
}

export function checkVersion(version: string): void {
  if (!TAG_RE.test(version)) throw new UsageError(`release version "${version}" is not usable as a registry tag (letters, digits, _ . -; at most 128, not starting with . or -)`);
}

export function entryTag(version: string, variant: string, arch: string): string {
  const tag = `${version}-${variant}-${arch}`;
  if (!TAG_RE.test(tag)) throw new UsageError(`tag "${tag}" (version-variant-arch) is not a valid registry tag`);
  return tag;
}

export const releaseTag = (version: string) => `${version}-release`;

/** The tag each image variant's multi-arch index goes under: the version itself when there is one image variant. */
export function indexTag(version: string, variant: string, imageVariants: string[]): string {
  return imageVariants.length === 1 ? version : `${version}-${variant}`;
}

const cmp = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);

/** The OCI image index over the arches of one image variant (pure, deterministic). */
export function imageIndex(version: string, specSha: string, images: PublishedDir[]): Buffer {
  const manifests = [...images]
    .sort((a, b) => cmp(a.arch, b.arch))
    .map((p) => ({ mediaType: p.image!.mediaType, digest: p.image!.digest, size: p.image!.size, platform: p.image!.platform }));
  return Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.index.v1+json',
      manifests,
      annotations: { [SPEC_ANNOTATION]: specSha, 'org.opencontainers.image.version': version },
    }),
  );
}

export function releaseManifest(version: string, dirs: PublishedDir[], indexes: ReleaseManifest['indexes']): ReleaseManifest {
  if (!dirs.length) throw new UsageError('nothing to release: no variant selected');
  const first = dirs[0]!.manifest;
  for (const d of dirs) {
    if (d.manifest.spec.sha256 !== first.spec.sha256) throw new Error(`${d.variant}/${d.arch} was built from another spec (${d.manifest.spec.sha256}) than ${first.spec.sha256}`);
  }
  const entries: ReleaseEntry[] = [...dirs]
    .sort((a, b) => cmp(a.variant, b.variant) || cmp(a.arch, b.arch))
    .map((d) => ({
      arch: d.arch,
      variant: d.variant,
      kind: d.image ? 'oci-image' : 'artifact',
      tag: entryTag(version, d.variant, d.arch),
      ...(d.image ? { ociDigest: d.image.digest } : {}),
      buildManifest: `sha256:${d.digests.buildManifest}`,
      provenance: { statement: `sha256:${d.digests.statement}`, ...(d.digests.bundle ? { bundle: `sha256:${d.digests.bundle}` } : {}) },
      files: d.manifest.outputs.map((o) => ({ path: o.path, size: o.size, sha256: o.sha256, fsverity: o.fsverity })),
    }));
  return {
    schema: RELEASE_SCHEMA,
    version,
    spec: { name: first.spec.name, sha256: first.spec.sha256 },
    sourceDateEpoch: first.sourceDateEpoch,
    builder: first.builder,
    indexes: [...indexes].sort((a, b) => cmp(a.variant, b.variant)),
    manifestTag: releaseTag(version),
    entries,
  };
}

export function releaseManifestBytes(m: ReleaseManifest): Buffer {
  return Buffer.from(stableJson(m));
}

/** The in-toto statement signed for the release manifest: it is the one subject. */
export function releaseStatement(manifestBytes: Buffer, m: ReleaseManifest): Buffer {
  return Buffer.from(
    stableJson({
      _type: STATEMENT_TYPE,
      subject: [{ name: RELEASE_MANIFEST_NAME, digest: { sha256: sha256(manifestBytes) } }],
      predicateType: RELEASE_PREDICATE_TYPE,
      predicate: { version: m.version, spec: m.spec },
    }),
  );
}

/** Files of an image dir that go into its artifact: the outputs and the metadata beside them. */
export function artifactFileNames(d: PublishedDir): string[] {
  const meta = [MANIFEST_NAME, 'SHA256SUMS', STATEMENT_NAME, ...(d.digests.bundle ? [BUNDLE_NAME] : [])];
  return [...d.manifest.outputs.map((o) => o.path), ...meta];
}

/** Standard Webhooks message id: derived from the release manifest digest, so a re-run re-sends the same id. */
export function webhookId(releaseManifestDigest: string): string {
  return `msg_${sha256(`pipeline-release:${releaseManifestDigest}`).slice(0, 32)}`;
}

export interface PublishedRef {
  variant: string;
  arch: string;
  kind: ReleaseKind;
  ref: string;
  /** Manifest digest the tag names. */
  digest: string;
}

export function webhookPayload(m: ReleaseManifest, manifestDigest: string, registry: string, refs: PublishedRef[], indexes: { variant: string; ref: string; digest: string }[]): Buffer {
  const byKey = new Map(refs.map((r) => [`${r.variant}/${r.arch}`, r]));
  return Buffer.from(
    JSON.stringify({
      type: 'disk_image_built',
      data: {
        version: m.version,
        spec: m.spec,
        registry,
        releaseManifest: { ref: `${registry}:${m.manifestTag}`, digest: manifestDigest },
        indexes,
        artifacts: m.entries.map((e) => ({
          variant: e.variant,
          arch: e.arch,
          kind: e.kind,
          ref: byKey.get(`${e.variant}/${e.arch}`)?.ref ?? `${registry}:${e.tag}`,
          digest: byKey.get(`${e.variant}/${e.arch}`)?.digest,
          ociDigest: e.ociDigest,
          provenanceBundle: e.provenance.bundle,
          files: e.files,
        })),
      },
    }),
  );
}
