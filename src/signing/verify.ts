// Offline verification of an image dir: the Sigstore bundle signs the statement on disk, and
// the statement's subjects are exactly the files in the dir with the recorded digests.
//
// What is checkable here (no network, no TUF):
//  - key-signed bundles: fully (signature with the given public key; no tlog/TSA in the bundle).
//  - keyless bundles: only with a Sigstore trusted root supplied as a file (trustedRootPath,
//    e.g. the trusted_root.json from Sigstore's TUF repo, fetched elsewhere). Then the Fulcio
//    chain, SCT, Rekor entry and the --certificate-identity/--certificate-oidc-issuer policy are
//    all checked by @sigstore/verify. Without it we refuse rather than trust an unchained cert.
//    sigstore.verify() is not used because it always refreshes TUF metadata over the network.
import { readdir, readFile, lstat } from 'node:fs/promises';
import path from 'node:path';
import { createPublicKey, type KeyObject } from 'node:crypto';
import { bundleFromJSON, type Bundle } from '@sigstore/bundle';
import { X509Certificate } from '@sigstore/core';
import { TrustedRoot } from '@sigstore/protobuf-specs';
import { Verifier, toSignedEntity, toTrustMaterial, type VerificationPolicy } from '@sigstore/verify';
import { sha256 } from '../engine/canonical.js';
import { BUNDLE_NAME, MANIFEST_NAME, STATEMENT_NAME, SUMS_NAME } from '../engine/manifest-types.js';
import { sha256File } from '../lib/digest.js';
import { DSSE_PAYLOAD_TYPE, SLSA_PROVENANCE_V1, STATEMENT_TYPE, isSafeSubjectName } from '../engine/provenance.js';
import { sshFingerprint } from './signing.js';

export type VerifyErrorCode =
  | 'MISSING_SIGNATURE'
  | 'INVALID_BUNDLE'
  | 'MISSING_STATEMENT'
  | 'INVALID_STATEMENT'
  | 'NO_PUBLIC_KEY'
  | 'BAD_SIGNATURE'
  | 'KEYLESS_NEEDS_TRUSTED_ROOT'
  | 'POLICY_MISMATCH'
  | 'TAMPERED_STATEMENT'
  | 'TAMPERED_MANIFEST'
  | 'TAMPERED_ARTIFACT'
  | 'MISSING_FILE'
  | 'EXTRA_FILE';

export class VerifyError extends Error {
  readonly exitCode = 1;
  constructor(
    readonly code: VerifyErrorCode,
    message: string,
    /** Every file-level problem found (the message leads with the most serious). */
    readonly problems: string[] = [],
  ) {
    super(message);
    this.name = 'VerifyError';
  }
}

export interface VerifyOptions {
  /** SPKI PEM public key for key-signed bundles. */
  publicKeyPath?: string;
  /** Keyless policy: expected certificate SAN (e.g. a workflow URI or email). */
  certificateIdentity?: string;
  /** Keyless policy: expected OIDC issuer (e.g. https://token.actions.githubusercontent.com). */
  certificateIssuer?: string;
  /** Keyless: Sigstore trusted_root.json (Fulcio CAs, Rekor and CT log keys). */
  trustedRootPath?: string;
}

export interface VerifyResult {
  ok: true;
  /** Number of subjects checked (artifacts + build-manifest.json + SHA256SUMS). */
  files: number;
  /** Key fingerprint or certificate identity that signed. */
  signer: string;
}

// ---------------------------------------------------------------------------- file hashing

/** Every regular file under dir as a posix relative path, sorted; non-regular files listed apart. */
export async function listImageFiles(dir: string): Promise<{ files: string[]; other: string[] }> {
  const files: string[] = [];
  const other: string[] = [];
  async function walk(rel: string): Promise<void> {
    const entries = await readdir(path.join(dir, rel), { withFileTypes: true });
    for (const e of entries) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) await walk(r);
      else if (e.isFile()) files.push(r);
      else other.push(r); // symlinks, fifos…: never legitimate published artifacts
    }
  }
  await walk('');
  const byBytes = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);
  return { files: files.sort(byBytes), other: other.sort(byBytes) };
}

