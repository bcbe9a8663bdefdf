// in-toto Statement v1 + SLSA Provenance v1 for one image dir (images/<variant>/<arch>/).
// Pure: the caller hashes the files and passes them in, so this is unit-testable and
// the output depends only on its inputs (no clock, no hostname, stable key order).
import { sortDeep, stableJson } from './canonical.js';
import {
  BUNDLE_NAME,
  STATEMENT_NAME,
  type BuildManifest,
  type DebPackage,
} from './manifest-types.js';

export const STATEMENT_TYPE = 'https://in-toto.io/Statement/v1';
export const SLSA_PROVENANCE_V1 = 'https://slsa.dev/provenance/v1';
/** Identifies how to read externalParameters; bump the version if their shape changes. */
export const BUILD_TYPE = 'https://pipeline.dev/buildtypes/image/v1';
export const DSSE_PAYLOAD_TYPE = 'application/vnd.in-toto+json';

export interface Subject {
  name: string;
  sha256: string;
}

/** SLSA ResourceDescriptor (subset we emit). */
export interface ResourceDescriptor {
  uri?: string;
  name?: string;
  digest?: Record<string, string>;
  annotations?: Record<string, unknown>;
}

export interface InTotoStatement {
  _type: typeof STATEMENT_TYPE;
  subject: { name: string; digest: { sha256: string } }[];
  predicateType: typeof SLSA_PROVENANCE_V1;
  predicate: {
    buildDefinition: {
      buildType: string;
      externalParameters: Record<string, unknown>;
      internalParameters: Record<string, unknown>;
      resolvedDependencies: ResourceDescriptor[];
    };
    runDetails: {
      builder: { id: string; version: Record<string, string> };
      byproducts: ResourceDescriptor[];
    };
  };
}

const HEX64 = /^[0-9a-f]{64}$/;

/** Files that sign/describe the subjects cannot be subjects themselves. */
const NOT_SUBJECTS: readonly string[] = [STATEMENT_NAME, BUNDLE_NAME];

// Byte-wise order (not localeCompare) so the result is the same under any locale.
function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Reject subject names that could escape the image dir when a verifier opens them. */
export function isSafeSubjectName(name: string): boolean {
  if (name === '' || name.startsWith('/') || name.includes('\\') || name.includes('\0')) return false;
  return name.split('/').every((seg) => seg !== '' && seg !== '.' && seg !== '..');
}

/**
 * Percent-encode a purl component. ':' stays literal because Debian epochs
 * (`1:2.3-4`) are written that way in the purl spec's own deb examples.
 */
function purlEncode(s: string): string {
  return encodeURIComponent(s).replace(/%3A/gi, ':');
}

export function debPurl(p: DebPackage): string {
  return `pkg:deb/debian/${purlEncode(p.name)}@${purlEncode(p.version)}?arch=${purlEncode(p.arch)}`;
}

function str(v: unknown): string | undefined {
  return typeof v === 'string' && v !== '' ? v : undefined;
}

/** Debian archives the build resolved packages from: one entry per distinct mirror+suite. */
function mirrorDependencies(meta: BuildManifest['resolved']['meta']): ResourceDescriptor[] {
  const seen = new Map<string, { mirror: string; suite: string; stages: string[] }>();
  for (const stage of Object.keys(meta).sort(cmp)) {
    const m = meta[stage] ?? {};
    const suite = str(m.suite);
    const mirrors = Array.isArray(m.mirrors) ? m.mirrors.filter((x): x is string => !!str(x)) : [];
    const one = str(m.mirror);
    if (one) mirrors.unshift(one);
    if (!suite || mirrors.length === 0) continue;
    for (const mirror of mirrors) {
      const k = `${mirror}\0${suite}`;
      const e = seen.get(k) ?? { mirror, suite, stages: [] };
      e.stages.push(stage);
      seen.set(k, e);
    }
  }
  return [...seen.values()]
    .sort((a, b) => cmp(a.mirror, b.mirror) || cmp(a.suite, b.suite))
    .map((e) => ({
      uri: `${e.mirror.replace(/\/+$/, '')}/dists/${e.suite}`,
      name: `debian-archive:${e.suite}`,
      annotations: { mirror: e.mirror, suite: e.suite, stages: e.stages },
    }));
}

/**
 * Locked mmdebstrap stages: the lock section they installed (its digest, which
 * is in the stage's cache key) and the InRelease it was resolved from.
 */
function lockDependencies(meta: BuildManifest['resolved']['meta']): ResourceDescriptor[] {
  const out: ResourceDescriptor[] = [];
  for (const stage of Object.keys(meta).sort(cmp)) {
    const m = meta[stage] ?? {};
    const lock = str(m.lock);
    const rel = m.inRelease as { sha256?: unknown; date?: unknown } | undefined;
    if (!lock || !HEX64.test(lock)) continue;
    const annotations: Record<string, unknown> = { stage };
    if (rel && typeof rel === 'object' && str(rel.sha256)) annotations.inRelease = { sha256: str(rel.sha256), date: str(rel.date) ?? '' };
    out.push({ name: `pipeline-lock:${stage}`, digest: { sha256: lock }, annotations });
  }
  return out;
}

