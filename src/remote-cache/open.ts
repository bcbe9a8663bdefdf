// The CLI's way in: a remote cache URL and flags -> a configured store. Loaded
// lazily, so a build without a remote cache never loads registry or signing code.
import { existsSync } from 'node:fs';
import path from 'node:path';
import { UsageError } from '../engine/errors.js';
import { parseRemoteCacheUrl } from './entry.js';
import { RegistryRemoteStore, type EntryTrust, type RemoteCacheMode } from './store.js';

export interface OpenOptions {
  mode: RemoteCacheMode;
  /** Public key (PEM): only entries signed with it are used. */
  verifyKey?: string;
  /** --sign value (key file or keyless); else $PIPELINE_SIGNING_KEY. Pushed entries are signed with it. */
  sign?: string;
  warn: (msg: string) => void;
  env?: NodeJS.ProcessEnv;
}

function ms(env: NodeJS.ProcessEnv, name: string): number | undefined {
  const v = env[name];
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n <= 0) throw new UsageError(`${name} must be a positive number of seconds, got "${v}"`);
  return Math.round(n * 1000);
}

export async function openRemoteCache(url: string, o: OpenOptions): Promise<RegistryRemoteStore> {
  const env = o.env ?? process.env;
  const location = parseRemoteCacheUrl(url);
  let trust: EntryTrust | undefined;
  if (o.verifyKey && !existsSync(o.verifyKey)) throw new UsageError(`--remote-cache-verify-key: no such file ${o.verifyKey}`);
  const signFlag = o.mode === 'readwrite' ? (o.sign ?? env.PIPELINE_SIGNING_KEY) : undefined;
  if (o.verifyKey || signFlag) {
    const { entryTrust } = await import('./sign.js');
    const { resolveSigningKey, signOptionsFromRef } = await import('../signing/signing.js');
    const ref = signFlag ? resolveSigningKey(o.sign, undefined, env) : undefined;
    if (ref?.kind === 'file' && !existsSync(ref.path)) throw new UsageError(`signing key not found: ${ref.path}`);
    trust = entryTrust({ sign: ref && signOptionsFromRef(ref), verifyKeyPath: o.verifyKey && path.resolve(o.verifyKey) });
  }
  return new RegistryRemoteStore(location, {
    mode: o.mode,
    warn: o.warn,
    trust,
    // Lookups are small: a registry that does not answer one in this time is treated as down.
    timeoutMs: ms(env, 'PIPELINE_REMOTE_CACHE_TIMEOUT'),
    transferTimeoutMs: ms(env, 'PIPELINE_REMOTE_CACHE_TRANSFER_TIMEOUT'),
    chunkSize: chunkSize(env.PIPELINE_REMOTE_CACHE_CHUNK_SIZE),
  });
}

/** Upload chunk size in bytes (default: the registry client's, 16 MiB). */
function chunkSize(v: string | undefined): number | undefined {
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new UsageError(`PIPELINE_REMOTE_CACHE_CHUNK_SIZE must be a whole number of bytes, got "${v}"`);
  return n;
}
