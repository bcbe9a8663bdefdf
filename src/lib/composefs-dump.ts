// composefs-dump(5): the text tree description `mkcomposefs --from-file` turns
// into an EROFS image. Pure: no I/O here; the caller supplies file digests and
// the bytes of small (inlined) files.
import type { FsTree, Inode } from './tarfs.js';
import { modeWithType } from './tarfs.js';

/** Files up to this size are inlined in the image; bigger ones go to the object store. */
export const MAX_INLINE = 64;

const HEX = '0123456789abcdef';

/**
 * Escape bytes for a dump field: anything outside printable ASCII, space, the
 * backslash and (in xattr fields) '=' become \xHH.
 */
export function escapeBytes(b: Uint8Array, xattr = false): string {
  let s = '';
  for (const c of b) {
    if (c < 0x21 || c > 0x7e || c === 0x5c || (xattr && c === 0x3d)) s += '\\x' + HEX[c >> 4] + HEX[c & 15];
    else s += String.fromCharCode(c);
  }
  return s;
}

/** An optional field: empty is "-", and a literal "-" is escaped so it is not read as empty. */
export function optionalField(b: Uint8Array): string {
  if (b.length === 0) return '-';
  if (b.length === 1 && b[0] === 0x2d) return '\\x2d';
  return escapeBytes(b);
}

const latin1 = (s: string) => Buffer.from(s, 'latin1');

/** glibc makedev(): the st_rdev value for a device number. */
export function makedev(major: number, minor: number): bigint {
  const ma = BigInt(major);
  const mi = BigInt(minor);
  return ((ma & 0xfffn) << 8n) | ((ma & ~0xfffn) << 32n) | (mi & 0xffn) | ((mi & ~0xffn) << 12n);
}

/** Object store path of a digest: xx/<rest>. */
export const objectPath = (digestHex: string): string => `${digestHex.slice(0, 2)}/${digestHex.slice(2)}`;

export interface DumpInputs {
  /** fs-verity digest (hex) of every regular file bigger than MAX_INLINE. */
  digests: Map<Inode, string>;
  /** Content of every non-empty regular file of at most MAX_INLINE bytes. */
  inline: Map<Inode, Buffer>;
  /** Every mtime in the image. */
  mtime: number;
}

/**
 * One dump line per path in bytewise order (parents first), root included. The
 * first path of a hard-link group describes the inode; later ones are "@" links
 * to it. Directory nlink is 2 + subdirectories, as on a real filesystem.
 */
export function* dumpLines(tree: FsTree, d: DumpInputs): Generator<string> {
  const paths = tree.paths();
  const links = tree.linkCounts();
  const subdirs = new Map<string, number>();
  for (const p of paths) {
    if (p !== '' && tree.get(p)!.type === 'dir') {
      const parent = p.includes('/') ? p.slice(0, p.lastIndexOf('/')) : '';
      subdirs.set(parent, (subdirs.get(parent) ?? 0) + 1);
    }
  }
  const first = new Map<Inode, string>();
  for (const p of paths) {
    const n = tree.get(p)!;
    const abs = '/' + p;
    let size = 0;
    let payload = '-';
    let content = '-';
    let digest = '-';
    const nlink = n.type === 'dir' ? 2 + (subdirs.get(p) ?? 0) : links.get(n)!;
    const target = first.get(n);
    if (n.type === 'file') {
      size = n.size;
      const dg = d.digests.get(n);
      if (size > MAX_INLINE) {
        if (!dg) throw new Error(`composefs dump: no digest for ${abs}`);
        payload = objectPath(dg);
        digest = dg;
      } else if (size > 0) {
        const data = d.inline.get(n);
        if (!data || data.length !== size) throw new Error(`composefs dump: no inline content for ${abs}`);
        content = optionalField(data);
      }
    } else if (n.type === 'symlink') {
      const t = latin1(n.target!);
      size = t.length;
      payload = optionalField(t);
    }
    let mode = modeWithType(n).toString(8);
    if (target !== undefined) {
      mode = '@' + mode;
      payload = optionalField(latin1('/' + target));
    } else if (n.type !== 'dir') {
      first.set(n, p);
    }
    const rdev = n.type === 'char' || n.type === 'block' ? makedev(n.devmajor, n.devminor) : 0n;
    const fields = [optionalField(latin1(abs)), String(size), mode, String(nlink), String(n.uid), String(n.gid), rdev.toString(), `${d.mtime}.0`, payload, content, digest];
    for (const k of [...n.xattrs.keys()].sort()) {
      fields.push(`${escapeBytes(Buffer.from(k, 'utf8'), true)}=${escapeBytes(n.xattrs.get(k)!, true)}`);
    }
    yield fields.join(' ') + '\n';
  }
}
