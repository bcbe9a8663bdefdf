// The one place a RunContext is put together: the scheduler and the tests'
// run-stage helper both call makeRunContext, so a kind sees the same contract
// (input lookup, unpacked rootfs, metadata) however it is run.
import { promises as fs } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { createHash } from 'node:crypto';
import { Cache, writeAtomic } from './cache.js';
import { safeRemove } from './fsutil.js';
import { StageError, type RunContext, type StageInput } from '../stage.js';

/** What the caller supplies; the rest of the RunContext is built here. */
export type RunContextOptions = Pick<
  RunContext<unknown>,
  'name' | 'arch' | 'params' | 'sourceDateEpoch' | 'outDir' | 'workDir' | 'inputs' | 'specDir' | 'signal' | 'exec' | 'log'
>;

export interface MadeRunContext {
  ctx: RunContext<unknown>;
  /** Everything the stage recorded with setMeta, merged. */
  meta(): Record<string, unknown>;
}

function requireRoot(what: string): void {
  if (typeof process.getuid === 'function' && process.getuid() !== 0) {
    throw new StageError(`${what} needs root (a rootfs keeps its owners and device nodes)`);
  }
}

/** The rootfs tarball of an input: rootfs.tar, or its only *.tar. */
function rootfsTarOf(input: StageInput, what = 'rootfs'): string {
  const tars = input.files.filter((f) => f.endsWith('.tar'));
  const pick = input.files.includes('rootfs.tar') ? 'rootfs.tar' : tars.length === 1 ? tars[0] : undefined;
  if (!pick) throw new StageError(`input "${what}" (${input.kind}) has no rootfs.tar; files: ${input.files.join(', ') || '(none)'}`);
  return join(input.dir, pick);
}

/**
 * Unpack rootfs.tar keeping owners, modes, device nodes, xattrs (file capabilities)
 * and the tarball's mtimes. The input tarball itself is never modified.
 */
async function extractRootfs(ctx: Pick<RunContext<unknown>, 'exec'>, tarPath: string, dest: string): Promise<void> {
  await mkdir(dest, { recursive: true });
  await ctx.exec('tar', ['-C', dest, '--extract', '--file', tarPath, '--preserve-permissions', '--same-owner', '--numeric-owner', '--xattrs', '--xattrs-include=*']);
}

/** Absolute path of a file a stage needs from one of its inputs; a clear error if it is not there. */
export function inputPath(inputs: Record<string, StageInput>, input: string, file: string): string {
  const inp = inputs[input];
  if (!inp) throw new StageError(`input "${input}" is missing`);
  if (!inp.files.includes(file)) throw new StageError(`input "${input}" (${inp.kind}) has no ${file} (files: ${inp.files.join(', ') || 'none'})`);
  return join(inp.dir, file);
}

/**
 * The cache an input was handed out from: the engine gives stages cache trees,
 * <cache>/trees/<key>. Anything else (a test's hand-made input) has none.
 */
function cacheOf(inp: StageInput): Cache | undefined {
  const trees = dirname(inp.dir);
  return basename(inp.dir) === inp.key && basename(trees) === 'trees' ? new Cache(dirname(trees)) : undefined;
}

/**
 * The sha256 its cache record gives for a file of one of the inputs (by absolute
 * path), or undefined (not an input file, or an input from outside a cache). The
 * engine verified the tree against that record before handing it out, so a kind
 * that needs a digest of a big input (a 650 MB rootfs tar) need not read it again.
 */
export async function recordedSha256(inputs: Record<string, StageInput>, file: string): Promise<string | undefined> {
  for (const inp of Object.values(inputs)) {
    if (dirname(file) !== inp.dir) continue;
    const cache = cacheOf(inp);
    const rec = cache ? await cache.lookup(inp.key) : undefined;
    return rec?.files.find((f) => f.path === basename(file))?.sha256;
  }
  return undefined;
}

// One unpack per rootfs entry in this process, however many stages ask at once.
const unpacking = new Map<string, Promise<string>>();

/** Forget the unpacks this process made, as a new build process starts (for tests). */
export function forgetUnpacked(): void {
  unpacking.clear();
}

