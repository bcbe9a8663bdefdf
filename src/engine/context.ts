// The one place a RunContext is put together: the scheduler and the tests'
// run-stage helper both call makeRunContext, so a kind sees the same contract
// (input lookup, unpacked rootfs, metadata) however it is run.
import { promises as fs } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { Cache } from './cache.js';
import { safeRemove } from './fsutil.js';
import { extractRootfs, requireRoot, rootfsTarOf } from '../lib/diskbuild.js';
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

// One unpack per rootfs entry in this process, however many stages ask at once.
const unpacking = new Map<string, Promise<string>>();

/**
 * The rootfs entry's tarball unpacked once under the cache (unpacked/<key>/tree) and
 * shared by every consumer: raw, iso and dracut used to extract the same 670 MB each.
 * Unpacked in staging and renamed into place with a completion mark, so a killed
 * unpack is never used and a concurrent build's copy is as good as ours.
 */
function sharedTree(ctx: RunContext<unknown>, cache: Cache, inp: StageInput, tar: string): Promise<string> {
  const dir = cache.unpackedPath(inp.key);
  let p = unpacking.get(dir);
  if (!p) {
    p = (async () => {
      const tree = join(dir, 'tree');
      if (await fs.access(join(dir, '.complete')).then(() => true, () => false)) return tree;
      await safeRemove(dir);
      const tmp = await cache.staging('unpack');
      try {
        await extractRootfs(ctx, tar, join(tmp, 'tree'));
        await fs.writeFile(join(tmp, '.complete'), '');
        await fs.mkdir(dirname(dir), { recursive: true });
        await fs.rename(tmp, dir).catch((e: NodeJS.ErrnoException) => {
          if (e.code !== 'ENOTEMPTY' && e.code !== 'EEXIST') throw e;
        });
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
