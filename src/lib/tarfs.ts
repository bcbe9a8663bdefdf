// A rootfs tarball as an in-memory tree of inodes, read without extraction (no
// root needed), and a byte-exact, deterministic tar writer for OCI layers.
//
// Why not tar-stream: its extractor decodes every PAX value as UTF-8 and its
// packer encodes them the same way, so a binary xattr such as security.capability
// (GNU tar writes it raw under SCHILY.xattr.*) comes out as U+FFFD garbage in both
// directions, and the packer turns mode 0 into 0644. This codec keeps PAX values,
// file names and link targets as raw bytes end to end.
//
// Paths inside this module are "byte strings": every byte of the name is one
// latin1 char, so they round-trip exactly and `<` on them is bytewise order.
// They never start with "/" or "./"; the root is "".
import { open, type FileHandle } from 'node:fs/promises';

export type NodeType = 'file' | 'dir' | 'symlink' | 'char' | 'block' | 'fifo';

/** Where a regular file's bytes come from. */
export type Content =
  | { kind: 'tar'; offset: number }
  | { kind: 'bytes'; data: Buffer }
  | { kind: 'path'; path: string };

export interface Inode {
  type: NodeType;
  /** Permission bits including setuid/setgid/sticky (07777). */
  mode: number;
  uid: number;
  gid: number;
  /** Regular files only. */
  size: number;
  content?: Content;
  /** Symlink target (byte string). */
  target?: string;
  devmajor: number;
  devminor: number;
  /** xattr name -> raw value. */
  xattrs: Map<string, Buffer>;
}

/** One member of a tar archive after PAX/GNU extensions are applied. */
export interface TarEntry {
  path: string;
  type: NodeType | 'hardlink';
  mode: number;
  uid: number;
  gid: number;
  size: number;
  /** Byte offset of the member's data in the archive. */
  offset: number;
  linkname: string;
  devmajor: number;
  devminor: number;
  xattrs: Map<string, Buffer>;
}

export class TarError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TarError';
  }
}

/** A byte-string path as people read it (UTF-8 where it is valid). */
export function showPath(p: string): string {
  return '/' + Buffer.from(p, 'latin1').toString('utf8');
}

// ---------------------------------------------------------------- header codec

const BLOCK = 512;
const S_IFMT: Record<NodeType, number> = { file: 0o100000, dir: 0o040000, symlink: 0o120000, char: 0o020000, block: 0o060000, fifo: 0o010000 };
export const modeWithType = (n: { type: NodeType; mode: number }): number => S_IFMT[n.type] | (n.mode & 0o7777);

function cstr(buf: Buffer, off: number, len: number): string {
  const end = buf.indexOf(0, off);
  return buf.toString('latin1', off, end === -1 || end > off + len ? off + len : end);
}

/** Octal (NUL/space padded) or GNU base-256 numeric field. */
export function parseNumber(buf: Buffer, off: number, len: number): number {
  if (buf[off]! & 0x80) {
    if (buf[off] === 0xff) throw new TarError('negative numeric field in tar header');
    let v = buf[off]! & 0x7f;
    for (let i = 1; i < len; i++) v = v * 256 + buf[off + i]!;
    return v;
  }
  const s = buf.toString('latin1', off, off + len).replace(/[\0 ]+$/, '').replace(/^[ \0]+/, '');
  if (s === '') return 0;
  if (!/^[0-7]+$/.test(s)) throw new TarError(`bad octal field "${s}" in tar header`);
  return parseInt(s, 8);
}

function checksumOk(h: Buffer): boolean {
  const stored = parseNumber(h, 148, 8);
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const b = i >= 148 && i < 156 ? 0x20 : h[i]!;
    unsigned += b;
    signed += b > 127 ? b - 256 : b;
  }
  return stored === unsigned || stored === signed;
}

