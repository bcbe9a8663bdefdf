// `pipeline repro`: build the same variants twice from scratch, in surroundings
// that differ in every way a build must not depend on (paths, umask, TZ, locale,
// clock), then compare every stage's outputs in DAG order and name the first
// stage that diverges. This file is the I/O half; the rules live in repro-compare.ts.
//
// Each build is a child process of the real CLI (bin/pipeline.js build --json)
// with its own empty cache, so nothing is shared between the two but the spec,
// the SOURCE_DATE_EPOCH and the Debian mirror.
import { createReadStream, createWriteStream, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { allVariants, loadSpec } from '../engine/build.js';
import { Cache, defaultCacheRoot, writeAtomic, type Entry } from '../engine/cache.js';
import { requirements } from '../engine/compile.js';
import { hashFile } from '../lib/digest.js';
import { firstDifference } from '../lib/diskimage.js';
import { resolveEpoch } from '../engine/epoch.js';
import { BuildError } from '../engine/errors.js';
import { safeRemove } from '../engine/fsutil.js';
import { spawnProcess } from '../engine/process.js';
import { interruptSignal } from '../cli/interrupt.js';
import { extraKindDirs, KINDS_PATH_ENV, PACKAGE_ROOT } from '../engine/kinds.js';
import { BUNDLE_NAME } from '../engine/manifest-types.js';
import {
  compareStages,
  diffImageFiles,
  diffTarMembers,
  formatReport,
  listTarMembers,
  type ImageComparison,
  type ImageFile,
  type ReproBuildInfo,
  type ReproReport,
  type SideStage,
} from './compare.js';

const BIN = path.join(PACKAGE_ROOT, 'bin', 'pipeline.js');

/** Forward shift for the second build's clock. Forward only: apt rejects Release files dated in the future. */
export const FAKETIME_OFFSET = '+400d';

/**
 * Programs libfaketime must leave alone. GNU tar only copies timestamps, never
 * makes them, yet under libfaketime mmdebstrap's tar shifts every member's mtime
 * by exactly the offset (seen on a real bookworm rootfs: 12451 of 15608 members,
 * contents and modes identical). That is the faking library talking, not the build.
 */
export const FAKETIME_SKIP_CMDS = 'tar';

/**
 * Sets the umask, then execs the rest of its arguments. A fixed script: the umask
 * and the command arrive as arguments, never inside the script text.
 */
const UMASK_SH = 'umask "$1"; shift; exec "$@"';

interface Side {
  label: 'a' | 'b';
  /** Root of everything this build writes. */
  dir: string;
  cache: string;
  out: string;
  tmp: string;
  umask: string;
  /** Variables to set (string) or remove (null) on top of the inherited environment. */
  env: Record<string, string | null>;
  faketime?: string;
}

/**
 * The two surroundings. Side b differs from a in everything a build must ignore:
 * path depth and names, umask, time zone (+14:00, the furthest from UTC), locale
 * and, when faketime is installed, a clock 400 days ahead.
 */
function sides(work: string, faketime: string | undefined): [Side, Side] {
  const a = path.join(work, 'a');
  const b = path.join(work, 'b', 'second build', 'deeper');
  return [
    {
      label: 'a',
      dir: a,
      cache: path.join(a, 'cache'),
      out: path.join(a, 'images'),
      tmp: path.join(a, 'tmp'),
      umask: '0022',
      env: { TZ: 'UTC', LC_ALL: 'C.UTF-8', LANG: 'C.UTF-8', LANGUAGE: null },
    },
    {
      label: 'b',
      dir: b,
      cache: path.join(b, 'pipeline-cache'),
      out: path.join(b, 'output', 'images'),
      tmp: path.join(b, 'scratch space'),
      umask: '0077',
      env: { TZ: 'Pacific/Kiritimati', LC_ALL: null, LANG: 'fr_FR.UTF-8', LANGUAGE: 'fr_FR:fr' },
      faketime,
    },
  ];
}

export interface ReproOptions {
  arch: string;
  variants: string[];
  all?: boolean;
  file?: string;
  keep?: boolean;
  /** Use faketime for build b when installed (default true). */
  faketime?: boolean;
  jobs?: number;
  signal?: AbortSignal;
  /** Progress lines (stderr in the CLI). */
  log?: (line: string) => void;
}

// ---------------------------------------------------------------------------
// SOURCE_DATE_EPOCH and the clock

/**
 * The epoch both builds share: resolved exactly as `pipeline build` resolves it
 * (env, then the spec's source_date_epoch, then the spec's git commit time), so
 * repro proves the artifacts a normal build makes.
 */
export async function reproEpoch(specFile: string, specValue: number | undefined, env = process.env): Promise<{ value: number; source: string }> {
  const r = await resolveEpoch(specFile, specValue, env);
  const words = { env: 'SOURCE_DATE_EPOCH from the environment', spec: "the spec's source_date_epoch", git: `git commit time of ${path.basename(specFile)}`, default: 'default 0 (no source_date_epoch, no git history)' };
  return { value: r.epoch, source: words[r.source] };
}

/**
 * `faketime` keeps its state in /dev/shm/faketime_shm_<pid> and sem.faketime_sem_<pid>
 * and opens them exclusively. Under the runner's PID namespace its pid is always 1,
 * so the files of a killed run ("sem_open: File exists") would break every later
 * repro on the machine. Removed when no faketime process is alive; if one is (a
 * concurrent repro), build b falls back to running without it.
 */
export const FAKETIME_PID1_FILES = ['/dev/shm/faketime_shm_1', '/dev/shm/sem.faketime_sem_1'];
export async function clearStaleFaketimeFiles(): Promise<void> {
  for (const pid of await fs.readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(pid)) continue;
    if ((await fs.readFile(`/proc/${pid}/comm`, 'utf8').catch(() => '')).trim() === 'faketime') return;
  }
  await Promise.all(FAKETIME_PID1_FILES.map((f) => fs.rm(f, { force: true })));
}

