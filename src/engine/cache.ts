// Content-addressed store. Layout under the cache root:
//   blobs/sha256/ab/<hex>   every output file, named by its sha256, read-only
//   entries/<key>.json      one record per stage key: files, digests, meta, key parts,
//                           sealed by a sha256 over its own content
//                           (its mtime is the entry's last use, for LRU eviction)
//   trees/<key>/            hardlink view of an entry's files, handed to downstream stages
//   published/<hex>.json    publish memo per image dir (src/engine/publish.ts): stat fingerprints
//   unpacked/<key>/         a rootfs entry's tarball unpacked once (tree/ + .complete), shared
//                           read-only by every stage that asks for it (RunContext.rootfsTree)
//   history/<spec>/<arch>/<stage>.json   last key parts per stage, for `explain`
//   verified/<key>          one memo per entry: a header naming the key, then for each of
//                           its blobs "<sha> <size> <stat fingerprint>" at its last full
//                           check (one file read per entry however many blobs it holds)
//   debs/sha256/<hex>.deb   .debs locks name (src/lock/); debs/roots/ lists the locks gc keeps them for
//   tmp/                    staging; same filesystem so commits are renames; every
//                           name carries its owner's pid and process start time
// An entry appears only when complete: blobs are made durable (an fsync each, or one
// syncfs for a many-file output) and renamed first, the record last. A crash leaves
// at most unreferenced blobs, which `gc` removes.
//
// Nothing read back from the store is trusted on its face: a record must parse,
// describe the key it is filed under and match its seal; a blob must hash to its
// name (or carry an unchanged stat fingerprint); a tree must be hardlinks to
// verified blobs. Anything else is a miss (rebuilt), never a published byte.
import { randomBytes } from 'node:crypto';
import { closeSync, constants as fsc, existsSync, fstatSync, lstatSync, mkdirSync, openSync, readFileSync, readSync, rmSync, utimesSync, promises as fs, type BigIntStats } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pLimit from 'p-limit';
import { canonicalize, sha256 } from './canonical.js';
import { keyOf, type KeyParts, type Plan } from './compile.js';
import { safeRemove } from './fsutil.js';
import { runProcess } from './process.js';
import { hashFile } from '../lib/digest.js';

export interface FileRecord {
  path: string;
  size: number;
  sha256: string;
  fsverity: string;
  executable: boolean;
}

export interface Entry {
  key: string;
  kind: string;
  /** Stage name that produced it (informational; names are not part of the key). */
  stage: string;
  parts: KeyParts;
  files: FileRecord[];
  meta: Record<string, unknown>;
}

/** A cache file does not hold what it should. `dropped`: record keys removed because of it. */
export class CacheCorruptError extends Error {
  constructor(
    message: string,
    readonly dropped: string[] = [],
  ) {
    super(message);
    this.name = 'CacheCorruptError';
  }
}

/** One bad thing `verifyAll` found. */
export interface CacheProblem {
  what: 'record' | 'blob' | 'tree' | 'deb';
  /** Path relative to the cache root. */
  path: string;
  message: string;
  expected?: string;
  found?: string;
  /** Records affected (key, stage). */
  records?: { key: string; stage: string }[];
}

export function defaultCacheRoot(env = process.env): string {
  if (env.PIPELINE_CACHE_DIR) return path.resolve(env.PIPELINE_CACHE_DIR);
  const base = env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(base, 'pipeline');
}

const HEX64 = /^[0-9a-f]{64}$/;
const SEAL = 'recordSha256';
const RECORD_FIELDS = new Set(['key', 'kind', 'stage', 'parts', 'files', 'meta']);
const FILE_FIELDS = new Set(['path', 'size', 'sha256', 'fsverity', 'executable']);
const TREE_MARK = '.complete';

const isObj = (v: unknown): v is Record<string, unknown> => typeof v === 'object' && v !== null && !Array.isArray(v);

/** The seal stored in a record: sha256 of the canonical JSON of everything else. */
export function recordSeal(e: Entry): string {
  return sha256(canonicalize({ key: e.key, kind: e.kind, stage: e.stage, parts: e.parts, files: e.files, meta: e.meta }));
}

/** A relative path that stays inside a tree and cannot collide with the tree marker. */
function safeRelPath(p: unknown): p is string {
  if (typeof p !== 'string' || !p || p.startsWith('/') || p.includes('\0') || p === TREE_MARK) return false;
  return p.split('/').every((s) => s !== '' && s !== '.' && s !== '..');
}

/**
 * Parse a record filed under `key` (pure). Bad JSON, unknown fields, a key field
 * or key parts that do not match the file name, malformed files or a broken seal
 * make it no record at all. Records from before seals (`sealed: false`) are still
 * read, so an existing cache is not rebuilt; everything else about them is checked.
 */
export function parseRecord(key: string, text: string): { entry: Entry; sealed: boolean } | { problem: string; expected?: string; found?: string } {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return { problem: 'not valid JSON' };
  }
  if (!isObj(v)) return { problem: 'not a JSON object' };
  const unknown = Object.keys(v).find((k) => !RECORD_FIELDS.has(k) && k !== SEAL);
  if (unknown !== undefined) return { problem: `unknown field "${unknown}"` };
  if (v.key !== key) return { problem: 'its key field does not match its file name', expected: key, found: JSON.stringify(v.key) };
  if (!isObj(v.parts)) return { problem: 'no key parts' };
  const partsKey = keyOf(v.parts as unknown as KeyParts);
  if (partsKey !== key) return { problem: 'its key parts do not hash to its key', expected: key, found: partsKey };
  if (typeof v.kind !== 'string' || v.kind !== v.parts.kind) return { problem: 'its kind does not match its key parts' };
  if (typeof v.stage !== 'string') return { problem: 'no stage name' };
  if (!isObj(v.meta)) return { problem: 'meta is not an object' };
  if (!Array.isArray(v.files)) return { problem: 'files is not a list' };
  const seen = new Set<string>();
  for (const f of v.files as unknown[]) {
    if (!isObj(f) || Object.keys(f).some((k) => !FILE_FIELDS.has(k))) return { problem: 'a file entry is malformed' };
    if (!safeRelPath(f.path) || seen.has(f.path)) return { problem: `bad or duplicate file path ${JSON.stringify(f.path)}` };
    seen.add(f.path);
    if (!Number.isSafeInteger(f.size) || (f.size as number) < 0) return { problem: `bad size for ${f.path}` };
    if (typeof f.sha256 !== 'string' || !HEX64.test(f.sha256)) return { problem: `bad sha256 for ${f.path}` };
    if (typeof f.fsverity !== 'string' || !HEX64.test(f.fsverity)) return { problem: `bad fsverity digest for ${f.path}` };
    if (typeof f.executable !== 'boolean') return { problem: `bad executable flag for ${f.path}` };
  }
  const entry: Entry = { key, kind: v.kind, stage: v.stage, parts: v.parts as unknown as KeyParts, files: v.files as FileRecord[], meta: v.meta };
  if (!(SEAL in v)) return { entry, sealed: false };
  const seal = recordSeal(entry);
  if (v[SEAL] !== seal) return { problem: 'its seal does not match its content', expected: `sha256 ${String(v[SEAL])}`, found: `sha256 ${seal}` };
  return { entry, sealed: true };
}