/** PAX extended header records; values stay raw bytes. */
export function parsePax(data: Buffer): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  let pos = 0;
  while (pos < data.length) {
    if (data[pos] === 0) break; // trailing padding
    const sp = data.indexOf(0x20, pos);
    if (sp === -1) throw new TarError('malformed PAX record (no length)');
    const len = Number(data.toString('latin1', pos, sp));
    if (!Number.isInteger(len) || len <= sp - pos + 1 || pos + len > data.length || data[pos + len - 1] !== 0x0a) {
      throw new TarError('malformed PAX record (bad length)');
    }
    const rec = data.subarray(sp + 1, pos + len - 1);
    const eq = rec.indexOf(0x3d);
    if (eq <= 0) throw new TarError('malformed PAX record (no key)');
    out.set(rec.toString('utf8', 0, eq), Buffer.from(rec.subarray(eq + 1)));
    pos += len;
  }
  return out;
}

/** One PAX record "<len> <key>=<value>\n", where len counts itself. */
export function paxRecord(key: string, value: Buffer): Buffer {
  const body = Buffer.concat([Buffer.from(' ' + key + '=', 'utf8'), value, Buffer.from('\n')]);
  let len = body.length + 1;
  while (String(len).length + body.length !== len) len = String(len).length + body.length;
  return Buffer.concat([Buffer.from(String(len), 'latin1'), body]);
}

const TYPES: Record<string, NodeType | 'hardlink'> = {
  '0': 'file',
  '\0': 'file',
  '7': 'file', // contiguous file: POSIX says read it as a regular file
  '1': 'hardlink',
  '2': 'symlink',
  '3': 'char',
  '4': 'block',
  '5': 'dir',
  '6': 'fifo',
};

const TYPE_NAMES: Record<string, string> = {
  S: 'GNU sparse file',
  V: 'volume label',
  M: 'multi-volume continuation',
  D: 'GNU dumpdir',
  N: 'GNU long-name (old)',
  A: 'Solaris ACL',
  E: 'Solaris extended attributes',
  I: 'inode metadata',
  X: 'Solaris extended header',
};

const SUPPORTED = 'OCI layers and composefs images carry only regular files, directories, symlinks, hard links, devices and FIFOs';

function typeName(flag: string): string {
  return TYPE_NAMES[flag] ?? `type '${flag.replace(/[^\x20-\x7e]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`)}'`;
}

/** Normalize a tar member name: drop "./" and "/" prefixes and the trailing "/"; refuse "..". */
export function normalizePath(raw: string): string {
  const parts = raw.split('/').filter((c) => c !== '' && c !== '.');
  if (parts.includes('..')) throw new TarError(`tar member ${JSON.stringify(raw)} escapes the root ("..")`);
  return parts.join('/');
}

const XATTR_PREFIX = 'SCHILY.xattr.';
const LIBARCHIVE_XATTR = 'LIBARCHIVE.xattr.';

function isZeroBlock(b: Buffer): boolean {
  for (let i = 0; i < BLOCK; i++) if (b[i] !== 0) return false;
  return true;
}

async function readExact(fh: FileHandle, len: number, pos: number): Promise<Buffer> {
  const buf = Buffer.alloc(len);
  let got = 0;
  while (got < len) {
    const { bytesRead } = await fh.read(buf, got, len - got, pos + got);
    if (bytesRead === 0) throw new TarError(`tar archive is truncated (wanted ${len} bytes at offset ${pos})`);
    got += bytesRead;
  }
  return buf;
}

/**
 * Every member of an uncompressed tar archive, in archive order, with PAX (local
 * and global) and GNU long-name extensions applied. Only headers are read; data is
 * located by offset. Member types an OCI layer cannot carry are refused by name.
 */
