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
import { hostArch } from '../stage.js';
import { aptInstallLine, preflight } from '../doctor/doctor.js';
import { toolVersions } from '../doctor/probe.js';

/** Same name as in signing.ts, repeated so this module need not load sigstore. */
const SIGNING_KEY_ENV = 'PIPELINE_SIGNING_KEY';

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

export async function prepare(opts: CommonOptions & { arch: string; variants: string[]; all?: boolean; forRun?: boolean }): Promise<Prepared> {
  const { kinds, loaded } = await loadSpec(opts.file);
  const variants = opts.all ? allVariants(loaded, opts.arch) : opts.variants;
  const cache = new Cache(opts.cacheDir ? path.resolve(opts.cacheDir) : defaultCacheRoot());
  await cache.init();
  const req = requirements(loaded, opts.arch, variants, kinds);
  const [{ epoch, source }, tv, assets] = await Promise.all([
    resolveEpoch(loaded.file, loaded.spec.source_date_epoch),
    toolVersions(req.tools, cache.root),
    assetDigests(req.assets, loaded.dir),
  ]);
  if (tv.missing.length) {
    // A build that cannot run fails before it starts; plan/explain still show the DAG.
    if (opts.forRun) throw new UsageError(`missing tools: ${tv.missing.map((t) => t.name).join(', ')}\n  fix: ${aptInstallLine(tv.missing)}`);
    for (const t of tv.missing) tv.versions[t.name] = 'missing';
  }
  if (tv.failed.length) {
    const f = tv.failed.map((t) => `${t.name} (${t.error ?? 'printed no version'})`).join(', ');
    if (opts.forRun) throw new UsageError(`cannot read the version of: ${f}; versions are part of cache keys`);
    for (const t of tv.failed) tv.versions[t.name] ??= 'unknown';
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
  /** --sign value: a key file or `keyless` (else $PIPELINE_SIGNING_KEY, else the spec's signing.key). */
  sign?: string;
}

export interface BuildResult {
  prepared: Prepared;
  outcome: RunOutcome;
  published: Published[];
}

export async function build(opts: BuildOptions): Promise<BuildResult> {
  const prepared = await prepare({ ...opts, forRun: true });
  const { plan, cache, loaded } = prepared;
  await checkHost(plan, cache);
  // Resolve (and read) the key before any stage runs: a bad key fails fast.
  // The sigstore libraries are only loaded when signing is on: they cost more
  // start-up time than the whole of a cached no-op build.
  let sign: ((dir: string) => Promise<void>) | undefined;
  if (opts.sign || process.env[SIGNING_KEY_ENV] || loaded.spec.signing?.key) {
    const { resolveSigningKey, signImageDir, signOptionsFromRef } = await import('../signing/signing.js');
    const keyRef = resolveSigningKey(opts.sign, loaded.spec.signing?.key, process.env, loaded.dir);
    if (keyRef?.kind === 'file' && !existsSync(keyRef.path)) throw new UsageError(`signing key not found: ${keyRef.path} (create one with \`pipeline keygen --out ${path.dirname(keyRef.path)}\`)`);
    if (keyRef) sign = (dir: string) => signImageDir(dir, signOptionsFromRef(keyRef));
  }
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
        sign,
      }),
    );
  }
  return { prepared, outcome, published };
}

/**
 * Fail before any stage starts if the machine cannot run the stages that will
 * run (privileges, foreign-arch emulation), with the fix in plain words.
 */
async function checkHost(plan: Plan, cache: Cache): Promise<void> {
  const misses = (await Promise.all(plan.stages.map(async (s) => ((await cache.lookup(s.key)) ? undefined : s)))).filter((s) => s !== undefined);
  if (!misses.length) return;
  const needs = new Set(misses.flatMap((s) => s.mod.requires ?? []));
  const foreign = hostArch() !== plan.arch && misses.some((s) => s.mod.requires?.includes('foreign-exec'));
  const errors = await preflight({
    tools: [],
    arches: foreign ? [plan.arch] : [],
    needsRoot: needs.has('root'),
    needsLoop: needs.has('loop'),
    cacheDir: cache.root,
  });
  if (errors.length) {
    throw new UsageError(`this machine cannot run the build:\n${errors.map((f) => `  ✗ ${f.what}: ${f.detail}${f.fix ? `\n    fix: ${f.fix}` : ''}`).join('\n')}`);
  }
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
