// Runs a plan: every stage whose inputs are ready runs at once, bounded by
// --jobs, with heavy stages (chroots, big downloads) limited further. When more
// stages are ready than there are slots, the one with the longest remaining path
// to a sink goes first (stage times from the previous run, see durations.json),
// so the critical path starts early instead of in plan order. A stage
// that is cached is not run, and nothing upstream of a cached stage is even
// looked at unless something downstream of it must be rebuilt.
import { createWriteStream, promises as fs, type WriteStream } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Cache, CacheCorruptError, writeAtomic, type Entry } from './cache.js';
import type { Plan, PlanStage } from './compile.js';
import { BuildError } from './errors.js';
import { runProcess, stageEnv } from './process.js';
import { safeRemove } from './fsutil.js';
import { makeRunContext } from './context.js';
import { stageWorkDir } from './scratch.js';
import type { RemoteStore } from './remote.js';
import { StageError, type ExecOptions, type StageInput } from '../stage.js';

/** pulled: a local miss filled from the remote cache (verified), not executed. */
export type StageStatus = 'cached' | 'pulled' | 'built' | 'failed' | 'cancelled' | 'unused';

export interface StageResult {
  name: string;
  kind: string;
  key: string;
  status: StageStatus;
  /** Wall seconds spent running the stage, or pulling it (0 when cached). */
  seconds: number;
  /** Offsets from the start of the run, for overlap analysis. */
  startedAt?: number;
  endedAt?: number;
  logFile?: string;
}

export interface Reporter {
  start(stage: PlanStage): void;
  done(stage: PlanStage, result: StageResult): void;
  line?(stage: PlanStage, line: string): void;
}

export interface RunOptions {
  cache: Cache;
  specDir: string;
  jobs: number;
  heavyJobs?: number;
  signal?: AbortSignal;
  reporter?: Reporter;
  logDir: string;
  /** The plan's records from cache.lookupAll (read once per build); looked up here when absent. */
  lookups?: ReadonlyMap<string, Entry>;
  /**
   * Hits whose blobs need no check unless a stage that runs reads them: the sinks of
   * variants whose publication is unchanged (src/engine/publish.ts unchangedPublication).
   */
  unread?: ReadonlySet<string>;
  /** A shared cache asked on local misses and handed every built stage. */
  remote?: RemoteStore;
}

export interface RunOutcome {
  results: StageResult[];
  /** Entries of every stage that is available (sinks always). */
  entries: Map<string, Entry>;
  seconds: number;
}

/** Which stages must run: walk back from the sinks, descending only through misses. */
export function stagesToRun(plan: Plan, hits: ReadonlySet<string>): { run: Set<string>; needed: Set<string> } {
  const needed = new Set(Object.values(plan.sinks).flat());
  const run = new Set<string>();
  for (const st of [...plan.stages].reverse()) {
    if (!needed.has(st.name)) continue;
    if (hits.has(st.name)) continue;
    run.add(st.name);
    for (const ref of Object.values(st.inputs)) needed.add(ref);
  }
  return { run, needed };
}

/**
 * Each stage's longest remaining path: its own estimated seconds plus the longest
 * of its consumers' that also run. Unknown stages count the mean of the known
 * ones (1 s when none is known), so a first build orders by chain length.
 */
export function remainingPaths(stages: readonly Pick<PlanStage, 'name' | 'inputs'>[], run: ReadonlySet<string>, estimates: ReadonlyMap<string, number>): Map<string, number> {
  const known = [...estimates.values()].filter((x) => Number.isFinite(x) && x >= 0);
  const fallback = known.length ? known.reduce((a, b) => a + b, 0) / known.length : 1;
  const consumers = new Map<string, string[]>();
  for (const st of stages) {
    if (!run.has(st.name)) continue;
    for (const ref of new Set(Object.values(st.inputs))) consumers.set(ref, [...(consumers.get(ref) ?? []), st.name]);
  }
  const out = new Map<string, number>();
  // Plan stages are in dependency order: consumers come after their inputs.
  for (const st of [...stages].reverse()) {
    if (!run.has(st.name)) continue;
    const own = estimates.get(st.name) ?? fallback;
    out.set(st.name, own + Math.max(0, ...(consumers.get(st.name) ?? []).map((c) => out.get(c) ?? 0)));
  }
  return out;
}

