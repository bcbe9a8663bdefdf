// Debian control-file (deb822) paragraphs: dpkg's status file, apt's Packages
// indices. Shared by the rootfs stage, dracut (versions in the target tree) and the lock.
/** Split a deb822 file (dpkg status, apt Packages) into field maps. */
export function parseDeb822(text: string): Array<Record<string, string>> {
  const out: Array<Record<string, string>> = [];
  for (const para of text.split(/\n\s*\n/)) {
    const rec: Record<string, string> = {};
    let last = '';
    for (const line of para.split('\n')) {
      if (!line) continue;
      if (/^[ \t]/.test(line)) {
        if (last) rec[last] += '\n' + line.trim();
        continue;
      }
      const i = line.indexOf(':');
      if (i <= 0) continue;
      last = line.slice(0, i);
      rec[last] = line.slice(i + 1).trim();
    }
    if (Object.keys(rec).length) out.push(rec);
  }
  return out;
}