/** Subjects for buildStatement: every file in dir except the statement and bundle. */
export async function hashImageDir(dir: string): Promise<{ name: string; sha256: string }[]> {
  const { files, other } = await listImageFiles(dir);
  if (other.length) throw new Error(`${dir}: not regular files: ${other.join(', ')}`);
  const out: { name: string; sha256: string }[] = [];
  for (const f of files) {
    if (f === STATEMENT_NAME || f === BUNDLE_NAME) continue;
    out.push({ name: f, sha256: await sha256File(path.join(dir, f)) });
  }
  return out;
}

// ---------------------------------------------------------------------------- signature

type EmptyRoot = Parameters<typeof toTrustMaterial>[0];

function emptyTrustedRoot(): EmptyRoot {
  return {
    mediaType: 'application/vnd.dev.sigstore.trustedroot+json;version=0.1',
    tlogs: [],
    certificateAuthorities: [],
    ctlogs: [],
    timestampAuthorities: [],
  };
}

function certInfo(bundle: Bundle): { san: string; issuer: string } {
  const vm = bundle.verificationMaterial.content;
  const raw =
    vm.$case === 'certificate'
      ? vm.certificate.rawBytes
      : vm.$case === 'x509CertificateChain'
        ? vm.x509CertificateChain.certificates[0]?.rawBytes
        : undefined;
  if (!raw) return { san: '?', issuer: '?' };
  try {
    const cert = X509Certificate.parse(Buffer.from(raw));
    // Fulcio issuer: v2 extension is a DER UTF8String, v1 the raw string.
    const v2 = cert.extension('1.3.6.1.4.1.57264.1.8');
    const issuer = v2
      ? (v2.valueObj.subs[0]?.value.toString('utf8') ?? '?')
      : (cert.extension('1.3.6.1.4.1.57264.1.1')?.value.toString('utf8') ?? '?');
    return { san: cert.subjectAltName ?? '?', issuer };
  } catch {
    return { san: '?', issuer: '?' };
  }
}

/** Check a bundle's signature against the key or keyless policy in opts; returns who signed. */
export async function verifySignature(bundle: Bundle, opts: VerifyOptions, bundlePath: string): Promise<string> {
  const entity = toSignedEntity(bundle);
  if (entity.key.$case === 'public-key') {
    if (opts.certificateIdentity || opts.certificateIssuer) {
      throw new VerifyError(
        'POLICY_MISMATCH',
        `${bundlePath} is signed with a key (keyid ${entity.key.hint || 'none'}), not a Fulcio certificate; --certificate-identity/--certificate-oidc-issuer cannot match`,
      );
    }
    if (!opts.publicKeyPath) {
      throw new VerifyError('NO_PUBLIC_KEY', `${bundlePath} is signed with a key; pass the public key (--key signing.pub)`);
    }
    let key: KeyObject;
    try {
      key = createPublicKey(await readFile(opts.publicKeyPath, 'utf8'));
    } catch (err) {
      throw new VerifyError('NO_PUBLIC_KEY', `cannot load public key ${opts.publicKeyPath}: ${(err as Error).message}`);
    }
    const fp = safeFingerprint(key);
    // The selector ignores the hint and always offers our key: the signature decides.
    const trust = toTrustMaterial(emptyTrustedRoot(), () => ({ publicKey: key, validFor: () => true }));
    const verifier = new Verifier(trust, { tlogThreshold: 0, ctlogThreshold: 0, timestampThreshold: 0 });
    try {
      verifier.verify(entity);
    } catch (err) {
      const hint = entity.key.hint ? `bundle keyid ${entity.key.hint}` : 'bundle has no keyid';
      throw new VerifyError(
        'BAD_SIGNATURE',
        `signature in ${bundlePath} does not verify with ${opts.publicKeyPath} (${fp}; ${hint}): wrong key or altered signature/payload (${(err as Error).message})`,
      );
    }
    return fp;
  }

  // Keyless (Fulcio certificate).
  const { san, issuer } = certInfo(bundle);
  if (!opts.trustedRootPath) {
    throw new VerifyError(
      'KEYLESS_NEEDS_TRUSTED_ROOT',
      `${bundlePath} is signed keyless (certificate for ${san}, issuer ${issuer}); verifying it needs the Sigstore trusted root ` +
        `(Fulcio CA, Rekor and CT log keys), which is not available offline: pass a trusted_root.json, or use cosign verify-blob-attestation online`,
    );
  }
  if (!opts.certificateIdentity || !opts.certificateIssuer) {
    throw new VerifyError(
      'POLICY_MISMATCH',
      `${bundlePath} is signed keyless (${san}, ${issuer}); --certificate-identity and --certificate-oidc-issuer are required`,
    );
  }
  let root: EmptyRoot;
  try {
    root = TrustedRoot.fromJSON(JSON.parse(await readFile(opts.trustedRootPath, 'utf8')));
  } catch (err) {
    throw new VerifyError('INVALID_BUNDLE', `cannot load trusted root ${opts.trustedRootPath}: ${(err as Error).message}`);
  }
  const policy: VerificationPolicy = {
    subjectAlternativeName: opts.certificateIdentity,
    extensions: { issuer: opts.certificateIssuer },
  };
  try {
    // Default thresholds: one tlog entry, one SCT, one timestamp.
    new Verifier(toTrustMaterial(root)).verify(entity, policy);
  } catch (err) {
    const code = (err as { code?: string }).code === 'UNTRUSTED_SIGNER_ERROR' ? 'POLICY_MISMATCH' : 'BAD_SIGNATURE';
    throw new VerifyError(code, `keyless verification of ${bundlePath} failed (${san}, ${issuer}): ${(err as Error).message}`);
  }
  return `${san} (${issuer})`;
}