/** History is only used by `explain`; one that does not hash to its key is ignored. */
function parseHistory(text: string): { key: string; parts: KeyParts } | undefined {
  try {
    const v: unknown = JSON.parse(text);
    if (!isObj(v) || typeof v.key !== 'string' || !isObj(v.parts)) return undefined;
    const parts = v.parts as unknown as KeyParts;
    if (keyOf(parts) !== v.key) return undefined;
    for (const f of ['tools', 'assets', 'inputs'] as const) if (parts[f] !== undefined && !isObj(parts[f])) return undefined;
    return { key: v.key, parts };
  } catch {
    return undefined;
  }
}

/**
 * The memo line for a blob: its sha and recorded size, then its stat fingerprint
 * (device, inode, size, mtime, ctime in ns). Fixed width, so a cache's size does
 * not depend on inode numbers.
 */
function memoLine(sha: string, size: number | bigint, st: { dev: bigint; ino: bigint; size: bigint; mtimeNs: bigint; ctimeNs: bigint }): string {
  const n = (v: number | bigint) => String(v).padStart(20, '0');
  return `${sha} ${n(size)} ${[st.dev, st.ino, st.size, st.mtimeNs, st.ctimeNs].map(n).join(':')}\n`;
}

/**
 * First line of an entry's verified memo: the key, and the sha256 of the record
 * text that last passed every parseRecord check ("-" when none is known). Anything
 * else (an old per-blob memo, garbage) is no memo.
 */
const memoHeader = (key: string, record?: string) => `pipeline-verified/2 ${key} ${record ?? '-'}\n`;
const MEMO_HEAD = /^pipeline-verified\/2 ([0-9a-f]{64}) ([0-9a-f]{64}|-)\n/;

type BlobCheck = { ok: true } | { ok: false; missing: boolean; found: string; recordWrong?: boolean };

/** The record digest an entry memo filed under key vouches for, if any. */
function memoRecord(key: string, text: string): string | undefined {
  const m = MEMO_HEAD.exec(text);
  return m && m[1] === key && m[2] !== '-' ? m[2] : undefined;
}

/** The blob lines of an entry memo filed under key (sha -> line); empty for anything that is not one. */
function parseMemo(key: string, text: string): Map<string, string> {
  const out = new Map<string, string>();
  const m = MEMO_HEAD.exec(text);
  if (!m || m[1] !== key) return out;
  for (const l of text.slice(m[0].length).split('\n')) if (l) out.set(l.slice(0, 64), `${l}\n`);
  return out;
}

/**
 * A record whose exact text already passed parseRecord (its digest is in the
 * entry memo): only its JSON is read again. A composefs record lists ~16k files,
 * and checking each one (and the seal over all of them) was most of a no-op.
 */
function trustedRecord(key: string, text: string): Entry | undefined {
  try {
    const v = JSON.parse(text) as Entry;
    return v.key === key && Array.isArray(v.files) ? { key, kind: v.kind, stage: v.stage, parts: v.parts, files: v.files, meta: v.meta } : undefined;
  } catch {
    return undefined;
  }
}

/** Records above this size are vouched-for lazily (lazyTrustedRecord); memos above it are read only for their header. */
const LAZY_BYTES = 64 * 1024;

/**
 * A big vouched-for record (a composefs store's, ~3 MB) as an entry whose fields
 * are parsed on first use: a no-op build whose publication is unchanged only needs
 * its key and record digest, and the parse (plus the garbage of 16k file objects)
 * was a tenth of it. The bytes are held as read, so the fields are the ones the
 * memo vouched for. Only a memo forged to the digest of a bad record could make
 * the deferred parse fail: then the record is dropped and the access throws
 * CacheCorruptError (a miss in verify, like any corrupt entry).
 */
function lazyTrustedRecord(key: string, bytes: Buffer, onBad: () => void): Entry {
  let v: Entry | undefined;
  const load = (): Entry => {
    if (v) return v;
    const e = trustedRecord(key, bytes.toString('utf8'));
    if (!e) {
      onBad();
      throw new CacheCorruptError(`cache record for entry ${key.slice(0, 12)} is not what its verified memo vouched for; dropped, it will be rebuilt`, [key]);
    }
    return (v = e);
  };
  const entry = { key } as Entry;
  for (const f of ['kind', 'stage', 'parts', 'files', 'meta'] as const) {
    Object.defineProperty(entry, f, {
      enumerable: true,
      configurable: true,
      get: () => load()[f],
      // A caller that replaces a field gets a plain data property, as on any entry.
      set: (x: unknown) => Object.defineProperty(entry, f, { value: x, enumerable: true, writable: true, configurable: true }),
    });
  }
  return entry;
}

/**
 * An entry memo's record digest, reading only its header when the memo is big (a
 * composefs entry's lists ~16k blobs, 2 MB: verify reads it whole if it needs the
 * lines). `text` is the whole memo when it was small enough to read at once.
 */
function readMemoHead(file: string, key: string): { record?: string; text?: string } {
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch {
    return { text: '' };
  }
  try {
    const size = fstatSync(fd).size;
    const buf = Buffer.allocUnsafe(size <= LAZY_BYTES ? size : 256);
    let n = 0;
    while (n < buf.length) {
      const r = readSync(fd, buf, n, buf.length - n, n);
      if (r === 0) break;
      n += r;
    }
    if (size > LAZY_BYTES) return { record: memoRecord(key, buf.toString('latin1', 0, n)) };
    const text = buf.toString('utf8', 0, n);
    return { record: memoRecord(key, text), text };
  } catch {
    return { text: '' };
  } finally {
    closeSync(fd);
  }
}

export class Cache {
  /**
   * Blobs this process checked (hashed, or found under an entry memo): sha -> memo
   * line at that time. Lets entries that share a blob, and commit, trust it while
   * its stat is unchanged without reading any memo.
   */
  private readonly checked = new Map<string, string>();
  /** key -> sha256 of the record text that passed parseRecord here (it goes into the entry memo). */
  private readonly recordDigests = new Map<string, string>();
  /** key -> the entry memo as readRecord found it, so verify does not read it again. */
  private readonly memoTexts = new Map<string, string>();

  constructor(readonly root: string) {
    CACHE_ROOTS.add(path.resolve(root));
  }

  private entryPath(key: string) {
    return path.join(this.root, 'entries', `${key}.json`);
  }
  blobPath(sha: string) {
    return path.join(this.root, 'blobs', 'sha256', sha.slice(0, 2), sha);
  }
  /** A .deb a lock names, filed by its sha256 (shared by every stage, arch and spec). */
  debPath(sha: string) {
    return path.join(this.root, 'debs', 'sha256', `${sha}.deb`);
  }
  /** One file per lock that uses the .deb store, holding the lock's path: `gc` keeps every .deb such a lock names. */
  debRootPath(lockFile: string) {
    return path.join(this.root, 'debs', 'roots', sha256(path.resolve(lockFile)));
  }
  private treePath(key: string) {
    return path.join(this.root, 'trees', key);
  }
  /** Where a rootfs entry's tarball is unpacked for every consumer (see RunContext.rootfsTree). */
  unpackedPath(key: string) {
    return path.join(this.root, 'unpacked', key);
  }
  /** The entry's verified memo (a hint: lost, torn or tampered, it only costs a re-hash). */
  private memoPath(key: string) {
    return path.join(this.root, 'verified', key);
  }
  private rel(p: string) {
    return path.relative(this.root, p);
  }