/**
 * A bounded pool that starts the highest-priority waiting task when a slot frees
 * (ties: first come). p-limit is first-in first-out, which starts ready stages in
 * plan order whatever their remaining path.
 */
export class PriorityPool {
  private running = 0;
  private seq = 0;
  private pending = false;
  private waiting: { prio: number; seq: number; start: () => void }[] = [];
  constructor(private readonly slots: number) {}
  run<T>(prio: number, fn: () => Promise<T>): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.waiting.push({
        prio,
        seq: this.seq++,
        start: () => {
          this.running++;
          fn()
            .then(resolve, reject)
            .finally(() => {
              this.running--;
              this.schedule();
            });
        },
      });
      this.schedule();
    });
  }
  /**
   * Pick after the current turn: stages that become ready together (all inputs
   * cached, or one upstream stage finishing) are all waiting before one is chosen.
   */
  private schedule(): void {
    if (this.pending) return;
    this.pending = true;
    setImmediate(() => {
      this.pending = false;
      this.next();
    });
  }
  private next(): void {
    while (this.running < this.slots && this.waiting.length) {
      let best = 0;
      for (let i = 1; i < this.waiting.length; i++) {
        const a = this.waiting[i]!;
        const b = this.waiting[best]!;
        if (a.prio > b.prio || (a.prio === b.prio && a.seq < b.seq)) best = i;
      }
      this.waiting.splice(best, 1)[0]!.start();
    }
  }
}

/** Stage seconds of the last run that built them (a hint for ordering only: lost or torn, it costs nothing). */
const DURATIONS = 'durations.json';
async function readDurations(logDir: string): Promise<Map<string, number>> {
  try {
    const j = JSON.parse(await fs.readFile(path.join(logDir, DURATIONS), 'utf8')) as Record<string, unknown>;
    return new Map(Object.entries(j).filter((e): e is [string, number] => typeof e[1] === 'number'));
  } catch {
    return new Map();
  }
}
async function writeDurations(cache: Cache, logDir: string, old: ReadonlyMap<string, number>, results: Iterable<StageResult>): Promise<void> {
  const next = new Map(old);
  for (const r of results) if (r.status === 'built') next.set(r.name, Math.round(r.seconds * 100) / 100);
  await fs.mkdir(logDir, { recursive: true });
  const text = JSON.stringify(Object.fromEntries([...next].sort(([a], [b]) => (a < b ? -1 : 1)))) + '\n';
  // A hint: no fsync; the temp file is owner-named in the cache's tmp/, so a killed write leaves nothing for long.
  await writeAtomic(path.join(logDir, DURATIONS), text, cache.tmpDir(), { durable: false });
}