/**
 * A fingerprint of every entry's metadata in a tree. Any write, chmod, rename or
 * replacement moves an inode's ctime (which cannot be set back) or its inode
 * number, so a shared tree that a stage or a person changed never matches again.
 */
async function treeStamp(root: string): Promise<string> {
  const h = createHash('sha256');
  const visit = async (rel: string): Promise<void> => {
    const abs = rel ? join(root, rel) : root;
    const st = await fs.lstat(abs, { bigint: true });
    h.update(`${rel}\0${st.ino}\0${st.mode}\0${st.size}\0${st.mtimeNs}\0${st.ctimeNs}\n`);
    if (!st.isDirectory()) return;
    for (const name of (await fs.readdir(abs)).sort()) await visit(rel ? `${rel}/${name}` : name);
  };
  await visit('');
  return h.digest('hex');
}

/**
 * The rootfs entry's tarball unpacked once under the cache (unpacked/<key>/tree) and
 * shared by every consumer: raw, iso and dracut used to extract the same 670 MB each.
 * Unpacked in staging and renamed into place with a completion mark holding the
 * tree's stamp, so a killed unpack is never used, a tree changed since (it is
 * shared read-only) is unpacked again, and a concurrent build's copy is as good as ours.
 */
function sharedTree(ctx: RunContext<unknown>, cache: Cache, inp: StageInput, tar: string): Promise<string> {
  const dir = cache.unpackedPath(inp.key);
  let p = unpacking.get(dir);
  if (!p) {
    p = (async () => {
      const tree = join(dir, 'tree');
      const mark = await fs.readFile(join(dir, '.complete'), 'utf8').catch(() => undefined);
      if (mark !== undefined) {
        if (mark.trim() === (await treeStamp(tree).catch(() => ''))) return tree;
        ctx.log(`the shared unpacked rootfs of ${inp.key.slice(0, 12)} changed since it was unpacked; unpacking it again`);
      }
      await safeRemove(dir);
      const tmp = await cache.staging('unpack');
      try {
        await extractRootfs(ctx, tar, join(tmp, 'tree'));
        await fs.mkdir(dirname(dir), { recursive: true });
        // The stamp is taken after the rename: a rename moves the tree root's ctime.
        await fs.rename(tmp, dir).catch((e: NodeJS.ErrnoException) => {
          if (e.code !== 'ENOTEMPTY' && e.code !== 'EEXIST') throw e;
        });
        await writeAtomic(join(dir, '.complete'), (await treeStamp(tree)) + '\n');
      } finally {
        await safeRemove(tmp);
      }
      return tree;
    })();
    // A failed unpack is retried by the next caller, not remembered.
    p.catch(() => unpacking.delete(dir));
    unpacking.set(dir, p);
  }
  return p;
}

export function makeRunContext(o: RunContextOptions): MadeRunContext {
  let meta: Record<string, unknown> = {};
  // One unpack per input and stage, however often the kind asks.
  const trees = new Map<string, Promise<string>>();
  const input = (name: string): StageInput => {
    const inp = o.inputs[name];
    if (!inp) throw new StageError(`input "${name}" is missing`);
    return inp;
  };
  const ctx: RunContext<unknown> = {
    name: o.name,
    arch: o.arch,
    params: o.params,
    sourceDateEpoch: o.sourceDateEpoch,
    outDir: o.outDir,
    workDir: o.workDir,
    inputs: o.inputs,
    specDir: o.specDir,
    signal: o.signal,
    exec: o.exec,
    log: o.log,
    setMeta: (m) => {
      meta = { ...meta, ...m };
    },
    input: (name, file) => inputPath(o.inputs, name, file),
    rootfsTar: (name = 'rootfs') => rootfsTarOf(input(name), name),
    rootfsTree: (name = 'rootfs') => {
      let p = trees.get(name);
      if (!p) {
        p = (async () => {
          requireRoot(`unpacking input "${name}" for stage ${o.name}`);
          const inp = input(name);
          const tar = rootfsTarOf(inp, name);
          const cache = cacheOf(inp);
          if (cache) return sharedTree(ctx, cache, inp, tar);
          const dest = join(o.workDir, `rootfs-${name}`);
          await extractRootfs(ctx, tar, dest);
          return dest;
        })();
        trees.set(name, p);
      }
      return p;
    },
  };
  return { ctx, meta: () => meta };
}
