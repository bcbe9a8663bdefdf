// Run one stage module outside the engine: the engine's own RunContext
// (makeRunContext) whose exec spawns argument arrays, with params parsed by the
// module's own schema. Like the engine, scratch goes whatever happens and the
// output directory is emptied when the stage fails.
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, relative } from 'node:path';
import { makeRunContext } from '../../src/engine/context.js';
import { safeRemove } from '../../src/engine/fsutil.js';
import { runProcess } from '../../src/engine/process.js';
import type { Arch, StageInput, StageModule } from '../../src/stage.js';

export interface RunStageOptions {
  params?: unknown;
  inputs?: Record<string, StageInput>;
  arch?: Arch;
  sourceDateEpoch?: number;
  /** Defaults to a fresh temp dir, which the caller removes. */
  outDir?: string;
  workDir?: string;
  name?: string;
}

export interface RunStageResult {
  outDir: string;
  meta: Record<string, unknown>;
  log: string[];
  files: string[];
}

/** Relative paths of all regular files below dir, sorted. */
export async function listFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { recursive: true, withFileTypes: true })) {
    if (e.isFile()) out.push(relative(dir, join(e.parentPath ?? (e as unknown as { path: string }).path, e.name)));
  }
  return out.sort();
}

/** An input as the engine would hand it over: a directory of files plus metadata. */
export async function inputFrom(dir: string, meta: Record<string, unknown> = {}, kind = 'test'): Promise<StageInput> {
  return { dir, files: await listFiles(dir), meta, key: 'test', kind };
}

export async function runStage(mod: StageModule, opts: RunStageOptions = {}): Promise<RunStageResult> {
  const outDir = opts.outDir ?? (await mkdtemp(join(tmpdir(), 'stage-out-')));
  const workDir = opts.workDir ?? (await mkdtemp(join(tmpdir(), 'stage-work-')));
  await mkdir(outDir, { recursive: true });
  const log: string[] = [];
  const { ctx, meta } = makeRunContext({
    name: opts.name ?? mod.kind,
    arch: opts.arch ?? 'amd64',
    params: mod.params.parse(opts.params ?? {}),
    sourceDateEpoch: opts.sourceDateEpoch ?? 1704067200,
    outDir,
    workDir,
    inputs: opts.inputs ?? {},
    specDir: process.cwd(),
    signal: new AbortController().signal,
    exec: (cmd, args, o) => runProcess(cmd, args, { ...o, onOutput: (c) => log.push(c) }),
    log: (l) => log.push(l.endsWith('\n') ? l : l + '\n'),
  });
  try {
    await mod.run(ctx as never);
  } catch (e) {
    // The engine drops a failed stage's outDir; here the caller may own the
    // directory (a mount point), so empty it instead.
    for (const f of await readdir(outDir).catch(() => [] as string[])) await rm(join(outDir, f), { recursive: true, force: true });
    process.stderr.write(`stage ${mod.kind} failed; last log lines:\n${log.join('').split('\n').slice(-40).join('\n')}\n`);
    throw e;
  } finally {
    if (!opts.workDir) await safeRemove(workDir);
  }
  return { outDir, meta: meta(), log, files: await listFiles(outDir) };
}