export async function readTarEntries(file: string): Promise<TarEntry[]> {
  const fh = await open(file, 'r');
  try {
    const { size: fileSize } = await fh.stat();
    const out: TarEntry[] = [];
    let pos = 0;
    let global = new Map<string, Buffer>();
    let local: Map<string, Buffer> | undefined;
    let longName: string | undefined;
    let longLink: string | undefined;
    for (;;) {
      if (pos + BLOCK > fileSize) {
        if (pos === fileSize && out.length > 0) break; // missing end-of-archive blocks: tolerated
        throw new TarError(`tar archive is truncated at offset ${pos}`);
      }
      const h = await readExact(fh, BLOCK, pos);
      if (isZeroBlock(h)) break;
      if (pos === 0 && h[0] === 0x1f && h[1] === 0x8b) throw new TarError(`${file} is gzip-compressed; the rootfs input must be an uncompressed tar`);
      if (pos === 0 && h.readUInt32LE(0) === 0xfd2fb528) throw new TarError(`${file} is zstd-compressed; the rootfs input must be an uncompressed tar`);
      if (!checksumOk(h)) throw new TarError(`${file}: bad tar header checksum at offset ${pos}`);
      const flag = String.fromCharCode(h[156]!);
      const ustar = h.toString('latin1', 257, 263) === 'ustar\0';
      let name = cstr(h, 0, 100);
      if (ustar && h[345] !== 0) name = cstr(h, 345, 155) + '/' + name;
      let size = parseNumber(h, 124, 12);
      const dataPos = pos + BLOCK;
      const next = dataPos + Math.ceil(size / BLOCK) * BLOCK;
      const readData = () => readExact(fh, size, dataPos);

      if (flag === 'x' || flag === 'g') {
        const recs = parsePax(await readData());
        if (flag === 'g') global = new Map([...global, ...recs]);
        else local = recs;
        pos = next;
        continue;
      }
      if (flag === 'L' || flag === 'K') {
        const s = (await readData()).toString('latin1').replace(/\0+$/, '');
        if (flag === 'L') longName = s;
        else longLink = s;
        pos = next;
        continue;
      }
      const pax = new Map([...global, ...(local ?? [])]);
      local = undefined;
      const paxStr = (k: string) => pax.get(k)?.toString('latin1');
      const rawPath = paxStr('path') ?? longName ?? name;
      const linkname = paxStr('linkpath') ?? longLink ?? cstr(h, 157, 100);
      longName = longLink = undefined;
      const type = TYPES[flag];
      if (!type) throw new TarError(`${showPath(normalizePath(rawPath))}: tar member is a ${typeName(flag)}; ${SUPPORTED}`);
      if ([...pax.keys()].some((k) => k.startsWith('GNU.sparse.'))) {
        throw new TarError(`${showPath(normalizePath(rawPath))}: tar member is a GNU sparse file; ${SUPPORTED} (re-create the archive without --sparse)`);
      }
      if ([...pax.keys()].some((k) => k.startsWith('SCHILY.acl.'))) {
        throw new TarError(`${showPath(normalizePath(rawPath))}: tar member has POSIX ACLs (SCHILY.acl.*), which are not supported; store them as system.posix_acl_* xattrs or drop them`);
      }
      if (paxStr('size') !== undefined) size = Number(paxStr('size'));
      const num = (k: string, fallback: number) => (paxStr(k) !== undefined ? Number(paxStr(k)) : fallback);
      const xattrs = new Map<string, Buffer>();
      for (const [k, v] of pax) {
        if (k.startsWith(XATTR_PREFIX)) xattrs.set(k.slice(XATTR_PREFIX.length), v);
        // bsdtar's form: URL-encoded name, base64 value.
        else if (k.startsWith(LIBARCHIVE_XATTR)) xattrs.set(decodeURIComponent(k.slice(LIBARCHIVE_XATTR.length)), Buffer.from(v.toString('latin1'), 'base64'));
      }
      out.push({
        path: normalizePath(rawPath),
        type,
        mode: parseNumber(h, 100, 8) & 0o7777,
        uid: num('uid', parseNumber(h, 108, 8)),
        gid: num('gid', parseNumber(h, 116, 8)),
        size: type === 'file' ? size : 0,
        offset: dataPos,
        linkname: type === 'hardlink' ? normalizePath(linkname) : linkname,
        devmajor: type === 'char' || type === 'block' ? parseNumber(h, 329, 8) : 0,
        devminor: type === 'char' || type === 'block' ? parseNumber(h, 337, 8) : 0,
        xattrs,
      });
      // Only regular files own data (a PAX size overrides the header's); other members
      // may still declare a size, so skip whatever the header says is there.
      pos = type === 'file' ? dataPos + Math.ceil(size / BLOCK) * BLOCK : next;
    }
    return out;
  } finally {
    await fh.close();
  }
}

