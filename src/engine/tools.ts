// Host tools a build runs: where they are, their versions (part of every cache key,
// memoised by binary identity so a warm build spawns nothing), and the Debian
// packages that provide them. Used by the build and by `pipeline doctor`.
import { accessSync, constants as fsc, promises as fs, readFileSync, realpathSync, statSync } from 'node:fs';
import path from 'node:path';
import { sha256File } from '../lib/digest.js';
import type { ToolSpec } from '../stage.js';
import { writeAtomic } from './cache.js';
import { sha256 } from './canonical.js';
import { spawnProcess } from './process.js';

export interface ToolFact {
  name: string;
  apt: string;
  /** Where it was found on PATH; undefined when missing. */
  path?: string;
  /** Version line (or a content hash when the tool prints none). */
  version?: string;
  /** False when the tool printed nothing usable and the hash stands in. */
  versionKnown?: boolean;
  /** Running `<tool> <versionArgs>` failed (timeout, could not start). */
  error?: string;
  /** The version came from the memo without spawning the tool. */
  memo?: boolean;
}

/** One apt-get line for every missing tool or package: packages deduplicated and sorted. */
export function aptInstallLine(missing: { apt: string }[]): string {
  return `apt-get install -y ${[...new Set(missing.map((t) => t.apt))].sort().join(' ')}`;
}

/** A Debian package a tool needs at run time besides its own (ToolSpec.packages), and which tool. */
export interface PackageNeed {
  apt: string;
  /** The tool that needs it, for the message. */
  by: string;
}

/** The runtime-only packages of these tools, one entry per package, sorted. */
export function runtimePackages(tools: ToolSpec[]): PackageNeed[] {
  const out = new Map<string, PackageNeed>();
  for (const t of tools) for (const p of t.packages ?? []) if (!out.has(p)) out.set(p, { apt: p, by: t.name });
  return [...out.values()].sort((a, b) => (a.apt < b.apt ? -1 : a.apt > b.apt ? 1 : 0));
}

/** The first line that looks like a version (has a digit), else the first non-empty line. */
export function firstMeaningfulLine(text: string): string | undefined {
  const lines = text
    .replace(/\x1b\[[0-9;]*m/g, '')
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l.length > 0);
  const line = lines.find((l) => /\d/.test(l)) ?? lines[0];
  return line === undefined ? undefined : line.slice(0, 200);
}

export async function findOnPath(name: string, pathEnv = process.env.PATH ?? ''): Promise<string | undefined> {
  return findOnPathSync(name, pathEnv);
}

/**
 * Synchronous on purpose: a build probes ~15 tools over ~10 PATH directories, and
 * each failed stat through the thread pool cost more than the syscall (a few ms of
 * every no-op build); these are metadata lookups the kernel answers from its cache.
 */
