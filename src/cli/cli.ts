// Command line. Exit codes: 0 ok, 1 build/test failure, 2 usage or spec error.
import { Command, CommanderError, Option } from 'commander';
import { z } from 'zod';
import { existsSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { specJsonSchema } from '../../schema/spec.js';
import { allVariants, build, explain, loadSpec, prepare, useLockSupport, VERSION } from '../engine/build.js';
import { Cache, defaultCacheRoot } from '../engine/cache.js';
import { loadKinds } from '../engine/kinds.js';
import { BuildError, SpecError, UsageError } from '../engine/errors.js';
import { planDot, planJson, planMermaid, planText, specSummary } from './plan-format.js';
import { interruptSignal } from './interrupt.js';
import { fmt, pickMode, Progress, summaryTable } from './progress.js';
import { parseSize } from '../lib/diskimage.js';
import { ARCHES } from '../arch.js';
import { imageSigner } from '../signing/signer.js';
import type { StageResult } from '../engine/scheduler.js';
import { lockPathFor } from '../lock/format.js';

// Locked builds (src/lock/) plug into the engine here, loaded only when used.
useLockSupport({
  // A spec without a lock file (the common case) does not load the lock code.
  load: async (specFile) => (existsSync(lockPathFor(specFile)) ? (await import('../lock/lock.js')).loadLockProvider(specFile) : undefined),
  beforeRun: async (plan, cache, lookups, opts) => {
    if (plan.stages.some((s) => s.lock) || opts.offline) await (await import('../lock/lock.js')).prepareLocked(plan, cache, lookups, opts);
  },
});

/** `cache gc` keeps every .deb a registered lock names. */
async function gcWithLocks(c: Cache, maxBytes: number) {
  const { debsToKeep } = await import('../lock/store.js');
  return c.gc(maxBytes, { keepDebs: await debsToKeep(c) });
}

const program = new Command();
program
  .name('pipeline')
  .description('Declarative image-build pipelines: one YAML spec -> cached, parallel, reproducible OS images')
  .version(VERSION)
  .showHelpAfterError('(run with --help for usage)')
  .exitOverride();

const specOpt = () => new Option('-f, --file <spec>', 'pipeline spec (default: ./pipeline.yaml, else the shipped pipelines/powernode.yaml)');
const cacheOpt = () => new Option('--cache-dir <dir>', 'cache location (default: $PIPELINE_CACHE_DIR or $XDG_CACHE_HOME/pipeline)');

const remoteOpts = (cmd: Command) =>
  cmd
    .option('--remote-cache <url>', 'shared cache in an OCI registry, oci://HOST[:PORT]/REPO (default: $PIPELINE_REMOTE_CACHE)')
    .addOption(new Option('--remote-cache-mode <mode>', 'read: pull only (untrusted jobs); readwrite: also push what was built (default: $PIPELINE_REMOTE_CACHE_MODE or readwrite)').choices(['read', 'readwrite']))
    .option('--remote-cache-verify-key <pub>', 'only use remote entries signed with this key (entries are signed with --sign / $PIPELINE_SIGNING_KEY)');

/** The registry-backed remote cache, when one is configured (loaded lazily: plain builds never load registry code). */
async function remoteCache(o: { remoteCache?: string; remoteCacheMode?: string; remoteCacheVerifyKey?: string; sign?: string }, progress: Progress, forPush = true) {
  const url = o.remoteCache ?? process.env.PIPELINE_REMOTE_CACHE;
  if (!url) {
    if (o.remoteCacheVerifyKey) throw new UsageError('--remote-cache-verify-key needs --remote-cache (or $PIPELINE_REMOTE_CACHE)');
    return undefined;
  }
  const mode = o.remoteCacheMode ?? process.env.PIPELINE_REMOTE_CACHE_MODE ?? 'readwrite';
  if (mode !== 'read' && mode !== 'readwrite') throw new UsageError(`PIPELINE_REMOTE_CACHE_MODE must be read or readwrite, got "${mode}"`);
  const { openRemoteCache } = await import('../remote-cache/open.js');
  return openRemoteCache(url, {
    mode: forPush ? mode : 'read',
    verifyKey: o.remoteCacheVerifyKey,
    sign: o.sign,
    warn: (m) => {
      progress.event({ event: 'warning', source: 'remote-cache', message: m });
      process.stderr.write(`warning: ${m}\n`);
    },
  });
}

function parseJobs(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new UsageError(`--jobs expects a whole number ≥ 1, got "${v}"`);
  return n;
}

remoteOpts(program
  .command('build'))
  .description('build variants for an arch: pipeline build amd64 ipxe [raw …] | amd64 --all | --all (every arch the spec lists)')
  .argument('[arch]', `target architecture (${ARCHES.join(', ')}); with --all, omit it for every arch the spec lists`)
  .argument('[variants...]', 'variants to build (see `pipeline validate`)')
  .addOption(specOpt())
  .addOption(cacheOpt())
  .option('--all', 'every variant the spec declares for this arch')
  .option('-o, --out <dir>', 'output root', 'images')
  .option('-j, --jobs <n>', 'stages to run at once (default: number of cores)', parseJobs)
  .option('--json', 'JSON-lines progress and summary on stdout')
  .option('-v, --verbose', 'stream stage logs')
  .option('--sign <key>', 'sign the provenance with this private key, or `keyless` (Fulcio/Rekor in CI)')
  .option('--offline', 'read nothing from the network: locked stages install from the .deb store only (see `pipeline fetch`)')
  .action(async (arch: string | undefined, variants: string[], o) => {
    // `build --all` alone: every variant for every arch the spec lists, one arch after another.
    if (arch === undefined && !o.all) throw new UsageError(`give an arch (${ARCHES.join(', ')}), or --all for every arch the spec lists`);
    const arches = arch !== undefined ? [arch] : (await loadSpec(o.file)).loaded.spec.arches;
    const progress = new Progress(pickMode(!!o.json), process.stderr, !!o.verbose);
    const { signal } = interruptSignal();
    try {
      for (const a of arches) {
        const t0 = performance.now();
        const remote = o.offline ? undefined : await remoteCache(o, progress);
        const r = await build({ arch: a, variants, all: o.all, file: o.file, cacheDir: o.cacheDir, outDir: o.out, jobs: o.jobs, reporter: progress, signal, signer: (l) => imageSigner(o.sign, l), remote, offline: !!o.offline });
        progress.stop();
        // A configured cap is enforced after every build, so a CI cache never grows unbounded.
        if (process.env.PIPELINE_CACHE_MAX_SIZE) await gcWithLocks(r.prepared.cache, sizeArg(process.env.PIPELINE_CACHE_MAX_SIZE));
        reportBuild(progress, r.outcome.results, (performance.now() - t0) / 1000, r.published.map((p) => path.relative(process.cwd(), p.dir) || '.'), r.prepared.plan.sinks, remote && { url: remote.location.repo, mode: remote.readOnly ? 'read' : 'readwrite', ...remote.stats });
      }
    } catch (e) {
      progress.stop();
      if (e instanceof BuildError && (e as { results?: StageResult[] }).results) {
        if (o.json) progress.event({ event: 'summary', ok: false, stages: (e as { results?: StageResult[] }).results });
      }
      throw e;
    }
  });

function reportBuild(progress: Progress, results: StageResult[], seconds: number, dirs: string[], sinks: Record<string, string[]>, remoteCache?: Record<string, unknown> & { bytesDown: number; bytesUp: number }): void {
  const built = results.filter((r) => r.status === 'built');
  const cached = results.filter((r) => r.status === 'cached');
  const pulled = results.filter((r) => r.status === 'pulled');
  progress.event({ event: 'summary', ok: true, seconds: Math.round(seconds * 1000) / 1000, executed: built.map((r) => r.name), cached: cached.map((r) => r.name), pulled: pulled.map((r) => r.name), stages: results, outputs: dirs, variants: Object.keys(sinks), ...(remoteCache ? { remoteCache } : {}) });
  if (built.length || pulled.length) progress.info(summaryTable(results));
  const rc = remoteCache ? ` (remote cache: ${human(remoteCache.bytesDown)} pulled, ${human(remoteCache.bytesUp)} pushed)` : '';
  progress.info(`${built.length ? `built ${built.length}, ` : ''}${pulled.length ? `pulled ${pulled.length}, ` : ''}${cached.length} cached in ${fmt(seconds)}${rc} → ${dirs.join(', ')}`);
}

program
  .command('plan')
  .description('show the stage DAG and cache keys for a build, without running anything')
  .argument('<arch>')
  .argument('[variants...]')
  .addOption(specOpt())
  .addOption(cacheOpt())
  .option('--all', 'every variant for this arch')
  .addOption(new Option('--json', 'machine-readable plan').conflicts(['dot', 'mermaid']))
  .addOption(new Option('--dot', 'Graphviz').conflicts(['mermaid']))
  .option('--mermaid', 'Mermaid flowchart')
  .action(async (arch: string, variants: string[], o) => {
    const { plan } = await prepare({ arch, variants, all: o.all, file: o.file, cacheDir: o.cacheDir });
    process.stdout.write(o.json ? planJson(plan) : o.dot ? planDot(plan) : o.mermaid ? planMermaid(plan) : planText(plan));
  });

program
  .command('explain')
  .description('why each stage is a cache hit or a miss')
  .argument('<arch>')
  .argument('[variants...]')
  .addOption(specOpt())
  .addOption(cacheOpt())
  .option('--all')
  .option('--json')
  .action(async (arch: string, variants: string[], o) => {
    const { rows } = await explain({ arch, variants, all: o.all, file: o.file, cacheDir: o.cacheDir });
    if (o.json) {
      process.stdout.write(JSON.stringify(rows, null, 2) + '\n');
      return;
    }
    const w = Math.max(...rows.map((r) => r.stage.length));
    for (const r of rows) {
      process.stdout.write(`${r.status === 'hit' ? '✓ hit ' : '✗ miss'}  ${r.stage.padEnd(w)}  ${r.kind}  ${r.key.slice(0, 12)}\n`);
      for (const reason of r.reasons) process.stdout.write(`          ${reason}\n`);
    }
  });

program
  .command('lock')
  .description('resolve every mmdebstrap stage to exact .debs and write <spec>.lock next to the spec')
  .argument('[arches...]', 'arches to lock (default: every arch the spec builds)')
  .addOption(specOpt())
  .addOption(cacheOpt())
  .option('--update', 're-resolve every stage against the mirror (default: keep sections that still match the spec)')
  .option('--lock-file <file>', 'write the lock here instead of next to the spec')
  .action(async (arches: string[], o) => {
    const { lockPathFor, writeLock } = await import('../lock/lock.js');
    const { loaded } = await loadSpec(o.file);
    const targets = [];
    for (const arch of arches.length ? arches : loaded.spec.arches) {
      const { plan } = await prepare({ arch, variants: [], all: true, file: o.file, cacheDir: o.cacheDir, ignoreLock: true });
      for (const st of plan.stages) if (st.kind === 'mmdebstrap') targets.push({ stage: st.name, arch, params: st.params as never });
    }
    const file = o.lockFile ? path.resolve(o.lockFile) : lockPathFor(loaded.file);
    const { signal } = interruptSignal();
    const r = await writeLock({
      file,
      spec: loaded.spec.name,
      targets,
      update: !!o.update,
      signal,
      onStage: (t, ms, kept) => process.stderr.write(kept ? `  ${t.stage} (${t.arch}): kept (matches the spec)\n` : `  ${t.stage} (${t.arch}): resolved in ${fmt(ms / 1000)}\n`),
    });
    for (const c of r.changes) {
      process.stdout.write(`${c.stage} (${c.arch}):\n`);
      for (const l of c.lines) process.stdout.write(`  ${l}\n`);
    }
    const n = r.lock.sections.reduce((a, s) => a + s.debs.length, 0);
    process.stderr.write(`${path.relative(process.cwd(), file) || file}: ${r.lock.sections.length} stage section(s), ${n} packages; ${r.resolved} resolved, ${r.changes.length ? `${r.changes.reduce((a, c) => a + c.lines.length, 0)} change(s)` : 'no changes'}\n`);
  });

program
  .command('fetch')
  .description('fill the .deb store with every .deb the lock names (verified against it), for offline builds later')
  .argument('[arches...]', 'arches to fetch (default: every arch in the lock)')
  .addOption(specOpt())
  .addOption(cacheOpt())
  .action(async (arches: string[], o) => {
    const { lockPathFor, readLock, sectionsFor } = await import('../lock/lock.js');
    const { fetchDebs, registerLock, verifyStored } = await import('../lock/store.js');
    const { loaded } = await loadSpec(o.file);
    const file = lockPathFor(loaded.file);
    const lock = await readLock(file);
    if (!lock) throw new UsageError(`no lock at ${file}: run \`pipeline lock\` first`);
    const sections = sectionsFor(lock, arches);
    if (!sections.length) throw new UsageError(`${file} locks no stage for ${arches.join(', ')}`);
    const c = new Cache(o.cacheDir ? path.resolve(o.cacheDir) : defaultCacheRoot());
    await c.init();
    await registerLock(c, file);
    const { signal } = interruptSignal();
    const t0 = performance.now();
    const r = await fetchDebs(c, sections, { signal });
    const debs = [...new Map(sections.flatMap((s) => s.debs).map((d) => [d.sha256, d])).values()];
    await verifyStored(c, debs);
    process.stderr.write(`fetched ${r.fetched} .deb(s) (${human(r.bytes)}) in ${fmt((performance.now() - t0) / 1000)}; ${debs.length} locked .debs verified in ${path.dirname(c.debPath(debs[0]?.sha256 ?? '0'))}\n`);
  });

program
  .command('validate')
  .description('check a spec (every stage, every arch) and exit; prints nothing else when it is fine')
  .addOption(specOpt())
  .action(async (o) => {
    const { loaded } = await loadSpec(o.file);
    process.stderr.write(`${path.relative(process.cwd(), loaded.file) || loaded.file}: ok (${Object.keys(loaded.spec.stages).length} stages, variants: ${Object.keys(loaded.spec.variants).join(', ')})\n`);
  });

program
  .command('summary')
  .description('everything resolved for a build: epoch, variants, stages, params, tools, keys')
  .argument('<arch>')
  .argument('[variants...]')
  .addOption(specOpt())
  .addOption(cacheOpt())
  .option('--all')
  .action(async (arch: string, variants: string[], o) => {
    const p = await prepare({ arch, variants, all: o.all || !variants.length, file: o.file, cacheDir: o.cacheDir });
    process.stdout.write(specSummary(p.plan, p.epochSource, p.cache.root));
  });

program
  .command('schema')
  .description('print the spec JSON Schema (for editor completion)')
  .action(async () => {
    process.stdout.write(JSON.stringify(specJsonSchema(await loadKinds()), null, 2) + '\n');
  });

program
  .command('test')
  .description('build (cached) and boot-test variants under qemu: markers must appear on the serial console')
  .argument('<arch>')
  .argument('[variants...]')
  .addOption(specOpt())
  .addOption(cacheOpt())
  .option('--all')
  .option('-o, --out <dir>', 'output root', 'images')
  .option('--firmware <fw>', 'only this firmware where an image boots several ways (bios, uefi, …)')
  .option('--accel <accel>', 'kvm or tcg (default: kvm only if a probe boot works)')
  .option('--json')
  .option('-v, --verbose', 'echo the serial console')
  .action(async (arch: string, variants: string[], o) => {
    const { runBootTests } = await import('../boot/boot-test.js');
    const progress = new Progress(pickMode(!!o.json), process.stderr, !!o.verbose);
    const { signal } = interruptSignal();
    const r = await build({ arch, variants, all: o.all, file: o.file, cacheDir: o.cacheDir, outDir: o.out, reporter: progress, signal, signer: (l) => imageSigner(undefined, l) });
    progress.stop();
    const ok = await runBootTests(r, { firmware: o.firmware, accel: o.accel, json: !!o.json, verbose: !!o.verbose, signal });
    if (!ok) process.exitCode = 1;
  });

const cache = program.command('cache').description('inspect and trim the content-addressed cache');
cache
  .command('ls')
  .addOption(cacheOpt())
  .option('--json')
  .action(async (o) => {
    const c = new Cache(o.cacheDir ? path.resolve(o.cacheDir) : defaultCacheRoot());
    const list = await c.list();
    if (o.json) {
      process.stdout.write(JSON.stringify(list.map((e) => ({ key: e.entry.key, stage: e.entry.stage, kind: e.entry.kind, size: e.size, lastUsed: e.lastUsed.toISOString(), files: e.entry.files.length })), null, 2) + '\n');
      return;
    }
    for (const e of list) process.stdout.write(`${e.entry.key.slice(0, 16)}  ${human(e.size).padStart(8)}  ${e.lastUsed.toISOString().slice(0, 19)}  ${e.entry.stage} (${e.entry.kind})\n`);
  });
cache
  .command('du')
  .addOption(cacheOpt())
  .action(async (o) => {
    const c = new Cache(o.cacheDir ? path.resolve(o.cacheDir) : defaultCacheRoot());
    const d = await c.du();
    process.stdout.write(`${human(d.bytes)} in ${d.blobs} blobs, ${d.entries} entries (${c.root})\n`);
  });
cache
  .command('gc')
  .description('evict least-recently-used entries until the cache fits')
  .requiredOption('--max-size <size>', 'cap, e.g. 20G, 500M')
  .addOption(cacheOpt())
  .action(async (o) => {
    const c = new Cache(o.cacheDir ? path.resolve(o.cacheDir) : defaultCacheRoot());
    const r = await gcWithLocks(c, sizeArg(o.maxSize));
    process.stdout.write(`evicted ${r.evicted.length} entries, freed ${human(r.freed)}; cache now ${human(r.bytes)}\n`);
  });
cache
  .command('verify')
  .description('re-hash every blob, record, tree and stored .deb; exit 1 and list what is bad (--repair drops it so the next build rebuilds or refetches it)')
  .option('--repair', 'drop bad records, blobs and trees')
  .addOption(cacheOpt())
  .action(async (o) => {
    const c = new Cache(o.cacheDir ? path.resolve(o.cacheDir) : defaultCacheRoot());
    const r = await c.verifyAll({ repair: !!o.repair });
    for (const p of r.problems) {
      const digests = p.expected ? `: expected ${p.expected}, found ${p.found ?? 'nothing'}` : p.found ? `: ${p.found}` : '';
      const used = p.records?.length ? ` (records: ${p.records.map((x) => `${x.stage} ${x.key.slice(0, 12)}`).join(', ')})` : '';
      process.stdout.write(`bad ${p.what} ${p.path}: ${p.message}${digests}${used}\n`);
    }
    const note = r.unsealed ? `; ${r.unsealed} record(s) predate record seals` : '';
    process.stdout.write(`${r.problems.length ? `${r.problems.length} problem(s)` : 'ok'}: ${r.records} records and ${r.blobs} blobs re-hashed in ${c.root}${note}\n`);
    if (r.problems.length && o.repair) process.stdout.write('repaired: the bad items were dropped; the next build rebuilds them\n');
    if (r.problems.length) process.exitCode = 1;
  });

for (const dir of ['push', 'pull'] as const) {
  cache
    .command(dir)
    .description(dir === 'push' ? 'push the locally cached stages of a build to a remote cache: pipeline cache push oci://HOST/REPO amd64 ipxe' : 'pull the stages of a build from a remote cache into the local cache (verified)')
    .argument('<url>', 'oci://HOST[:PORT]/REPO')
    .argument('<arch>')
    .argument('[variants...]')
    .addOption(specOpt())
    .addOption(cacheOpt())
    .option('--all', 'every variant for this arch')
    .option('--sign <key>', 'push: sign each entry (as for build)')
    .option('--remote-cache-verify-key <pub>', 'pull: only entries signed with this key')
    .option('--json')
    .action(async (url: string, arch: string, variants: string[], o) => {
      const progress = new Progress(pickMode(!!o.json), process.stderr, false);
      const { plan, cache: local } = await prepare({ arch, variants, all: o.all, file: o.file, cacheDir: o.cacheDir });
      const remote = (await remoteCache({ ...o, remoteCache: url, remoteCacheMode: dir === 'push' ? 'readwrite' : 'read' }, progress))!;
      await local.init();
      const lookups = await local.lookupAll(plan.stages.map((s) => s.key));
      const done: string[] = [];
      const missing: string[] = [];
      for (const st of plan.stages) {
        const e = lookups.get(st.key);
        if (dir === 'push') {
          if (!e) missing.push(st.name);
          else {
            await local.verify(e);
            await remote.store(e, local);
            if (remote.stats.pushed.some((p) => p.key === st.key)) done.push(st.name);
          }
        } else if (!e) {
          if (await remote.fetch(st.key, st.name, local)) done.push(st.name);
          else missing.push(st.name);
        }
      }
      const s = remote.stats;
      if (o.json) process.stdout.write(JSON.stringify({ event: `cache-${dir}`, url: remote.location.repo, stages: done, missing, stats: s }) + '\n');
      else process.stderr.write(`${dir === 'push' ? 'pushed' : 'pulled'} ${done.length} entries (${human(dir === 'push' ? s.bytesUp : s.bytesDown)} moved)${missing.length ? `; ${dir === 'push' ? 'not in the local cache' : 'not in the remote cache'}: ${missing.join(', ')}` : ''}\n`);
      if (s.unavailable !== undefined || s.pushFailed.length || s.rejected.length) process.exitCode = 1;
    });
}

program
  .command('matrix')
  .description('one CI job per (arch, variant): pipeline matrix [--format github|gitlab|json] [arch…] [--variant v…] [--affected]')
  .argument('[arches...]', 'default: every arch the spec declares')
  .addOption(specOpt())
  .addOption(cacheOpt())
  .option('--variant <v...>', 'only these variants')
  .addOption(new Option('--format <f>', 'github: {"include":[…]} for strategy.matrix; gitlab: a child pipeline; json: the list').choices(['github', 'gitlab', 'json']).default('github'))
  .option('--affected', 'drop entries whose outputs are all in the remote cache already (needs --remote-cache or $PIPELINE_REMOTE_CACHE)')
  .option('--remote-cache <url>', 'oci://HOST[:PORT]/REPO (default: $PIPELINE_REMOTE_CACHE)')
  .action(async (arches: string[], o) => {
    const { matrixEntries, dropCached, githubMatrix, gitlabPipeline } = await import('../matrix/matrix.js');
    const { loaded } = await loadSpec(o.file);
    const wanted = arches.length ? arches : loaded.spec.arches;
    for (const a of wanted) if (!loaded.spec.arches.includes(a as never)) throw new UsageError(`arch "${a}" is not in the spec's arches (${loaded.spec.arches.join(', ')})`);
    for (const v of o.variant ?? []) if (!(v in loaded.spec.variants)) throw new UsageError(`unknown variant "${v}"; the spec has: ${Object.keys(loaded.spec.variants).join(', ')}`);
    const plans = [];
    for (const arch of wanted) {
      const variants = allVariants(loaded, arch).filter((v) => !o.variant || o.variant.includes(v));
      if (variants.length) plans.push((await prepare({ arch, variants, file: o.file, cacheDir: o.cacheDir })).plan);
    }
    let entries = matrixEntries(plans);
    if (o.affected) {
      const progress = new Progress('plain', process.stderr, false);
      const remote = await remoteCache({ remoteCache: o.remoteCache }, progress, false);
      if (!remote) throw new UsageError('--affected needs a remote cache: --remote-cache oci://HOST/REPO or $PIPELINE_REMOTE_CACHE');
      const have = new Set<string>();
      for (const k of new Set(entries.flatMap((e) => Object.values(e.keys)))) if (await remote.has(k)) have.add(k);
      // An unusable registry drops nothing: every job runs (and builds locally).
      const r = dropCached(entries, have);
      entries = r.kept;
      process.stderr.write(r.dropped.length ? `already in the remote cache, dropped: ${r.dropped.map((e) => e.id).join(', ')}\n` : 'no entry is fully in the remote cache\n');
    }
    process.stdout.write(o.format === 'github' ? githubMatrix(entries) + '\n' : o.format === 'gitlab' ? gitlabPipeline(entries) : JSON.stringify(entries, null, 2) + '\n');
  });

program
  .command('push')
  .description('build (cached) an OCI variant and push it to a registry: pipeline push amd64 oci --to localhost:5000/powernode:1.0')
  .argument('<arch>')
  .argument('[variant]', 'variant whose output is an OCI image layout', 'oci')
  .requiredOption('--to <ref>', 'HOST[:PORT]/REPO[:TAG]; credentials from ~/.docker/config.json or PIPELINE_REGISTRY_USER/PASSWORD')
  .addOption(specOpt())
  .addOption(cacheOpt())
  .option('-o, --out <dir>', 'output root', 'images')
  .option('--insecure', 'plain http (default only for loopback registries)')
  .option('--chunk-size <bytes>', 'upload blobs larger than this in chunks', sizeArg)
  .option('--sign <key>', 'sign the provenance (as for build) and attach it to the pushed image as an OCI referrer')
  .option('--json')
  .action(async (arch: string, variant: string, o) => {
    const progress = new Progress(pickMode(!!o.json), process.stderr, false);
    const { signal } = interruptSignal();
    const r = await build({ arch, variants: [variant], file: o.file, cacheDir: o.cacheDir, outDir: o.out, reporter: progress, signal, signer: (l) => imageSigner(o.sign, l) });
    progress.stop();
    const pub = r.published[0]!;
    const { pushLayout } = await import('../registry/registry.js');
    const opts = { insecure: o.insecure ? true : undefined, chunkSize: o.chunkSize, signal, log: (l: string) => progress.info(`  ${l}`) };
    const res = await pushLayout(pub.dir, o.to, opts);
    // A signed build's bundle travels with the image (cosign-style referrer).
    let attestation: { tag: string; digest: string } | undefined;
    if (pub.manifest.attestation.bundle) {
      const { layoutSubject, pushBundleReferrer } = await import('../registry/referrers.js');
      const subject = await layoutSubject(pub.dir);
      if (subject.digest !== res.digest) throw new BuildError(`pushed ${res.digest} but the layout's image is ${subject.digest}; not attaching provenance`);
      attestation = await pushBundleReferrer(pub.dir, o.to, subject, opts);
    }
    if (o.json) process.stdout.write(JSON.stringify({ event: 'push', ref: o.to, ...res, attestation }) + '\n');
    else {
      process.stderr.write(`pushed ${o.to}@${res.digest} (${res.pushed.length} blobs uploaded, ${res.skipped.length} already there)\n`);
      if (attestation) process.stderr.write(`attached signed provenance as ${o.to.replace(/:[^:/]*$/, '')}:${attestation.tag}\n`);
    }
  });

program
  .command('release')
  .description('build (cached) and publish a release: images, artifacts, a signed release manifest, a webhook')
  .argument('<version>', 'release version, used in tags (v1.4.0)')
  .argument('<arch>', 'architecture, or several: amd64,arm64')
  .argument('[variants...]')
  .requiredOption('--registry <oci://host/repo>', 'OCI registry repository; credentials as for push')
  .addOption(specOpt())
  .addOption(cacheOpt())
  .option('--all', 'every variant the spec declares for the arch')
  .option('-o, --out <dir>', 'output root', 'images')
  .option('--webhook <url>', 'POST a Standard Webhooks signed notice here when published')
  .option('--webhook-secret-file <file>', 'whsec_<base64> secret (else $PIPELINE_WEBHOOK_SECRET)')
  .addOption(new Option('--webhook-header-style <style>', 'also send GitHub\'s X-Hub-Signature-256').choices(['standard', 'github']).default('standard'))
  .option('--sign <key>', 'sign (a key file or `keyless`), as for build')
  .option('--dry-run', 'build and print what would be published; publish nothing')
  .option('--force', 'overwrite a release of this version made from a different spec')
  .option('--insecure', 'plain http (default only for loopback registries)')
  .option('--chunk-size <bytes>', 'upload blobs larger than this in chunks', sizeArg)
  .option('--json')
  .action(async (version: string, arch: string, variants: string[], o) => {
    const { runRelease, ReleaseError } = await import('../release/publish.js');
    const { formatRelease } = await import('../release/report.js');
    const progress = new Progress(pickMode(!!o.json), process.stderr, false);
    const { signal } = interruptSignal();
    try {
      const r = await runRelease({
        version, arches: arch.split(',').filter(Boolean), variants, all: o.all, registry: o.registry, file: o.file, cacheDir: o.cacheDir, outDir: o.out,
        webhook: o.webhook, webhookSecretFile: o.webhookSecretFile, headerStyle: o.webhookHeaderStyle, sign: o.sign, dryRun: o.dryRun, force: o.force,
        insecure: o.insecure, chunkSize: o.chunkSize, reporter: progress, signal, log: (l) => progress.info(l),
      });
      progress.stop();
      process.stdout.write(o.json ? JSON.stringify({ event: 'release', ok: true, ...r }) + '\n' : formatRelease(r));
    } catch (e) {
      progress.stop();
      if (o.json && e instanceof ReleaseError) process.stdout.write(JSON.stringify({ event: 'release', ok: false, error: e.message, steps: e.steps }) + '\n');
      throw e;
    }
  });

program
  .command('keygen')
  .description('create an ECDSA P-256 signing key pair (signing.key mode 0600, signing.pub)')
  .requiredOption('--out <dir>', 'directory for the key pair')
  .action(async (o) => {
    const { keygen } = await import('../signing/signing.js');
    await mkdir(path.resolve(o.out), { recursive: true, mode: 0o700 });
    const r = await keygen(path.resolve(o.out));
    process.stderr.write(`wrote ${path.relative(process.cwd(), r.privateKey)} (keep it secret) and ${path.relative(process.cwd(), r.publicKey)}\n`);
  });

program
  .command('verify')
  .description('check an image dir: signature (offline) and every file digest; no unlisted files')
  .argument('<dir>', 'e.g. images/ipxe/amd64')
  .option('--key <pub>', 'public key (PEM) the bundle must be signed with')
  .option('--certificate-identity <id>', 'keyless: expected signer identity')
  .option('--certificate-oidc-issuer <url>', 'keyless: expected OIDC issuer')
  .option('--trusted-root <file>', 'keyless: Sigstore trusted_root.json')
  .action(async (dir: string, o) => {
    const { verifyImageDir, VerifyError } = await import('../signing/verify.js');
    try {
      if (existsSync(path.join(dir, 'release-manifest.json'))) {
        const { verifyReleaseDir } = await import('../release/verify.js');
        const r = await verifyReleaseDir(path.resolve(dir), { publicKeyPath: o.key, certificateIdentity: o.certificateIdentity, certificateIssuer: o.certificateOidcIssuer, trustedRootPath: o.trustedRoot });
        process.stderr.write(`verified release ${r.version} manifest in ${dir}: ${r.entries} entries, signed by ${r.signer}\n`);
        return;
      }
      const r = await verifyImageDir(path.resolve(dir), { publicKeyPath: o.key, certificateIdentity: o.certificateIdentity, certificateIssuer: o.certificateOidcIssuer, trustedRootPath: o.trustedRoot });
      process.stderr.write(`verified ${dir}: ${r.files} files, signed by ${r.signer}\n`);
    } catch (e) {
      if (e instanceof VerifyError) {
        process.stderr.write(`verify failed (${e.code}): ${e.message}\n`);
        process.exitCode = 1;
        return;
      }
      throw e;
    }
  });

const pkgRepo = program.command('pkg-repo').description('FreeBSD pkg repositories');
pkgRepo
  .command('verify')
  .description('check a pkg repository as a client does, offline: catalogue signatures and every package sum')
  .argument('<dir>', 'e.g. images/pkgrepo/amd64')
  .option('--pubkey <file>', 'the repository public key (signature_type: pubkey)')
  .option('--fingerprint <file>', 'a trusted/ fingerprint file or directory (signature_type: fingerprints)')
  .action(async (dir: string, o) => {
    const { pkgRepoVerifyCommand } = await import('../lib/pkgrepo/verify-cli.js');
    process.exitCode = await pkgRepoVerifyCommand(path.resolve(dir), o);
  });

program
  .command('repro')
  .description('build twice from scratch (other paths, umask, TZ, locale, clock; same SOURCE_DATE_EPOCH) and compare: names the first divergent stage')
  .argument('<arch>')
  .argument('[variants...]')
  .addOption(specOpt())
  .option('--all', 'every variant for this arch')
  .option('--keep', 'keep both build trees (the path is printed)')
  .option('--json', 'print the report as JSON')
  .option('--report <file>', 'write the JSON report here (default: <out>/repro-<arch>.json)')
  .option('-o, --out <dir>', 'output root for the default report path', 'images')
  .option('-j, --jobs <n>', 'stages to run at once in each build', parseJobs)
  .option('--no-faketime', 'do not shift build b\'s clock with faketime even when installed')
  .action(async (arch: string, variants: string[], o) => {
    const { reproCommand } = await import('../repro/repro.js');
    process.exitCode = await reproCommand({ arch, variants, all: o.all, file: o.file, keep: o.keep, json: o.json, report: o.report, out: o.out, jobs: o.jobs, faketime: o.faketime });
  });

program
  .command('doctor')
  .description('what this machine offers for builds, in plain words')
  .addOption(cacheOpt())
  .option('--apt-packages', 'only list the Debian packages every stage kind needs, one a line (scripts/setup installs them)')
  .action(async (o) => {
    const { doctorCommand } = await import('../doctor/doctor.js');
    process.exitCode = await doctorCommand({ cacheDir: o.cacheDir ? path.resolve(o.cacheDir) : defaultCacheRoot(), aptPackages: o.aptPackages });
  });

/** A size argument (500M, 20G); a bad one is a usage error (exit 2). */
export function sizeArg(s: string): number {
  try {
    return parseSize(s);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

export function human(n: number): string {
  const u = ['B', 'K', 'M', 'G', 'T'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n}${u[i]}`;
}

async function main(): Promise<void> {
  // zod compiles a fast path for each object schema the first time it parses; a
  // command parses its spec once, and compiling cost ~0.2 s of a 0.5 s no-op build.
  // Results are the same either way.
  z.config({ jitless: true });
  try {
    await program.parseAsync(process.argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      process.exitCode = e.exitCode === 0 ? 0 : 2;
      return;
    }
    if (e instanceof SpecError || e instanceof UsageError) {
      process.stderr.write(`${e.message}\n`);
      process.exitCode = 2;
      return;
    }
    if (e instanceof BuildError) {
      process.stderr.write(`error: ${e.message}\n${e.detail ? indent(e.detail) + '\n' : ''}`);
      process.exitCode = 1;
      return;
    }
    process.stderr.write(`error: ${e instanceof Error ? (process.env.PIPELINE_DEBUG ? e.stack : e.message) : String(e)}\n`);
    process.exitCode = 1;
  }
}

function indent(s: string): string {
  return s
    .split('\n')
    .map((l) => `  │ ${l}`)
    .join('\n');
}

// Not awaited: the bundle (scripts/bundle.mjs) is CommonJS, which has no top-level await; main() handles its own errors.
void main();
