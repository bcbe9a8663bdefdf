// Orchestration (I/O): load the spec, gather facts, compile, run, publish.
// The CLI commands are thin wrappers around these functions.
import { constants as fsConstants, existsSync, promises as fs, readdirSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { assetDigests, checkSpecPaths } from './assets.js';
import { Cache, checkedRecordDigest, defaultCacheRoot } from './cache.js';
import { compile, diffParts, requirements, type LockProvider, type Plan } from './compile.js';
import { resolveEpoch, type EpochSource } from './epoch.js';
import { BuildError, SpecError, UsageError } from './errors.js';
import { loadKinds, PACKAGE_ROOT, type Kinds } from './kinds.js';
import { prefetchStampTrees, publish, unchangedPublication, type Published } from './publish.js';
import { within } from './fsutil.js';
import { runPlan, type Reporter, type RunOutcome } from './scheduler.js';
import type { RemoteStore } from './remote.js';
import { loadSpecFile, type LoadedSpec } from './spec.js';
import { hostArch } from '../stage.js';
import { preflight } from './preflight.js';
import { aptInstallLine, runtimePackages, toolVersions } from './tools.js';

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

/**
 * Locked builds (src/lock/) plug in here: the engine does not import them. The
 * CLI registers them once; without a registration no lock is read.
 */
export interface LockSupport {
  /** The spec's lock, or undefined when it has none (a lock that does not parse throws, exit 2). */
  load(specFile: string): Promise<LockProvider | undefined>;
  /** Before stages run: the locked stages' .debs present and verified (fetched unless offline), handed to the stages. */
  beforeRun(plan: Plan, cache: Cache, lookups: ReadonlyMap<string, unknown>, opts: { offline?: boolean; lockFile?: string; specFile: string; signal?: AbortSignal }): Promise<void>;
}
let lockSupport: LockSupport | undefined;
export function useLockSupport(s: LockSupport | undefined): void {
  lockSupport = s;
}

export interface Prepared {
  kinds: Kinds;
  loaded: LoadedSpec;
  plan: Plan;
  cache: Cache;
  epochSource: EpochSource;
  /** The spec's lock file when one exists (its mmdebstrap stages are locked). */
  lockFile?: string;
}

export async function loadSpec(file?: string): Promise<{ kinds: Kinds; loaded: LoadedSpec }> {
  const kinds = await loadKinds();
  const loaded = loadSpecFile(specPath(file), kinds);
  // Paths in the spec are checked against the file system here, once, for every command.
  const pathIssues = checkSpecPaths(loaded, kinds);
  if (pathIssues.length) throw new SpecError(pathIssues);
  return { kinds, loaded };
}

/** Every variant the spec declares for an arch (for --all). */
export function allVariants(loaded: LoadedSpec, arch: string): string[] {
  return Object.entries(loaded.spec.variants)
    .filter(([, v]) => Array.isArray(v) || !v.arches || v.arches.includes(arch as never))
    .map(([n]) => n);
}

export async function prepare(opts: CommonOptions & { arch: string; variants: string[]; all?: boolean; forRun?: boolean; ignoreLock?: boolean }): Promise<Prepared> {
  const { kinds, loaded } = await loadSpec(opts.file);
  const variants = opts.all ? allVariants(loaded, opts.arch) : opts.variants;
  // Nothing is created here: a command that fails on its arguments leaves no cache
  // behind; build() creates the store when it is about to run stages.
  const cache = new Cache(opts.cacheDir ? path.resolve(opts.cacheDir) : defaultCacheRoot());
  const req = requirements(loaded, opts.arch, variants, kinds);
  const [{ epoch, source }, tv, assets, lock] = await Promise.all([
    resolveEpoch(loaded.file, loaded.spec.source_date_epoch),
    toolVersions(req.tools, existsSync(cache.root) ? cache.root : undefined),
    assetDigests(req.assets, loaded.dir),
    // `pipeline lock` itself resolves from the spec alone: a stale lock must not stop it.
    opts.ignoreLock ? undefined : lockSupport?.load(loaded.file),
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
  const plan = compile(loaded, opts.arch, variants, kinds, {
    toolVersions: tv.versions,
    assetDigests: assets.digests,
    sourceDateEpoch: epoch,
    ...(lock ? { lock } : {}),
  });
  return { kinds, loaded, plan, cache, epochSource: source, ...(lock ? { lockFile: lock.file } : {}) };
}

export interface BuildOptions extends CommonOptions {
  arch: string;
  variants: string[];
  all?: boolean;
  outDir?: string;
  jobs?: number;
  reporter?: Reporter;
  signal?: AbortSignal;
  /**
   * Called once the spec is loaded, before any stage runs: returns what signs each
   * published directory, or undefined for no signing (the CLI passes imageSigner
   * from src/signing/signer.ts; the engine itself knows nothing of keys).
   */
  signer?: (loaded: LoadedSpec) => Promise<((dir: string) => Promise<void>) | undefined>;
  /** A shared cache (the CLI's registry-backed one): asked on local misses, handed built stages. */
  remote?: RemoteStore;
  /** Read nothing from the network: locked stages install from the .deb store only. */
  offline?: boolean;
}

export interface BuildResult {
  prepared: Prepared;
  outcome: RunOutcome;
  published: Published[];
}

export async function build(opts: BuildOptions): Promise<BuildResult> {
  prefetchPublished(opts);
  await checkOutDir(path.resolve(opts.outDir ?? 'images'));
  const prepared = await prepare({ ...opts, forRun: true });
  const { plan, cache, loaded } = prepared;
  // A killed build's staging and scratch dirs go first; live concurrent builds keep theirs.
  await cache.cleanStaging();
  const lookups = await cache.lookupAll(plan.stages.map((s) => s.key));
  await checkHost(plan, cache, lookups);
  // Resolve (and read) the key before any stage runs: a bad key fails fast.
  const sign = await opts.signer?.(loaded);
  await cache.init(); // every check passed: from here on the build runs
  // Locked stages: every .deb in the store and verified before anything installs.
  if (lockSupport) await lockSupport.beforeRun(plan, cache, lookups, { offline: opts.offline, lockFile: prepared.lockFile, specFile: loaded.file, signal: opts.signal });
  else if (opts.offline) throw new UsageError('--offline needs lock support, which this caller did not register');
  const logDir = path.join(cache.root, 'logs', plan.spec.name, plan.arch);
  const outRoot = path.resolve(opts.outDir ?? 'images');
  // Records the cache checked are named by their text's digest: the publish stamp's inputs.
  const recordDigest = (key: string) => checkedRecordDigest(cache, key);
  const pubOpts = { outRoot, memoDir: path.join(cache.root, 'published'), builderVersion: VERSION, sign, recordDigest };
  // Variants published exactly as they would be again: their sinks' blobs are not
  // read, so not checked (a composefs store is ~16 000 of them); the no-op costs
  // the published files' stats. Anything that reads them later checks them then.
  const hits = new Map(plan.stages.filter((s) => lookups.has(s.key)).map((s) => [s.name, lookups.get(s.key)!]));
  const unchanged = new Map<string, Published>();
  for (const v of plan.variants) {
    if (!plan.sinks[v]!.every((s) => hits.has(s))) continue;
    const p = await unchangedPublication(plan, v, hits, pubOpts);
    if (p) unchanged.set(v, p);
  }
  const unread = new Set([...unchanged.keys()].flatMap((v) => plan.sinks[v]!));
  for (const v of plan.variants) if (!unchanged.has(v)) for (const s of plan.sinks[v]!) unread.delete(s);
  const outcome = await runPlan(plan, {
    cache,
    specDir: loaded.dir,
    jobs: opts.jobs ?? os.availableParallelism(),
    signal: opts.signal,
    reporter: opts.reporter,
    logDir,
    lookups,
    unread,
    remote: opts.offline ? undefined : opts.remote,
  });
  if (opts.signal?.aborted) throw new BuildError('build interrupted');
  await cache.recordBuild(plan, [...outcome.entries.values()].map((e) => e.key));
  const published: Published[] = [];
  for (const variant of plan.variants) {
    const same = unchanged.get(variant);
    if (same && plan.sinks[variant]!.every((s) => outcome.entries.get(s) === hits.get(s))) {
      published.push(same);
      continue;
    }
    published.push(
      await publish(plan, variant, outcome.entries, {
        outRoot,
        blobPath: (sha) => cache.blobPath(sha),
        onCorrupt: (sha) => cache.dropBlob(sha),
        // What was published where (stat fingerprints): an unchanged set costs a stat per file.
        memoDir: path.join(cache.root, 'published'),
        builderVersion: VERSION,
        sign,
        recordDigest,
      }),
    );
  }
  return { prepared, outcome, published };
}

/**
 * The no-op check of a big published tree (a composefs store) walks it in a child
 * process: started here, it runs beside the spec loading, tool probing and record
 * reading that come first. Names that are no variant, or nothing stamped, start nothing.
 */
function prefetchPublished(opts: BuildOptions): void {
  try {
    const outRoot = path.resolve(opts.outDir ?? 'images');
    const memoDir = path.join(opts.cacheDir ? path.resolve(opts.cacheDir) : defaultCacheRoot(), 'published');
    const names = opts.all ? readdirSync(outRoot) : opts.variants;
    const dests = names.flatMap((v) => {
      try {
        return [within(within(outRoot, v), opts.arch)];
      } catch {
        return [];
      }
    });
    prefetchStampTrees(memoDir, dests);
  } catch {
    /* only a head start: the check itself runs later either way */
  }
}

/**
 * Fail before any stage starts if the machine cannot run the stages that will
 * run (privileges, foreign-arch emulation), with the fix in plain words.
 */
async function checkHost(plan: Plan, cache: Cache, lookups: ReadonlyMap<string, unknown>): Promise<void> {
  const misses = plan.stages.filter((s) => !lookups.has(s.key));
  if (!misses.length) return;
  const needs = new Set(misses.flatMap((s) => s.mod.requires ?? []));
  const foreign = hostArch() !== plan.arch && misses.some((s) => s.mod.requires?.includes('foreign-exec'));
  const errors = await preflight({
    tools: [], // prepare() already found them
    packages: runtimePackages(misses.flatMap((s) => s.tools)),
    arches: foreign ? [plan.arch] : [],
    needsRoot: needs.has('root'),
    needsLoop: needs.has('loop'),
    cacheDir: cache.root,
  });
  if (errors.length) {
    // A fix shared by several findings (one apt-get line) is printed once, after the last.
    const lines = errors.map((f, i) => `  ✗ ${f.what}: ${f.detail}${f.fix && !errors.slice(i + 1).some((g) => g.fix === f.fix) ? `\n    fix: ${f.fix}` : ''}`);
    throw new UsageError(`this machine cannot run the build:\n${lines.join('\n')}`);
  }
}

// statfs f_type of file systems an output tree can never live on (linux/magic.h).
const PSEUDO_FS: Record<number, string> = {
  0x9fa0: 'proc',
  0x62656572: 'sysfs',
  0x27e0eb: 'cgroup',
  0x63677270: 'cgroup2',
  0x64626720: 'debugfs',
  0x74726163: 'tracefs',
  0x73636673: 'securityfs',
  0x1cd1: 'devpts',
  0x6165676c: 'pstore',
  0xcafe4a11: 'bpf',
  0x62656570: 'configfs',
  0xde5e81e4: 'efivarfs',
  0x65735543: 'fusectl',
  0x19800202: 'mqueue',
  0x42494e4d: 'binfmt_misc',
  0xf97cff8c: 'selinuxfs',
};
const TMPFS_MAGIC = 0x01021994; // devtmpfs reports tmpfs's magic

/**
 * --out must be a directory we can create and write, on a real file system:
 * checked before anything runs (publishing under /proc would spin forever, a
 * file in the way would fail only after every stage ran).
 */
export async function checkOutDir(outRoot: string): Promise<void> {
  let dir = outRoot;
  for (;;) {
    const st = await fs.stat(dir).catch((e: NodeJS.ErrnoException) => (e.code === 'ENOENT' || e.code === 'ENOTDIR' ? undefined : Promise.reject(e)));
    if (st) {
      if (!st.isDirectory()) throw new UsageError(`--out ${outRoot}: expected a directory (or a path that can be created), found ${dir === outRoot ? 'a file' : `a file at ${dir}`}`);
      break;
    }
    const up = path.dirname(dir);
    if (up === dir) break;
    dir = up;
  }
  const real = await fs.realpath(dir);
  const sfs = await fs.statfs(real);
  const pseudo = PSEUDO_FS[Number(sfs.type)] ?? (Number(sfs.type) === TMPFS_MAGIC && (real === '/dev' || real.startsWith('/dev/')) ? 'devtmpfs' : undefined);
  if (pseudo) throw new UsageError(`--out ${outRoot}: expected a directory on a real file system, found ${real} on ${pseudo}`);
  try {
    await fs.access(real, fsConstants.W_OK);
  } catch {
    throw new UsageError(`--out ${outRoot}: expected a writable directory, but ${real} is not writable`);
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
  const lookups = await cache.lookupAll(plan.stages.map((s) => s.key));
  for (const st of plan.stages) {
    if (lookups.has(st.key)) {
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
