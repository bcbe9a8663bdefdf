// Talking to poudriere on a remote FreeBSD builder, pure parts: the remote
// command lines (ssh hands the remote side one string for its shell, so every
// word is quoted here), poudriere's list outputs, its failed-ports file, and
// where it keeps logs and packages (poudriere(8), poudriere-bulk(8)).

/** Names poudriere accepts for jails, ports trees and sets. */
export const NAME_RE = /^[A-Za-z0-9_][A-Za-z0-9_.-]*$/;
/** category/port, optionally @flavor. */
export const ORIGIN_RE = /^[A-Za-z0-9_+.-]+\/[A-Za-z0-9_+.-]+(@[A-Za-z0-9_]+)?$/;
/** A git branch, tag or commit: no spaces, no leading "-", no "..". */
export const REF_RE = /^(?!-)(?!.*\.\.)[A-Za-z0-9_./+-]+$/;
export const HOST_RE = /^(?!-)[A-Za-z0-9.-]+$|^\[?[0-9A-Fa-f:]+\]?$/;
export const USER_RE = /^[a-z_][a-z0-9_.-]*$/;
export const ABS_PATH_RE = /^\/[A-Za-z0-9_./-]*$/;

/** One word for a POSIX shell: single-quoted unless it is plainly safe. */
export function shQuote(word: string): string {
  return /^[A-Za-z0-9_./:=@%+,-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

/** The string ssh sends as the remote command. */
export const remoteCommand = (words: string[]): string => words.map(shQuote).join(' ');

/** poudriere's build name: <jail>-<ports tree>[-<set>]. Logs and packages live under it. */
export const masterName = (jail: string, tree: string, set?: string): string => [jail, tree, ...(set ? [set] : [])].join('-');

export const bulkLogDir = (dataDir: string, master: string): string => `${dataDir}/logs/bulk/${master}/latest`;
export const failedListFile = (dataDir: string, master: string): string => `${bulkLogDir(dataDir, master)}/.poudriere.ports.failed`;
export const errorLogFile = (dataDir: string, master: string, pkgname: string): string => `${bulkLogDir(dataDir, master)}/logs/errors/${pkgname}.log`;
export const packagesDir = (dataDir: string, master: string): string => `${dataDir}/packages/${master}/All`;

/** `poudriere jail -l -q`: name, version, arch, method, timestamp…, path. */
export function parseJailList(text: string): { name: string; version: string; arch: string }[] {
  return text
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .filter((w) => w.length >= 3 && w[0] !== '')
    .map((w) => ({ name: w[0]!, version: w[1]!, arch: w[2]! }));
}

/** `poudriere ports -l -q`: name, method, timestamp (may hold a space), path last. */
export function parsePortsList(text: string): { name: string; method: string; path: string }[] {
  return text
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .filter((w) => w.length >= 3 && w[0] !== '')
    .map((w) => ({ name: w[0]!, method: w[1]!, path: w[w.length - 1]! }));
}

export interface FailedPort {
  origin: string;
  pkgname: string;
  phase: string;
}

/** `.poudriere.ports.failed`: "origin pkgname phase errortype elapsed" per line. */
export function parseFailedPorts(text: string): FailedPort[] {
  return text
    .split('\n')
    .map((l) => l.trim().split(/\s+/))
    .filter((w) => w.length >= 2 && w[0] !== '')
    .map((w) => ({ origin: w[0]!, pkgname: w[1]!, phase: w[2] ?? 'unknown' }));
}

/** poudriere ports -m for a git URL. */
export function portsMethod(url: string): string {
  if (/^https:\/\//.test(url)) return 'git+https';
  if (/^http:\/\//.test(url)) return 'git+http';
  if (/^(ssh:\/\/|[A-Za-z0-9_.-]+@[A-Za-z0-9_.-]+:)/.test(url)) return 'git+ssh';
  return 'git';
}