// ---------------------------------------------------------------- tree

export const parentOf = (p: string): string => {
  const i = p.lastIndexOf('/');
  return i === -1 ? '' : p.slice(0, i);
};

export function dirInode(mode = 0o755, uid = 0, gid = 0): Inode {
  return { type: 'dir', mode, uid, gid, size: 0, devmajor: 0, devminor: 0, xattrs: new Map() };
}

/**
 * path -> inode. Hard links are paths sharing one Inode object, so there is no
 * "first" link until the tree is written in sorted order.
 */
export class FsTree {
  readonly nodes = new Map<string, Inode>();

  constructor() {
    this.nodes.set('', dirInode());
  }

  /** Apply tar members in order, with extraction semantics: a later member replaces an earlier one. */
  static fromEntries(entries: Iterable<TarEntry>): FsTree {
    const t = new FsTree();
    for (const e of entries) {
      if (e.type === 'hardlink') {
        const target = t.nodes.get(e.linkname);
        if (!target) throw new TarError(`${showPath(e.path)}: hard link to ${showPath(e.linkname)}, which is not earlier in the archive`);
        if (target.type === 'dir') throw new TarError(`${showPath(e.path)}: hard link to a directory (${showPath(e.linkname)})`);
        if (e.path === '') throw new TarError('the archive root is a hard link');
        t.set(e.path, target);
        continue;
      }
      const inode: Inode = {
        type: e.type,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        size: e.size,
        devmajor: e.devmajor,
        devminor: e.devminor,
        xattrs: e.xattrs,
      };
      if (e.type === 'file') inode.content = { kind: 'tar', offset: e.offset };
      if (e.type === 'symlink') {
        if (e.linkname === '') throw new TarError(`${showPath(e.path)}: symlink with an empty target`);
        inode.target = e.linkname;
      }
      if (e.path === '' && e.type !== 'dir') throw new TarError('the archive root is not a directory');
      t.set(e.path, inode);
    }
    return t;
  }

  get(p: string): Inode | undefined {
    return this.nodes.get(p);
  }

  /**
   * Put inode at path. Missing parents become 0755 root directories (as tar does on
   * extraction); a non-directory parent is an error. Replacing a directory with
   * anything else drops what was below it.
   */
  set(p: string, inode: Inode): void {
    const old = this.nodes.get(p);
    if (old && old.type === 'dir' && inode.type !== 'dir') this.removeChildren(p);
    if (p !== '') this.ensureDir(parentOf(p));
    this.nodes.set(p, inode);
  }

  private ensureDir(p: string): void {
    const n = this.nodes.get(p);
    if (n) {
      if (n.type !== 'dir') throw new TarError(`${showPath(p)} is a ${n.type}, but the archive has members below it`);
      return;
    }
    this.ensureDir(parentOf(p));
    this.nodes.set(p, dirInode());
  }

  /** Remove path and everything below it. */
  remove(p: string): void {
    this.removeChildren(p);
    if (p !== '') this.nodes.delete(p);
  }

  removeChildren(p: string): void {
    const prefix = p === '' ? '' : p + '/';
    for (const k of [...this.nodes.keys()]) if (k !== '' && k !== p && k.startsWith(prefix)) this.nodes.delete(k);
  }

