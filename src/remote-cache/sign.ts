// Optional trust for remote cache entries, on top of the digests: a Sigstore
// bundle (DSSE, in-toto statement) whose one subject is the entry's tag with the
// sha256 of its record, signed with the same offline key or keyless identity as
// provenance (src/signing/). The record names every file's sha256, so signing its
// digest covers the whole entry.
import { bundleFromJSON } from '@sigstore/bundle';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { sha256 } from '../engine/canonical.js';
import { DSSE_PAYLOAD_TYPE, STATEMENT_TYPE } from '../engine/provenance.js';
import type { ArtifactFile, RemoteManifest } from '../registry/artifact.js';
import { signStatement, type SignOptions } from '../signing/signing.js';
import { verifySignature } from '../signing/verify.js';
import { BUNDLE_MEDIA_TYPE, TITLE } from './entry.js';
import type { EntryTrust } from './store.js';

export const BUNDLE_TITLE = 'pipeline-cache-record.sigstore.json';
export const CACHE_PREDICATE_TYPE = 'https://pipeline.invalid/cache-entry/v1';

/** The statement signed for an entry (pure; fixed key order). */
export function entryStatement(tag: string, record: Buffer): Buffer {
  return Buffer.from(JSON.stringify({ _type: STATEMENT_TYPE, subject: [{ name: tag, digest: { sha256: sha256(record) } }], predicateType: CACHE_PREDICATE_TYPE, predicate: {} }));
}

export function entryTrust(opts: { sign?: SignOptions; verifyKeyPath?: string }): EntryTrust {
  const trust: EntryTrust = {};
  if (opts.sign) {
    const so = opts.sign;
    trust.sign = async (tag, record, dir): Promise<ArtifactFile[]> => {
      const bundle = Buffer.from(JSON.stringify(await signStatement(entryStatement(tag, record), so)));
      const p = path.join(dir, BUNDLE_TITLE);
      await fs.writeFile(p, bundle);
      return [{ path: p, name: BUNDLE_TITLE, mediaType: BUNDLE_MEDIA_TYPE, sha256: sha256(bundle), size: bundle.length }];
    };
  }
  if (opts.verifyKeyPath) {
    const pub = opts.verifyKeyPath;
    trust.check = async (tag: string, record: Buffer, m: RemoteManifest, fetchLayer: (digest: string) => Promise<Buffer>) => {
      const l = (m.json.layers ?? []).find((x) => x.mediaType === BUNDLE_MEDIA_TYPE && x.annotations?.[TITLE] === BUNDLE_TITLE);
      if (!l) return 'the entry is not signed, and --remote-cache-verify-key requires a signature';
      const bundle = bundleFromJSON(JSON.parse((await fetchLayer(l.digest)).toString('utf8')));
      if (bundle.content.$case !== 'dsseEnvelope' || bundle.content.dsseEnvelope.payloadType !== DSSE_PAYLOAD_TYPE) return 'the signature bundle is not a DSSE in-toto envelope';
      try {
        await verifySignature(bundle, { publicKeyPath: pub }, `signature of ${tag}`);
      } catch (e) {
        return (e as Error).message;
      }
      // The signature holds; it must be over this very record.
      if (!Buffer.from(bundle.content.dsseEnvelope.payload).equals(entryStatement(tag, record))) return 'the signature is valid but covers another entry or record';
      return undefined;
    };
  }
  return trust;
}