  async init(): Promise<void> {
    // Synchronous: on an existing cache (every build but the first) each is one failing
    // mkdir, cheaper than a thread-pool round trip; a no-op build pays for every one.
    for (const d of ['blobs/sha256', 'entries', 'trees', 'history', 'verified', 'tmp']) mkdirSync(path.join(this.root, d), { recursive: true });
  }

  /** The record filed under key: undefined when absent; a record that fails its checks is removed and is a miss. */
  private async readRecord(key: string): Promise<Entry | undefined> {
    // Read at once (one syscall each from the page cache, no thread-pool round trips
    // for a 3 MB record) and hashed as bytes: the digest is the same as of the text.
    let bytes: Buffer;
    try {
      bytes = readFileSync(this.entryPath(key));
    } catch {
      return undefined;
    }
    const memo = readMemoHead(this.memoPath(key), key);
    // A big memo is left for verify to read, only if it runs for this entry.
    if (memo.text !== undefined) this.memoTexts.set(key, memo.text);
    else this.memoTexts.delete(key);
    const digest = sha256(bytes);
    if (memo.record === digest) {
      // The layout commit writes: a record filed under another key is never taken on trust, even lazily.
      if (bytes.length > LAZY_BYTES && bytes.toString('latin1', 0, 80).startsWith(`{"key":"${key}",`)) {
        this.recordDigests.set(key, digest);
        return lazyTrustedRecord(key, bytes, () => this.dropRecordSync(key));
      }
      const e = trustedRecord(key, bytes.toString('utf8'));
      if (e) {
        this.recordDigests.set(key, digest);
        return e;
      }
    }
    const text = bytes.toString('utf8');
    const r = parseRecord(key, text);
    if ('problem' in r) {
      await this.dropRecord(key);
      return undefined;
    }
    if (!r.sealed) await this.seal(r.entry, this.entryPath(key));
    else this.recordDigests.set(key, digest);
    return r.entry;
  }

  /**
   * Records written before seals are sealed the first time they are read (trust on
   * first use; otherwise a shared cache would have to be rebuilt), keeping their
   * mtime, which is their LRU age.
   */
  private async seal(entry: Entry, file: string): Promise<void> {
    try {
      const st = await fs.stat(file);
      await fs.mkdir(this.tmpDir(), { recursive: true });
      await writeAtomic(file, JSON.stringify({ ...entry, [SEAL]: recordSeal(entry) }), this.tmpDir());
      await fs.utimes(file, st.atime, st.mtime);
    } catch {
      /* best effort: an unsealed record is still a valid one */
    }
  }

  /** The entry for a key, or undefined. A bad record, or one whose blobs are gone, is absent. */
  async lookup(key: string): Promise<Entry | undefined> {
    const e = await this.readRecord(key);
    if (!e) return undefined;
    // Back to back (a composefs entry has ~16k blobs): a thread-pool round trip each cost more than the syscall.
    for (const f of e.files) if (!existsSync(this.blobPath(f.sha256))) return undefined;
    return e;
  }

  /**
   * The records of a whole plan, read once per build (key -> entry). Blobs are not
   * touched here: `verify` checks the ones a build will really use.
   */
  async lookupAll(keys: Iterable<string>): Promise<Map<string, Entry>> {
    const out = new Map<string, Entry>();
    await Promise.all(
      [...new Set(keys)].map(async (k) => {
        const e = await this.readRecord(k);
        if (e) out.set(k, e);
      }),
    );
    return out;
  }

  /** Mark an entry as used now (LRU). */
  async touch(key: string): Promise<void> {
    const now = new Date();
    // One syscall: synchronous (see init), done for every entry a build used.
    try {
      utimesSync(this.entryPath(key), now, now);
    } catch {
      /* gone meanwhile: nothing to mark */
    }
  }

  /** End of a build: remember every stage's key parts (for explain) and mark the entries used (LRU). */
  async recordBuild(plan: Pick<Plan, 'spec' | 'arch' | 'stages'>, usedKeys: Iterable<string>): Promise<void> {
    const used = new Set(usedKeys);
    await Promise.all(plan.stages.map((st) => this.writeHistory(plan.spec.name, plan.arch, st.name, st.key, st.parts)));
    await Promise.all([...used].map((k) => this.touch(k)));
  }

  /**
   * Check every blob of an entry against its recorded digest. The entry's memo
   * (verified/<key>, one file) holds each blob's sha, size and stat fingerprint
   * (device, inode, size, mtime, ctime, all in ns) at its last full check; a blob
   * whose line still matches its current stat is not re-read: any write or chmod
   * moves ctime, which cannot be set back, and a tampered memo only differs from
   * the expected lines, which means a re-hash of the blobs it no longer vouches
   * for. Blobs shared by two entries are in both memos: a change is seen by each.
   * `full` ignores memos. On a bad blob, the blob and every record that uses it
   * are dropped (so they are rebuilt) and CacheCorruptError names the stage, file
   * and both digests.
   */
  async verify(entry: Entry, opts: { full?: boolean } = {}): Promise<void> {
    const bySha = new Map<string, FileRecord>();
    for (const f of entry.files) if (!bySha.has(f.sha256)) bySha.set(f.sha256, f);
    const memoText = opts.full ? '' : (this.memoTexts.get(entry.key) ?? (await fs.readFile(this.memoPath(entry.key), 'utf8').catch(() => '')));
    // One lstat per blob, back to back: a composefs entry has ~16k blobs, and the
    // thread-pool round trip of an async lstat costs more than the syscall.
    const bad: { f: FileRecord; c: Extract<BlobCheck, { ok: false }> }[] = [];
    const toHash: { f: FileRecord; line: string }[] = [];
    const lines: string[] = [];
    for (const f of bySha.values()) {
      const st = lstatSync(this.blobPath(f.sha256), { bigint: true, throwIfNoEntry: false });
      if (!st) bad.push({ f, c: { ok: false, missing: true, found: 'no file' } });
      else if (!st.isFile()) bad.push({ f, c: { ok: false, missing: false, found: 'not a regular file' } });
      else lines.push(memoLine(f.sha256, f.size, st));
    }
    // The record digest is a fact about that text, whenever it was checked: kept as it was when this process has not read the record.
    const text = memoHeader(entry.key, this.recordDigests.get(entry.key) ?? memoRecord(entry.key, memoText)) + lines.join('');
    if (!bad.length && memoText === text) {
      let i = 0;
      for (const sha of bySha.keys()) this.checked.set(sha, lines[i++]!);
      return;
    }
    const memo = parseMemo(entry.key, memoText);
    const missing = new Set(bad.map((b) => b.f));
    let i = 0;
    for (const f of bySha.values()) {
      if (missing.has(f)) continue;
      const line = lines[i++]!;
      if (!opts.full && (memo.get(f.sha256) === line || this.checked.get(f.sha256) === line)) this.checked.set(f.sha256, line);
      else toHash.push({ f, line });
    }
    const limit = pLimit(8);
    await Promise.all(
      toHash.map(({ f, line }) =>
        limit(async () => {
          const c = await this.hashBlob(f.sha256, f.size, line);
          if (!c.ok) bad.push({ f, c });
        }),
      ),
    );
    if (!bad.length) {
      // A hint (a lost or torn one only costs a re-hash), so no fsync.
      if (memoText !== text) await this.writeMemo(entry.key, text);
      return;
    }
    const dropped = new Set<string>();
    const msgs: string[] = [];
    for (const { f, c } of bad) {
      const where = `cache ${c.missing ? 'blob missing' : 'blob corrupt'} for stage ${entry.stage} file ${f.path} (${this.rel(this.blobPath(f.sha256))}, entry ${entry.key.slice(0, 12)})`;
      let keys: string[];
      if (c.recordWrong) {
        // The blob is what its name says; the record is what is wrong.
        await this.dropRecord(entry.key);
        keys = [entry.key];
      } else keys = await this.dropBlob(f.sha256);
      keys.forEach((k) => dropped.add(k));
      msgs.push(`${where}: expected sha256 ${f.sha256} (${f.size} bytes), found ${c.found}; dropped ${keys.length} record(s) using it, they will be rebuilt`);
    }
    throw new CacheCorruptError(msgs.join('\n'), [...dropped]);
  }