/** Does faketime exist and actually move node's clock forward? */
export async function probeFaketime(offset = FAKETIME_OFFSET): Promise<{ ok: boolean; reason: string }> {
  await clearStaleFaketimeFiles();
  const days = Number(/^\+(\d+)d$/.exec(offset)?.[1] ?? NaN);
  const before = Date.now();
  const r = await spawnProcess('faketime', ['-f', offset, process.execPath, '-e', 'process.stdout.write(String(Date.now()))'], { capture: true, timeoutMs: 30_000 });
  if (r.notFound) return { ok: false, reason: 'faketime is not installed (apt-get install faketime)' };
  if (r.spawnError || r.timedOut || r.exitCode !== 0) {
    const why = r.spawnError ?? (r.timedOut ? 'timed out' : (r.stderr.trim().split('\n')[0] ?? '') || `exit ${r.exitCode ?? r.signal}`);
    return { ok: false, reason: `faketime failed: ${why}` };
  }
  const seen = Number(r.stdout.trim());
  if (!Number.isFinite(seen)) return { ok: false, reason: `faketime ran but node printed "${r.stdout.trim()}"` };
  const shiftDays = (seen - before) / 86_400_000;
  if (Number.isFinite(days) && Math.abs(shiftDays - days) > 1) return { ok: false, reason: `faketime did not shift node's clock (saw ${shiftDays.toFixed(1)} days instead of ${days})` };
  return { ok: true, reason: `faketime ${offset}: node saw ${new Date(seen).toISOString()}` };
}

// ---------------------------------------------------------------------------
// Running one build

interface BuildRun {
  ok: boolean;
  seconds: number;
  stages: { name: string; kind: string; key: string; status: string }[];
  error?: string;
  logFile: string;
  logTail: string;
}

function childEnv(side: Side, epoch: number): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  // A signature is randomised (ECDSA nonce): it would differ by design, and a
  // repro run has no business using the user's key.
  delete env.PIPELINE_SIGNING_KEY;
  env.SOURCE_DATE_EPOCH = String(epoch);
  env.PIPELINE_CACHE_DIR = side.cache;
  env.TMPDIR = side.tmp;
  // The children run in other directories: hand them absolute kind paths.
  const extra = extraKindDirs();
  if (extra.length) env[KINDS_PATH_ENV] = extra.join(':');
  for (const [k, v] of Object.entries(side.env)) {
    if (v === null) delete env[k];
    else env[k] = v;
  }
  if (side.faketime) env.FAKETIME_SKIP_CMDS = FAKETIME_SKIP_CMDS;
  return env;
}

