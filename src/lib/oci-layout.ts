// OCI image layout pieces: the bootc tree rules, a reproducible layer writer, and
// the config / manifest / index documents. Tree rules and JSON builders are pure;
// the writers only touch the paths they are given.
import { createHash, type Hash } from 'node:crypto';
import { createWriteStream } from 'node:fs';
import { open, rename, rm, type FileHandle } from 'node:fs/promises';
import { once } from 'node:events';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { constants as zc, createGzip } from 'node:zlib';
import { canonicalize } from '../engine/canonical.js';
import { ARCH, type Arch } from '../arch.js';
import { ContentReader, dirInode, encodeHeader, END_OF_ARCHIVE, FsTree, type Inode, padding, showPath, TarError } from './tarfs.js';

export const MEDIA = {
  index: 'application/vnd.oci.image.index.v1+json',
  manifest: 'application/vnd.oci.image.manifest.v1+json',
  config: 'application/vnd.oci.image.config.v1+json',
  layerTar: 'application/vnd.oci.image.layer.v1.tar',
  layerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
} as const;

export const REF_NAME_ANNOTATION = 'org.opencontainers.image.ref.name';
/** OCI tag grammar (distribution spec). */
export const TAG_RE = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$/;

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
  platform?: Platform;
}

export interface Platform {
  architecture: string;
  os: string;
  variant?: string;
}

export function platformOf(arch: Arch): Platform {
  return { ...ARCH[arch].oci };
}

// ---------------------------------------------------------------- bootc layout

export const PREPARE_ROOT_CONF = '[composefs]\nenabled = true\n';

/** Runtime mount points: always plain directories, emptied (their content belongs to the booted system). */
const API_DIRS: Record<string, number> = { dev: 0o755, proc: 0o555, sys: 0o555, run: 0o755, tmp: 0o1777 };
/** Debian's /vmlinuz-style convenience links point into /boot, which bootc leaves empty. */
const ROOT_KERNEL_LINKS = ['vmlinuz', 'vmlinuz.old', 'initrd.img', 'initrd.img.old'];

export interface BootFiles {
  /** Kernel version: the directory name under /usr/lib/modules. */
  kver: string;
  vmlinuz: string;
  initramfs: string;
}

const fileNode = (content: Inode['content'], size: number, mode = 0o644): Inode => ({
  type: 'file',
  mode,
  uid: 0,
  gid: 0,
  size,
  content,
  devmajor: 0,
  devminor: 0,
  xattrs: new Map(),
});

/**
 * Rewrite a Debian rootfs tree into the shape bootc expects (see bootc's
 * container lints): one kernel + initramfs under /usr/lib/modules/$kver, nothing
 * in /boot, /sysroot and the /ostree -> sysroot/ostree link, composefs enabled in
 * prepare-root.conf, API dirs as empty directories, and no SELinux labels (the
 * deployment relabels). Returns human-readable notes on what changed.
 */
export function applyBootcLayout(tree: FsTree, boot: BootFiles & { vmlinuzSize: number; initramfsSize: number }): string[] {
  const notes: string[] = [];
  if (!/^[A-Za-z0-9._+~-]+$/.test(boot.kver) || boot.kver === '.' || boot.kver === '..') {
    throw new TarError(`kernel version ${JSON.stringify(boot.kver)} is not a plain directory name`);
  }
  let selinux = 0;
  for (const n of new Set(tree.nodes.values())) if (n.xattrs.delete('security.selinux')) selinux++;
  if (selinux) notes.push(`dropped security.selinux from ${selinux} inodes`);

  const bootDir = tree.get('boot');
  const before = tree.nodes.size;
  if (bootDir?.type === 'dir') tree.removeChildren('boot');
  else tree.set('boot', dirInode());
  if (tree.nodes.size !== before) notes.push(`emptied /boot (${before - tree.nodes.size} entries)`);
  for (const l of ROOT_KERNEL_LINKS) {
    if (tree.get(l) && tree.get(l)!.type !== 'dir') {
      tree.remove(l);
      notes.push(`removed /${l}`);
    }
  }
  for (const [d, mode] of Object.entries(API_DIRS)) {
    const n = tree.get(d);
    if (n?.type === 'dir') tree.removeChildren(d);
    else tree.set(d, dirInode(mode));
  }
  if (tree.get('var')?.type !== 'dir') tree.set('var', dirInode());
  tree.set('sysroot', dirInode());
  tree.set('ostree', { type: 'symlink', mode: 0o777, uid: 0, gid: 0, size: 0, target: 'sysroot/ostree', devmajor: 0, devminor: 0, xattrs: new Map() });

  const modules = 'usr/lib/modules';
  const kdir = `${modules}/${Buffer.from(boot.kver, 'utf8').toString('latin1')}`;
  if (tree.get(kdir)?.type !== 'dir') {
    const have = tree
      .paths()
      .filter((p) => p.startsWith(modules + '/') && !p.slice(modules.length + 1).includes('/'))
      .map((p) => p.slice(modules.length + 1));
    throw new TarError(`kernel ${boot.kver} from the boot input has no /${kdir} in the rootfs (modules present: ${have.join(', ') || 'none'}); build the initramfs from the same rootfs`);
  }
  for (const p of tree.paths()) {
    const m = p.match(/^usr\/lib\/modules\/([^/]+)\/(vmlinuz|initramfs\.img)$/);
    if (m && `${modules}/${m[1]}` !== kdir) throw new TarError(`${showPath(p)}: a second kernel; a bootc image carries exactly one`);
  }
  tree.set(`${kdir}/vmlinuz`, fileNode({ kind: 'path', path: boot.vmlinuz }, boot.vmlinuzSize));
  tree.set(`${kdir}/initramfs.img`, fileNode({ kind: 'path', path: boot.initramfs }, boot.initramfsSize));
  const conf = Buffer.from(PREPARE_ROOT_CONF);
  tree.set('usr/lib/ostree/prepare-root.conf', fileNode({ kind: 'bytes', data: conf }, conf.length));
  return notes;
}