  /** Hash a blob whose stat gave `line` (taken before reading, so a change while hashing is seen next time). */
  private async hashBlob(sha: string, size: number, line: string): Promise<BlobCheck> {
    const h = await hashFile(this.blobPath(sha)).catch((e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') return undefined;
      throw e;
    });
    if (!h) return { ok: false, missing: true, found: 'no file' };
    if (h.sha256 !== sha) return { ok: false, missing: false, found: `sha256 ${h.sha256} (${h.size} bytes)` };
    if (h.size !== size) return { ok: false, missing: false, found: `${h.size} bytes with the right digest`, recordWrong: true };
    this.checked.set(sha, line);
    return { ok: true };
  }

  /**
   * An existing blob that is what its name says, unchanged since: checked by this
   * process with the same stat, or hashed now. (Blob memos are per entry, so a
   * blob met for the first time in this process is read once.)
   */
  private async blobHolds(sha: string, size: number): Promise<boolean> {
    const st = lstatSync(this.blobPath(sha), { bigint: true, throwIfNoEntry: false });
    if (!st?.isFile() || st.size !== BigInt(size)) return false;
    const line = memoLine(sha, size, st);
    if (this.checked.get(sha) === line) return true;
    return (await this.hashBlob(sha, size, line)).ok;
  }

  /** The blob named sha is the inode st describes, unchanged since st was taken. */
  private isBlobInode(sha: string, st: BigIntStats): boolean {
    const b = lstatSync(this.blobPath(sha), { bigint: true, throwIfNoEntry: false });
    return b !== undefined && b.isFile() && fingerprint(b) === fingerprint(st);
  }

  /** Remember an entry's blobs as checked now (all just hashed, or checked by this process). */
  private async writeEntryMemo(entry: Entry): Promise<void> {
    const lines: string[] = [];
    // sha -> size of its first file (a composefs entry has ~12k: no search per blob).
    const sizes = new Map<string, number>();
    for (const f of entry.files) if (!sizes.has(f.sha256)) sizes.set(f.sha256, f.size);
    for (const [sha, size] of sizes) {
      const line = this.checked.get(sha);
      if (!line) continue;
      const st = lstatSync(this.blobPath(sha), { bigint: true, throwIfNoEntry: false });
      // Changed since it was checked (or never checked here): leave it out; it is re-hashed next time.
      if (!st || memoLine(sha, size, st) !== line) continue;
      lines.push(line);
    }
    const record = this.recordDigests.get(entry.key) ?? memoRecord(entry.key, this.memoTexts.get(entry.key) ?? '');
    await this.writeMemo(entry.key, memoHeader(entry.key, record) + lines.join(''));
  }

  /** A hint (a lost or torn one only costs a re-check), so no fsync. */
  private async writeMemo(key: string, text: string): Promise<void> {
    this.memoTexts.set(key, text);
    await writeAtomic(this.memoPath(key), text, this.tmpDir(), { durable: false }).catch(() => {});
  }
  /** A record and its memo gone now, from a getter (lazyTrustedRecord) that cannot wait; its tree is re-made when used. */
  private dropRecordSync(key: string): void {
    rmSync(this.entryPath(key), { force: true });
    rmSync(this.memoPath(key), { force: true });
    this.memoTexts.delete(key);
    this.recordDigests.delete(key);
  }

  /** Remove a record and its tree; the next build rebuilds it. */
  async dropRecord(key: string): Promise<void> {
    await fs.rm(this.entryPath(key), { force: true });
    await fs.rm(this.memoPath(key), { force: true });
    this.memoTexts.delete(key);
    this.recordDigests.delete(key);
    await safeRemove(this.treePath(key));
    await safeRemove(this.unpackedPath(key));
  }

  /**
   * Remove a blob and every record that refers to it (records share blobs: the
   * initramfs and ipxe entries hold the same initrd), so no record is left
   * pointing at nothing. Returns the dropped keys.
   */
  async dropBlob(sha: string): Promise<string[]> {
    const dropped: string[] = [];
    const dir = path.join(this.root, 'entries');
    for (const n of await fs.readdir(dir).catch(() => [] as string[])) {
      if (!n.endsWith('.json')) continue;
      const key = n.slice(0, -5);
      const v = await fs
        .readFile(path.join(dir, n), 'utf8')
        .then((t) => JSON.parse(t) as unknown)
        .catch(() => undefined);
      const files = isObj(v) && Array.isArray(v.files) ? (v.files as unknown[]) : [];
      if (files.some((f) => isObj(f) && f.sha256 === sha)) {
        await this.dropRecord(key);
        dropped.push(key);
      }
    }
    await fs.rm(this.blobPath(sha), { force: true });
    this.checked.delete(sha);
    return dropped;
  }

  /**
   * A read-only directory view (hardlinks) of an entry's files. An existing tree
   * is reused only when it holds exactly the entry's files, each the blob itself;
   * the blobs are verified before the tree is handed out. Linking and unlinking
   * move a blob's ctime, so a re-made tree is checked after its last link.
   */
  async materialize(entry: Entry): Promise<string> {
    const dir = this.treePath(entry.key);
    if ((await this.treeProblem(entry, dir)) === undefined) {
      await this.verify(entry);
      return dir;
    }
    await safeRemove(dir);
    const tmp = await this.staging('tree');
    try {
      for (const f of entry.files) {
        const dst = path.join(tmp, f.path);
        await fs.mkdir(path.dirname(dst), { recursive: true });
        await fs.link(this.blobPath(f.sha256), dst).catch(async (e: NodeJS.ErrnoException) => {
          if (e.code === 'ENOENT') await this.verify(entry); // a missing blob: CacheCorruptError, not a bare ENOENT
          if (e.code !== 'EXDEV' && e.code !== 'EMLINK') throw e;
          await fs.copyFile(this.blobPath(f.sha256), dst, fsc.COPYFILE_FICLONE);
        });
      }
      await fs.writeFile(path.join(tmp, TREE_MARK), '');
      await fs.rename(tmp, dir).catch((e: NodeJS.ErrnoException) => {
        // Another process materialised it first: theirs is as good as ours.
        if (e.code !== 'ENOTEMPTY' && e.code !== 'EEXIST') throw e;
      });
    } finally {
      await safeRemove(tmp);
    }
    await this.verify(entry);
    return dir;
  }