export async function runPlan(plan: Plan, opts: RunOptions): Promise<RunOutcome> {
  const t0 = performance.now();
  const { cache } = opts;
  const controller = new AbortController();
  const onOuterAbort = () => controller.abort(opts.signal?.reason);
  opts.signal?.addEventListener('abort', onOuterAbort, { once: true });

  const entries = new Map<string, Entry>();
  const lookups = opts.lookups ?? (await cache.lookupAll(plan.stages.map((s) => s.key)));
  for (const st of plan.stages) {
    const e = lookups.get(st.key);
    if (e) entries.set(st.name, e);
  }
  // Verify the hits we will actually use; a corrupt one becomes a miss, which may
  // pull in its inputs, so repeat until stable.
  let sel = stagesToRun(plan, new Set(entries.keys()));
  for (;;) {
    let changed = false;
    const readByRun = new Set(plan.stages.filter((s) => sel.run.has(s.name)).flatMap((s) => Object.values(s.inputs)));
    for (const name of sel.needed) {
      const e = entries.get(name);
      if (!e || sel.run.has(name)) continue;
      if (opts.unread?.has(name) && !readByRun.has(name)) continue;
      try {
        await cache.verify(e);
      } catch (err) {
        if (!(err instanceof CacheCorruptError)) throw err;
        opts.reporter?.line?.(plan.stages.find((s) => s.name === name)!, `warning: ${err.message}`);
        entries.delete(name);
        // Records sharing the bad blob were dropped with it: they are misses too.
        for (const [n, other] of entries) if (err.dropped.includes(other.key)) entries.delete(n);
        changed = true;
      }
    }
    if (!changed) break;
    sel = stagesToRun(plan, new Set(entries.keys()));
  }

  // Local misses: ask the remote, most downstream first, so a stage whose output is
  // pulled never needs its inputs (they are neither pulled nor built).
  const pulled = new Map<string, number>();
  if (opts.remote) {
    const tried = new Set<string>();
    for (;;) {
      const st = [...plan.stages].reverse().find((s) => sel.run.has(s.name) && !tried.has(s.name));
      if (!st || controller.signal.aborted) break;
      tried.add(st.name);
      const t = performance.now();
      const e = await opts.remote.fetch(st.key, st.name, cache).catch(() => undefined);
      if (!e) continue;
      entries.set(st.name, e);
      pulled.set(st.name, (performance.now() - t) / 1000);
      sel = stagesToRun(plan, new Set(entries.keys()));
    }
  }

  const results = new Map<string, StageResult>();
  for (const st of plan.stages) {
    const status = sel.run.has(st.name) ? 'cancelled' : pulled.has(st.name) ? 'pulled' : entries.has(st.name) ? 'cached' : 'unused';
    results.set(st.name, { name: st.name, kind: st.kind, key: st.key, status, seconds: pulled.get(st.name) ?? 0 });
  }
  for (const st of plan.stages) if (!sel.run.has(st.name)) opts.reporter?.done(st, results.get(st.name)!);

  const limit = new PriorityPool(Math.max(1, opts.jobs));
  const heavy = new PriorityPool(Math.max(1, opts.heavyJobs ?? 1));
  const durations = sel.run.size ? await readDurations(opts.logDir) : new Map<string, number>();
  const priority = remainingPaths(plan.stages, sel.run, durations);
  const promises = new Map<string, Promise<Entry>>();
  const pushes: Promise<void>[] = [];
  let firstError: unknown;

  const byName = new Map(plan.stages.map((s) => [s.name, s]));
  const get = (name: string): Promise<Entry> => {
    const existing = promises.get(name);
    if (existing) return existing;
    const st = byName.get(name)!;
    let p: Promise<Entry>;
    if (!sel.run.has(name)) {
      p = Promise.resolve(entries.get(name)!);
    } else {
      p = (async () => {
        const inputs = await Promise.all(Object.entries(st.inputs).map(async ([k, ref]) => [k, await get(ref)] as const));
        const prio = priority.get(name) ?? 0;
        const go = () => limit.run(prio, () => runStage(plan, st, Object.fromEntries(inputs), opts, controller.signal, results, t0));
        const entry = await (st.heavy ? heavy.run(prio, go) : go());
        entries.set(name, entry);
        // In the background: downstream stages do not wait for the upload.
        if (opts.remote && !opts.remote.readOnly) pushes.push(opts.remote.store(entry, cache).catch(() => {}));
        return entry;
      })();
      p.catch((e) => {
        // The first failure is the cause; whatever fails after the abort was cancelled by it.
        if (firstError === undefined && !controller.signal.aborted) firstError = e;
        controller.abort(e);
      });
    }
    promises.set(name, p);
    return p;
  };
  const all = plan.stages.filter((s) => sel.run.has(s.name)).map((s) => get(s.name));
  const settled = await Promise.allSettled(all);
  if (sel.run.size) await writeDurations(cache, opts.logDir, durations, results.values()).catch(() => {});
  // Stages that were built are shared even when a later one failed.
  await Promise.all(pushes);
  opts.signal?.removeEventListener('abort', onOuterAbort);
  const seconds = (performance.now() - t0) / 1000;
  const list = plan.stages.map((s) => results.get(s.name)!);
  if (settled.some((s) => s.status === 'rejected')) {
    if (opts.signal?.aborted && firstError === undefined) throw new BuildError('build interrupted; running stages were stopped and nothing partial was kept');
    const err = firstError ?? settled.find((s) => s.status === 'rejected')!;
    const failed = list.find((r) => r.status === 'failed');
    const msg = err instanceof Error ? err.message : String(err);
    const tail = err instanceof StageError ? err.logTail : '';
    throw Object.assign(new BuildError(failed ? `stage ${failed.name} (${failed.kind}) failed: ${msg}` : msg, tail + (failed?.logFile ? `\nfull log: ${failed.logFile}` : '')), { results: list });
  }
  return { results: list, entries, seconds };
}