// ---------------------------------------------------------------- layer

const FLUSH_AT = 1 << 20;

/** Batches small writes (tar headers are 512 bytes) into large ones, hashing everything. */
class HashingWriter {
  private parts: Buffer[] = [];
  private pending = 0;
  readonly hash: Hash = createHash('sha256');
  size = 0;
  constructor(private readonly sink: (buf: Buffer) => Promise<void>) {}
  async write(b: Buffer): Promise<void> {
    this.hash.update(b);
    this.size += b.length;
    this.parts.push(b);
    this.pending += b.length;
    if (this.pending >= FLUSH_AT) await this.flush();
  }
  async flush(): Promise<void> {
    if (!this.pending) return;
    const buf = this.parts.length === 1 ? this.parts[0]! : Buffer.concat(this.parts, this.pending);
    this.parts = [];
    this.pending = 0;
    await this.sink(buf);
  }
}

/** A HashingWriter sink that writes to a file. */
function fileSink(fh: FileHandle): (buf: Buffer) => Promise<void> {
  return async (buf) => {
    let off = 0;
    while (off < buf.length) off += (await fh.write(buf, off, buf.length - off)).bytesWritten;
  };
}

export interface LayerStats {
  entries: number;
  hardlinks: number;
}

/**
 * The tree as one uncompressed layer tar, into w. Members are in bytewise path order
 * (parents first), each path once, every mtime = epoch, numeric owners, exact modes;
 * the first path of a hard-link group (in that order) carries the data and the
 * others link to it. The root directory itself is not a member.
 */
async function emitLayer(tree: FsTree, rootfsTar: string, epoch: number, w: HashingWriter): Promise<LayerStats> {
  const reader = new ContentReader(rootfsTar);
  const first = new Map<Inode, string>();
  let entries = 0;
  let hardlinks = 0;
  try {
    for (const p of tree.paths()) {
      if (p === '') continue;
      const n = tree.get(p)!;
      // OCI consumers read ".wh." names as whiteouts (deletions), not as files.
      if (p.slice(p.lastIndexOf('/') + 1).startsWith('.wh.')) throw new TarError(`${showPath(p)}: a name starting with ".wh." is an OCI whiteout marker and cannot be carried as a file`);
      entries++;
      const common = { path: p, mode: n.mode, uid: n.uid, gid: n.gid, mtime: epoch };
      const linkTo = first.get(n);
      if (linkTo !== undefined) {
        hardlinks++;
        await w.write(encodeHeader({ ...common, type: 'hardlink', size: 0, linkname: linkTo }));
        continue;
      }
      if (n.type !== 'dir') first.set(n, p);
      await w.write(
        encodeHeader({ ...common, type: n.type, size: n.size, linkname: n.target, devmajor: n.devmajor, devminor: n.devminor, xattrs: n.xattrs }),
      );
      if (n.type === 'file' && n.size > 0) {
        let got = 0;
        for await (const chunk of reader.read(n)) {
          got += chunk.length;
          await w.write(chunk);
        }
        if (got !== n.size) throw new TarError(`${showPath(p)}: expected ${n.size} bytes of content, read ${got}`);
        const pad = padding(n.size);
        if (pad) await w.write(Buffer.alloc(pad));
      }
    }
    await w.write(END_OF_ARCHIVE);
    await w.flush();
  } finally {
    await reader.close();
  }
  return { entries, hardlinks };
}

