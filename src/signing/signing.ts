// Signing the provenance statement into a Sigstore bundle (DSSE envelope).
//
// Two modes, one code path (DSSEBundleBuilder):
//  - local key (offline): ECDSA P-256 key from `pipeline keygen`; no Rekor/TSA witnesses, so
//    the bundle verifies offline with the public key (ours or `cosign ... --insecure-ignore-tlog`).
//  - keyless (CI): Fulcio certificate for an OIDC identity + a Rekor entry. Needs network and a
//    token (SIGSTORE_ID_TOKEN or the GitHub Actions OIDC env vars); it cannot run on the dev box.
//
// Key material is never logged or put in error messages: only paths and fingerprints.
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, sign as cryptoSign, type KeyObject } from 'node:crypto';
import { chmod, link, readFile, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import {
  CIContextProvider,
  DEFAULT_FULCIO_URL,
  DEFAULT_REKOR_URL,
  DSSEBundleBuilder,
  FulcioSigner,
  RekorWitness,
  type IdentityProvider,
  type Signature,
  type Signer,
  type Witness,
} from '@sigstore/sign';
import { bundleToJSON, type SerializedBundle } from '@sigstore/bundle';
import { writeAtomic } from '../engine/cache.js';
import { stableJson } from '../engine/canonical.js';
import { BUNDLE_NAME, STATEMENT_NAME } from '../engine/manifest-types.js';
import { DSSE_PAYLOAD_TYPE, STATEMENT_TYPE } from '../engine/provenance.js';
import { SIGNING_KEY_ENV } from './signer.js';

export const PRIVATE_KEY_NAME = 'signing.key';
export const PUBLIC_KEY_NAME = 'signing.pub';

export class SigningError extends Error {
  readonly exitCode = 1;
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
    this.name = 'SigningError';
  }
}

// ---------------------------------------------------------------------------- keys

/**
 * Write a new ECDSA P-256 key pair: `signing.key` (PKCS#8 PEM, 0600) and `signing.pub` (SPKI PEM).
 * Refuses to replace an existing private key. Returns the two paths (not the PEMs).
 */
export async function keygen(outDir: string): Promise<{ privateKey: string; publicKey: string }> {
  const keyPath = path.join(outDir, PRIVATE_KEY_NAME);
  const pubPath = path.join(outDir, PUBLIC_KEY_NAME);
  const { privateKey, publicKey } = generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
  const keyPem = privateKey.export({ format: 'pem', type: 'pkcs8' }) as string;
  const pubPem = publicKey.export({ format: 'pem', type: 'spki' }) as string;

  const tmpKey = `${keyPath}.${process.pid}.tmp`;
  await writeFile(tmpKey, keyPem, { mode: 0o600, flag: 'wx' });
  try {
    await chmod(tmpKey, 0o600); // umask can only narrow it, but be explicit
    // link() fails with EEXIST instead of replacing, so an existing key is never clobbered,
    // and the key appears complete or not at all.
    await link(tmpKey, keyPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new SigningError(`${keyPath} already exists; refusing to overwrite a signing key`, 'KEY_EXISTS');
    }
    throw err;
  } finally {
    await unlink(tmpKey).catch(() => {});
  }
  await writeAtomic(pubPath, pubPem);
  return { privateKey: keyPath, publicKey: pubPath };
}

function sshString(b: Buffer): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(b.length);
  return Buffer.concat([len, b]);
}

/**
 * OpenSSH-style fingerprint of a P-256 public key: `SHA256:` + unpadded base64 of sha256 over
 * the SSH wire encoding. cosign only accepts a DSSE bundle's keyid if it is empty or this value.
 */
export function sshFingerprint(publicKeyPem: string | KeyObject): string {
  const key = typeof publicKeyPem === 'string' ? createPublicKey(publicKeyPem) : publicKeyPem;
  if (key.asymmetricKeyType !== 'ec' || key.asymmetricKeyDetails?.namedCurve !== 'prime256v1') {
    throw new SigningError('only ECDSA P-256 keys are supported', 'UNSUPPORTED_KEY');
  }
  const jwk = key.export({ format: 'jwk' });
  const point = Buffer.concat([Buffer.from([4]), Buffer.from(jwk.x!, 'base64url'), Buffer.from(jwk.y!, 'base64url')]);
  const wire = Buffer.concat([
    sshString(Buffer.from('ecdsa-sha2-nistp256')),
    sshString(Buffer.from('nistp256')),
    sshString(point),
  ]);
  return 'SHA256:' + createHash('sha256').update(wire).digest('base64').replace(/=+$/, '');
}

// ---------------------------------------------------------------------------- key selection