  /** Why a tree is not a faithful view of the entry's (verified) blobs, or undefined. */
  private async treeProblem(entry: Entry, dir: string): Promise<{ file: string; found: string; expected: string } | { file: string; found: string; expected?: undefined } | undefined> {
    try {
      await fs.access(path.join(dir, TREE_MARK));
    } catch {
      return { file: TREE_MARK, found: 'no completion marker' };
    }
    let present: string[];
    try {
      present = await walkAll(dir);
    } catch {
      return { file: '.', found: 'unreadable' };
    }
    const want = new Set(entry.files.map((f) => f.path));
    const extra = present.find((p) => p !== TREE_MARK && !want.has(p));
    if (extra) return { file: extra, found: 'a file the entry does not have' };
    for (const f of entry.files) {
      const p = path.join(dir, f.path);
      const [t, b] = await Promise.all([fs.lstat(p).catch(() => undefined), fs.stat(this.blobPath(f.sha256)).catch(() => undefined)]);
      if (!t || !t.isFile()) return { file: f.path, found: t ? 'not a regular file' : 'missing', expected: f.sha256 };
      if (b && t.dev === b.dev && t.ino === b.ino) continue;
      // A copy (EXDEV/EMLINK fallback) must hash to the record.
      const h = await hashFile(p);
      if (h.sha256 !== f.sha256) return { file: f.path, found: h.sha256, expected: f.sha256 };
    }
    return undefined;
  }

  /** Scratch for atomic writes and staging (same filesystem; dead owners' files go at the next build). */
  tmpDir() {
    return path.join(this.root, 'tmp');
  }

  /** A fresh directory under tmp/ (same filesystem as the blobs), named for its owner (pid, start time). */
  async staging(label: string): Promise<string> {
    const dir = path.join(this.tmpDir(), ownedName(`${label}-`));
    await fs.mkdir(dir, { recursive: true });
    return dir;
  }

  /**
   * Move a finished stage's outDir into the store and write its record. outDir must
   * be a staging dir from this cache. Only regular files are allowed.
   */
  async commit(key: string, stage: string, parts: KeyParts, outDir: string, meta: Record<string, unknown>, opts: { expect?: FileRecord[] } = {}): Promise<Entry> {
    const rels = await listFiles(outDir, stage);
    // Many files at once (a composefs store has ~16 000): a serial fsync each cost
    // ~3.7 ms here (a minute for the store); side by side the disk takes them in
    // batches (~0.25 ms each). Hash first, then store each distinct digest once.
    const limit = pLimit(COMMIT_PARALLEL);
    const hashed = await Promise.all(
      rels.map((rel) =>
        limit(async () => {
          const abs = path.join(outDir, rel);
          const st = lstatSync(abs, { bigint: true });
          // Digests the stage noted for exactly this file (same inode, size, times) are
          // not read again; everything else is hashed here.
          const noted = takeNoted(abs, st);
          const h = noted ?? (await hashFile(abs, { fsverity: true }));
          return { abs, st, noted: noted !== undefined, rec: { path: rel, size: h.size, sha256: h.sha256, fsverity: h.fsverity!, executable: (st.mode & 0o111n) !== 0n } };
        }),
      ),
    );
    const files: FileRecord[] = hashed.map((h) => h.rec);
    const firstOf = new Set<string>();
    const toStore: { abs: string; rec: FileRecord }[] = [];
    await Promise.all(
      hashed.map(({ abs, st, noted, rec }) => {
        // Two files of one entry with the same bytes: one blob, stored by the first.
        if (firstOf.has(rec.sha256)) return fs.rm(abs);
        firstOf.add(rec.sha256);
        return limit(async () => {
          // A hard link to the blob itself whose bytes the stage compared with the bytes
          // it hashed (noteOutputDigests after linking): the blob holds them, no read.
          if (noted && this.isBlobInode(rec.sha256, st)) {
            this.checked.set(rec.sha256, memoLine(rec.sha256, rec.size, st));
            return fs.rm(abs);
          }
          // An existing blob of the same name is kept only when it is what its name says
          // (trees linked to it stay valid); else the fresh bytes are renamed over it.
          if (await this.blobHolds(rec.sha256, rec.size)) return fs.rm(abs);
          toStore.push({ abs, rec });
        });
      }),
    );
    // A blob name never holds bytes a crash could lose: each file is durable before it
    // is renamed into blobs/ (and so before the record, written last). Few files: an
    // fsync each. Many (a composefs store has ~12k new objects on a first build, and
    // one fsync costs ~3.7 ms here): one syncfs of the cache's filesystem for all.
    const batch = toStore.length >= SYNCFS_MIN;
    if (batch) {
      await Promise.all(toStore.map(({ abs }) => limit(() => fs.chmod(abs, 0o444))));
      await syncFilesystem(outDir);
    }
    await Promise.all(
      toStore.map(({ abs, rec }) =>
        limit(async () => {
          if (!batch) {
            await fsyncFile(abs);
            await fs.chmod(abs, 0o444);
          }
          const blob = this.blobPath(rec.sha256);
          await fs.mkdir(path.dirname(blob), { recursive: true });
          await fs.rename(abs, blob);
          // Just hashed: remember it (the entry memo below), so the next build does not read it again.
          this.checked.set(rec.sha256, memoLine(rec.sha256, rec.size, await fs.lstat(blob, { bigint: true })));
        }),
      ),
    );
    // An entry imported from elsewhere (the remote cache) must be exactly what its
    // record said, fs-verity digests and modes included; else no record is written
    // (the blobs just moved are named by their own hashes: gc drops them).
    if (opts.expect && canonicalize(opts.expect) !== canonicalize(files)) {
      const bad = files.find((f, i) => canonicalize(f) !== canonicalize(opts.expect![i])) ?? files[0];
      throw new CacheCorruptError(`imported entry ${key.slice(0, 12)} (stage ${stage}) does not match its record${bad ? ` at ${bad.path}` : ''}`);
    }
    const entry: Entry = { key, kind: parts.kind, stage, parts, files, meta };
    const text = JSON.stringify({ ...entry, [SEAL]: recordSeal(entry) });
    await writeAtomic(this.entryPath(key), text, this.tmpDir());
    // Vouched for only as parseRecord would read it back (a file named like the tree marker is not).
    if ('entry' in parseRecord(key, text)) this.recordDigests.set(key, sha256(text));
    await this.writeEntryMemo(entry);
    return entry;
  }

