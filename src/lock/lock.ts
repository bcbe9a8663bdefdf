// `pipeline lock`, `pipeline fetch` and the locked part of `pipeline build`:
// the I/O around format.ts (parse/format), resolve.ts (apt's solver) and
// store.ts (the .deb store).
import { promises as fs } from 'node:fs';
import path from 'node:path';
import pLimit from 'p-limit';
import { Cache } from '../engine/cache.js';
import { writeAtomic } from '../engine/cache.js';
import { BuildError, UsageError } from '../engine/errors.js';
import type { LockProvider, Plan } from '../engine/compile.js';
import { diffSections, findSection, formatLock, lockPathFor, parseLock, requestMismatch, requestOf, sectionDigest, sectionId, LOCKED_RUN, type LockFile, type LockSection } from './format.js';
import { resolveStage } from './resolve.js';
import { fetchDebs, missingDebs, registerLock, verifyStored } from './store.js';
import type { MmdebstrapParams } from '../../stages/mmdebstrap.js';

/** The lock next to a spec, parsed; undefined when there is none. A lock that does not parse is a SpecError (exit 2) with its location. */
export async function readLock(file: string): Promise<LockFile | undefined> {
  const text = await fs.readFile(file, 'utf8').catch((e: NodeJS.ErrnoException) => (e.code === 'ENOENT' ? undefined : Promise.reject(e)));
  return text === undefined ? undefined : parseLock(text, file);
}

export { lockPathFor };

export interface LockTarget {
  stage: string;
  arch: string;
  params: MmdebstrapParams;
}

export interface LockResult {
  file: string;
  lock: LockFile;
  /** Per section that changed: "package: old → new" lines. */
  changes: { stage: string; arch: string; lines: string[]; resolved: boolean }[];
  resolved: number;
}

/**
 * Resolve the targets and write the lock. Without `update`, a section that still
 * matches its stage's request is kept as it is (pins hold); with it, every
 * target is resolved against the mirror again. Sections of other arches stay.
 */
export async function writeLock(opts: { file: string; spec: string; targets: LockTarget[]; update?: boolean; signal?: AbortSignal; onStage?: (t: LockTarget, ms: number, kept: boolean) => void }): Promise<LockResult> {
  const prev = await readLock(opts.file).catch((e) => {
    // --update rewrites the lock wholesale, so a broken one need not block it.
    if (opts.update) return undefined;
    throw e;
  });
  const sections = new Map<string, LockSection>();
  for (const s of prev?.sections ?? []) sections.set(sectionId(s.stage, s.arch), s);
  const changes: LockResult['changes'] = [];
  let resolved = 0;
  const wanted = new Set(opts.targets.map((t) => sectionId(t.stage, t.arch)));
  const arches = new Set(opts.targets.map((t) => t.arch));
  // Sections for stages the spec no longer has (for the arches being locked) go.
  for (const [id, s] of sections) {
    if (arches.has(s.arch) && !wanted.has(id)) {
      changes.push({ stage: s.stage, arch: s.arch, lines: diffSections(s, undefined), resolved: false });
      sections.delete(id);
    }
  }
  // Resolves are mostly waiting on the mirror and apt's solver: a few at once.
  const limit = pLimit(3);
  const results = await Promise.all(
    opts.targets.map((t) =>
      limit(async () => {
        const old = prev ? findSection(prev, t.stage, t.arch) : undefined;
        const req = requestOf(t.params);
        const t0 = Date.now();
        if (old && !opts.update && !requestMismatch(req, old).length) {
          opts.onStage?.(t, 0, true);
          return { t, old, next: undefined };
        }
        const next = await resolveStage({ ...req, stage: t.stage, arch: t.arch, ignoreValidUntil: t.params.ignore_valid_until }, { signal: opts.signal });
        opts.onStage?.(t, Date.now() - t0, false);
        return { t, old, next };
      }),
    ),
  );
  for (const { t, old, next } of results) {
    if (!next) continue;
    resolved++;
    sections.set(sectionId(t.stage, t.arch), next);
    // A new section is one line, not a page of "(added)".
    const lines = old ? diffSections(old, next) : [`(new) ${next.debs.length} packages from ${next.mirror} ${next.suite} (InRelease ${next.inRelease.date})`];
    if (lines.length) changes.push({ stage: t.stage, arch: t.arch, lines, resolved: true });
  }
  const lock: LockFile = { spec: opts.spec, sections: [...sections.values()] };
  await writeAtomic(opts.file, formatLock(lock));
  return { file: opts.file, lock, changes, resolved };
}

