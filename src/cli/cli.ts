// Command line. Exit codes: 0 ok, 1 build/test failure, 2 usage or spec error.
import { Command, CommanderError, Option } from 'commander';
import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { specJsonSchema } from '../../schema/spec.js';
import { build, explain, loadSpec, prepare, VERSION } from '../engine/build.js';
import { Cache, defaultCacheRoot } from '../engine/cache.js';
import { BuildError, SpecError, UsageError } from '../engine/errors.js';
import { planDot, planJson, planMermaid, planText, specSummary } from './plan-format.js';
import { fmt, pickMode, Progress, summaryTable } from './progress.js';
import type { StageResult } from '../engine/scheduler.js';

const program = new Command();
program
  .name('pipeline')
  .description('Declarative image-build pipelines: one YAML spec -> cached, parallel, reproducible OS images')
  .version(VERSION)
  .showHelpAfterError('(run with --help for usage)')
  .exitOverride();

const specOpt = () => new Option('-f, --file <spec>', 'pipeline spec (default: ./pipeline.yaml, else the shipped pipelines/powernode.yaml)');
const cacheOpt = () => new Option('--cache-dir <dir>', 'cache location (default: $PIPELINE_CACHE_DIR or $XDG_CACHE_HOME/pipeline)');

function parseJobs(v: string): number {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) throw new UsageError(`--jobs expects a whole number ≥ 1, got "${v}"`);
  return n;
}

/** Ctrl-C aborts the build: running tools are killed and nothing partial is kept. */
function interruptSignal(): AbortSignal {
  const ac = new AbortController();
  let count = 0;
  const onSig = (sig: NodeJS.Signals) => {
    count++;
    if (count > 1) process.exit(130);
    process.stderr.write(`\npipeline: ${sig}, stopping running stages…\n`);
    ac.abort(new Error(sig));
  };
  process.on('SIGINT', onSig);
  process.on('SIGTERM', onSig);
  return ac.signal;
}

program
  .command('build')
  .description('build variants for an arch: pipeline build amd64 ipxe [raw …] | --all')
  .argument('<arch>', 'target architecture (amd64, arm64)')
  .argument('[variants...]', 'variants to build (see `pipeline validate`)')
  .addOption(specOpt())
  .addOption(cacheOpt())
  .option('--all', 'every variant the spec declares for this arch')
  .option('-o, --out <dir>', 'output root', 'images')
  .option('-j, --jobs <n>', 'stages to run at once (default: number of cores)', parseJobs)
  .option('--json', 'JSON-lines progress and summary on stdout')
  .option('-v, --verbose', 'stream stage logs')
  .option('--sign <key>', 'sign the provenance with this private key, or `keyless` (Fulcio/Rekor in CI)')
  .action(async (arch: string, variants: string[], o) => {
    const progress = new Progress(pickMode(!!o.json), process.stderr, !!o.verbose);
    const signal = interruptSignal();
    try {
      const t0 = performance.now();
      const r = await build({ arch, variants, all: o.all, file: o.file, cacheDir: o.cacheDir, outDir: o.out, jobs: o.jobs, reporter: progress, signal, sign: o.sign });
      progress.stop();
      // A configured cap is enforced after every build, so a CI cache never grows unbounded.
      if (process.env.PIPELINE_CACHE_MAX_SIZE) await r.prepared.cache.gc(parseSize(process.env.PIPELINE_CACHE_MAX_SIZE));
      reportBuild(progress, r.outcome.results, (performance.now() - t0) / 1000, r.published.map((p) => path.relative(process.cwd(), p.dir) || '.'), r.prepared.plan.sinks);
    } catch (e) {
      progress.stop();
      if (e instanceof BuildError && (e as { results?: StageResult[] }).results) {
        if (o.json) progress.event({ event: 'summary', ok: false, stages: (e as { results?: StageResult[] }).results });
      }
      throw e;
    }
  });

function reportBuild(progress: Progress, results: StageResult[], seconds: number, dirs: string[], sinks: Record<string, string[]>): void {
  const built = results.filter((r) => r.status === 'built');
  const cached = results.filter((r) => r.status === 'cached');
  progress.event({ event: 'summary', ok: true, seconds: Math.round(seconds * 1000) / 1000, executed: built.map((r) => r.name), cached: cached.map((r) => r.name), stages: results, outputs: dirs, variants: Object.keys(sinks) });
  if (built.length) progress.info(summaryTable(results));
  progress.info(`${built.length ? `built ${built.length}, ` : ''}${cached.length} cached in ${fmt(seconds)} → ${dirs.join(', ')}`);
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
  .action(() => {
    process.stdout.write(JSON.stringify(specJsonSchema(), null, 2) + '\n');
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
    const signal = interruptSignal();
    const r = await build({ arch, variants, all: o.all, file: o.file, cacheDir: o.cacheDir, outDir: o.out, reporter: progress, signal });
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
    const r = await c.gc(parseSize(o.maxSize));
    process.stdout.write(`evicted ${r.evicted.length} entries, freed ${human(r.freed)}; cache now ${human(r.bytes)}\n`);
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
  .option('--chunk-size <bytes>', 'upload blobs larger than this in chunks', (v) => parseSize(v))
  .option('--sign <key>', 'sign the provenance (as for build) and attach it to the pushed image as an OCI referrer')
  .option('--json')
  .action(async (arch: string, variant: string, o) => {
    const progress = new Progress(pickMode(!!o.json), process.stderr, false);
    const signal = interruptSignal();
    const r = await build({ arch, variants: [variant], file: o.file, cacheDir: o.cacheDir, outDir: o.out, reporter: progress, signal, sign: o.sign });
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
  .action(async (o) => {
    const { doctorCommand } = await import('../doctor/doctor.js');
    process.exitCode = await doctorCommand({ cacheDir: o.cacheDir ? path.resolve(o.cacheDir) : defaultCacheRoot() });
  });

export function parseSize(s: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?$/i.exec(s.trim());
  if (!m) throw new UsageError(`invalid size "${s}"; expected e.g. 500M, 20G`);
  const mult = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  return Math.floor(Number(m[1]) * mult);
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

await main();