  async readHistory(spec: string, arch: string, stage: string): Promise<{ key: string; parts: KeyParts } | undefined> {
    const text = await fs.readFile(path.join(this.root, 'history', spec, arch, `${stage}.json`), 'utf8').catch(() => undefined);
    return text === undefined ? undefined : parseHistory(text);
  }

  async writeHistory(spec: string, arch: string, stage: string, key: string, parts: KeyParts): Promise<void> {
    const file = path.join(this.root, 'history', spec, arch, `${stage}.json`);
    const text = canonicalize({ key, parts });
    // (issue 10) A no-op build rewrites (and fsyncs) nothing: the history is unchanged.
    let old: string | undefined;
    try {
      old = readFileSync(file, 'utf8'); // small, and read on every build: no thread-pool round trips
    } catch {
      /* none yet */
    }
    if (old === text) return;
    await fs.mkdir(path.dirname(file), { recursive: true });
    await writeAtomic(file, text, this.tmpDir());
  }

  /** All valid entries with their size (sum of their files) and last use. */
  async list(): Promise<{ entry: Entry; size: number; lastUsed: Date }[]> {
    const dir = path.join(this.root, 'entries');
    const names = (await fs.readdir(dir).catch(() => [] as string[])).filter((n) => n.endsWith('.json'));
    const out: { entry: Entry; size: number; lastUsed: Date }[] = [];
    for (const n of names) {
      try {
        const p = path.join(dir, n);
        const [text, st] = await Promise.all([fs.readFile(p, 'utf8'), fs.stat(p)]);
        const r = parseRecord(n.slice(0, -5), text);
        if ('problem' in r) continue;
        out.push({ entry: r.entry, size: r.entry.files.reduce((s, f) => s + f.size, 0), lastUsed: st.mtime });
      } catch {
        /* a record being replaced; skip */
      }
    }
    return out.sort((a, b) => a.lastUsed.getTime() - b.lastUsed.getTime() || a.entry.key.localeCompare(b.entry.key));
  }

  /** Bytes held by blobs (each counted once, however many entries share it). */
  async du(): Promise<{ blobs: number; bytes: number; entries: number }> {
    const blobs = await this.blobSizes();
    const entries = (await fs.readdir(path.join(this.root, 'entries')).catch(() => [] as string[])).filter((n) => n.endsWith('.json')).length;
    return { blobs: blobs.size, bytes: [...blobs.values()].reduce((a, b) => a + b, 0), entries };
  }

  private async blobSizes(): Promise<Map<string, number>> {
    const out = new Map<string, number>();
    const base = path.join(this.root, 'blobs', 'sha256');
    for (const d of await fs.readdir(base).catch(() => [] as string[])) {
      for (const f of await fs.readdir(path.join(base, d)).catch(() => [] as string[])) {
        const st = await fs.stat(path.join(base, d, f)).catch(() => undefined);
        if (st) out.set(f, st.size);
      }
    }
    return out;
  }

  /**
   * Evict least-recently-used entries until the blobs fit in maxBytes, then drop
   * unreferenced blobs, orphaned trees and staging dirs of dead processes. The
   * store keeps accepting new entries at its cap: eviction never blocks writes.
   */
  async gc(maxBytes: number, opts: { keepDebs?: ReadonlySet<string> } = {}): Promise<{ evicted: string[]; freed: number; bytes: number }> {
    await this.init();
    await this.cleanStaging();
    const entries = await this.list();
    const blobs = await this.blobSizes();
    const refs = new Map<string, number>();
    for (const { entry } of entries) for (const f of new Set(entry.files.map((x) => x.sha256))) refs.set(f, (refs.get(f) ?? 0) + 1);
    let bytes = 0;
    for (const [sha, size] of blobs) if (refs.has(sha)) bytes += size;
    const before = [...blobs.values()].reduce((a, b) => a + b, 0);
    const evicted: string[] = [];
    for (const { entry } of entries) {
      if (bytes <= maxBytes) break;
      await this.dropRecord(entry.key);
      evicted.push(entry.key);
      for (const sha of new Set(entry.files.map((x) => x.sha256))) {
        const n = (refs.get(sha) ?? 1) - 1;
        if (n <= 0) {
          refs.delete(sha);
          bytes -= blobs.get(sha) ?? 0;
        } else refs.set(sha, n);
      }
    }
    // Unreferenced blobs (evicted, or left by an interrupted commit).
    for (const sha of blobs.keys()) {
      if (!refs.has(sha)) await fs.rm(this.blobPath(sha), { force: true });
    }
    const live = new Set((await this.list()).map((e) => e.entry.key));
    // Memos of gone entries, and per-blob memos of older caches (verified/<sha>).
    for (const m of await fs.readdir(path.join(this.root, 'verified')).catch(() => [] as string[])) {
      if (!live.has(m)) await fs.rm(path.join(this.root, 'verified', m), { recursive: true, force: true });
    }
    for (const t of await fs.readdir(path.join(this.root, 'trees')).catch(() => [] as string[])) {
      if (!live.has(t)) await safeRemove(this.treePath(t));
    }
    for (const t of await fs.readdir(path.join(this.root, 'unpacked')).catch(() => [] as string[])) {
      if (!live.has(t)) await safeRemove(this.unpackedPath(t));
    }
    if (opts.keepDebs) await this.gcDebs(opts.keepDebs);
    const after = await this.du();
    return { evicted, freed: before - after.bytes, bytes: after.bytes };
  }

  /** Drop stored .debs whose sha256 is not in keep (the locks' .debs, computed by src/lock/; gc without it leaves them alone). */
  private async gcDebs(keep: ReadonlySet<string>): Promise<void> {
    const dir = path.join(this.root, 'debs', 'sha256');
    for (const f of await fs.readdir(dir).catch(() => [] as string[])) if (!keep.has(f.replace(/\.deb$/, ''))) await fs.rm(path.join(dir, f), { force: true });
  }

  /**
   * Remove tmp/ files and dirs whose owner is gone (a killed build's staging and
   * scratch dirs, half-written records). The owner is the pid and the process
   * start time in the name, so a reused pid is not mistaken for the owner, and
   * a live concurrent build keeps its dirs.
   */
  async cleanStaging(): Promise<string[]> {
    const removed: string[] = [];
    for (const n of await fs.readdir(this.tmpDir()).catch(() => [] as string[])) {
      const owner = tmpOwner(n);
      if (owner && ownerAlive(owner)) continue;
      await safeRemove(path.join(this.tmpDir(), n));
      removed.push(n);
    }
    return removed;
  }