/** The stage's section of the lock; a stage the lock lacks, or locked for another request, is a usage error (exit 2). */
export function lockedSection(file: string, lock: LockFile, stage: string, arch: string, params: unknown): LockSection {
  const section = findSection(lock, stage, arch);
  if (!section) throw new UsageError(`stage ${stage} (${arch}) is not in ${file}: run \`pipeline lock ${arch}\``);
  const issues = requestMismatch(requestOf(params as MmdebstrapParams), section);
  if (issues.length) throw new UsageError(`stage ${stage} (${arch}) does not match ${file}: ${issues.join('; ')}: run \`pipeline lock\``);
  return section;
}

/** What the compiler asks (pure once the lock is read): mmdebstrap stages are locked, other kinds are not. */
export function lockProvider(file: string, lock: LockFile): LockProvider {
  return {
    file,
    stage: (name, kind, arch, params) => {
      if (kind !== 'mmdebstrap') return undefined;
      const section = lockedSection(file, lock, name, arch, params);
      return { digest: sectionDigest(section), section };
    },
  };
}

/** The spec's lock as a provider for compile(), or undefined when the spec has no lock. */
export async function loadLockProvider(specFile: string): Promise<LockProvider | undefined> {
  const file = lockPathFor(specFile);
  const lock = await readLock(file);
  return lock && lockProvider(file, lock);
}

/** Sections of the lock for the given arches (all when none given). */
export function sectionsFor(lock: LockFile, arches: string[]): LockSection[] {
  return lock.sections.filter((s) => !arches.length || arches.includes(s.arch));
}

/**
 * Before a locked build runs: every .deb its missing stages install is in the
 * store and hashes to what the lock names. Online, missing ones are fetched
 * (and checked); offline, a missing one is an error naming the packages and the
 * `pipeline fetch` line that fixes it. Then the stages get their section.
 */
export async function prepareLocked(plan: Plan, cache: Cache, lookups: ReadonlyMap<string, unknown>, opts: { offline?: boolean; lockFile?: string; specFile: string; signal?: AbortSignal }): Promise<void> {
  const sectionOf = (s: Plan['stages'][number]) => s.lock!.section as LockSection;
  const misses = plan.stages.filter((s) => !lookups.has(s.key));
  if (opts.offline) {
    const unlocked = misses.filter((s) => s.kind === 'mmdebstrap' && !s.lock);
    if (unlocked.length) {
      throw new UsageError(`--offline needs a lock: stage${unlocked.length > 1 ? 's' : ''} ${unlocked.map((s) => s.name).join(', ')} would read the mirror\n  fix: pipeline lock ${plan.arch} -f ${opts.specFile}`);
    }
  }
  const locked = misses.filter((s) => s.lock);
  if (!locked.length) return;
  if (opts.lockFile) await registerLock(cache, opts.lockFile);
  const debs = [...new Map(locked.flatMap((s) => sectionOf(s).debs).map((d) => [d.sha256, d])).values()];
  const missing = await missingDebs(cache, debs);
  if (missing.length && opts.offline) {
    const names = missing.map((d) => `${d.name} ${d.version} (${d.arch})`);
    throw new BuildError(
      `--offline: ${missing.length} locked .deb${missing.length > 1 ? 's are' : ' is'} not in the store (${path.dirname(cache.debPath(missing[0]!.sha256))}):\n  ${names.join('\n  ')}\n  fix (with network): pipeline fetch ${plan.arch} -f ${opts.specFile}`,
    );
  }
  if (missing.length) await fetchDebs(cache, locked.map(sectionOf), { signal: opts.signal });
  await verifyStored(cache, debs);
  for (const s of locked) s.params = { ...(s.params as object), [LOCKED_RUN]: { section: sectionOf(s), cacheRoot: cache.root } };
}

/**
 * For `repro`: when the spec has a lock, make sure the user's store holds every
 * .deb the arch's sections name (fetched and verified once), then give each
 * throw-away build cache the same files, so both builds run --offline and install
 * the same bytes even if the mirror moves between them. False when there is no lock.
 */
export async function seedLockedStores(specFile: string, arch: string, storeRoot: string, sideRoots: string[], signal?: AbortSignal): Promise<boolean> {
  const file = lockPathFor(specFile);
  const lock = await readLock(file);
  if (!lock) return false;
  const sections = sectionsFor(lock, [arch]);
  const store = new Cache(storeRoot);
  await store.init();
  await registerLock(store, file);
  await fetchDebs(store, sections, { signal });
  const debs = [...new Map(sections.flatMap((s) => s.debs).map((d) => [d.sha256, d])).values()];
  await verifyStored(store, debs);
  for (const root of sideRoots) {
    const side = new Cache(root);
    await fs.mkdir(path.dirname(side.debPath(debs[0]?.sha256 ?? '0')), { recursive: true });
    for (const d of debs) await fs.link(store.debPath(d.sha256), side.debPath(d.sha256)).catch(() => fs.copyFile(store.debPath(d.sha256), side.debPath(d.sha256)));
  }
  return true;
}
