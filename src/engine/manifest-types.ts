// Shapes of the files written next to every published artifact set in
// images/<variant>/<arch>/. Kept free of I/O so signing, verify and tests share them.

export const MANIFEST_NAME = 'build-manifest.json';
export const SUMS_NAME = 'SHA256SUMS';
/** Unsigned in-toto Statement v1 with SLSA Provenance v1 (always written). */
export const STATEMENT_NAME = 'provenance.intoto.json';
/** Sigstore bundle (DSSE over the statement), written when signing is on. */
export const BUNDLE_NAME = 'provenance.sigstore.json';
/** Files in an image dir that describe the artifacts rather than being artifacts. */
export const METADATA_FILES = [MANIFEST_NAME, SUMS_NAME, STATEMENT_NAME, BUNDLE_NAME] as const;

export interface OutputRecord {
  /** Path relative to the image dir. */
  path: string;
  size: number;
  sha256: string;
  /** fs-verity digest (sha256, 4 KiB blocks, no salt) as `fsverity digest` prints it, hex. */
  fsverity: string;
  /** Stage that produced it. */
  stage: string;
}

export interface StageRecord {
  name: string;
  kind: string;
  /** Stage implementation version. */
  version: string;
  key: string;
  inputs: Record<string, string>;
  tools: Record<string, string>;
  params: unknown;
}

export interface DebPackage {
  name: string;
  version: string;
  arch: string;
  /** sha256 of the .deb as published by the mirror, when known. */
  sha256?: string;
}

export interface BuildManifest {
  schema: 'pipeline.build-manifest/v1';
  builder: { id: string; version: string };
  spec: { name: string; path: string; sha256: string };
  variant: string;
  arch: string;
  sourceDateEpoch: number;
  stages: StageRecord[];
  resolved: {
    /** Per stage, the metadata it recorded (suite, mirror, kernel version, …). */
    meta: Record<string, Record<string, unknown>>;
    packages: DebPackage[];
    tools: Record<string, string>;
  };
  outputs: OutputRecord[];
  /** Where the provenance lives, relative to the image dir. */
  attestation: { statement: string; bundle?: string };
}