function packageDependencies(pkgs: DebPackage[]): ResourceDescriptor[] {
  const byPurl = new Map<string, ResourceDescriptor>();
  for (const p of pkgs) {
    const uri = debPurl(p);
    const d: ResourceDescriptor = { uri, name: p.name };
    if (p.sha256) d.digest = { sha256: p.sha256 };
    // The same package can be listed by several stages; keep one, prefer one with a digest.
    const prev = byPurl.get(uri);
    if (!prev || (!prev.digest && d.digest)) byPurl.set(uri, d);
  }
  return [...byPurl.values()].sort((a, b) => cmp(a.uri!, b.uri!));
}

function toolDependencies(tools: Record<string, string>): ResourceDescriptor[] {
  return Object.keys(tools)
    .sort(cmp)
    .map((name) => ({
      uri: `pkg:generic/${purlEncode(name)}@${purlEncode(tools[name]!)}`,
      name,
      annotations: { version: tools[name] },
    }));
}

function stageByproducts(stages: BuildManifest['stages']): ResourceDescriptor[] {
  return [...stages]
    .sort((a, b) => cmp(a.name, b.name))
    .map((s) => {
      const d: ResourceDescriptor = {
        name: `stage:${s.name}`,
        annotations: { kind: s.kind, version: s.version, cacheKey: s.key },
      };
      // Cache keys are sha256 hex; anything else still goes in the annotation only.
      if (HEX64.test(s.key)) d.digest = { sha256: s.key };
      else d.uri = `urn:pipeline:cache-key:${encodeURIComponent(s.key)}`;
      return d;
    });
}

/**
 * Build the provenance statement for one image dir.
 * `subjects` is every file in the dir with its sha256 (build-manifest.json and SHA256SUMS
 * included, so editing either is detectable); the statement and bundle are dropped if passed.
 * Throws if subjects disagree with manifest.outputs, since that means the dir is not what
 * the build recorded.
 */
export function buildStatement(manifest: BuildManifest, subjects: Subject[]): InTotoStatement {
  const subj = subjects.filter((s) => !NOT_SUBJECTS.includes(s.name)).sort((a, b) => cmp(a.name, b.name));
  for (let i = 0; i < subj.length; i++) {
    const s = subj[i]!;
    if (!isSafeSubjectName(s.name)) throw new Error(`provenance: unsafe subject name ${JSON.stringify(s.name)}`);
    if (!HEX64.test(s.sha256)) throw new Error(`provenance: subject ${s.name}: sha256 must be 64 lowercase hex digits`);
    if (i > 0 && subj[i - 1]!.name === s.name) throw new Error(`provenance: duplicate subject ${s.name}`);
  }
  const bySubject = new Map(subj.map((s) => [s.name, s.sha256]));
  for (const o of manifest.outputs) {
    const d = bySubject.get(o.path);
    if (d === undefined) throw new Error(`provenance: output ${o.path} (stage ${o.stage}) is not among the subjects`);
    if (d !== o.sha256) {
      throw new Error(`provenance: output ${o.path}: manifest says sha256 ${o.sha256}, file has ${d}`);
    }
  }

  const statement: InTotoStatement = {
    _type: STATEMENT_TYPE,
    subject: subj.map((s) => ({ name: s.name, digest: { sha256: s.sha256 } })),
    predicateType: SLSA_PROVENANCE_V1,
    predicate: {
      buildDefinition: {
        buildType: BUILD_TYPE,
        externalParameters: {
          spec: { name: manifest.spec.name, path: manifest.spec.path, sha256: manifest.spec.sha256 },
          variant: manifest.variant,
          arch: manifest.arch,
        },
        internalParameters: { sourceDateEpoch: manifest.sourceDateEpoch },
        resolvedDependencies: [
          ...mirrorDependencies(manifest.resolved.meta),
          ...lockDependencies(manifest.resolved.meta),
          ...packageDependencies(manifest.resolved.packages),
          ...toolDependencies(manifest.resolved.tools),
        ],
      },
      // No runDetails.metadata: startedOn/finishedOn would make rebuilds differ byte-wise.
      runDetails: {
        // SLSA v1 defines builder.version as a map of component -> version.
        builder: { id: manifest.builder.id, version: { pipeline: manifest.builder.version } },
        byproducts: stageByproducts(manifest.stages),
      },
    },
  };
  return sortDeep(statement) as InTotoStatement;
}

/** The exact bytes written to provenance.intoto.json (and signed as the DSSE payload). */
export function statementBytes(statement: InTotoStatement): Buffer {
  return Buffer.from(stableJson(statement), 'utf8');
}
