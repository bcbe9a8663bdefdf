// composefs image + content store from a rootfs tarball. The tree description
// (composefs-dump(5)) and the object store (objects/xx/<rest of fs-verity digest>)
// are generated here from the tar; mkcomposefs only turns the description into
// the EROFS image and prints the image's own fs-verity digest.
//
// mkcomposefs (Debian `composefs`) exists only in sid/forky and needs glibc >= 2.38,
// so it is not a host tool: it comes from the `tools` input, a rootfs tarball built
// by the engine's own mmdebstrap stage (cached and keyed like any stage), and runs
// through that root's own dynamic loader with --library-path. No chroot, no mounts.
import { createHash } from 'node:crypto';
import { type BigIntStats, closeSync, fstatSync, linkSync, lstatSync, mkdirSync, openSync, readSync, rmSync, writeFileSync } from 'node:fs';
import { lstat, mkdir, open, readdir, readFile, readlink, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { z } from 'zod';
import { dumpLines, MAX_INLINE, objectPath } from '../src/lib/composefs-dump.js';
import { FsVerityHasher, hashBytes, hashFile } from '../src/lib/digest.js';
import { noteOutputDigests, storedBlob } from '../src/engine/cache.js';
import { stageFailure } from '../src/lib/stage-failure.js';
import { defineStage, specPath, StageError, type RunContext, type SpecPathRule, type StageInput } from '../src/stage.js';
import { resolveSpecPath } from '../src/engine/assets.js';
import { ContentReader, type FsTree, type Inode, readTarTree, showPath, TarError } from '../src/lib/tarfs.js';

export const Params = z
  .object({
    /** Highest composefs format version mkcomposefs may use (its --max-version). */
    max_version: z.number().int().min(0).max(1).default(1),
    /**
     * Extra composefs images stacked above the base (a verified boot mounts them
     * in priority order, highest on top): each a directory relative to the spec,
     * packed with owner root and the epoch's mtime. Their objects share objects/;
     * the images are layers/<fs-verity digest>.cfs. Optional without a default so
     * specs without layers keep their cache keys.
     */
    layers: z
      .array(z.object({ dir: specPath({ type: 'dir', symlinks: 'copy' }), priority: z.number().int().min(0).max(999) }).strict())
      .optional(),
  })
  .strict();

const LAYER_PATH: SpecPathRule = { type: 'dir', symlinks: 'copy' };

/** Layers top (highest priority) first; equal priorities are a spec error, as their order would be arbitrary. */
export function orderLayers<L extends { dir: string; priority: number }>(layers: readonly L[]): L[] {
  const seen = new Map<number, string>();
  for (const l of layers) {
    const other = seen.get(l.priority);
    if (other !== undefined) throw new StageError(`composefs layers ${other} and ${l.dir} have the same priority ${l.priority}; give each its own`);
    seen.set(l.priority, l.dir);
  }
  return [...layers].sort((a, b) => b.priority - a.priority);
}

// ------------------------------------------------------------ tools root

/** PT_INTERP of a 64-bit little-endian ELF executable (amd64, arm64). */
export function elfInterpreter(elf: Buffer): string | undefined {
  if (elf.length < 64 || elf.readUInt32BE(0) !== 0x7f454c46 || elf[4] !== 2 || elf[5] !== 1) return undefined;
  const phoff = Number(elf.readBigUInt64LE(0x20));
  const phentsize = elf.readUInt16LE(0x36);
  const phnum = elf.readUInt16LE(0x38);
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * phentsize;
    if (ph + 56 > elf.length) break;
    if (elf.readUInt32LE(ph) !== 3) continue; // PT_INTERP
    const off = Number(elf.readBigUInt64LE(ph + 8));
    const len = Number(elf.readBigUInt64LE(ph + 32));
    return elf.toString('latin1', off, off + len).replace(/\0+$/, '');
  }
  return undefined;
}

/**
 * Resolve an absolute path inside root, following symlinks as if root were "/".
 * Returns the host path, or undefined if it does not exist.
 */
