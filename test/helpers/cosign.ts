// Find cosign, or fetch Debian's static `cosign` binary into a cache dir.
//
// How it is fetched (CI can do the same by hand):
//   a throwaway apt config (own sources.list, lists dir, cache dir, empty status file) pointing
//   at `deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian
//   <suite> main`; `apt-get update`; `apt-get download cosign/<suite>`; `dpkg -x` the .deb and
//   keep usr/bin/cosign. The system's apt configuration and state are not touched.
// Order: $COSIGN (path) > cached binary > `cosign` on PATH > fetch. Suite: $COSIGN_SUITE or trixie.
import { execFile } from 'node:child_process';
import { access, constants, mkdir, mkdtemp, readdir, rename, rm, writeFile, readFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export const COSIGN_CACHE_DIR = process.env.PIPELINE_TEST_CACHE
  ? path.join(process.env.PIPELINE_TEST_CACHE, 'cosign')
  : '/var/cache/pipeline-test/cosign';

async function executable(p: string): Promise<boolean> {
  try {
    await access(p, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

async function onPath(name: string): Promise<string | undefined> {
  for (const d of (process.env.PATH ?? '').split(':')) {
    if (d && (await executable(path.join(d, name)))) return path.join(d, name);
  }
  return undefined;
}

export interface CosignInfo {
  path: string;
  /** Where it came from, e.g. "debian trixie cosign 2.5.0-2+b5" or "PATH". */
  origin: string;
}

export async function findOrFetchCosign(cacheDir = COSIGN_CACHE_DIR): Promise<CosignInfo> {
  if (process.env.COSIGN) return { path: process.env.COSIGN, origin: '$COSIGN' };
  const cached = path.join(cacheDir, 'cosign');
  if (await executable(cached)) {
    const origin = await readFile(path.join(cacheDir, 'ORIGIN'), 'utf8').catch(() => 'cache');
    return { path: cached, origin: origin.trim() };
  }
  const found = await onPath('cosign');
  if (found) return { path: found, origin: 'PATH' };
  return fetchCosign(cacheDir, process.env.COSIGN_SUITE ?? 'trixie');
}

async function fetchCosign(cacheDir: string, suite: string): Promise<CosignInfo> {
  return fetchDebianBinary('cosign', 'usr/bin/cosign', cacheDir, suite);
}

/**
 * Fetch one binary from a Debian package of `suite` into cacheDir/<basename> with a
 * throwaway apt config (see the header); ORIGIN records the package version.
 */
export async function fetchDebianBinary(pkg: string, binInDeb: string, cacheDir: string, suite: string): Promise<CosignInfo> {
  const name = path.basename(binInDeb);
  await mkdir(cacheDir, { recursive: true });
  const tmp = await mkdtemp(path.join(cacheDir, '.fetch-'));
  try {
    for (const d of ['lists/partial', 'cache/archives/partial', 'sources.list.d', 'x']) {
      await mkdir(path.join(tmp, d), { recursive: true });
    }
    const sources = path.join(tmp, 'sources.list');
    await writeFile(
      sources,
      `deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian ${suite} main\n`,
    );
    await writeFile(path.join(tmp, 'status'), '');
    const aptOpts = [
      '-o', `Dir::Etc::SourceList=${sources}`,
      '-o', `Dir::Etc::SourceParts=${path.join(tmp, 'sources.list.d')}`,
      '-o', `Dir::State::Lists=${path.join(tmp, 'lists')}`,
      '-o', `Dir::State::Status=${path.join(tmp, 'status')}`,
      '-o', `Dir::Cache=${path.join(tmp, 'cache')}`,
      '-o', 'APT::Sandbox::User=root', // files live in a root-only temp dir
      '-q',
    ];
    await run('apt-get', [...aptOpts, 'update'], { cwd: tmp });
    await run('apt-get', [...aptOpts, 'download', `${pkg}/${suite}`], { cwd: tmp });
    const deb = (await readdir(tmp)).find((f) => f.startsWith(`${pkg}_`) && f.endsWith('.deb'));
    if (!deb) throw new Error(`apt-get download ${pkg}/${suite} produced no .deb`);
    const { stdout: version } = await run('dpkg-deb', ['-f', path.join(tmp, deb), 'Version']);
    await run('dpkg', ['-x', path.join(tmp, deb), path.join(tmp, 'x')]);
    const origin = `debian ${suite} ${pkg} ${version.trim()} (${deb})`;
    await writeFile(path.join(cacheDir, 'ORIGIN'), origin + '\n');
    // rename is atomic: a concurrent test never sees a half-copied binary.
    await rename(path.join(tmp, 'x', binInDeb), path.join(cacheDir, name));
    return { path: path.join(cacheDir, name), origin };
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`could not fetch ${pkg} from Debian ${suite}: ${e.message}${e.stderr ? `\n${e.stderr}` : ''}`);
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}
