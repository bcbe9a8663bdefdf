// Signing as a build sees it: a callback that signs a published image directory.
// The CLI builds it and hands it to the engine, so the engine never references
// signing. This module stays light: the sigstore libraries (signing.ts) load only
// when a build really signs — they cost more start-up time than a whole cached
// no-op build.
import { existsSync } from 'node:fs';
import path from 'node:path';
import { UsageError } from '../engine/errors.js';
import type { LoadedSpec } from '../engine/spec.js';

export const SIGNING_KEY_ENV = 'PIPELINE_SIGNING_KEY';

export type ImageSigner = (dir: string) => Promise<void>;

/**
 * The signer for a build: --sign value (a key file or `keyless`), else
 * $PIPELINE_SIGNING_KEY, else the spec's signing.key; undefined when none is set.
 * The key is resolved (and a missing key file reported) now, before any stage runs.
 */
export async function imageSigner(flag: string | undefined, loaded: LoadedSpec, env: NodeJS.ProcessEnv = process.env): Promise<ImageSigner | undefined> {
  if (!(flag || env[SIGNING_KEY_ENV] || loaded.spec.signing?.key)) return undefined;
  const { resolveSigningKey, signImageDir, signOptionsFromRef } = await import('./signing.js');
  const keyRef = resolveSigningKey(flag, loaded.spec.signing?.key, env, loaded.dir);
  if (keyRef?.kind === 'file' && !existsSync(keyRef.path)) throw new UsageError(`signing key not found: ${keyRef.path} (create one with \`pipeline keygen --out ${path.dirname(keyRef.path)}\`)`);
  return keyRef ? (dir: string) => signImageDir(dir, signOptionsFromRef(keyRef)) : undefined;
}