async function runBuild(side: Side, o: { arch: string; variants: string[]; spec: string; epoch: number; jobs?: number; signal?: AbortSignal; offline?: boolean }): Promise<BuildRun> {
  await Promise.all([side.cache, side.out, side.tmp].map((d) => fs.mkdir(d, { recursive: true })));
  const logFile = path.join(side.dir, 'build.log');
  const log = createWriteStream(logFile);
  const cli = [process.execPath, BIN, 'build', o.arch, ...o.variants, '-f', o.spec, '--out', side.out, '--json'];
  if (o.jobs) cli.push('--jobs', String(o.jobs));
  if (o.offline) cli.push('--offline');
  if (side.faketime) await clearStaleFaketimeFiles();
  const cmd = side.faketime ? ['faketime', '-f', side.faketime, ...cli] : cli;
  const t0 = performance.now();
  const tail: string[] = [];
  let stdoutBuf = '';
  const events: Record<string, unknown>[] = [];
  const keepTail = (t: string) => {
    for (const l of t.split('\n')) if (l) tail.push(l);
    if (tail.length > 40) tail.splice(0, tail.length - 40);
  };
  // The runner gives it its own process group and PID namespace, so cancelling or
  // killing us takes down faketime, node and every tool below it.
  const r = await spawnProcess('sh', ['-c', UMASK_SH, 'sh', side.umask, ...cmd], {
    cwd: side.dir,
    baseEnv: childEnv(side, o.epoch),
    signal: o.signal,
    onOutput: (d, stream) => {
      log.write(d);
      if (stream === 'stderr') {
        keepTail(d);
        return;
      }
      stdoutBuf += d;
      let i: number;
      while ((i = stdoutBuf.indexOf('\n')) >= 0) {
        const line = stdoutBuf.slice(0, i);
        stdoutBuf = stdoutBuf.slice(i + 1);
        if (line.startsWith('{')) {
          try {
            events.push(JSON.parse(line) as Record<string, unknown>);
          } catch {
            keepTail(line);
          }
        } else keepTail(line);
      }
    },
  });
  if (r.spawnError) {
    await new Promise<void>((res) => log.end(res));
    throw new BuildError(`could not start the build: ${r.spawnError}`);
  }
  const code = r.exitCode ?? (r.signal ? 128 : 1);
  await new Promise<void>((r) => log.end(r));
  const seconds = (performance.now() - t0) / 1000;
  const summary = events.find((e) => e.event === 'summary') as { ok?: boolean; stages?: BuildRun['stages'] } | undefined;
  const stages = (summary?.stages ?? []).map((s) => ({ name: s.name, kind: s.kind, key: s.key, status: s.status }));
  const ok = code === 0 && summary?.ok === true;
  const error = ok ? undefined : (tail.filter((l) => l.startsWith('error') || l.includes('failed')).pop() ?? `exit code ${code}`);
  return { ok, seconds, stages, error, logFile, logTail: tail.join('\n') };
}

// ---------------------------------------------------------------------------
// Reading and comparing outputs

async function sideStages(side: Side, stages: BuildRun['stages']): Promise<{ list: SideStage[]; entries: Map<string, Entry> }> {
  const cache = new Cache(side.cache);
  const entries = new Map<string, Entry>();
  const list: SideStage[] = [];
  for (const s of stages) {
    const e = await cache.lookup(s.key);
    if (e) entries.set(s.name, e);
    list.push({ name: s.name, kind: s.kind, key: s.key, parts: e?.parts, files: e?.files.map((f) => ({ path: f.path, size: f.size, sha256: f.sha256, executable: f.executable })) });
  }
  return { list, entries };
}

function isTar(p: string): boolean {
  return /\.tar$/.test(p);
}