function safeFingerprint(key: KeyObject): string {
  try {
    return sshFingerprint(key);
  } catch {
    return `${key.asymmetricKeyType} key`;
  }
}

// ---------------------------------------------------------------------------- image dir

interface StatementSubject {
  name: string;
  sha256: string;
}

function parseStatement(payload: Buffer, where: string): StatementSubject[] {
  let st: { _type?: unknown; predicateType?: unknown; subject?: unknown };
  try {
    st = JSON.parse(payload.toString('utf8'));
  } catch {
    throw new VerifyError('INVALID_STATEMENT', `${where} is not valid JSON`);
  }
  if (st._type !== STATEMENT_TYPE) throw new VerifyError('INVALID_STATEMENT', `${where}: _type is not ${STATEMENT_TYPE}`);
  if (st.predicateType !== SLSA_PROVENANCE_V1) {
    throw new VerifyError('INVALID_STATEMENT', `${where}: predicateType is not ${SLSA_PROVENANCE_V1}`);
  }
  if (!Array.isArray(st.subject) || st.subject.length === 0) {
    throw new VerifyError('INVALID_STATEMENT', `${where}: no subjects`);
  }
  const seen = new Set<string>();
  return st.subject.map((s: { name?: unknown; digest?: { sha256?: unknown } }) => {
    const name = s?.name;
    const sha256 = s?.digest?.sha256;
    if (typeof name !== 'string' || !isSafeSubjectName(name) || typeof sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(sha256)) {
      throw new VerifyError('INVALID_STATEMENT', `${where}: malformed subject ${JSON.stringify(s)}`);
    }
    if (name === STATEMENT_NAME || name === BUNDLE_NAME || seen.has(name)) {
      throw new VerifyError('INVALID_STATEMENT', `${where}: invalid or duplicate subject ${name}`);
    }
    seen.add(name);
    return { name, sha256 };
  });
}

// Most serious first: a doctored manifest/artifact matters more than a stray file.
const PRIORITY: VerifyErrorCode[] = ['TAMPERED_MANIFEST', 'TAMPERED_ARTIFACT', 'MISSING_FILE', 'EXTRA_FILE'];

/**
 * Verify an image dir offline. Throws VerifyError (with a distinct code) on the first class of
 * failure; resolves only when the signature, the statement and every file check out.
 */