  /**
   * Re-hash everything (memos ignored: they can be tampered too) and list what is
   * bad: records that fail their checks, blobs whose content is not their name,
   * records whose blobs are missing, trees that are not their entry's blobs.
   * With repair, drop all of it so the next build rebuilds; good blobs get a fresh memo.
   */
  async verifyAll(opts: { repair?: boolean } = {}): Promise<{ problems: CacheProblem[]; records: number; blobs: number; unsealed: number }> {
    await this.init();
    const problems: CacheProblem[] = [];
    const good = new Map<string, Entry>();
    let unsealed = 0;
    const edir = path.join(this.root, 'entries');
    const recordFiles = (await fs.readdir(edir).catch(() => [] as string[])).sort();
    for (const n of recordFiles) {
      const p = path.join(edir, n);
      if (!n.endsWith('.json')) {
        problems.push({ what: 'record', path: this.rel(p), message: 'not a record file name' });
        if (opts.repair) await fs.rm(p, { recursive: true, force: true });
        continue;
      }
      const key = n.slice(0, -5);
      const text = await fs.readFile(p, 'utf8').catch(() => '');
      const r = parseRecord(key, text);
      if ('problem' in r) {
        problems.push({ what: 'record', path: this.rel(p), message: r.problem, expected: r.expected, found: r.found });
        if (opts.repair) await this.dropRecord(key);
        continue;
      }
      if (!r.sealed) {
        unsealed++;
        if (opts.repair) await this.seal(r.entry, p);
      } else this.recordDigests.set(key, sha256(text));
      good.set(key, r.entry);
    }
    const users = new Map<string, Entry[]>();
    for (const e of good.values()) for (const sha of new Set(e.files.map((f) => f.sha256))) users.set(sha, [...(users.get(sha) ?? []), e]);
    const recs = (es: Entry[] | undefined) => (es ?? []).map((e) => ({ key: e.key, stage: e.stage }));
    // Records that go because of a bad blob; their trees go with them.
    const dropped = new Set<string>();
    const dropEntries = async (es: Entry[] | undefined) => {
      for (const e of es ?? []) {
        dropped.add(e.key);
        if (good.delete(e.key) && opts.repair) await this.dropRecord(e.key);
      }
    };
    let blobCount = 0;

    // Every blob on disk, hashed once however many records share it.
    const base = path.join(this.root, 'blobs', 'sha256');
    const present = new Set<string>();
    const limit = pLimit(4);
    const jobs: Promise<void>[] = [];
    for (const d of (await fs.readdir(base).catch(() => [] as string[])).sort()) {
      for (const name of (await fs.readdir(path.join(base, d)).catch(() => [] as string[])).sort()) {
        blobCount++;
        jobs.push(
          limit(async () => {
            const p = path.join(base, d, name);
            const st = await fs.lstat(p, { bigint: true }).catch(() => undefined);
            const h = st?.isFile() ? await hashFile(p).catch(() => undefined) : undefined;
            if (h && h.sha256 === name && d === name.slice(0, 2)) {
              present.add(name);
              // Stat taken before the hash: a change while hashing is seen next time.
              this.checked.set(name, memoLine(name, h.size, st!));
              return;
            }
            const found = h ? `sha256 ${h.sha256}` : st?.isFile() ? 'unreadable' : 'not a regular file';
            problems.push({ what: 'blob', path: this.rel(p), message: 'content does not match its name', expected: `sha256 ${name}`, found, records: recs(users.get(name)) });
            if (opts.repair) await fs.rm(p, { recursive: true, force: true });
          }),
        );
      }
    }
    await Promise.all(jobs);
    for (const pr of problems) if (pr.what === 'blob') await dropEntries(users.get(path.basename(pr.path)));

    // Records whose blobs are missing (or were just found bad), or whose sizes are wrong.
    for (const e of [...good.values()]) {
      for (const f of e.files) {
        if (present.has(f.sha256)) {
          const st = await fs.stat(this.blobPath(f.sha256));
          if (st.size === f.size) continue;
          problems.push({ what: 'record', path: this.rel(this.entryPath(e.key)), message: `file ${f.path} has the wrong size`, expected: `${f.size} bytes`, found: `${st.size} bytes`, records: recs([e]) });
        } else if (!problems.some((p) => p.what === 'blob' && path.basename(p.path) === f.sha256)) {
          problems.push({ what: 'blob', path: this.rel(this.blobPath(f.sha256)), message: `missing (stage ${e.stage} file ${f.path})`, expected: `sha256 ${f.sha256}`, found: 'no file', records: recs(users.get(f.sha256)) });
        }
        await dropEntries([e]);
        break;
      }
    }

    // Trees: only complete trees of good entries whose files are the blobs themselves.
    for (const t of (await fs.readdir(path.join(this.root, 'trees')).catch(() => [] as string[])).sort()) {
      const dir = this.treePath(t);
      if (dropped.has(t)) continue;
      const e = good.get(t);
      const bad = e ? await this.treeProblem(e, dir) : { file: '.', found: 'a tree without a valid record' };
      if (!bad) continue;
      if (bad.file === TREE_MARK && e) {
        // An unfinished tree is never used (materialize re-makes it); just tidy it.
        if (opts.repair) await safeRemove(dir);
        continue;
      }
      const file = this.rel(path.join(dir, bad.file));
      if (bad.expected) problems.push({ what: 'tree', path: file, message: 'not its blob', expected: `sha256 ${bad.expected}`, found: HEX64.test(bad.found) ? `sha256 ${bad.found}` : bad.found, records: recs([e!]) });
      else problems.push({ what: 'tree', path: file, message: bad.found, records: e ? recs([e]) : [] });
      if (opts.repair) await safeRemove(dir);
    }
    // The .deb store (locked builds, src/lock/): each file is named by its sha256.
    // A bad one is dropped on repair; `pipeline fetch` or the next locked build gets it again.
    const debDir = path.join(this.root, 'debs', 'sha256');
    const debJobs: Promise<void>[] = [];
    for (const n of (await fs.readdir(debDir).catch(() => [] as string[])).sort()) {
      blobCount++;
      debJobs.push(
        limit(async () => {
          const p = path.join(debDir, n);
          const st = await fs.lstat(p).catch(() => undefined);
          const h = st?.isFile() ? await hashFile(p).catch(() => undefined) : undefined;
          if (h && n === `${h.sha256}.deb`) return;
          const want = /^([0-9a-f]{64})\.deb$/.exec(n)?.[1];
          problems.push({ what: 'deb', path: this.rel(p), message: want ? 'content does not match its name' : 'not a .deb store file name', ...(want ? { expected: `sha256 ${want}` } : {}), found: h ? `sha256 ${h.sha256}` : st?.isFile() ? 'unreadable' : 'not a regular file' });
          if (opts.repair) await fs.rm(p, { recursive: true, force: true });
        }),
      );
    }
    await Promise.all(debJobs);
    // Good entries, every blob just re-hashed: a fresh memo each (a blob changed since is left out).
    if (opts.repair) for (const e of good.values()) await this.writeEntryMemo(e);
    return { problems, records: recordFiles.length, blobs: blobCount, unsealed };
  }
}

/** Every path under dir (files and other non-directories), relative, unsorted. */
async function walkAll(dir: string, rel = ''): Promise<string[]> {
  const out: string[] = [];
  for (const e of await fs.readdir(path.join(dir, rel), { withFileTypes: true })) {
    const r = rel ? `${rel}/${e.name}` : e.name;
    if (e.isDirectory()) out.push(...(await walkAll(dir, r)));
    else out.push(r);
  }
  return out;
}

interface Owner {
  pid: number;
  /** Process start time in clock ticks since boot (/proc/<pid>/stat field 22); undefined for old names. */
  start?: string;
}