  /** All paths, bytewise sorted: a parent always precedes its children. */
  paths(): string[] {
    return [...this.nodes.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  }

  /** Number of paths per inode (the hard link count). */
  linkCounts(): Map<Inode, number> {
    const m = new Map<Inode, number>();
    for (const n of this.nodes.values()) m.set(n, (m.get(n) ?? 0) + 1);
    return m;
  }
}

export async function readTarTree(file: string): Promise<FsTree> {
  return FsTree.fromEntries(await readTarEntries(file));
}

// ---------------------------------------------------------------- content

const CHUNK = 1 << 20;

/** Reads regular-file content for inodes of one tree; call close() when done. */
export class ContentReader {
  private fh: FileHandle | undefined;
  constructor(private readonly tarFile: string) {}

  async *read(n: Inode): AsyncGenerator<Buffer> {
    const c = n.content;
    if (!c || n.size === 0) return;
    if (c.kind === 'bytes') {
      yield c.data;
      return;
    }
    let fh: FileHandle;
    let base = 0;
    let own: FileHandle | undefined;
    if (c.kind === 'tar') {
      this.fh ??= await open(this.tarFile, 'r');
      fh = this.fh;
      base = c.offset;
    } else {
      own = await open(c.path, 'r');
      fh = own;
    }
    try {
      let done = 0;
      while (done < n.size) {
        const buf = Buffer.allocUnsafe(Math.min(CHUNK, n.size - done));
        const { bytesRead } = await fh.read(buf, 0, buf.length, base + done);
        if (bytesRead === 0) throw new TarError(`unexpected end of data (${c.kind === 'path' ? c.path : this.tarFile})`);
        done += bytesRead;
        yield bytesRead === buf.length ? buf : buf.subarray(0, bytesRead);
      }
    } finally {
      await own?.close();
    }
  }

  async close(): Promise<void> {
    await this.fh?.close();
    this.fh = undefined;
  }
}

// ---------------------------------------------------------------- writer

export interface WriteHeader {
  path: string;
  /** 'hardlink' entries point at linkname, an earlier member. */
  type: NodeType | 'hardlink';
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  linkname?: string;
  devmajor?: number;
  devminor?: number;
  xattrs?: Map<string, Buffer>;
}

const TYPEFLAG: Record<WriteHeader['type'], string> = { file: '0', hardlink: '1', symlink: '2', char: '3', block: '4', dir: '5', fifo: '6' };
const MAX_OCTAL7 = 0o7777777;
const MAX_OCTAL11 = 0o77777777777;

function writeOctal(buf: Buffer, off: number, len: number, v: number): void {
  buf.write(v.toString(8).padStart(len - 1, '0') + '\0', off, len, 'latin1');
}

function writeSize(buf: Buffer, off: number, v: number): void {
  if (v <= MAX_OCTAL11) return writeOctal(buf, off, 12, v);
  // GNU base-256 for files of 8 GiB and more (a PAX size record is written too).
  buf[off] = 0x80;
  let x = v;
  for (let i = 11; i > 0; i--) {
    buf[off + i] = x % 256;
    x = Math.floor(x / 256);
  }
}

const isAscii = (s: string) => /^[\x20-\x7e]*$/.test(s);

/** Split into ustar (prefix, name), or undefined when it does not fit. */
function ustarSplit(p: string): [string, string] | undefined {
  if (!isAscii(p)) return undefined;
  if (p.length <= 100) return ['', p];
  for (let i = p.indexOf('/'); i !== -1; i = p.indexOf('/', i + 1)) {
    if (i <= 155 && p.length - i - 1 <= 100 && p.length - i - 1 > 0) return [p.slice(0, i), p.slice(i + 1)];
  }
  return undefined;
}

/** A printable stand-in for header fields that the PAX record overrides. */
const placeholder = (s: string, max: number) => s.replace(/[^\x20-\x7e]/g, '_').slice(-max);

function ustarHeader(f: { name: string; prefix: string; mode: number; uid: number; gid: number; size: number; mtime: number; flag: string; linkname: string; devmajor: number; devminor: number }): Buffer {
  const h = Buffer.alloc(BLOCK);
  h.write(f.name, 0, 100, 'latin1');
  writeOctal(h, 100, 8, f.mode);
  writeOctal(h, 108, 8, f.uid);
  writeOctal(h, 116, 8, f.gid);
  writeSize(h, 124, f.size);
  writeOctal(h, 136, 12, f.mtime);
  h.write(f.flag, 156, 1, 'latin1');
  h.write(f.linkname, 157, 100, 'latin1');
  h.write('ustar\x0000', 257, 8, 'latin1');
  writeOctal(h, 329, 8, f.devmajor);
  writeOctal(h, 337, 8, f.devminor);
  h.write(f.prefix, 345, 155, 'latin1');
  h.fill(0x20, 148, 156);
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += h[i]!;
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 8, 'latin1');
  return h;
}