export async function resolveInRoot(root: string, p: string, hops = 0): Promise<string | undefined> {
  if (hops > 40) return undefined;
  const parts = p.split('/').filter((c) => c && c !== '.');
  let cur: string[] = [];
  for (let i = 0; i < parts.length; i++) {
    const c = parts[i]!;
    if (c === '..') {
      cur.pop();
      continue;
    }
    const host = join(root, ...cur, c);
    const st = await lstat(host).catch(() => undefined);
    if (!st) return undefined;
    if (st.isSymbolicLink()) {
      const t = await readlink(host);
      const rest = parts.slice(i + 1).join('/');
      const next = t.startsWith('/') ? `${t}/${rest}` : `/${[...cur, t].join('/')}/${rest}`;
      return resolveInRoot(root, next, hops + 1);
    }
    cur = [...cur, c];
  }
  return join(root, ...cur);
}

export interface ToolsRoot {
  root: string;
  loader: string;
  libraryPath: string;
  mkcomposefs: string;
}

/** Loader and library path for running root's binaries on this host without chroot. */
export async function locateTools(root: string): Promise<ToolsRoot> {
  const mkcomposefs = await resolveInRoot(root, '/usr/bin/mkcomposefs');
  if (!mkcomposefs) throw new StageError('the tools input has no /usr/bin/mkcomposefs; build it with packages: [composefs] (suite sid or forky)');
  const head = Buffer.alloc(4096);
  const fh = await open(mkcomposefs, 'r');
  try {
    await fh.read(head, 0, head.length, 0);
  } finally {
    await fh.close();
  }
  const interp = elfInterpreter(head);
  if (!interp) throw new StageError(`${mkcomposefs}: not a 64-bit little-endian dynamic ELF executable`);
  // An `extract` root has no usr-merge links (base-files makes them), so try /usr too.
  const loader = (await resolveInRoot(root, interp)) ?? (await resolveInRoot(root, '/usr' + interp));
  if (!loader) throw new StageError(`the tools root has no dynamic loader ${interp} for mkcomposefs`);
  const dirs: string[] = [];
  const confDir = join(root, 'etc/ld.so.conf.d');
  for (const f of (await readdir(confDir).catch(() => [] as string[])).filter((x) => x.endsWith('.conf')).sort()) {
    for (const line of (await readFile(join(confDir, f), 'utf8')).split('\n')) {
      const l = line.trim();
      if (l.startsWith('/')) dirs.push(l);
    }
  }
  const libs: string[] = [];
  for (const d of [...dirs, '/usr/lib', '/lib']) {
    const r = (await resolveInRoot(root, d)) ?? (await resolveInRoot(root, '/usr' + d));
    if (r && !libs.includes(r) && (await stat(r).catch(() => undefined))?.isDirectory()) libs.push(r);
  }
  return { root, loader, libraryPath: libs.join(':'), mkcomposefs };
}

/**
 * Version of a package in the tools root: from the input's recorded package list,
 * else from the first line of its Debian changelog (an `extract` root has no dpkg
 * status).
 */
async function packageVersion(input: StageInput, root: string, name: string): Promise<string | undefined> {
  const pkgs = input.meta.packages;
  const p = Array.isArray(pkgs) ? (pkgs.find((x) => (x as { name?: unknown }).name === name) as { version?: string } | undefined) : undefined;
  if (p?.version) return p.version;
  const log = await readFile(join(root, 'usr/share/doc', name, 'changelog.Debian.gz')).catch(() => undefined);
  const m = log && gunzipSync(log).toString('utf8', 0, 200).match(/^\S+ \(([^)]+)\)/);
  return m ? m[1] : undefined;
}

// ------------------------------------------------------------ object store

export interface StoreResult {
  digests: Map<Inode, string>;
  inline: Map<Inode, Buffer>;
  objects: number;
  bytes: number;
}

/** Objects up to this size are read whole into memory (one read, hashed, then written or linked); bigger ones are streamed. */
const WHOLE_MAX = 64 << 20;
/** Up to this size the object's file work is done with synchronous calls: a thread-pool round trip costs more than the syscall. */
const SYNC_MAX = 1 << 20;