async function runStage(
  plan: Plan,
  st: PlanStage,
  inputs: Record<string, Entry>,
  opts: RunOptions,
  signal: AbortSignal,
  results: Map<string, StageResult>,
  t0: number,
): Promise<Entry> {
  if (signal.aborted) throw new StageError('cancelled before start');
  const { cache } = opts;
  const res = results.get(st.name)!;
  const start = performance.now();
  res.startedAt = (start - t0) / 1000;
  opts.reporter?.start(st);
  let outDir = await cache.staging(`out-${st.name}`);
  let work = await stageWorkDir(cache, `work-${st.name}`, st.mod.memoryWorkDir);
  await fs.mkdir(opts.logDir, { recursive: true });
  const logFile = path.join(opts.logDir, `${st.name}.log`);
  res.logFile = logFile;
  const log: WriteStream = createWriteStream(logFile);
  const tail: string[] = [];
  const write = (text: string) => {
    log.write(text);
    for (const l of text.split('\n')) {
      if (!l) continue;
      tail.push(l);
      if (tail.length > 60) tail.shift();
      opts.reporter?.line?.(st, l);
    }
  };
  const attempt = async (stageInputs: Record<string, StageInput>) => {
    const workDir = work.dir;
    if (st.mod.memoryWorkDir) write(`# ${work.note}\n`);
    // An allow-list, never our whole environment (signing key, registry password, CI tokens).
    const env = stageEnv(process.env, { sourceDateEpoch: plan.sourceDateEpoch, home: workDir, declared: st.mod.env, kind: st.mod.kind });
    const { ctx, meta } = makeRunContext({
      name: st.name,
      arch: plan.arch,
      params: st.params,
      sourceDateEpoch: plan.sourceDateEpoch,
      outDir,
      workDir,
      inputs: stageInputs,
      specDir: opts.specDir,
      signal,
      exec: (cmd: string, args: string[], o: ExecOptions = {}) => {
        write(`$ ${[cmd, ...args].map(quoteForLog).join(' ')}\n`);
        return runProcess(cmd, args, { ...o, baseEnv: env, signal, onOutput: write, logTail: () => tail.join('\n') });
      },
      log: (l: string) => write(l.endsWith('\n') ? l : l + '\n'),
    });
    await st.mod.run(ctx);
    return meta();
  };
  try {
    const stageInputs: Record<string, StageInput> = {};
    for (const [k, e] of Object.entries(inputs)) {
      const dir = await cache.materialize(e);
      stageInputs[k] = { dir, files: e.files.map((f) => f.path), meta: e.meta, key: e.key, kind: e.kind };
    }
    let meta: Record<string, unknown>;
    try {
      meta = await attempt(stageInputs);
    } catch (e) {
      // A tree bigger than the RAM it was given: once more on disk, from scratch.
      if (signal.aborted || !work.memory || !(await work.full())) throw e;
      write(`# the work dir in RAM filled up (${e instanceof Error ? e.message.split('\n')[0] : String(e)}); running the stage again on disk\n`);
      await Promise.all([safeRemove(outDir), work.remove()]);
      outDir = await cache.staging(`out-${st.name}`);
      work = await stageWorkDir(cache, `work-${st.name}`, st.mod.memoryWorkDir, { forceDisk: true });
      meta = await attempt(stageInputs);
    }
    if (signal.aborted) throw new StageError('cancelled');
    const entry = await cache.commit(st.key, st.name, st.parts, outDir, JSON.parse(JSON.stringify(meta)));
    res.status = 'built';
    return entry;
  } catch (e) {
    res.status = signal.aborted ? 'cancelled' : 'failed';
    if (e instanceof StageError) throw new StageError(e.message, e.logTail || tail.join('\n'));
    throw new StageError(e instanceof Error ? e.message : String(e), tail.join('\n'));
  } finally {
    const end = performance.now();
    res.seconds = (end - start) / 1000;
    res.endedAt = (end - t0) / 1000;
    await new Promise<void>((r) => log.end(r));
    await Promise.all([safeRemove(outDir), work.remove()]);
    opts.reporter?.done(st, res);
  }
}

function quoteForLog(a: string): string {
  return /^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`;
}
