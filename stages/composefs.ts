// composefs image + content store from a rootfs tarball. The tree description
// (composefs-dump(5)) and the object store (objects/xx/<rest of fs-verity digest>)
// are generated here from the tar; mkcomposefs only turns the description into
// the EROFS image and prints the image's own fs-verity digest.
//
// mkcomposefs (Debian `composefs`) exists only in sid/forky and needs glibc >= 2.38,
// so it is not a host tool: it comes from the `tools` input, a rootfs tarball built
// by the engine's own mmdebstrap stage (cached and keyed like any stage), and runs
// through that root's own dynamic loader with --library-path. No chroot, no mounts.
import { lstat, mkdir, open, readdir, readFile, readlink, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { z } from 'zod';
import { dumpLines, MAX_INLINE, objectPath } from '../src/lib/composefs-dump.js';
import { FsVerityHasher, hashFile } from '../src/lib/digest.js';
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

/**
 * Write every regular file bigger than MAX_INLINE once, as objects/xx/<rest> named
 * by its fs-verity digest (one read: the digest is computed while copying), and
 * collect the content of the small files that the image inlines.
 */
export async function writeObjectStore(tree: FsTree, rootfsTar: string, objectsDir: string): Promise<StoreResult> {
  const reader = new ContentReader(rootfsTar);
  const digests = new Map<Inode, string>();
  const inline = new Map<Inode, Buffer>();
  const seen = new Set<string>();
  let bytes = 0;
  const tmp = join(objectsDir, '.incoming');
  await mkdir(objectsDir, { recursive: true });
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
      const fv = new FsVerityHasher();
      const fh = await open(tmp, 'w');
      try {
        for await (const c of reader.read(n)) {
          fv.update(c);
          let off = 0;
          while (off < c.length) off += (await fh.write(c, off, c.length - off)).bytesWritten;
        }
        // No fsync per object: thousands of them cost seconds; the engine publishes
        // the finished directory as a whole.
      } finally {
        await fh.close();
      }
      if (fv.size !== n.size) throw new TarError(`${showPath(p)}: expected ${n.size} bytes, read ${fv.size}`);
      const dg = fv.digestHex();
      digests.set(n, dg);
      if (seen.has(dg)) continue; // same content already stored; tmp is overwritten next time
      seen.add(dg);
      bytes += n.size;
      await mkdir(join(objectsDir, dg.slice(0, 2)), { recursive: true });
      await rename(tmp, join(objectsDir, objectPath(dg)));
    }
  } finally {
    await rm(tmp, { force: true });
    await reader.close();
  }
  return { digests, inline, objects: seen.size, bytes };
}

/** composefs-dump of tree -> mkcomposefs -> image; returns the image's fs-verity digest (checked against our own). */
async function buildImage(ctx: RunContext<z.infer<typeof Params>>, tools: ToolsRoot, tree: FsTree, store: StoreResult, image: string, dumpName: string): Promise<string> {
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
  const own = (await hashFile(image, { fsverity: true })).fsverity;
  if (own !== printed) throw new StageError(`mkcomposefs reported image digest ${printed}, but the image file's fs-verity digest is ${own}`);
  return printed;
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
      const tree = await readTarTree(rootfsTar);
      const t0 = Date.now();
      const store = await writeObjectStore(tree, rootfsTar, objects);
      ctx.log(`composefs: ${store.objects} objects (${store.bytes} bytes), ${store.inline.size} inlined files, ${Date.now() - t0} ms`);

      const printed = await buildImage(ctx, tools, tree, store, image, 'tree.dump');

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
        const digest = await buildImage(ctx, tools, ltree, lstore, tmpImage, `layer-${l.priority}.dump`);
        await rename(tmpImage, join(ctx.outDir, 'layers', `${digest}.cfs`));
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