/**
 * Write every regular file bigger than MAX_INLINE once, as objects/xx/<rest> named
 * by its fs-verity digest, and collect the content of the small files that the
 * image inlines. Each object is read once from the tar; its sha256 and fs-verity
 * digest come from that one buffer and are handed to the cache (noteOutputDigests),
 * so the commit does not read it again. When the cache already holds a blob with
 * that sha256 and the same bytes (compared, not assumed), it is hard-linked instead
 * of written: a rebuild over an unchanged rootfs writes no object bytes.
 */
export async function writeObjectStore(tree: FsTree, rootfsTar: string, objectsDir: string): Promise<StoreResult> {
  const reader = new ContentReader(rootfsTar);
  const digests = new Map<Inode, string>();
  const inline = new Map<Inode, Buffer>();
  const seen = new Set<string>();
  const made = new Set<string>();
  const scratch: Scratch = { buf: Buffer.alloc(0) };
  let bytes = 0;
  const tmp = join(objectsDir, '.incoming');
  await mkdir(objectsDir, { recursive: true });
  const destFor = (dg: string) => {
    const d = join(objectsDir, dg.slice(0, 2));
    if (!made.has(d)) {
      mkdirSync(d, { recursive: true });
      made.add(d);
    }
    return join(objectsDir, objectPath(dg));
  };
  try {
    for (const p of tree.paths()) {
      const n = tree.get(p)!;
      if (n.type !== 'file' || n.size === 0 || digests.has(n) || inline.has(n)) continue;
      if (n.size <= MAX_INLINE) {
        const parts: Buffer[] = [];
        for await (const c of reader.read(n)) parts.push(c);
        inline.set(n, Buffer.concat(parts));
        continue;
      }
      if (n.size > WHOLE_MAX) {
        const h = await streamObject(reader, n, tmp);
        if (h.size !== n.size) throw new TarError(`${showPath(p)}: expected ${n.size} bytes, read ${h.size}`);
        const dg = h.fsverity!;
        digests.set(n, dg);
        if (seen.has(dg)) continue; // same content already stored; tmp is overwritten next time
        seen.add(dg);
        bytes += n.size;
        const dest = destFor(dg);
        await rename(tmp, dest);
        noteOutputDigests(dest, { size: h.size, sha256: h.sha256, fsverity: dg });
        continue;
      }
      const parts: Buffer[] = [];
      for await (const c of reader.read(n)) parts.push(c);
      const data = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
      if (data.length !== n.size) throw new TarError(`${showPath(p)}: expected ${n.size} bytes, read ${data.length}`);
      const h = hashBytes(data, { fsverity: true });
      const dg = h.fsverity!;
      digests.set(n, dg);
      if (seen.has(dg)) continue; // same content already stored
      seen.add(dg);
      bytes += n.size;
      const dest = destFor(dg);
      const blob = storedBlob(objectsDir, h.sha256);
      let st = blob ? linkIfSame(blob, data, dest, scratch) : undefined;
      if (!st) {
        try {
          // No fsync per object: the cache's commit makes the output durable.
          if (data.length <= SYNC_MAX) writeFileSync(dest, data, { flag: 'wx' });
          else await writeFile(dest, data, { flag: 'wx' });
        } catch (e) {
          // Already there: a layer sharing an object with the base (same digest, same bytes, already noted).
          if ((e as NodeJS.ErrnoException).code === 'EEXIST') continue;
          throw e;
        }
        st = lstatSync(dest, { bigint: true });
      }
      noteOutputDigests(dest, { size: h.size, sha256: h.sha256, fsverity: dg }, st);
    }
  } finally {
    await rm(tmp, { force: true });
    await reader.close();
  }
  return { digests, inline, objects: seen.size, bytes };
}

