// Find the `oras` CLI, or fetch Debian trixie's `oras` package into the test cache
// (dpkg -x; the Go binary needs glibc >= 2.34, which bookworm has), the same way
// cosign.ts fetches cosign. Order: $ORAS (path) > cached binary > PATH > fetch.
import { access, constants, readFile } from 'node:fs/promises';
import path from 'node:path';
import { fetchDebianBinary, type CosignInfo } from './cosign.js';

export const ORAS_CACHE_DIR = process.env.PIPELINE_TEST_CACHE ? path.join(process.env.PIPELINE_TEST_CACHE, 'oras') : '/var/cache/pipeline-test/oras';

const executable = (p: string) => access(p, constants.X_OK).then(() => true, () => false);

export async function findOrFetchOras(cacheDir = ORAS_CACHE_DIR): Promise<CosignInfo> {
  if (process.env.ORAS) return { path: process.env.ORAS, origin: '$ORAS' };
  const cached = path.join(cacheDir, 'oras');
  if (await executable(cached)) return { path: cached, origin: (await readFile(path.join(cacheDir, 'ORIGIN'), 'utf8').catch(() => 'cache')).trim() };
  for (const d of (process.env.PATH ?? '').split(':')) if (d && (await executable(path.join(d, 'oras')))) return { path: path.join(d, 'oras'), origin: 'PATH' };
  return fetchDebianBinary('oras', 'usr/bin/oras', cacheDir, process.env.ORAS_SUITE ?? 'trixie');
}
