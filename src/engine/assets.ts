// Digests of repo files a stage reads (dracut modules, overlays): they are part
// of the cache key, so editing a module's script rebuilds the initramfs.
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { PACKAGE_ROOT } from './kinds.js';

/** Asset paths with this prefix name files shipped in the pipeline package itself. */
export const PACKAGE_ASSET = 'pipeline:';

/** A package asset's name: relative, so cache keys do not depend on where pipeline is installed. */
export function packageAsset(abs: string): string {
  return PACKAGE_ASSET + path.relative(PACKAGE_ROOT, abs);
}

/** Where an asset resolves: `pipeline:<path>` in the package, anything else next to the spec. */
export async function resolveAsset(name: string, specDir: string): Promise<string | undefined> {
  const abs = name.startsWith(PACKAGE_ASSET) ? path.resolve(PACKAGE_ROOT, name.slice(PACKAGE_ASSET.length)) : path.resolve(specDir, name);
  try {
    await fs.lstat(abs);
    return abs;
  } catch {
    return undefined;
  }
}

/** sha256 over (relative path, type, exec bit, content) of every entry, sorted. */
export async function digestTree(abs: string): Promise<string> {
  const h = createHash('sha256');
  const walk = async (p: string, rel: string) => {
    // The asset itself may be a symlink (followed); links inside it are hashed as links.
    const st = rel ? await fs.lstat(p) : await fs.stat(p);
    if (st.isSymbolicLink()) h.update(`L ${rel} ${await fs.readlink(p)}\n`);
    else if (st.isDirectory()) {
      h.update(`D ${rel}\n`);
      for (const n of (await fs.readdir(p)).sort()) await walk(path.join(p, n), rel ? `${rel}/${n}` : n);
    } else if (st.isFile()) {
      const c = createHash('sha256').update(await fs.readFile(p)).digest('hex');
      h.update(`F ${rel} ${st.mode & 0o111 ? 'x' : '-'} ${c}\n`);
    }
  };
  await walk(abs, '');
  return h.digest('hex');
}

export async function assetDigests(assets: string[], specDir: string): Promise<{ digests: Record<string, string>; missing: string[] }> {
  const digests: Record<string, string> = {};
  const missing: string[] = [];
  await Promise.all(
    assets.map(async (a) => {
      const abs = await resolveAsset(a, specDir);
      if (!abs) missing.push(a);
      else digests[a] = await digestTree(abs);
    }),
  );
  return { digests, missing: missing.sort() };
}