/** Copy a big object to tmp, hashing it on the way (sha256 and fs-verity). */
async function streamObject(reader: ContentReader, n: Inode, tmp: string) {
  const fv = new FsVerityHasher();
  const sha = createHash('sha256');
  const fh = await open(tmp, 'w');
  try {
    for await (const c of reader.read(n)) {
      fv.update(c);
      sha.update(c);
      let off = 0;
      while (off < c.length) off += (await fh.write(c, off, c.length - off)).bytesWritten;
    }
  } finally {
    await fh.close();
  }
  return { size: fv.size, sha256: sha.digest('hex'), fsverity: fv.digestHex() };
}

/** A read buffer reused from object to object (grown as needed). */
interface Scratch {
  buf: Buffer;
}

/**
 * Hard-link blob to dest if it holds exactly data (read and compared: a blob is
 * trusted only as far as its bytes), and return dest's stat. The link must be the
 * inode that was read, unchanged (size and mtime) since; otherwise dest is removed.
 * Undefined when nothing was linked (no such blob, other bytes, dest exists).
 */
function linkIfSame(blob: string, data: Buffer, dest: string, scratch: Scratch): BigIntStats | undefined {
  let fd: number;
  try {
    fd = openSync(blob, 'r');
  } catch {
    return undefined;
  }
  try {
    const st = fstatSync(fd, { bigint: true });
    if (!st.isFile() || st.size !== BigInt(data.length)) return undefined;
    if (scratch.buf.length < data.length) scratch.buf = Buffer.allocUnsafe(Math.max(data.length, 1 << 20));
    const buf = scratch.buf.subarray(0, data.length);
    // Synchronous even for the biggest (WHOLE_MAX) objects: a page-cache read of
    // tens of MiB blocks for milliseconds, and it is the same inode as st.
    for (let off = 0; off < buf.length; ) {
      const r = readSync(fd, buf, off, buf.length - off, off);
      if (r === 0) return undefined;
      off += r;
    }
    if (!buf.equals(data)) return undefined;
    try {
      linkSync(blob, dest);
    } catch {
      return undefined; // another device, too many links, dest exists: the caller writes (or skips)
    }
    const after = lstatSync(dest, { bigint: true });
    if (after.dev === st.dev && after.ino === st.ino && after.size === st.size && after.mtimeNs === st.mtimeNs) return after;
    rmSync(dest, { force: true });
    return undefined;
  } finally {
    closeSync(fd);
  }
}

/** composefs-dump of tree -> mkcomposefs -> image; returns the image's fs-verity digest (checked against our own). */
async function buildImage(ctx: RunContext<z.infer<typeof Params>>, tools: ToolsRoot, tree: FsTree, store: StoreResult, image: string, dumpName: string): Promise<Built> {
  const dump = join(ctx.workDir, dumpName);
  const fh = await open(dump, 'w');
  try {
    let buf = '';
    for (const line of dumpLines(tree, { digests: store.digests, inline: store.inline, mtime: ctx.sourceDateEpoch })) {
      buf += line;
      if (buf.length > 1 << 20) {
        await fh.write(buf, null, 'latin1');
        buf = '';
      }
    }
    await fh.write(buf, null, 'latin1');
  } finally {
    await fh.close();
  }
  const r = await ctx.exec(
    tools.loader,
    ['--library-path', tools.libraryPath, tools.mkcomposefs, '--from-file', '--print-digest', `--max-version=${ctx.params.max_version}`, dump, image],
    { capture: true },
  );
  const printed = r.stdout.trim();
  if (!/^[0-9a-f]{64}$/.test(printed)) throw new StageError(`mkcomposefs printed no digest (got ${JSON.stringify(printed.slice(0, 200))})`);
  // mkcomposefs's digest of its image must be the fs-verity digest of the file we keep.
  const before = lstatSync(image, { bigint: true });
  const h = await hashFile(image, { fsverity: true });
  if (h.fsverity !== printed) throw new StageError(`mkcomposefs reported image digest ${printed}, but the image file's fs-verity digest is ${h.fsverity}`);
  return { digest: printed, hashed: { ...h, fsverity: printed }, before };
}

/**
 * Hand an image's digests (hashed when buildImage checked it) to the cache, once it
 * has its final name, if it is still the inode that was hashed, unchanged.
 */