function findOnPathSync(name: string, pathEnv: string): string | undefined {
  // A plain absolute directory needs no path.join (~150 of them, cold code, on every build).
  const join = (d: string) => (d[0] === '/' && !d.endsWith('/') && !/\/\.\.?(?:\/|$)|\/\//.test(d) ? `${d}/${name}` : path.join(d, name));
  const candidates = name.includes('/') ? [name] : pathEnv.split(':').filter(Boolean).map(join);
  for (const c of candidates) {
    try {
      if (!statSync(c, { throwIfNoEntry: false })?.isFile()) continue;
      accessSync(c, fsc.X_OK);
      return c;
    } catch {
      // not here
    }
  }
  return undefined;
}

// ---------------------------------------------------------------------------
// Tool versions, memoised by binary identity

interface MemoEntry {
  /** realpath, size, mtime, ctime, inode, device, version args: any change means a new binary. */
  stamp: string;
  version: string;
  versionKnown: boolean;
  /** Checksum over key and fields: a flipped byte in the memo must never change a cache key. */
  sum: string;
}
type Memo = Record<string, MemoEntry>;

const MEMO_FORMAT = 'tool-versions/2';

function memoSum(key: string, e: Omit<MemoEntry, 'sum'>): string {
  return sha256(JSON.stringify([key, e.stamp, e.version, e.versionKnown]));
}

function memoFile(cacheDir: string): string {
  return path.join(cacheDir, 'host', 'tool-versions.json');
}

async function readMemo(cacheDir: string | undefined): Promise<Memo> {
  if (!cacheDir) return {};
  try {
    const j = JSON.parse(readFileSync(memoFile(cacheDir), 'utf8')) as { format?: string; entries?: Memo };
    if (j.format !== MEMO_FORMAT || !j.entries || typeof j.entries !== 'object') return {};
    // Entries that fail their checksum are dropped: the tool is simply asked again.
    return Object.fromEntries(Object.entries(j.entries).filter(([k, e]) => e && typeof e === 'object' && e.sum === memoSum(k, e)));
  } catch {
    return {};
  }
}

async function stampOf(real: string, args: string[]): Promise<string> {
  return stampOfSync(real, args);
}

function stampOfSync(real: string, args: string[]): string {
  // ctime catches an in-place rewrite that kept size and mtime (cp --preserve, touch -r).
  const st = statSync(real, { bigint: true });
  return JSON.stringify([real, String(st.size), String(st.mtimeNs), String(st.ctimeNs), String(st.ino), String(st.dev), args]);
}

/**
 * Find each tool on PATH and read its version. A memo in cacheDir keyed by the
 * binary's identity means a warm build spawns nothing; any change to the binary
 * (new inode, size, mtime or ctime) reads the version again. Failures (timeouts,
 * spawn errors) are never memoised.
 */
export async function probeTools(tools: ToolSpec[], cacheDir?: string, pathEnv?: string): Promise<ToolFact[]> {
  const unique = new Map<string, ToolSpec>();
  for (const t of tools) unique.set(t.name, t);
  const memo = await readMemo(cacheDir);
  let dirty = false;
  const facts = await Promise.all(
    [...unique.values()].map(async (t): Promise<ToolFact> => {
      const found = findOnPathSync(t.name, pathEnv ?? process.env.PATH ?? '');
      if (!found) return { name: t.name, apt: t.apt };
      const args = t.versionArgs ?? ['--version'];
      let real: string;
      let stamp: string;
      try {
        real = realpathSync.native(found); // as fs.promises.realpath: realpath(3)
        stamp = stampOfSync(real, args);
      } catch (e) {
        return { name: t.name, apt: t.apt, path: found, error: `cannot stat: ${(e as Error).message}` };
      }
      const key = `${real}\0${JSON.stringify(args)}`;
      const hit = memo[key];
      if (hit && hit.stamp === stamp) {
        return { name: t.name, apt: t.apt, path: found, version: hit.version, versionKnown: hit.versionKnown, memo: true };
      }
      const r = await spawnProcess(found, args, { capture: true, timeoutMs: 15000, env: { LC_ALL: 'C' } });
      if (r.spawnError || r.timedOut) return { name: t.name, apt: t.apt, path: found, error: r.spawnError ?? `\`${t.name} ${args.join(' ')}\` timed out` };
      // Some tools print their banner on stderr, some exit non-zero on --version.
      let version = firstMeaningfulLine(r.stdout) ?? firstMeaningfulLine(r.stderr);
      let versionKnown = true;
      if (version === undefined) {
        // Nothing to read: the binary's content hash keeps cache keys honest.
        version = `unknown (sha256:${await sha256File(real)})`;
        versionKnown = false;
      }
      // Re-stat: if the binary changed while we ran it, do not memoise a mixed result.
      if ((await stampOf(real, args).catch(() => '')) === stamp) {
        memo[key] = { stamp, version, versionKnown, sum: memoSum(key, { stamp, version, versionKnown }) };
        dirty = true;
      }
      return { name: t.name, apt: t.apt, path: found, version, versionKnown, memo: false };
    }),
  );
  if (dirty && cacheDir) {
    // Merge with what another process may have written meanwhile; ours wins per key.
    const latest = await readMemo(cacheDir);
    await fs.mkdir(path.dirname(memoFile(cacheDir)), { recursive: true });
    await writeAtomic(memoFile(cacheDir), JSON.stringify({ format: MEMO_FORMAT, entries: { ...latest, ...memo } }, null, 1) + '\n');
  }
  return facts.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

/** Versions for compile's cache keys, plus what is missing or unreadable. */
export async function toolVersions(
  tools: ToolSpec[],
  cacheDir?: string,
): Promise<{ versions: Record<string, string>; missing: ToolSpec[]; failed: ToolFact[] }> {
  const facts = await probeTools(tools, cacheDir);
  const versions: Record<string, string> = {};
  const missing: ToolSpec[] = [];
  const failed: ToolFact[] = [];
  for (const f of facts) {
    if (!f.path) missing.push({ name: f.name, apt: f.apt });
    else if (f.error || f.version === undefined) failed.push(f);
    else versions[f.name] = f.version;
  }
  return { versions, missing, failed };
}