/** Start time of a process, or undefined when it does not exist (or /proc is unavailable). */
export function processStartTime(pid: number | 'self'): string | undefined {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parens; fields after it are plain.
    return s.slice(s.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

const OWNER: Required<Owner> = { pid: process.pid, start: processStartTime('self') ?? '0' };

/** The owner encoded in a tmp/ name: staging `label-pid-start-hex`, writeAtomic `.name.pid.start.hex.tmp`, or older forms with the pid only. */
export function tmpOwner(name: string): Owner | undefined {
  const m = /-(\d+)-(\d+)-[0-9a-f]{12}$/.exec(name) ?? /\.(\d+)\.(\d+)\.[0-9a-f]+\.tmp$/.exec(name);
  if (m) return { pid: Number(m[1]), start: m[2] };
  const old = /-(\d+)-[0-9a-f]+$/.exec(name) ?? /\.(\d+)\.[0-9a-f]+\.tmp$/.exec(name);
  return old ? { pid: Number(old[1]) } : undefined;
}

/** prefix + this process's owner tag + a random part, as tmpOwner reads it back. */
export function ownedName(prefix: string): string {
  return `${prefix}${OWNER.pid}-${OWNER.start}-${randomBytes(6).toString('hex')}`;
}

/** A name made by ownedName (or an older pid-only form) whose owner is gone. */
export function ownerGone(name: string): boolean {
  const o = tmpOwner(name.replace(/\.old$/, ''));
  return o !== undefined && !ownerAlive(o);
}

function ownerAlive(o: Owner): boolean {
  if (o.pid === OWNER.pid && (o.start === undefined || o.start === OWNER.start)) return true;
  if (o.start !== undefined && o.start !== '0') return processStartTime(o.pid) === o.start;
  try {
    process.kill(o.pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Sorted relative paths of the regular files under dir; anything else is an error. */
export async function listFiles(dir: string, stage: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (rel: string) => {
    const ents = await fs.readdir(path.join(dir, rel), { withFileTypes: true });
    for (const e of ents) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) await walk(r);
      else if (e.isFile()) out.push(r);
      else throw new Error(`stage ${stage} wrote ${r}, which is not a regular file; stage outputs must be regular files`);
    }
  };
  await walk('');
  return out.sort();
}

/** Roots of the caches this process opened (storedBlob looks for blobs in them). */
const CACHE_ROOTS = new Set<string>();

type Fingerprinted = { dev: bigint; ino: bigint; size: bigint; mtimeNs: bigint; ctimeNs: bigint };
const fingerprint = (st: Fingerprinted) => `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;

interface Noted {
  fingerprint: string;
  digests: { size: number; sha256: string; fsverity: string };
}
/** Output file (absolute path) -> digests its stage noted; taken (and dropped) by commit. */
const NOTED = new Map<string, Noted>();

/**
 * For a stage that computed a file's digests from the very bytes it wrote to it (or
 * proved byte for byte equal to them): commit then takes the digests instead of
 * reading the file again. Call it once the file is final (written, closed, renamed
 * or linked); the file's stat is taken now, and commit uses the digests only if
 * the file still has that stat (any later write, chmod, rename or link moves ctime),
 * else it hashes the file as usual.
 */
export function noteOutputDigests(file: string, digests: { size: number; sha256: string; fsverity: string }, stat?: BigIntStats): void {
  if (!HEX64.test(digests.sha256) || !HEX64.test(digests.fsverity)) throw new Error(`noteOutputDigests: malformed digests for ${file}`);
  // stat: the caller's lstat of the final file, taken just now (saves one per object).
  const st = stat ?? lstatSync(file, { bigint: true });
  if (!st.isFile() || st.size !== BigInt(digests.size)) throw new Error(`noteOutputDigests: ${file} is not a ${digests.size}-byte regular file`);
  // Only a cache's staging area is ever committed: a note for anything else would never be taken.
  const abs = path.resolve(file);
  if (!inStaging(abs)) return;
  NOTED.set(abs, { fingerprint: fingerprint(st), digests: { size: digests.size, sha256: digests.sha256, fsverity: digests.fsverity } });
}

/** The noted digests of file if its stat is still st; the note is used up either way. */
function takeNoted(file: string, st: BigIntStats): { size: number; sha256: string; fsverity: string } | undefined {
  const key = path.resolve(file);
  const n = NOTED.get(key);
  NOTED.delete(key);
  return n && n.fingerprint === fingerprint(st) ? n.digests : undefined;
}

/**
 * Where the blob named sha is (or would be) in the cache whose staging dir holds
 * dir (a stage's outDir); undefined when dir is in no cache this process opened.
 * If it exists, a stage may hard-link it into its output instead of writing the
 * same bytes again, after comparing it with them (a blob is only as good as its
 * last check), and then note the digests.
 */
export function storedBlob(dir: string, sha: string): string | undefined {
  if (!HEX64.test(sha)) return undefined;
  const root = inStaging(path.resolve(dir));
  return root === undefined ? undefined : path.join(root, 'blobs', 'sha256', sha.slice(0, 2), sha);
}

/** The root of the opened cache whose tmp/ holds the absolute path p, if any. */
function inStaging(p: string): string | undefined {
  for (const root of CACHE_ROOTS) if (p.startsWith(path.join(root, 'tmp') + path.sep)) return root;
  return undefined;
}

/** Files hashed and stored side by side in one commit. */
const COMMIT_PARALLEL = 8;

/** From this many new blobs in one commit, one syncfs replaces an fsync per file. */
export const SYNCFS_MIN = 64;

/**
 * syncfs(2) of the filesystem holding dir: every dirty file on it reaches the disk
 * (coreutils `sync -f`; Node has no binding). A failure throws: nothing is renamed.
 */
async function syncFilesystem(dir: string): Promise<void> {
  await runProcess('sync', ['-f', dir]);
}

async function fsyncFile(p: string): Promise<void> {
  const fh = await fs.open(p, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Write a small file so readers see the old or the new content, never a torn one.
 * durable: fsync before the rename (off only for hints such as stat memos). The
 * temp name carries the owner (pid, start time) so a killed writer's leftovers
 * in the cache's tmp/ are cleaned.
 */
export async function writeAtomic(file: string, data: string | Buffer, tmpDir = path.dirname(file), opts: { durable?: boolean } = {}): Promise<void> {
  const tmp = path.join(tmpDir, `.${path.basename(file)}.${OWNER.pid}.${OWNER.start}.${randomBytes(4).toString('hex')}.tmp`);
  const fh = await fs.open(tmp, 'w', 0o644);
  try {
    await fh.writeFile(data);
    if (opts.durable !== false) await fh.sync();
  } finally {
    await fh.close();
  }
  try {
    await fs.rename(tmp, file);
  } catch (e) {
    await fs.rm(tmp, { force: true });
    throw e;
  }
}

/**
 * Read-only, for the publish stamp (src/engine/publish.ts): the sha256 of the record
 * text this cache read or wrote for key and found valid in this process, undefined
 * when it vouches for none. An entry's identity without serialising its files again.
 */
export function checkedRecordDigest(cache: Cache, key: string): string | undefined {
  return (cache as unknown as { recordDigests: ReadonlyMap<string, string> }).recordDigests.get(key);
}