function noteImage(file: string, b: Built): void {
  const st = lstatSync(file, { bigint: true });
  if (st.ino === b.before.ino && st.dev === b.before.dev && st.size === b.before.size && st.mtimeNs === b.before.mtimeNs) noteOutputDigests(file, b.hashed);
}

interface Built {
  digest: string;
  hashed: { size: number; sha256: string; fsverity: string };
  /** The image's stat before it was hashed. */
  before: BigIntStats;
}

export default defineStage({
  kind: 'composefs',
  version: '1',
  summary: 'composefs EROFS image (image.cfs) + fs-verity-named object store (objects/)',
  params: Params,
  inputs: ['rootfs', 'tools'],
  heavy: false,
  tools: () => [{ name: 'tar', apt: 'tar' }],
  assets: (p) => (p.layers ?? []).map((l) => l.dir),
  async run(ctx) {
    const rootfsTar = ctx.rootfsTar('rootfs');
    const toolsTar = ctx.rootfsTar('tools');
    const toolsRoot = join(ctx.workDir, 'tools');
    await mkdir(toolsRoot);
    // Device nodes are not needed to run a program and cannot be made without root.
    await ctx.exec('tar', ['-x', '-f', toolsTar, '-C', toolsRoot, '--no-same-owner', '--exclude=./dev/*', '--exclude=dev/*']);
    const tools = await locateTools(toolsRoot);
    const version = await packageVersion(ctx.inputs.tools!, toolsRoot, 'composefs');

    const objects = join(ctx.outDir, 'objects');
    const image = join(ctx.outDir, 'image.cfs');
    try {
      const t0 = Date.now();
      const tree = await readTarTree(rootfsTar);
      const t1 = Date.now();
      const store = await writeObjectStore(tree, rootfsTar, objects);
      const t2 = Date.now();
      const built = await buildImage(ctx, tools, tree, store, image, 'tree.dump');
      noteImage(image, built);
      const printed = built.digest;
      // Phase times, for profiling (the object store: one read, hash, then write or link).
      ctx.log(`composefs: ${store.objects} objects (${store.bytes} bytes), ${store.inline.size} inlined files; tree read ${t1 - t0} ms, object store ${t2 - t1} ms, image ${Date.now() - t2} ms`);

      // Layers: same object store, one image each, named by its digest.
      const layers: { dir: string; priority: number; digest: string; objects: number }[] = [];
      for (const l of orderLayers(ctx.params.layers ?? [])) {
        const src = resolveSpecPath(ctx.specDir, l.dir, LAYER_PATH);
        const tar = join(ctx.workDir, `layer-${l.priority}.tar`);
        await ctx.exec('tar', ['-c', '-f', tar, '--sort=name', '--owner=0', '--group=0', '--numeric-owner', `--mtime=@${ctx.sourceDateEpoch}`, '--format=pax', '--pax-option=delete=atime,delete=ctime', '-C', src, '.']);
        const ltree = await readTarTree(tar);
        const lstore = await writeObjectStore(ltree, tar, objects);
        await mkdir(join(ctx.outDir, 'layers'), { recursive: true });
        // Named once its digest is known (the engine drops outDir if anything fails).
        const tmpImage = join(ctx.outDir, 'layers', `.building-${l.priority}`);
        const lbuilt = await buildImage(ctx, tools, ltree, lstore, tmpImage, `layer-${l.priority}.dump`);
        const digest = lbuilt.digest;
        const final = join(ctx.outDir, 'layers', `${digest}.cfs`);
        await rename(tmpImage, final);
        noteImage(final, lbuilt);
        layers.push({ dir: l.dir, priority: l.priority, digest, objects: lstore.objects });
      }
      ctx.setMeta({
        image: 'image.cfs',
        imageDigest: printed,
        objects: store.objects,
        objectBytes: store.bytes,
        inlined: store.inline.size,
        entries: tree.nodes.size,
        ...(layers.length ? { layers } : {}),
        ...(version ? { composefsVersion: version } : {}),
      });
    } catch (e) {
      // Nothing to take back: the engine drops outDir when a stage fails.
      throw stageFailure('composefs', e, ctx.outDir);
    }
  },
});
