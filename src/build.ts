// Orchestration (I/O): load the spec, gather facts, compile, run, publish.
// The CLI commands are thin wrappers around these functions.
import { existsSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { assetDigests } from './assets.js';
import { Cache, defaultCacheRoot } from './cache.js';
import { compile, diffParts, requirements, type Plan } from './compile.js';
import { resolveEpoch, type EpochSource } from './epoch.js';
import { BuildError, SpecError, UsageError } from './errors.js';
import { loadKinds, PACKAGE_ROOT, type Kinds } from './kinds.js';
import { publish, type Published } from './publish.js';
import { runPlan, type Reporter, type RunOutcome } from './scheduler.js';
import { loadSpecFile, type LoadedSpec } from './spec.js';
import { aptLine, toolVersions } from './tools.js';

export const VERSION: string = JSON.parse(readFileSync(path.join(PACKAGE_ROOT, 'package.json'), 'utf8')).version;

/** The shipped default pipeline, used when neither -f nor ./pipeline.yaml is given. */
export const DEFAULT_SPEC = path.join(PACKAGE_ROOT, 'pipelines', 'powernode.yaml');

export function specPath(file?: string, env = process.env): string {
  if (file) return path.resolve(file);
  if (env.PIPELINE_SPEC) return path.resolve(env.PIPELINE_SPEC);
  if (existsSync('pipeline.yaml')) return path.resolve('pipeline.yaml');
  return DEFAULT_SPEC;
}

export interface CommonOptions {
  file?: string;
  cacheDir?: string;
}

export interface Prepared {
  kinds: Kinds;
  loaded: LoadedSpec;
  plan: Plan;
  cache: Cache;
  epochSource: EpochSource;
}

export async function loadSpec(file?: string): Promise<{ kinds: Kinds; loaded: LoadedSpec }> {
  const kinds = await loadKinds();
  return { kinds, loaded: loadSpecFile(specPath(file), kinds) };
}

/** Every variant the spec declares for an arch (for --all). */
export function allVariants(loaded: LoadedSpec, arch: string): string[] {
  return Object.entries(loaded.spec.variants)
    .filter(([, v]) => Array.isArray(v) || !v.arches || v.arches.includes(arch as never))
    .map(([n]) => n);
}

export async function prepare(opts: CommonOptions & { arch: string; variants: string[]; all?: boolean }): Promise<Prepared> {
  const { kinds, loaded } = await loadSpec(opts.file);
  const variants = opts.all ? allVariants(loaded, opts.arch) : opts.variants;
  const cache = new Cache(opts.cacheDir ? path.resolve(opts.cacheDir) : defaultCacheRoot());
  await cache.init();
  const req = requirements(loaded, opts.arch, variants, kinds);
  const [{ epoch, source }, tv, assets] = await Promise.all([
    resolveEpoch(loaded.file, loaded.spec.source_date_epoch),
    toolVersions(req.tools, path.join(cache.root, 'tools.json')),
    assetDigests(req.assets, loaded.dir),
  ]);
  if (tv.missing.length) {
    throw new UsageError(`missing tools: ${tv.missing.map((t) => t.name).join(', ')}\n  fix: ${aptLine(tv.missing)}`);
  }
  if (assets.missing.length) {
    throw new SpecError(
      assets.missing.map((a) => {
        const st = req.assetOwners[a]!;
        return { loc: loaded.locate(['stages', st, 'with']), path: `stages.${st}.with`, message: `file not found: ${a} (looked next to the spec and in the pipeline package)` };
      }),
    );
  }
  const plan = compile(loaded, opts.arch, variants, kinds, { toolVersions: tv.versions, assetDigests: assets.digests, sourceDateEpoch: epoch });
  return { kinds, loaded, plan, cache, epochSource: source };
}

export interface BuildOptions extends CommonOptions {
  arch: string;
  variants: string[];
  all?: boolean;
  outDir?: string;
  jobs?: number;
  reporter?: Reporter;
  signal?: AbortSignal;
  /** Called on each staged image dir before it is swapped in (signing). */
  beforePublish?: (dir: string) => Promise<void>;
}

export interface BuildResult {
  prepared: Prepared;
  outcome: RunOutcome;
  published: Published[];
}

export async function build(opts: BuildOptions): Promise<BuildResult> {
  const prepared = await prepare(opts);
  const { plan, cache, loaded } = prepared;
  const logDir = path.join(cache.root, 'logs', plan.spec.name, plan.arch);
  const outcome = await runPlan(plan, {
    cache,
    specDir: loaded.dir,
    jobs: opts.jobs ?? os.availableParallelism(),
    signal: opts.signal,
    reporter: opts.reporter,
    logDir,
  });
  if (opts.signal?.aborted) throw new BuildError('build interrupted');
  await Promise.all(
    plan.stages.map(async (st) => {
      await cache.writeHistory(plan.spec.name, plan.arch, st.name, st.key, st.parts);
      if (outcome.entries.has(st.name)) await cache.touch(st.key);
    }),
  );
  const published: Published[] = [];
  const outRoot = path.resolve(opts.outDir ?? 'images');
  for (const variant of plan.variants) {
    published.push(
      await publish(plan, variant, outcome.entries, {
        outRoot,
        blobPath: (sha) => cache.blobPath(sha),
        builderVersion: VERSION,
        beforeSwap: opts.beforePublish,
      }),
    );
  }
  return { prepared, outcome, published };
}

export interface Explanation {
  stage: string;
  kind: string;
  key: string;
  status: 'hit' | 'miss';
  reasons: string[];
}

/** Per stage: hit or miss, and for a miss what changed since the last recorded build. */
export async function explain(opts: CommonOptions & { arch: string; variants: string[]; all?: boolean }): Promise<{ plan: Plan; rows: Explanation[] }> {
  const { plan, cache } = await prepare(opts);
  const rows: Explanation[] = [];
  for (const st of plan.stages) {
    const entry = await cache.lookup(st.key);
    if (entry) {
      rows.push({ stage: st.name, kind: st.kind, key: st.key, status: 'hit', reasons: [] });
      continue;
    }
    const prev = await cache.readHistory(plan.spec.name, plan.arch, st.name);
    let reasons: string[];
    if (!prev) reasons = ['never built for this spec and arch'];
    else if (prev.key === st.key) reasons = ['same key as the last build, but its entry is gone (evicted by gc or removed)'];
    else {
      reasons = diffParts(prev.parts, st.parts);
      if (!reasons.length) reasons = ['key format changed'];
    }
    rows.push({ stage: st.name, kind: st.kind, key: st.key, status: 'miss', reasons });
  }
  return { plan, rows };
}
