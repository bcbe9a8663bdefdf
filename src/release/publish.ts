// `pipeline release`: build (cached) what the release needs, then publish it to an
// OCI registry and announce it with a signed webhook.
//
// Order, chosen so that a tag consumers follow never points at something partial
// and a re-run finishes an interrupted release:
//   1. per arch × variant: images (layout push, tag <version>-<variant>-<arch>) and
//      their signed provenance as a referrer; other variants as oras artifacts;
//   2. per image variant, the multi-arch index (tag <version>);
//   3. the release manifest and its bundle as an artifact (tag <version>-release);
//   4. the webhook.
// Every step HEADs first, so a re-run uploads nothing the registry has. Signatures
// over unchanged bytes are reused (ECDSA signatures are randomised: re-signing would
// change every bundle, hence every artifact digest, on each run).
import { createPrivateKey, createPublicKey } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { build } from '../engine/build.js';
import { sha256 } from '../engine/canonical.js';
import { BuildError, UsageError } from '../engine/errors.js';
import { BUNDLE_NAME, MANIFEST_NAME, STATEMENT_NAME, type BuildManifest } from '../engine/manifest-types.js';
import type { Reporter } from '../engine/scheduler.js';
import type { LoadedSpec } from '../engine/spec.js';
import { writeAtomic } from '../engine/cache.js';
import { sha256File } from '../lib/digest.js';
import { artifactManifest, describeFiles, getManifest, pushArtifact, putManifest, type ArtifactFile, DEFAULT_TIMEOUT_MS } from '../registry/artifact.js';
import { BUNDLE_MEDIA_TYPE, layoutSubject, pushBundleReferrer, referrerManifest, referrersTag } from '../registry/referrers.js';
import { connectRegistry, MT, parseRef, pushLayout, type PushOptions, type RegistryClient } from '../registry/registry.js';
import { imageSigner } from '../signing/signer.js';
import {
  ARTIFACT_TYPE_RELEASE,
  ARTIFACT_TYPE_VARIANT,
  artifactFileNames,
  checkVersion,
  entryTag,
  imageIndex,
  indexTag,
  RELEASE_BUNDLE_NAME,
  RELEASE_MANIFEST_NAME,
  releaseManifest,
  releaseManifestBytes,
  releaseStatement,
  releaseTag,
  SPEC_ANNOTATION,
  webhookId,
  webhookPayload,
  type PublishedDir,
  type PublishedRef,
} from './manifest.js';
import { deliverWebhook, loadWebhookSecret, safeUrl, type DeliveryResult, type HeaderStyle, type WebhookSecret } from './webhook.js';

export interface ReleaseOptions {
  version: string;
  /** One or more arches (the CLI accepts amd64,arm64). */
  arches: string[];
  variants: string[];
  all?: boolean;
  /** oci://host[:port]/repo or host[:port]/repo */
  registry: string;
  file?: string;
  cacheDir?: string;
  outDir?: string;
  jobs?: number;
  webhook?: string;
  webhookSecretFile?: string;
  headerStyle?: HeaderStyle;
  sign?: string;
  dryRun?: boolean;
  force?: boolean;
  insecure?: boolean;
  chunkSize?: number;
  reporter?: Reporter;
  signal?: AbortSignal;
  log?: (line: string) => void;
  env?: NodeJS.ProcessEnv;
}

export type StepStatus = 'published' | 'unchanged' | 'failed' | 'not published' | 'planned';

export interface ReleaseStep {
  what: string;
  ref: string;
  digest?: string;
  status: StepStatus;
  uploaded?: number;
  error?: string;
}

export interface ReleaseResult {
  version: string;
  registry: string;
  manifestDigest: string;
  manifestPath: string;
  steps: ReleaseStep[];
  webhook?: DeliveryResult & { url: string };
  dryRun: boolean;
}