export async function verifyImageDir(dir: string, opts: VerifyOptions = {}): Promise<VerifyResult> {
  const bundlePath = path.join(dir, BUNDLE_NAME);
  const stmtPath = path.join(dir, STATEMENT_NAME);

  let bundleText: string;
  try {
    bundleText = await readFile(bundlePath, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new VerifyError('MISSING_SIGNATURE', `${dir} is not signed: ${BUNDLE_NAME} is missing`);
    }
    throw err;
  }
  let bundle: Bundle;
  try {
    bundle = bundleFromJSON(JSON.parse(bundleText));
  } catch (err) {
    throw new VerifyError('INVALID_BUNDLE', `${bundlePath} is not a valid Sigstore bundle: ${(err as Error).message}`);
  }
  if (bundle.content.$case !== 'dsseEnvelope') {
    throw new VerifyError('INVALID_BUNDLE', `${bundlePath} holds a ${bundle.content.$case}, expected a DSSE envelope`);
  }
  const env = bundle.content.dsseEnvelope;
  if (env.payloadType !== DSSE_PAYLOAD_TYPE) {
    throw new VerifyError('INVALID_BUNDLE', `${bundlePath}: DSSE payloadType is ${env.payloadType}, expected ${DSSE_PAYLOAD_TYPE}`);
  }

  // 1. The envelope is signed by the expected key/identity.
  const signer = await verifySignature(bundle, opts, bundlePath);

  // 2. The statement on disk is the one that was signed.
  let onDisk: Buffer;
  try {
    onDisk = await readFile(stmtPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      throw new VerifyError('MISSING_STATEMENT', `${STATEMENT_NAME} is missing from ${dir}`);
    }
    throw err;
  }
  const payload = Buffer.from(env.payload);
  if (!onDisk.equals(payload)) {
    throw new VerifyError(
      'TAMPERED_STATEMENT',
      `${stmtPath} differs from the signed statement in ${BUNDLE_NAME}: sha256 ${sha256(onDisk)} on disk, ${sha256(payload)} signed`,
    );
  }
  // Trust only the signed bytes from here on.
  const subjects = parseStatement(payload, STATEMENT_NAME);

  // 3. Every subject is present with its digest, and nothing else is in the dir.
  const { files, other } = await listImageFiles(dir);
  const present = new Set(files);
  const found: { code: VerifyErrorCode; msg: string }[] = [];
  for (const s of subjects) {
    if (!present.has(s.name)) {
      found.push({ code: 'MISSING_FILE', msg: `${s.name}: listed in the signed statement but missing from ${dir}` });
      continue;
    }
    const actual = await sha256File(path.join(dir, s.name));
    if (actual !== s.sha256) {
      const isManifest = s.name === MANIFEST_NAME || s.name === SUMS_NAME;
      found.push({
        code: isManifest ? 'TAMPERED_MANIFEST' : 'TAMPERED_ARTIFACT',
        msg: `${s.name}: ${isManifest ? 'manifest' : 'artifact'} modified: signed sha256 ${s.sha256}, file has ${actual}`,
      });
    }
  }
  const listed = new Set(subjects.map((s) => s.name));
  for (const f of files) {
    if (f === STATEMENT_NAME || f === BUNDLE_NAME || listed.has(f)) continue;
    found.push({ code: 'EXTRA_FILE', msg: `${f}: present in ${dir} but not a subject of the signed statement` });
  }
  for (const f of other) {
    found.push({ code: 'EXTRA_FILE', msg: `${f}: not a regular file (not allowed in a signed image dir)` });
  }
  if (found.length) {
    found.sort((a, b) => PRIORITY.indexOf(a.code) - PRIORITY.indexOf(b.code));
    const lines = found.map((f) => f.msg);
    const first = found[0]!;
    const more = found.length > 1 ? `\n  (${found.length - 1} more: ${lines.slice(1).join('; ')})` : '';
    throw new VerifyError(first.code, `verification failed: ${first.msg}${more}`, lines);
  }
  return { ok: true, files: subjects.length, signer };
}