export type SigningKeyRef =
  | { kind: 'file'; path: string; source: 'flag' | 'env' | 'spec' }
  /** Inline PEM (only from the env var, for CI secrets). Never print `pem`. */
  | { kind: 'pem'; pem: string; source: 'env' }
  | { kind: 'keyless'; source: 'flag' | 'env' | 'spec' };

/**
 * Which key signs: --sign flag > $PIPELINE_SIGNING_KEY > spec. Each may be a key file path or
 * `keyless`; the env var may also hold the PEM itself. Relative spec paths resolve against
 * specDir. Returns undefined when signing is off.
 */
export function resolveSigningKey(
  cliFlag?: string,
  specValue?: string,
  env: NodeJS.ProcessEnv = process.env,
  specDir?: string,
): SigningKeyRef | undefined {
  const pick = (v: string | undefined, source: 'flag' | 'env' | 'spec', base: string): SigningKeyRef | undefined => {
    if (v === undefined || v.trim() === '') return undefined;
    if (v === 'keyless') return { kind: 'keyless', source };
    if (source === 'env' && v.includes('-----BEGIN')) return { kind: 'pem', pem: v, source: 'env' };
    return { kind: 'file', path: path.resolve(base, v), source };
  };
  return (
    pick(cliFlag, 'flag', process.cwd()) ??
    pick(env[SIGNING_KEY_ENV], 'env', process.cwd()) ??
    pick(specValue, 'spec', specDir ?? process.cwd())
  );
}

/** Safe one-line description for logs. */
export function describeSigningKey(ref: SigningKeyRef): string {
  const from = ref.source === 'flag' ? '--sign' : ref.source === 'env' ? `$${SIGNING_KEY_ENV}` : 'spec';
  switch (ref.kind) {
    case 'file':
      return `key ${ref.path} (from ${from})`;
    case 'pem':
      return `inline key (from ${from})`;
    case 'keyless':
      return `keyless via Fulcio/Rekor (from ${from})`;
  }
}

// ---------------------------------------------------------------------------- signing

export interface SignOptions {
  /** Path to a PKCS#8 PEM private key. */
  keyPath?: string;
  /** PEM private key held in memory (from $PIPELINE_SIGNING_KEY). */
  keyPem?: string;
  keyless?: boolean;
  /** Keyless only: where to get the OIDC token. Default CIContextProvider('sigstore'). */
  identityProvider?: IdentityProvider;
  fulcioURL?: string;
  rekorURL?: string;
  /** Keyless only: HTTP timeout (ms) and retry count for Fulcio/Rekor. */
  timeout?: number;
  retry?: number;
  /** Env consulted to decide whether an OIDC token is available (default process.env). */
  env?: NodeJS.ProcessEnv;
}

export function signOptionsFromRef(ref: SigningKeyRef): SignOptions {
  switch (ref.kind) {
    case 'file':
      return { keyPath: ref.path };
    case 'pem':
      return { keyPem: ref.pem };
    case 'keyless':
      return { keyless: true };
  }
}

/** True when CIContextProvider would find a token (GitHub Actions OIDC or SIGSTORE_ID_TOKEN). */
export function oidcTokenAvailable(env: NodeJS.ProcessEnv = process.env): boolean {
  return !!env.SIGSTORE_ID_TOKEN || (!!env.ACTIONS_ID_TOKEN_REQUEST_URL && !!env.ACTIONS_ID_TOKEN_REQUEST_TOKEN);
}

/** @sigstore/sign Signer backed by a local private key (no network). */
class LocalKeySigner implements Signer {
  private readonly publicKeyPem: string;
  private readonly hint: string;
  constructor(private readonly key: KeyObject) {
    const pub = createPublicKey(key);
    this.publicKeyPem = pub.export({ format: 'pem', type: 'spki' }) as string;
    this.hint = sshFingerprint(pub);
  }
  async sign(data: Buffer): Promise<Signature> {
    // DER-encoded ECDSA signature over the DSSE pre-authentication encoding.
    const signature = cryptoSign('sha256', data, this.key);
    return { signature, key: { $case: 'publicKey', publicKey: this.publicKeyPem, hint: this.hint } };
  }
}

async function loadPrivateKey(opts: SignOptions): Promise<KeyObject> {
  let pem: string;
  let where: string;
  if (opts.keyPem !== undefined) {
    pem = opts.keyPem;
    where = `$${SIGNING_KEY_ENV}`;
  } else {
    where = opts.keyPath!;
    try {
      pem = await readFile(opts.keyPath!, 'utf8');
    } catch (err) {
      throw new SigningError(`cannot read signing key ${where}: ${(err as Error).message}`, 'KEY_UNREADABLE');
    }
  }
  let key: KeyObject;
  try {
    key = createPrivateKey(pem);
  } catch {
    // Do not echo the parser error: it can quote parts of the input.
    throw new SigningError(`${where} is not a PEM private key`, 'KEY_INVALID');
  }
  if (key.asymmetricKeyType !== 'ec' || key.asymmetricKeyDetails?.namedCurve !== 'prime256v1') {
    throw new SigningError(`${where}: only ECDSA P-256 keys are supported (use \`pipeline keygen\`)`, 'UNSUPPORTED_KEY');
  }
  return key;
}