/** oci://host/repo → host/repo, checked like an image ref without a tag. */
export function parseRegistry(s: string): string {
  const bare = s.replace(/^oci:\/\//, '');
  if (/^[a-z]+:\/\//i.test(bare)) throw new UsageError(`--registry ${s}: expected oci://HOST[:PORT]/REPO`);
  const r = parseRef(bare);
  if (r.tag) throw new UsageError(`--registry ${s}: give the repository without a tag (tags come from the version)`);
  return `${r.host}/${r.repository}`;
}

/** A release that stopped part-way: says what is in the registry and what is not. */
export class ReleaseError extends BuildError {
  constructor(
    message: string,
    readonly steps: ReleaseStep[],
  ) {
    super(message, describeSteps(steps));
    this.name = 'ReleaseError';
  }
}

export function describeSteps(steps: ReleaseStep[]): string {
  const done = steps.filter((s) => s.status === 'published' || s.status === 'unchanged');
  const not = steps.filter((s) => s.status === 'failed' || s.status === 'not published');
  const line = (s: ReleaseStep) => `  ${s.what}: ${s.ref}${s.digest ? `@${s.digest}` : ''}${s.status === 'unchanged' ? ' (already there)' : ''}${s.error ? ` — ${s.error}` : ''}`;
  return [`published (${done.length}):`, ...done.map(line), `not published (${not.length}):`, ...not.map(line), 'run the same command again to finish the release'].join('\n');
}

// --------------------------------------------------------------------------- signing

interface SignatureReuse {
  /** sha256 of signed statement bytes → bundle bytes found before the build. */
  bundles: Map<string, Buffer>;
}

/** Which identity a bundle was made with: a key fingerprint, or 'keyless'. */
function bundleSigner(bundle: Buffer): string | undefined {
  try {
    const b = JSON.parse(bundle.toString('utf8')) as { verificationMaterial?: { publicKey?: { hint?: string }; certificate?: unknown; x509CertificateChain?: unknown } };
    const vm = b.verificationMaterial;
    if (vm?.publicKey?.hint) return vm.publicKey.hint;
    if (vm?.certificate || vm?.x509CertificateChain) return 'keyless';
  } catch {
    /* not a bundle: not reusable */
  }
  return undefined;
}

/** The identity the current key would sign with (fingerprint or 'keyless'); never the key. */
async function currentSigner(flag: string | undefined, loaded: LoadedSpec, env: NodeJS.ProcessEnv): Promise<{ id: string; opts: import('../signing/signing.js').SignOptions } | undefined> {
  const { resolveSigningKey, signOptionsFromRef, sshFingerprint } = await import('../signing/signing.js');
  const ref = resolveSigningKey(flag, loaded.spec.signing?.key, env, loaded.dir);
  if (!ref) return undefined;
  if (ref.kind === 'keyless') return { id: 'keyless', opts: signOptionsFromRef(ref) };
  let pem: string;
  try {
    pem = ref.kind === 'pem' ? ref.pem : await fs.readFile(ref.path, 'utf8');
  } catch {
    throw new UsageError(`signing key not found or unreadable: ${ref.kind === 'file' ? ref.path : 'inline key'}`);
  }
  let id: string;
  try {
    id = sshFingerprint(createPublicKey(createPrivateKey(pem)));
  } catch {
    throw new UsageError(`${ref.kind === 'file' ? ref.path : 'the inline signing key'} is not an ECDSA P-256 private key`);
  }
  return { id, opts: signOptionsFromRef(ref) };
}

async function snapshotBundles(outRoot: string, arches: string[]): Promise<SignatureReuse> {
  const bundles = new Map<string, Buffer>();
  const variants = await fs.readdir(outRoot).catch(() => [] as string[]);
  for (const v of variants) {
    for (const a of arches) {
      const dir = path.join(outRoot, v, a);
      const [st, b] = await Promise.all([fs.readFile(path.join(dir, STATEMENT_NAME)).catch(() => undefined), fs.readFile(path.join(dir, BUNDLE_NAME)).catch(() => undefined)]);
      if (st && b) bundles.set(sha256(st), b);
    }
  }
  return { bundles };
}

/** The build's signer, reusing a bundle made earlier by the same identity for the very same statement. */
function reusingSigner(flag: string | undefined, reuse: SignatureReuse, env: NodeJS.ProcessEnv) {
  return async (loaded: LoadedSpec) => {
    const inner = await imageSigner(flag, loaded, env);
    if (!inner) return undefined;
    const who = await currentSigner(flag, loaded, env);
    return async (dir: string) => {
      const st = await fs.readFile(path.join(dir, STATEMENT_NAME));
      const old = reuse.bundles.get(sha256(st));
      if (old && who && bundleSigner(old) === who.id) {
        await fs.writeFile(path.join(dir, BUNDLE_NAME), old);
        return;
      }
      await inner(dir);
    };
  };
}

// --------------------------------------------------------------------------- reading what was built

async function readPublished(dir: string, arch: string, variant: string, manifest: BuildManifest): Promise<PublishedDir> {
  const [bm, st, bundle] = await Promise.all([
    sha256File(path.join(dir, MANIFEST_NAME)),
    sha256File(path.join(dir, STATEMENT_NAME)),
    existsSync(path.join(dir, BUNDLE_NAME)) ? sha256File(path.join(dir, BUNDLE_NAME)) : Promise.resolve(undefined),
  ]);
  const p: PublishedDir = { arch, variant, dir, manifest, digests: { buildManifest: bm, statement: st, ...(bundle ? { bundle } : {}) } };
  if (existsSync(path.join(dir, 'oci-layout')) && existsSync(path.join(dir, 'index.json'))) {
    const subject = await layoutSubject(dir);
    const blob = await fs.readFile(path.join(dir, 'blobs', 'sha256', subject.digest.slice(7)));
    const m = JSON.parse(blob.toString('utf8')) as { config?: { digest: string } };
    let platform: { os: string; architecture: string; variant?: string } = { os: 'linux', architecture: arch };
    if (m.config) {
      const cfg = JSON.parse(await fs.readFile(path.join(dir, 'blobs', 'sha256', m.config.digest.slice(7)), 'utf8')) as { os?: string; architecture?: string; variant?: string };
      platform = { os: cfg.os ?? 'linux', architecture: cfg.architecture ?? arch, ...(cfg.variant ? { variant: cfg.variant } : {}) };
    }
    p.image = { digest: subject.digest, size: subject.size, mediaType: subject.mediaType ?? MT.ociManifest, platform };
  }
  return p;
}

function artifactFiles(d: PublishedDir): ArtifactFile[] {
  const known = new Map(d.manifest.outputs.map((o) => [o.path, o]));
  return artifactFileNames(d).map((name) => {
    const o = known.get(name);
    const mediaType = name === BUNDLE_NAME ? BUNDLE_MEDIA_TYPE : name.endsWith('.json') ? 'application/json' : undefined;
    return { path: path.join(d.dir, name), name, ...(mediaType ? { mediaType } : {}), ...(o ? { sha256: o.sha256, size: o.size } : {}) };
  });
}

// --------------------------------------------------------------------------- the release

export async function runRelease(o: ReleaseOptions): Promise<ReleaseResult> {
  const env = o.env ?? process.env;
  const log = o.log ?? (() => {});
  checkVersion(o.version);
  const registry = parseRegistry(o.registry);
  if (!o.arches.length) throw new UsageError('give an arch (or several: amd64,arm64)');
  if (!o.all && !o.variants.length) throw new UsageError('give the variants to release, or --all');
  let secret: WebhookSecret | undefined;
  if (o.webhook) {
    try {
      const u = new URL(o.webhook);
      if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new Error();
    } catch {
      throw new UsageError(`--webhook ${safeUrl(o.webhook)}: expected an http(s) URL`);
    }
    secret = await loadWebhookSecret(o.webhookSecretFile, env);
    if (!secret) throw new UsageError('--webhook needs a secret: --webhook-secret-file FILE or $PIPELINE_WEBHOOK_SECRET (whsec_<base64>)');
  }

  // 1. Build (cached), reusing signatures over unchanged statements.
  const outRoot = path.resolve(o.outDir ?? 'images');
  const reuse = await snapshotBundles(outRoot, o.arches);
  const dirs: PublishedDir[] = [];
  let loaded: LoadedSpec | undefined;
  for (const arch of o.arches) {
    const r = await build({ arch, variants: o.variants, all: o.all, file: o.file, cacheDir: o.cacheDir, outDir: outRoot, jobs: o.jobs, reporter: o.reporter, signal: o.signal, signer: reusingSigner(o.sign, reuse, env) });
    loaded = r.prepared.loaded;
    for (const p of r.published) dirs.push(await readPublished(p.dir, arch, p.variant, p.manifest));
  }
  const specSha = dirs[0]!.manifest.spec.sha256;

  // 2. Everything that will be published, with digests, before touching the registry.
  const imageVariants = [...new Set(dirs.filter((d) => d.image).map((d) => d.variant))].sort();
  const indexes = imageVariants.map((v) => {
    const bytes = imageIndex(o.version, specSha, dirs.filter((d) => d.variant === v));
    return { variant: v, tag: indexTag(o.version, v, imageVariants), digest: `sha256:${sha256(bytes)}`, bytes };
  });
  const manifest = releaseManifest(o.version, dirs, indexes.map(({ variant, tag, digest }) => ({ variant, tag, digest })));
  const manifestBytes = releaseManifestBytes(manifest);
  const manifestDigest = `sha256:${sha256(manifestBytes)}`;
  const relDir = path.join(outRoot, 'releases', o.version);
  const manifestPath = path.join(relDir, RELEASE_MANIFEST_NAME);
  const bundlePath = path.join(relDir, RELEASE_BUNDLE_NAME);
  const annotations = (extra: Record<string, string>) => ({ [SPEC_ANNOTATION]: specSha, 'org.opencontainers.image.version': o.version, ...extra });

  // The release manifest's signature: reused when these bytes were signed by this identity before.
  const signer = loaded ? await currentSigner(o.sign, loaded, env) : undefined;
  let bundle: Buffer | undefined;
  if (!o.dryRun) {
    await fs.mkdir(relDir, { recursive: true });
    const prevManifest = await fs.readFile(manifestPath).catch(() => undefined);
    const prevBundle = await fs.readFile(bundlePath).catch(() => undefined);
    if (signer && prevManifest?.equals(manifestBytes) && prevBundle && bundleSigner(prevBundle) === signer.id) bundle = prevBundle;
    else if (signer) {
      const { signStatement } = await import('../signing/signing.js');
      const { stableJson } = await import('../engine/canonical.js');
      bundle = Buffer.from(stableJson(await signStatement(releaseStatement(manifestBytes, manifest), signer.opts)));
    }
    await writeAtomic(manifestPath, manifestBytes);
    if (bundle) await writeAtomic(bundlePath, bundle);
    else await fs.rm(bundlePath, { force: true });
  }

  const pushOpts: PushOptions = { insecure: o.insecure ? true : undefined, chunkSize: o.chunkSize, signal: o.signal, timeoutMs: DEFAULT_TIMEOUT_MS, log: (l) => log(`  ${l}`) };
  const steps: ReleaseStep[] = [];
  const entryDigests = new Map<string, string>();
  for (const d of dirs) {
    const ref = `${registry}:${entryTag(o.version, d.variant, d.arch)}`;
    if (d.image) {
      steps.push({ what: `image ${d.variant}/${d.arch}`, ref, digest: d.image.digest, status: 'planned' });
      if (d.digests.bundle) {
        const rm = referrerManifest(await fs.readFile(path.join(d.dir, BUNDLE_NAME)), { mediaType: d.image.mediaType, digest: d.image.digest, size: d.image.size });
        steps.push({ what: `provenance ${d.variant}/${d.arch}`, ref: `${registry}:${referrersTag(d.image.digest)}`, digest: `sha256:${sha256(rm)}`, status: 'planned' });
      }
      entryDigests.set(`${d.variant}/${d.arch}`, d.image.digest);
    } else {
      const layers = await describeFiles(artifactFiles(d));
      const digest = `sha256:${sha256(artifactManifest(ARTIFACT_TYPE_VARIANT, layers, annotations({ 'dev.pipeline.variant': d.variant, 'dev.pipeline.arch': d.arch })))}`;
      steps.push({ what: `artifact ${d.variant}/${d.arch}`, ref, digest, status: 'planned' });
      entryDigests.set(`${d.variant}/${d.arch}`, digest);
    }
  }
  for (const ix of indexes) steps.push({ what: `index ${ix.variant}`, ref: `${registry}:${ix.tag}`, digest: ix.digest, status: 'planned' });
  const relFiles: ArtifactFile[] = [{ path: manifestPath, name: RELEASE_MANIFEST_NAME, mediaType: 'application/json' }];
  if (bundle) relFiles.push({ path: bundlePath, name: RELEASE_BUNDLE_NAME, mediaType: BUNDLE_MEDIA_TYPE });
  const relStep: ReleaseStep = { what: 'release manifest', ref: `${registry}:${releaseTag(o.version)}`, status: 'planned' };
  steps.push(relStep);
  if (!o.dryRun) {
    const layers = await describeFiles(relFiles);
    relStep.digest = `sha256:${sha256(artifactManifest(ARTIFACT_TYPE_RELEASE, layers, annotations({ 'dev.pipeline.release-manifest': manifestDigest })))}`;
  }
  const hookStep: ReleaseStep | undefined = o.webhook ? { what: 'webhook', ref: safeUrl(o.webhook), status: 'planned' } : undefined;
  if (hookStep) steps.push(hookStep);
  const result: ReleaseResult = { version: o.version, registry, manifestDigest, manifestPath, steps, dryRun: !!o.dryRun };

  // 3. A different spec under this version is refused unless --force.
  const host = parseRef(`${registry}:x`);
  let client: RegistryClient;
  try {
    client = await connectRegistry(host, pushOpts);
    await checkConflicts(client, registry, specSha, steps, !!o.force, log);
  } catch (e) {
    if (e instanceof UsageError || !o.dryRun) {
      if (e instanceof UsageError) throw e;
      for (const s of steps) s.status = 'not published';
      throw new ReleaseError(`release ${o.version}: ${(e as Error).message}`, steps);
    }
    log(`registry not readable for the dry run: ${(e as Error).message}`);
    return result;
  }
  if (o.dryRun) return result;

  // 4. Publish, in order; on the first failure say what is there and what is not.
  const byRef = new Map(steps.map((s) => [s.what, s]));
  const run = async (s: ReleaseStep, fn: () => Promise<{ digest?: string; uploaded: number; unchanged: boolean }>) => {
    try {
      const r = await fn();
      s.status = r.unchanged ? 'unchanged' : 'published';
      s.uploaded = r.uploaded;
      if (r.digest) s.digest = r.digest;
      log(`${s.status === 'unchanged' ? 'unchanged' : 'published'} ${s.what}: ${s.ref}${s.digest ? `@${s.digest}` : ''}`);
    } catch (e) {
      s.status = 'failed';
      s.error = (e as Error).message;
      for (const x of steps) if (x.status === 'planned') x.status = 'not published';
      throw new ReleaseError(`release ${o.version} incomplete: ${s.what} failed: ${s.error}`, steps);
    }
  };
  const refs: PublishedRef[] = [];
  for (const d of dirs) {
    const key = `${d.variant}/${d.arch}`;
    if (d.image) {
      const s = byRef.get(`image ${key}`)!;
      await run(s, async () => {
        const before = await getManifest(client, entryTag(o.version, d.variant, d.arch));
        const r = await pushLayout(d.dir, s.ref, pushOpts);
        if (r.digest !== d.image!.digest) throw new BuildError(`pushed ${r.digest}, but the layout's image is ${d.image!.digest}`);
        return { digest: r.digest, uploaded: r.pushed.length, unchanged: r.pushed.length === 0 && before?.digest === r.digest };
      });
      const p = byRef.get(`provenance ${key}`);
      if (p) {
        await run(p, async () => {
          const before = await getManifest(client, referrersTag(d.image!.digest));
          const r = await pushBundleReferrer(d.dir, s.ref, { mediaType: d.image!.mediaType, digest: d.image!.digest, size: d.image!.size }, pushOpts);
          return { digest: r.digest, uploaded: before?.digest === r.digest ? 0 : 1, unchanged: before?.digest === r.digest };
        });
      }
      refs.push({ variant: d.variant, arch: d.arch, kind: 'oci-image', ref: s.ref, digest: d.image.digest });
    } else {
      const s = byRef.get(`artifact ${key}`)!;
      await run(s, async () => {
        const r = await pushArtifact(s.ref, artifactFiles(d), { ...pushOpts, artifactType: ARTIFACT_TYPE_VARIANT, annotations: annotations({ 'dev.pipeline.variant': d.variant, 'dev.pipeline.arch': d.arch }) });
        return { digest: r.digest, uploaded: r.pushed.length, unchanged: !r.tagged && r.pushed.length === 0 };
      });
      refs.push({ variant: d.variant, arch: d.arch, kind: 'artifact', ref: s.ref, digest: s.digest! });
    }
  }
  for (const ix of indexes) {
    await run(byRef.get(`index ${ix.variant}`)!, async () => {
      const before = await getManifest(client, ix.tag);
      if (before?.digest === ix.digest) return { digest: ix.digest, uploaded: 0, unchanged: true };
      return { digest: await putManifest(client, ix.tag, ix.bytes, MT.ociIndex), uploaded: 1, unchanged: false };
    });
  }
  await run(relStep, async () => {
    const r = await pushArtifact(relStep.ref, relFiles, { ...pushOpts, artifactType: ARTIFACT_TYPE_RELEASE, annotations: annotations({ 'dev.pipeline.release-manifest': manifestDigest }) });
    return { digest: r.digest, uploaded: r.pushed.length, unchanged: !r.tagged && r.pushed.length === 0 };
  });

  // 5. The webhook, with an id that is the same on every run of this release.
  if (hookStep && o.webhook && secret) {
    const body = webhookPayload(manifest, manifestDigest, registry, refs, indexes.map((ix) => ({ variant: ix.variant, ref: `${registry}:${ix.tag}`, digest: ix.digest })));
    const id = webhookId(manifestDigest);
    await run(hookStep, async () => {
      const r = await deliverWebhook(o.webhook!, body, id, secret, { style: o.headerStyle, log, signal: o.signal });
      result.webhook = { ...r, url: safeUrl(o.webhook!) };
      hookStep.digest = undefined;
      return { uploaded: 0, unchanged: false };
    });
  }
  return result;
}

/** Tags of this version that carry another spec's annotation: refused unless force. */
async function checkConflicts(c: RegistryClient, registry: string, specSha: string, steps: ReleaseStep[], force: boolean, log: (l: string) => void): Promise<void> {
  const conflicts: string[] = [];
  for (const s of steps) {
    if (!s.ref.startsWith(`${registry}:`) || s.what.startsWith('provenance')) continue;
    const tag = s.ref.slice(registry.length + 1);
    const m = await getManifest(c, tag);
    if (!m) continue;
    const theirs = m.json.annotations?.[SPEC_ANNOTATION];
    if (theirs && theirs !== specSha) conflicts.push(`${s.ref} was published from spec ${theirs.slice(0, 12)}, this release is spec ${specSha.slice(0, 12)}`);
  }
  if (!conflicts.length) return;
  if (force) {
    for (const c2 of conflicts) log(`--force: overwriting ${c2}`);
    return;
  }
  throw new UsageError(`refusing to publish over an existing release with a different spec (use --force to overwrite):\n  ${conflicts.join('\n  ')}`);
}
