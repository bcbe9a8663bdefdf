// A flat apt repository ("deb [trusted=yes] copy:/dir ./") holding exactly the
// .debs a lock section names, copied out of the store and hashed on the way: a
// byte changed in the store is caught here, before anything is installed.
// The Packages index is written from each .deb's own control paragraph (what
// apt-ftparchive does), with the mirror's Priority from the lock so that
// priority-based variants select the same set; no extra host tool is needed.
import { createHash } from 'node:crypto';
import { sha256File } from '../lib/digest.js';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Cache } from '../engine/cache.js';
import type { RunContext } from '../stage.js';
import { StageError } from '../stage.js';
import type { LockedDeb, LockSection } from './format.js';

/** One Packages stanza: the control paragraph, Priority from the lock, and where/what the file is. */
export function packagesStanza(control: string, d: LockedDeb, file: string): string {
  const lines = control.replace(/\n+$/, '').split('\n');
  const out = lines.filter((l) => !/^(Priority|Filename|Size|SHA256|MD5sum):/i.test(l));
  // The paragraph's first line is Package:; keep apt-ftparchive's field order loosely (Priority after Package/Version lines is fine for apt).
  if (d.priority !== '-') out.push(`Priority: ${d.priority}`);
  out.push(`Filename: ${file}`, `Size: ${d.size}`, `SHA256: ${d.sha256}`);
  return out.join('\n') + '\n';
}

export function releaseFile(s: LockSection, packages: Buffer): string {
  const arches = [...new Set([s.arch, ...s.debs.map((d) => d.arch)])].sort().join(' ');
  return [
    `Suite: ${s.suite}`,
    `Codename: ${s.suite}`,
    `Date: ${s.inRelease.date}`,
    `Architectures: ${arches}`,
    'SHA256:',
    ` ${createHash('sha256').update(packages).digest('hex')} ${packages.length} Packages`,
    '',
  ].join('\n');
}

/**
 * Copy the section's .debs from the store into dir, verifying each, and write
 * Packages and Release. Returns the sources line mmdebstrap takes as its mirror.
 */
export async function makeFlatRepo(ctx: Pick<RunContext<unknown>, 'exec'>, cache: Pick<Cache, 'debPath'>, s: LockSection, dir: string): Promise<string> {
  await fs.mkdir(dir, { recursive: true });
  const files: string[] = [];
  for (const d of s.debs) {
    const src = cache.debPath(d.sha256);
    const dst = path.join(dir, `${d.sha256}.deb`);
    const found = await sha256File(src).catch(() => {
      throw new StageError(`${d.name} ${d.version} (${d.arch}) is not in the .deb store (${src})`);
    });
    if (found !== d.sha256) {
      throw new StageError(`${d.name} ${d.version} (${d.arch}): .deb sha256 mismatch in the .deb store (${src})\n  lock:  ${d.sha256}\n  found: ${found}\nnothing was installed; remove the file and run \`pipeline fetch\``);
    }
    // A hardlink (the store is on the same file system): apt checks each file
    // against the SHA256 in our Packages again when it copies it into the chroot.
    await fs.link(src, dst).catch(() => fs.copyFile(src, dst));
    files.push(dst);
  }
  // Every control paragraph in one run: a constant script, the file names as arguments.
  const out = (await ctx.exec('sh', ['-c', 'for f in "$@"; do dpkg-deb --field "$f" || exit 1; printf "\\0"; done', 'sh', ...files], { capture: true })).stdout;
  const controls = out.split('\0').slice(0, files.length);
  if (controls.length !== files.length) throw new StageError(`dpkg-deb printed ${controls.length} control paragraphs for ${files.length} .debs`);
  const stanzas = s.debs.map((d, i) => packagesStanza(controls[i]!, d, `./${d.sha256}.deb`));
  const packages = Buffer.from(stanzas.join('\n'));
  await fs.writeFile(path.join(dir, 'Packages'), packages);
  await fs.writeFile(path.join(dir, 'Release'), releaseFile(s, packages));
  // copy:// (not file://): apt copies each .deb into the chroot's archive cache, which mmdebstrap cleans.
  return `deb [trusted=yes] copy://${dir} ./`;
}
