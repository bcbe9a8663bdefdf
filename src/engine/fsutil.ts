// Filesystem helpers that must be careful: removing scratch trees that a chroot
// stage may have mounted things into, and publishing directories atomically.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { runProcess } from './process.js';

/** Mount points at or below dir, deepest first. */
export async function mountsUnder(dir: string): Promise<string[]> {
  const abs = path.resolve(dir);
  const text = await fs.readFile('/proc/self/mountinfo', 'utf8').catch(() => '');
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const mp = line.split(' ')[4];
    if (!mp) continue;
    const p = mp.replace(/\\(\d{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    if (p === abs || p.startsWith(abs + '/')) out.push(p);
  }
  return out.sort((a, b) => b.length - a.length);
}

/**
 * rm -rf that never descends into a mount: a stage killed mid-chroot could leave
 * /proc or /dev bind-mounted inside its scratch tree, and deleting through those
 * would destroy host files. Stages use private mount namespaces, so this is a
 * second line of defence.
 */
export async function safeRemove(dir: string): Promise<void> {
  let mounts = await mountsUnder(dir);
  for (const m of mounts) await runProcess('umount', ['-l', m], { capture: true }).catch(() => {});
  mounts = await mountsUnder(dir);
  if (mounts.length) throw new Error(`refusing to delete ${dir}: still mounted: ${mounts.join(', ')}`);
  await fs.rm(dir, { recursive: true, force: true, maxRetries: 3 });
}

/** A path component that cannot escape its parent directory. */
export function assertSafeComponent(name: string, what: string): void {
  if (!name || name === '.' || name === '..' || name.includes('/') || name.includes('\0')) {
    throw new Error(`invalid ${what} "${name}": it must be a single path component`);
  }
}

/** Resolve rel under base and refuse anything that escapes base. */
export function within(base: string, rel: string): string {
  const abs = path.resolve(base, rel);
  const b = path.resolve(base);
  if (abs !== b && !abs.startsWith(b + path.sep)) throw new Error(`path ${rel} escapes ${base}`);
  return abs;
}
