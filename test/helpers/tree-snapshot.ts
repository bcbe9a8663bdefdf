// What a directory tree looks like to a consumer: type, mode, owner, content hash,
// link target, device number, xattrs (via getfattr) and hard-link groups, per path.
// Used to compare a tree a real tool unpacked or mounted against a reference.
import { lstat, readdir, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { canonicalize } from '../../src/engine/canonical.js';
import { sha256File } from '../../src/lib/digest.js';
import { runProcess } from '../../src/engine/process.js';

export interface NodeSnap {
  type: string;
  mode: string;
  uid: number;
  gid: number;
  size?: number;
  sha256?: string;
  target?: string;
  rdev?: number;
  xattrs: Record<string, string>;
  /** Other paths of the same inode (sorted), for hard links. */
  links?: string[];
}

export type TreeSnap = Map<string, NodeSnap>;

function typeOf(mode: number): string {
  switch (mode & 0o170000) {
    case 0o100000: return 'file';
    case 0o040000: return 'dir';
    case 0o120000: return 'symlink';
    case 0o020000: return 'char';
    case 0o060000: return 'block';
    case 0o010000: return 'fifo';
    case 0o140000: return 'socket';
    default: return 'unknown';
  }
}

/** getfattr's path quoting: \ooo octal escapes. */
const unescapeGetfattr = (s: string) => Buffer.from(s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))), 'latin1').toString('utf8');

async function allXattrs(dir: string): Promise<Map<string, Record<string, string>>> {
  const r = await runProcess('getfattr', ['-R', '-P', '-h', '-d', '-m', '-', '-e', 'hex', '--absolute-names', dir], { capture: true });
  const out = new Map<string, Record<string, string>>();
  let cur: Record<string, string> | undefined;
  for (const line of r.stdout.split('\n')) {
    if (line.startsWith('# file: ')) {
      cur = {};
      out.set(unescapeGetfattr(line.slice(8)), cur);
    } else if (cur && line.includes('=')) {
      const i = line.indexOf('=');
      cur[line.slice(0, i)] = line.slice(i + 1);
    }
  }
  return out;
}

const sortKeys = (o: Record<string, string>) => Object.fromEntries(Object.entries(o).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));

export async function snapshotTree(dir: string, opts: { ignore?: (rel: string) => boolean } = {}): Promise<TreeSnap> {
  const snap: TreeSnap = new Map();
  const inodes = new Map<string, string[]>();
  const xattrs = await allXattrs(dir);
  async function walk(rel: string): Promise<void> {
    const abs = rel ? join(dir, rel) : dir;
    for (const name of (await readdir(abs)).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      if (opts.ignore?.(r)) continue;
      const p = join(dir, r);
      const st = await lstat(p);
      const type = typeOf(st.mode);
      const n: NodeSnap = { type, mode: (st.mode & 0o7777).toString(8), uid: st.uid, gid: st.gid, xattrs: sortKeys(xattrs.get(p) ?? {}) };
      if (type === 'file') {
        n.size = st.size;
        n.sha256 = await sha256File(p);
      }
      if (type === 'symlink') n.target = await readlink(p);
      if (type === 'char' || type === 'block') n.rdev = st.rdev;
      if (type !== 'dir' && st.nlink > 1) {
        const k = `${st.dev}:${st.ino}`;
        inodes.set(k, [...(inodes.get(k) ?? []), r]);
        (n as NodeSnap & { _ino?: string })._ino = k;
      }
      snap.set(r, n);
      if (type === 'dir') await walk(r);
    }
  }
  await walk('');
  for (const n of snap.values()) {
    const k = (n as NodeSnap & { _ino?: string })._ino;
    delete (n as NodeSnap & { _ino?: string })._ino;
    if (k && inodes.get(k)!.length > 1) n.links = [...inodes.get(k)!].sort();
  }
  return snap;
}

/** First differences between two snapshots, readable in an assertion message. */
export function diffSnapshots(actual: TreeSnap, expected: TreeSnap, max = 20): string[] {
  const out: string[] = [];
  for (const [p, e] of expected) {
    const a = actual.get(p);
    if (!a) out.push(`missing: ${p}`);
    else if (canonicalize(a) !== canonicalize(e)) out.push(`differs: ${p}\n  got  ${canonicalize(a)}\n  want ${canonicalize(e)}`);
    if (out.length >= max) return out;
  }
  for (const p of actual.keys()) {
    if (!expected.has(p)) out.push(`unexpected: ${p}`);
    if (out.length >= max) break;
  }
  return out;
}
