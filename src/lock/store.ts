// The .deb store: every .deb a lock names, filed by sha256 under the cache
// (Cache.debPath). Filled from the mirror by `pipeline fetch` or by a locked
// build; every byte is checked against the lock's sha256 before it is kept or used.
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, promises as fs } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline as pipe } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import pLimit from 'p-limit';
import { ownedName, writeAtomic, type Cache } from '../engine/cache.js';
import { BuildError } from '../engine/errors.js';
import { sha256File } from '../lib/digest.js';
import { parseLock, type LockedDeb, type LockSection } from './format.js';

/** Register a lock so `cache gc` keeps its .debs. */
export async function registerLock(cache: Cache, lockFile: string): Promise<void> {
  const p = cache.debRootPath(lockFile);
  await fs.mkdir(path.dirname(p), { recursive: true });
  await fs.mkdir(path.join(cache.root, 'tmp'), { recursive: true });
  await writeAtomic(p, path.resolve(lockFile) + '\n', path.join(cache.root, 'tmp'), { durable: false });
}

/**
 * The .debs `cache gc` keeps: every one a registered lock names. A root whose
 * lock file is gone is dropped; a lock that no longer parses makes this
 * undefined (gc then deletes no .deb: never on a guess).
 */
export async function debsToKeep(cache: Cache): Promise<Set<string> | undefined> {
  const rootsDir = path.dirname(cache.debRootPath('/'));
  const keep = new Set<string>();
  for (const r of await fs.readdir(rootsDir).catch(() => [] as string[])) {
    const lockFile = (await fs.readFile(path.join(rootsDir, r), 'utf8').catch(() => '')).trim();
    const text = lockFile ? await fs.readFile(lockFile, 'utf8').catch(() => undefined) : undefined;
    if (text === undefined) {
      await fs.rm(path.join(rootsDir, r), { force: true });
      continue;
    }
    try {
      for (const s of parseLock(text, lockFile).sections) for (const d of s.debs) keep.add(d.sha256);
    } catch {
      return undefined;
    }
  }
  return keep;
}

/** Locked .debs the store does not hold. */
export async function missingDebs(cache: Cache, debs: LockedDeb[]): Promise<LockedDeb[]> {
  const have = await Promise.all(debs.map((d) => fs.access(cache.debPath(d.sha256)).then(() => true, () => false)));
  return debs.filter((_, i) => !have[i]);
}

/** The error for a .deb whose bytes are not the ones the lock names (exit 1). */
export function mismatchError(d: LockedDeb, found: string, where: string): BuildError {
  return new BuildError(`${d.name} ${d.version} (${d.arch}): .deb sha256 mismatch in ${where}\n  lock:  ${d.sha256}\n  found: ${found}`);
}

/** Every stored .deb hashes to what the lock names; the first one that does not is an error naming both digests. */
export async function verifyStored(cache: Cache, debs: LockedDeb[]): Promise<void> {
  const limit = pLimit(4);
  const bad = await Promise.all(debs.map((d) => limit(async () => ((await sha256File(cache.debPath(d.sha256))) === d.sha256 ? undefined : d))));
  for (const d of bad) {
    if (!d) continue;
    const found = await sha256File(cache.debPath(d.sha256));
    throw new BuildError(
      `${mismatchError(d, found, `the .deb store (${cache.debPath(d.sha256)})`).message}\n  the file was changed after it was stored; remove it and run \`pipeline fetch\``,
    );
  }
}

/** Stream url to file, hashing on the way; returns the sha256 and size. */
async function download(url: string, file: string, signal?: AbortSignal): Promise<{ sha256: string; size: number }> {
  const h = createHash('sha256');
  let size = 0;
  let src: Readable;
  if (url.startsWith('file://')) src = createReadStream(fileURLToPath(url));
  else {
    const res = await fetch(url, { signal });
    if (!res.ok || !res.body) throw new BuildError(`GET ${url}: HTTP ${res.status}`);
    src = Readable.fromWeb(res.body as never);
  }
  src.on('data', (c: Buffer) => {
    h.update(c);
    size += c.length;
  });
  await pipe(src, createWriteStream(file, { mode: 0o444 }), { signal });
  return { sha256: h.digest('hex'), size };
}

/**
 * Download the .debs the store lacks from each section's mirror. A .deb whose
 * sha256 differs from the lock is refused (exit 1, both digests named); one the
 * mirror no longer serves is reported with the others at the end.
 */
export async function fetchDebs(cache: Cache, sections: LockSection[], opts: { signal?: AbortSignal; onFetched?: (d: LockedDeb) => void } = {}): Promise<{ fetched: number; bytes: number }> {
  await fs.mkdir(path.dirname(cache.debPath('0'.repeat(64))), { recursive: true });
  await fs.mkdir(path.join(cache.root, 'tmp'), { recursive: true });
  const want = new Map<string, { d: LockedDeb; mirror: string }>();
  for (const s of sections) for (const d of s.debs) if (!want.has(d.sha256)) want.set(d.sha256, { d, mirror: s.mirror });
  const missing = await missingDebs(cache, [...want.values()].map((w) => w.d));
  const limit = pLimit(4);
  const failed: string[] = [];
  let bytes = 0;
  await Promise.all(
    missing.map((d) =>
      limit(async () => {
        const url = `${want.get(d.sha256)!.mirror.replace(/\/+$/, '')}/${d.path}`;
        const tmp = path.join(cache.root, 'tmp', ownedName('deb'));
        try {
          const got = await download(url, tmp, opts.signal).catch((e: Error) => {
            failed.push(`${d.name} ${d.version} (${d.arch}): ${e instanceof BuildError ? e.message : `GET ${url}: ${e.message}`}`);
            return undefined;
          });
          if (!got) return;
          if (got.sha256 !== d.sha256) throw mismatchError(d, got.sha256, `the download from ${url}`);
          await fs.rename(tmp, cache.debPath(d.sha256));
          bytes += got.size;
          opts.onFetched?.(d);
        } finally {
          await fs.rm(tmp, { force: true });
        }
      }),
    ),
  );
  if (failed.length) throw new BuildError(`the mirror did not serve ${failed.length} locked .deb${failed.length > 1 ? 's' : ''}:\n  ${failed.join('\n  ')}`);
  return { fetched: missing.length, bytes };
}
