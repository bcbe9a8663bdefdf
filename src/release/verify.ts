// Offline check of a release manifest: its Sigstore bundle is signed by the given key
// (or keyless identity, with a trusted root), the signed statement is a release
// statement, and its one subject is the release-manifest.json on disk.
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { bundleFromJSON, type Bundle } from '@sigstore/bundle';
import { sha256 } from '../engine/canonical.js';
import { DSSE_PAYLOAD_TYPE, STATEMENT_TYPE } from '../engine/provenance.js';
import { verifySignature, VerifyError, type VerifyOptions } from '../signing/verify.js';
import { RELEASE_BUNDLE_NAME, RELEASE_MANIFEST_NAME, RELEASE_PREDICATE_TYPE } from './manifest.js';

export async function verifyReleaseDir(dir: string, opts: VerifyOptions = {}): Promise<{ signer: string; version: string; entries: number }> {
  const bundlePath = path.join(dir, RELEASE_BUNDLE_NAME);
  const manifestPath = path.join(dir, RELEASE_MANIFEST_NAME);
  const text = await readFile(bundlePath, 'utf8').catch(() => undefined);
  if (text === undefined) throw new VerifyError('MISSING_SIGNATURE', `${dir}: the release manifest is not signed (${RELEASE_BUNDLE_NAME} is missing)`);
  let bundle: Bundle;
  try {
    bundle = bundleFromJSON(JSON.parse(text));
  } catch (e) {
    throw new VerifyError('INVALID_BUNDLE', `${bundlePath} is not a valid Sigstore bundle: ${(e as Error).message}`);
  }
  if (bundle.content.$case !== 'dsseEnvelope' || bundle.content.dsseEnvelope.payloadType !== DSSE_PAYLOAD_TYPE) {
    throw new VerifyError('INVALID_BUNDLE', `${bundlePath}: expected a DSSE envelope with an in-toto statement`);
  }
  const signer = await verifySignature(bundle, opts, bundlePath);
  let st: { _type?: string; predicateType?: string; subject?: { name?: string; digest?: { sha256?: string } }[] };
  try {
    st = JSON.parse(Buffer.from(bundle.content.dsseEnvelope.payload).toString('utf8'));
  } catch {
    throw new VerifyError('INVALID_STATEMENT', `${bundlePath}: the signed payload is not JSON`);
  }
  if (st._type !== STATEMENT_TYPE || st.predicateType !== RELEASE_PREDICATE_TYPE) {
    throw new VerifyError('INVALID_STATEMENT', `${bundlePath}: not a release statement (predicateType ${st.predicateType})`);
  }
  const subj = st.subject?.find((s) => s.name === RELEASE_MANIFEST_NAME);
  const bytes = await readFile(manifestPath).catch(() => undefined);
  if (!bytes) throw new VerifyError('MISSING_FILE', `${RELEASE_MANIFEST_NAME} is missing from ${dir}`);
  if (!subj?.digest?.sha256 || subj.digest.sha256 !== sha256(bytes)) {
    throw new VerifyError('TAMPERED_MANIFEST', `${manifestPath}: sha256 ${sha256(bytes)} is not the signed ${subj?.digest?.sha256 ?? '(no subject)'}`);
  }
  const m = JSON.parse(bytes.toString('utf8')) as { version: string; entries: unknown[] };
  return { signer, version: m.version, entries: m.entries.length };
}
