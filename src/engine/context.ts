// The one place a RunContext is put together: the scheduler and the tests'
// run-stage helper both call makeRunContext, so a kind sees the same contract
// (input lookup, unpacked rootfs, metadata) however it is run.
import { join } from 'node:path';
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
          const dest = join(o.workDir, `rootfs-${name}`);
          await extractRootfs(ctx, rootfsTarOf(input(name), name), dest);
          return dest;
        })();
        trees.set(name, p);
      }
      return p;
    },
  };
  return { ctx, meta: () => meta };
}