/** The layer tar (see emitLayer) written to file. Returns its sha256 (the layer's diff_id). */
export async function writeLayerTar(tree: FsTree, rootfsTar: string, epoch: number, file: string): Promise<{ sha256: string; size: number } & LayerStats> {
  const fh = await open(file, 'wx');
  const w = new HashingWriter(fileSink(fh));
  try {
    const st = await emitLayer(tree, rootfsTar, epoch, w);
    await fh.sync();
    return { sha256: w.hash.digest('hex'), size: w.size, ...st };
  } finally {
    await fh.close();
  }
}

/** gzip with fixed settings: Node's gzip header has no name and mtime 0, so the bytes depend only on the input and the zlib build. */
function fixedGzip(level: number) {
  return createGzip({ level, memLevel: 8, windowBits: 15, strategy: zc.Z_DEFAULT_STRATEGY });
}

/** A pass-through that hashes and counts what goes by. */
function hashTap(): { tap: Transform; result: () => { sha256: string; size: number } } {
  const h = createHash('sha256');
  let size = 0;
  const tap = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      h.update(chunk);
      size += chunk.length;
      cb(null, chunk);
    },
  });
  return { tap, result: () => ({ sha256: h.digest('hex'), size }) };
}

/**
 * The layer tar gzipped as it is made (issue 10): the uncompressed tar (650 MB for
 * the powernode rootfs) is hashed for the diff_id but never written and read back.
 * The same bytes as writeLayerTar then gzipFile: deflate without flushes does not
 * depend on how its input is cut into writes.
 */
export async function writeLayerTarGz(
  tree: FsTree,
  rootfsTar: string,
  epoch: number,
  gzFile: string,
  level: number,
): Promise<{ tar: { sha256: string; size: number } & LayerStats; gz: { sha256: string; size: number } }> {
  const gz = fixedGzip(level);
  const { tap, result } = hashTap();
  const done = pipeline(gz, tap, createWriteStream(gzFile, { flags: 'wx' }));
  const w = new HashingWriter(async (buf) => {
    if (!gz.write(buf)) await Promise.race([once(gz, 'drain'), done]);
  });
  let st: LayerStats;
  try {
    st = await emitLayer(tree, rootfsTar, epoch, w);
    gz.end();
    await done;
  } catch (e) {
    gz.destroy();
    await done.catch(() => {});
    throw e;
  }
  const fh = await open(gzFile, 'r+');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
  return { tar: { sha256: w.hash.digest('hex'), size: w.size, ...st }, gz: result() };
}

/** Write bytes to a new file and fsync it (so a full disk shows up here, not later). */
export async function writeNew(file: string, data: Buffer | string): Promise<void> {
  const fh = await open(file, 'wx');
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Move a finished temp file to blobs/sha256/<hex> (a blob that is already there is identical). */
export async function commitBlob(tmp: string, blobsDir: string, hex: string): Promise<void> {
  await rename(tmp, `${blobsDir}/${hex}`);
}

export async function removeQuietly(...paths: string[]): Promise<void> {
  for (const p of paths) await rm(p, { recursive: true, force: true }).catch(() => {});
}

// ---------------------------------------------------------------- documents

/** JSON bytes for a blob: canonical (sorted keys, no spaces) so equal content gives equal digests. */
export const jsonBlob = (doc: unknown): Buffer => Buffer.from(canonicalize(doc));

export const sha256Hex = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

/**
 * Image config. No `created` and no `history`: both would carry wall-clock time or
 * build-host details, and neither is required.
 */
export function imageConfig(opts: { arch: Arch; labels: Record<string, string>; diffIds: string[] }): Record<string, unknown> {
  const p = platformOf(opts.arch);
  return {
    architecture: p.architecture,
    os: p.os,
    ...(p.variant ? { variant: p.variant } : {}),
    config: { Labels: opts.labels },
    rootfs: { type: 'layers', diff_ids: opts.diffIds },
  };
}

export function imageManifest(config: Descriptor, layers: Descriptor[], annotations?: Record<string, string>): Record<string, unknown> {
  return {
    schemaVersion: 2,
    mediaType: MEDIA.manifest,
    config,
    layers,
    ...(annotations && Object.keys(annotations).length ? { annotations } : {}),
  };
}

export function imageIndex(manifests: Descriptor[]): Record<string, unknown> {
  return { schemaVersion: 2, mediaType: MEDIA.index, manifests };
}

export const OCI_LAYOUT = JSON.stringify({ imageLayoutVersion: '1.0.0' });