/**
 * Header block(s) for one member: a PAX 'x' header first when anything does not fit
 * ustar (long or non-ASCII names, big ids or sizes, xattrs). PAX values are written
 * as raw bytes, xattrs as SCHILY.xattr.<name> sorted by name (what GNU tar and Go's
 * archive/tar read). No uname/gname, atime or ctime: owners are numeric.
 */
export function encodeHeader(e: WriteHeader): Buffer {
  const recs: Buffer[] = [];
  const name = e.type === 'dir' ? e.path + '/' : e.path;
  let split = ustarSplit(name);
  if (!split) {
    recs.push(paxRecord('path', Buffer.from(name, 'latin1')));
    split = ['', placeholder(name, 100)];
  }
  let linkname = e.linkname ?? '';
  if (linkname.length > 100 || !isAscii(linkname)) {
    recs.push(paxRecord('linkpath', Buffer.from(linkname, 'latin1')));
    linkname = placeholder(linkname, 100);
  }
  let { uid, gid } = e;
  if (uid > MAX_OCTAL7) {
    recs.push(paxRecord('uid', Buffer.from(String(uid))));
    uid = 0;
  }
  if (gid > MAX_OCTAL7) {
    recs.push(paxRecord('gid', Buffer.from(String(gid))));
    gid = 0;
  }
  const size = e.type === 'file' ? e.size : 0;
  if (size > MAX_OCTAL11) recs.push(paxRecord('size', Buffer.from(String(size))));
  for (const k of [...(e.xattrs?.keys() ?? [])].sort()) {
    if (k.includes('=') || k.includes('\n') || k === '') throw new TarError(`${showPath(e.path)}: xattr name ${JSON.stringify(k)} cannot be stored in a PAX record`);
    recs.push(paxRecord(XATTR_PREFIX + k, e.xattrs!.get(k)!));
  }
  const main = ustarHeader({
    name: split[1],
    prefix: split[0],
    mode: e.mode & 0o7777,
    uid,
    gid,
    size,
    mtime: e.mtime,
    flag: TYPEFLAG[e.type],
    linkname,
    devmajor: e.devmajor ?? 0,
    devminor: e.devminor ?? 0,
  });
  if (recs.length === 0) return main;
  const data = Buffer.concat(recs);
  const base = e.path.slice(e.path.lastIndexOf('/') + 1);
  const paxHdr = ustarHeader({
    name: 'PaxHeaders/' + placeholder(base, 89),
    prefix: '',
    mode: 0o644,
    uid: 0,
    gid: 0,
    size: data.length,
    mtime: e.mtime,
    flag: 'x',
    linkname: '',
    devmajor: 0,
    devminor: 0,
  });
  return Buffer.concat([paxHdr, data, Buffer.alloc(padding(data.length)), main]);
}

export const padding = (n: number): number => (BLOCK - (n % BLOCK)) % BLOCK;
export const END_OF_ARCHIVE = Buffer.alloc(2 * BLOCK);