async function listImageDir(dir: string): Promise<ImageFile[]> {
  const out: ImageFile[] = [];
  const walk = async (rel: string) => {
    let ents;
    try {
      ents = await fs.readdir(path.join(dir, rel), { withFileTypes: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT' && rel === '') return;
      throw e;
    }
    for (const e of ents) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) await walk(r);
      else {
        const abs = path.join(dir, r);
        const st = await fs.lstat(abs);
        const sha256 = e.isFile() ? (await hashFile(abs)).sha256 : `link:${await fs.readlink(abs).catch(() => '')}`;
        out.push({ path: r, size: st.size, mode: st.mode, mtime: Math.floor(st.mtimeMs / 1000), sha256 });
      }
    }
  };
  await walk('');
  return out;
}

async function compareImages(a: Side, b: Side, arch: string, variants: string[]): Promise<ImageComparison[]> {
  const out: ImageComparison[] = [];
  for (const v of variants) {
    const da = path.join(a.out, v, arch);
    const db = path.join(b.out, v, arch);
    const files = diffImageFiles(await listImageDir(da), await listImageDir(db), {
      [BUNDLE_NAME]: 'a signature is randomised (ECDSA nonce); the statement it signs is compared',
    });
    for (const f of files) if (f.changes.includes('content')) f.firstOffset = (await firstDifference(path.join(da, f.path), path.join(db, f.path))) ?? -1;
    out.push({ variant: v, identical: files.every((f) => f.ignored), files });
  }
  return out;
}

const DIFFOSCOPE_TIMEOUT_MS = 10 * 60 * 1000;
const DIFFOSCOPE_MAX_REPORT = 20_000;

/** diffoscope on one file pair, under readable names (a/<stage>/<file>, b/<stage>/<file>). */
async function runDiffoscope(work: string, stage: string, file: string, blobA: string, blobB: string, signal?: AbortSignal): Promise<ReproReport['diffoscope']> {
  const base = path.join(work, 'diffoscope');
  const rel = (s: 'a' | 'b') => path.join(s, stage, file);
  for (const [s, blob] of [['a', blobA], ['b', blobB]] as const) {
    const dst = path.join(base, rel(s));
    await fs.mkdir(path.dirname(dst), { recursive: true });
    await fs.link(blob, dst).catch(() => fs.copyFile(blob, dst));
  }
  const outputFile = path.join(work, 'diffoscope.txt');
  const out = createWriteStream(outputFile);
  let text = '';
  let truncated = false;
  const take = (d: string) => {
    out.write(d);
    if (text.length < DIFFOSCOPE_MAX_REPORT) text += d;
    else truncated = true;
  };
  const r = await spawnProcess('diffoscope', ['--no-progress', '--text', '-', rel('a'), rel('b')], { cwd: base, env: { LC_ALL: 'C.UTF-8', TZ: 'UTC' }, timeoutMs: DIFFOSCOPE_TIMEOUT_MS, signal, onOutput: take });
  const code = r.exitCode ?? -1;
  await new Promise<void>((r) => out.end(r));
  if (text.length > DIFFOSCOPE_MAX_REPORT) {
    text = text.slice(0, DIFFOSCOPE_MAX_REPORT);
    truncated = true;
  }
  // diffoscope exits 1 when the files differ, 0 when it found them equal.
  const note = code === 1 ? 'ran on the first differing file' : code === 0 ? 'found no difference' : `exited with ${code}`;
  return { ran: true, note, a: rel('a'), b: rel('b'), exitCode: code, output: text, truncated, outputFile };
}

async function haveDiffoscope(): Promise<boolean> {
  const r = await spawnProcess('diffoscope', ['--version'], { capture: true, timeoutMs: 60_000 });
  return r.exitCode === 0;
}

// ---------------------------------------------------------------------------
// The whole run