function assertStatement(bytes: Buffer): void {
  let parsed: unknown;
  try {
    parsed = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw new SigningError('provenance statement is not valid JSON', 'INVALID_STATEMENT');
  }
  if ((parsed as { _type?: unknown })?._type !== STATEMENT_TYPE) {
    throw new SigningError(`provenance statement is not an in-toto ${STATEMENT_TYPE}`, 'INVALID_STATEMENT');
  }
}

/** Flatten @sigstore/sign's InternalError (code + cause chain) into one readable line. */
function describeSigstoreError(err: unknown): string {
  const parts: string[] = [];
  let e: unknown = err;
  for (let i = 0; e !== undefined && e !== null && i < 5; i++) {
    if (e instanceof Error) {
      const code = (e as { code?: unknown }).code;
      parts.push(typeof code === 'string' && !/^E[A-Z]+$/.test(code) ? `${code}: ${e.message}` : e.message);
      e = (e as { cause?: unknown }).cause;
    } else {
      parts.push(String(e));
      break;
    }
  }
  return parts.join(': ');
}

/**
 * Sign statement bytes into a Sigstore bundle (v0.3 JSON) with a DSSE envelope.
 * Local key: offline, no witnesses. Keyless: FulcioSigner + RekorWitness (network).
 */
export async function signStatement(statementBytes: Buffer, opts: SignOptions): Promise<SerializedBundle> {
  assertStatement(statementBytes);
  let signer: Signer;
  let witnesses: Witness[];
  if (opts.keyless) {
    // Real keyless signing needs an OIDC token and access to Fulcio and Rekor; neither exists on
    // the dev machine, so only the wiring up to the first HTTP request is tested there.
    if (!opts.identityProvider && !oidcTokenAvailable(opts.env ?? process.env)) {
      throw new SigningError(
        'keyless signing needs an OIDC token: set SIGSTORE_ID_TOKEN, or run in GitHub Actions with `permissions: id-token: write`',
        'NO_OIDC_TOKEN',
      );
    }
    const fetchOpts = { timeout: opts.timeout, retry: opts.retry };
    signer = new FulcioSigner({
      identityProvider: opts.identityProvider ?? new CIContextProvider('sigstore'),
      fulcioBaseURL: opts.fulcioURL ?? DEFAULT_FULCIO_URL,
      ...fetchOpts,
    });
    witnesses = [new RekorWitness({ rekorBaseURL: opts.rekorURL ?? DEFAULT_REKOR_URL, fetchOnConflict: true, ...fetchOpts })];
  } else if (opts.keyPath !== undefined || opts.keyPem !== undefined) {
    signer = new LocalKeySigner(await loadPrivateKey(opts));
    witnesses = []; // offline: no transparency log, no timestamp authority
  } else {
    throw new SigningError('no signing key given (use --sign <key>|keyless)', 'NO_KEY');
  }

  const builder = new DSSEBundleBuilder({ signer, witnesses });
  try {
    const bundle = await builder.create({ data: statementBytes, type: DSSE_PAYLOAD_TYPE });
    return bundleToJSON(bundle);
  } catch (err) {
    if (err instanceof SigningError) throw err;
    const where = opts.keyless ? ` (Fulcio ${opts.fulcioURL ?? DEFAULT_FULCIO_URL}, Rekor ${opts.rekorURL ?? DEFAULT_REKOR_URL})` : '';
    throw new SigningError(`${opts.keyless ? 'keyless ' : ''}signing failed${where}: ${describeSigstoreError(err)}`, 'SIGN_FAILED');
  }
}

/** Sign <dir>/provenance.intoto.json into <dir>/provenance.sigstore.json (atomically). */
export async function signImageDir(dir: string, opts: SignOptions): Promise<void> {
  const stmtPath = path.join(dir, STATEMENT_NAME);
  let bytes: Buffer;
  try {
    bytes = await readFile(stmtPath);
  } catch (err) {
    throw new SigningError(`cannot read ${stmtPath}: ${(err as Error).message}`, 'MISSING_STATEMENT');
  }
  const bundle = await signStatement(bytes, opts);
  await writeAtomic(path.join(dir, BUNDLE_NAME), stableJson(bundle));
}
