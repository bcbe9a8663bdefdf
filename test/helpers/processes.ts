// Looking for processes in /proc by a marker in their command line (tests that
// check nothing is left running).
import { readdirSync, readFileSync } from 'node:fs';

/** Live (non-zombie) processes whose command line contains `needle`, as "pid: cmdline". */
export function processesWith(needle: string): string[] {
  const hits: string[] = [];
  for (const pid of readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ');
      if (!cmd.includes(needle)) continue;
      const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
      if (st.slice(st.lastIndexOf(')') + 2)[0] === 'Z') continue;
      hits.push(`${pid}: ${cmd}`);
    } catch {
      // exited while we looked
    }
  }
  return hits;
}