export async function repro(opts: ReproOptions): Promise<ReproReport> {
  const log = opts.log ?? (() => {});
  const { kinds, loaded } = await loadSpec(opts.file);
  const variants = opts.all ? allVariants(loaded, opts.arch) : opts.variants;
  // Unknown arch/variant fails here, before anything is built.
  requirements(loaded, opts.arch, variants, kinds);
  const epoch = await reproEpoch(loaded.file, loaded.spec.source_date_epoch);

  let clock: ReproReport['clock'];
  let faketime: string | undefined;
  if (opts.faketime === false) clock = { mode: 'none', note: 'faketime off (--no-faketime); the builds run at different times' };
  else {
    const probe = await probeFaketime();
    if (probe.ok) {
      faketime = FAKETIME_OFFSET;
      clock = {
        mode: 'faketime',
        offset: FAKETIME_OFFSET,
        note: `build b runs ${FAKETIME_OFFSET} ahead under faketime (host processes except ${FAKETIME_SKIP_CMDS}; tools inside a chroot keep the real clock, which differs from build a's anyway)`,
      };
    } else clock = { mode: 'none', note: `${probe.reason}; the builds only run at different times` };
  }

  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-repro-'));
  let keepWork = !!opts.keep;
  try {
    const [A, B] = sides(work, faketime);
    // A locked spec: both builds install the locked .debs from copies of the user's store, offline.
    const { seedLockedStores } = await import('../lock/lock.js');
    const offline = await seedLockedStores(loaded.file, opts.arch, defaultCacheRoot(), [A.cache, B.cache], opts.signal);
    if (offline) log('repro: the spec is locked; both builds install the locked .debs offline');
    const buildOpts = { arch: opts.arch, variants, spec: loaded.file, epoch: epoch.value, jobs: opts.jobs, signal: opts.signal, offline };
    const describe = (s: Side) => `umask ${s.umask}, ${Object.entries(s.env).map(([k, v]) => (v === null ? `${k} unset` : `${k}=${v}`)).join(', ')}${s.faketime ? `, faketime ${s.faketime}` : ''}`;
    const infos: ReproBuildInfo[] = [];

    log(`repro: SOURCE_DATE_EPOCH=${epoch.value} (${epoch.source}); work dir ${work}`);
    log(`repro: build a (${describe(A)}) …`);
    const ra = await runBuild(A, buildOpts);
    if (opts.signal?.aborted) throw new BuildError('repro interrupted');
    if (!ra.ok) {
      keepWork = true;
      throw new BuildError(`build a failed: ${ra.error}`, `${ra.logTail}\nfull log: ${ra.logFile}`);
    }
    log(`repro: build a done in ${ra.seconds.toFixed(1)}s`);
    infos.push({ label: 'a', umask: A.umask, env: A.env, dir: A.dir, seconds: ra.seconds });

    log(`repro: build b (${describe(B)}) …`);
    let rb = await runBuild(B, buildOpts);
    if (opts.signal?.aborted) throw new BuildError('repro interrupted');
    let noteB: string | undefined;
    if (!rb.ok && B.faketime) {
      // A tool that cannot live with a shifted clock (or with libfaketime preloaded)
      // must not stop the check: say so, and fall back to plain "different time".
      noteB = `failed under faketime (${rb.error}; log kept as build-faketime.log), rebuilt without it`;
      log(`repro: build b failed under faketime: ${rb.error}; rebuilding without faketime`);
      await fs.rename(rb.logFile, path.join(work, 'build-faketime.log')).catch(() => {});
      await Promise.all([B.cache, B.out, B.tmp].map((d) => safeRemove(d)));
      B.faketime = undefined;
      clock = { mode: 'none', note: `faketime was tried but build b failed under it (${rb.error}); the builds only run at different times` };
      rb = await runBuild(B, buildOpts);
    }
    if (!rb.ok) {
      keepWork = true;
      throw new BuildError(`build b failed: ${rb.error}`, `${rb.logTail}\nfull log: ${rb.logFile}`);
    }
    log(`repro: build b done in ${rb.seconds.toFixed(1)}s`);
    infos.push({ label: 'b', umask: B.umask, env: B.env, ...(B.faketime ? { faketime: B.faketime } : {}), dir: B.dir, seconds: rb.seconds, ...(noteB ? { note: noteB } : {}) });

    log('repro: comparing …');
    const sa = await sideStages(A, ra.stages);
    const sb = await sideStages(B, rb.stages);
    const cmp = compareStages(sa.list, sb.list);
    const blobs = { a: new Cache(A.cache), b: new Cache(B.cache) };
    for (const st of cmp.stages) {
      if (st.identical) continue;
      const source = st.divergentUpstream.length === 0;
      for (const f of st.files) {
        if (!f.a || !f.b || !f.changes.includes('content')) continue;
        const pa = blobs.a.blobPath(f.a.sha256);
        const pb = blobs.b.blobPath(f.b.sha256);
        f.firstOffset = (await firstDifference(pa, pb)) ?? -1;
        // Member lists only where the difference starts; downstream copies inherit it.
        if (source && isTar(f.path)) {
          try {
            f.tar = diffTarMembers(await listTarMembers(createReadStream(pa)), await listTarMembers(createReadStream(pb)));
          } catch (e) {
            log(`repro: could not list the members of ${f.path}: ${(e as Error).message}`);
          }
        }
      }
    }
    const images = await compareImages(A, B, opts.arch, variants);

    let diffoscope: ReproReport['diffoscope'] = { ran: false, note: 'nothing differs' };
    const firstPair = cmp.stages.flatMap((s) => (s.identical ? [] : s.files.filter((f) => f.a && f.b && f.changes.includes('content')).map((f) => ({ s, f }))))[0];
    if (firstPair) {
      if (await haveDiffoscope()) {
        log(`repro: diffoscope on ${firstPair.s.name}/${firstPair.f.path} …`);
        diffoscope = await runDiffoscope(work, firstPair.s.name, firstPair.f.path, blobs.a.blobPath(firstPair.f.a!.sha256), blobs.b.blobPath(firstPair.f.b!.sha256), opts.signal);
      } else diffoscope = { ran: false, note: 'not installed (apt-get install diffoscope-minimal) — skipped' };
    } else if (!cmp.identical) diffoscope = { ran: false, note: 'no file pair to compare (only keys or file lists differ)' };

    const identical = cmp.identical && images.every((i) => i.identical);
    return {
      schema: 'pipeline.repro-report/v1',
      spec: loaded.file,
      pipeline: loaded.spec.name,
      arch: opts.arch,
      variants,
      identical,
      sourceDateEpoch: epoch,
      clock,
      builds: infos,
      keysIdentical: cmp.keysIdentical,
      firstDivergent: cmp.firstDivergent ?? null,
      sources: cmp.sources,
      stages: cmp.stages,
      images,
      diffoscope,
      kept: keepWork ? work : null,
    };
  } finally {
    if (!keepWork) await safeRemove(work);
    else log(`repro: kept ${work}`);
  }
}

export interface ReproCommandOptions extends ReproOptions {
  json?: boolean;
  /** JSON report path; default <out>/repro-<arch>.json. */
  report?: string;
  /** Output root for the default report path (default: images). */
  out?: string;
}

/** The CLI command: run, print, write the JSON report; exit 0 when identical, 1 when not. */
export async function reproCommand(o: ReproCommandOptions): Promise<number> {
  const interrupt = interruptSignal('pipeline repro', 'stopping the build');
  const reportFile = path.resolve(o.report ?? path.join(o.out ?? 'images', `repro-${o.arch}.json`));
  try {
    const r = await repro({ ...o, signal: interrupt.signal, log: (l) => process.stderr.write(l + '\n') });
    await fs.mkdir(path.dirname(reportFile), { recursive: true });
    await writeAtomic(reportFile, JSON.stringify(r, null, 2) + '\n');
    if (o.json) process.stdout.write(JSON.stringify(r, null, 2) + '\n');
    else process.stdout.write(formatReport(r) + `  report: ${path.relative(process.cwd(), reportFile) || reportFile}\n`);
    return r.identical ? 0 : 1;
  } catch (e) {
    // The report is written whatever happens, so CI can always pick it up.
    const error = e instanceof Error ? e.message : String(e);
    await fs.mkdir(path.dirname(reportFile), { recursive: true }).catch(() => {});
    await writeAtomic(reportFile, JSON.stringify({ schema: 'pipeline.repro-report/v1', arch: o.arch, variants: o.variants, identical: false, error }, null, 2) + '\n').catch(() => {});
    throw e;
  } finally {
    interrupt.dispose();
  }
}
