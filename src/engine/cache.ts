// Content-addressed store. Layout under the cache root:
//   blobs/sha256/ab/<hex>   every output file, named by its sha256, read-only
//   entries/<key>.json      one record per stage key: files, digests, meta, key parts
//                           (its mtime is the entry's last use, for LRU eviction)
//   trees/<key>/            hardlink view of an entry's files, handed to downstream stages
//   history/<spec>/<arch>/<stage>.json   last key parts per stage, for `explain`
//   verified/<hex>          stat fingerprint of a blob at its last full digest check
//   tmp/                    staging; same filesystem so commits are renames
// An entry appears only when complete: blobs are fsynced and renamed first, the
// record last. A crash leaves at most unreferenced blobs, which `gc` removes.
import { randomBytes } from 'node:crypto';
import { constants as fsc, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { canonicalize } from './canonical.js';
import type { KeyParts } from './compile.js';
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

export class CacheCorruptError extends Error {}

export function defaultCacheRoot(env = process.env): string {
  if (env.PIPELINE_CACHE_DIR) return path.resolve(env.PIPELINE_CACHE_DIR);
  const base = env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(base, 'pipeline');
}

export class Cache {
  constructor(readonly root: string) {}

  private entryPath(key: string) {
    return path.join(this.root, 'entries', `${key}.json`);
  }
  blobPath(sha: string) {
    return path.join(this.root, 'blobs', 'sha256', sha.slice(0, 2), sha);
  }
  private treePath(key: string) {
    return path.join(this.root, 'trees', key);
  }

  async init(): Promise<void> {
    await Promise.all(['blobs/sha256', 'entries', 'trees', 'history', 'verified', 'tmp'].map((d) => fs.mkdir(path.join(this.root, d), { recursive: true })));
  }

  /** The entry for a key, or undefined. A record whose blobs are gone is treated as absent. */
  async lookup(key: string): Promise<Entry | undefined> {
    let text: string;
    try {
      text = await fs.readFile(this.entryPath(key), 'utf8');
    } catch {
      return undefined;
    }
    let entry: Entry;
    try {
      entry = JSON.parse(text) as Entry;
    } catch {
      await fs.rm(this.entryPath(key), { force: true });
      return undefined;
    }
    for (const f of entry.files) {
      try {
        await fs.access(this.blobPath(f.sha256));
      } catch {
        return undefined;
      }
    }
    return entry;
  }

  /** Mark an entry as used now (LRU). */
  async touch(key: string): Promise<void> {
    const now = new Date();
    await fs.utimes(this.entryPath(key), now, now).catch(() => {});
  }

  /**
   * Check every blob of an entry against its recorded digest. A blob whose stat
   * fingerprint (inode, size, mtime, ctime) is unchanged since its last full check
   * is not re-read: any write or chmod moves ctime, which cannot be set back.
   */
  async verify(entry: Entry): Promise<void> {
    await Promise.all(entry.files.map((f) => this.verifyBlob(f.sha256, f.size, entry.key, f.path)));
  }

  private async verifyBlob(sha: string, size: number, key: string, name: string): Promise<void> {
    const blob = this.blobPath(sha);
    const st = await fs.stat(blob);
    const stamp = `${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
    const memo = path.join(this.root, 'verified', sha);
    if ((await fs.readFile(memo, 'utf8').catch(() => '')) === stamp) return;
    const h = await hashFile(blob);
    if (h.sha256 !== sha || h.size !== size) {
      // Drop the record so the next build rebuilds instead of failing forever.
      await fs.rm(this.entryPath(key), { force: true });
      await fs.rm(this.treePath(key), { recursive: true, force: true });
      await fs.rm(blob, { force: true });
      throw new CacheCorruptError(`cache blob for ${name} (entry ${key.slice(0, 12)}) is corrupt: expected sha256 ${sha}, found ${h.sha256}; the entry was removed, rebuild to repair`);
    }
    await writeAtomic(memo, stamp, this.tmpDir());
  }

  /** A read-only directory view (hardlinks) of an entry's files. */
  async materialize(entry: Entry): Promise<string> {
    const dir = this.treePath(entry.key);
    try {
      await fs.access(path.join(dir, '.complete'));
      return dir;
    } catch {
      /* build it */
    }
    const tmp = await this.staging('tree');
    for (const f of entry.files) {
      const dst = path.join(tmp, f.path);
      await fs.mkdir(path.dirname(dst), { recursive: true });
      await fs.link(this.blobPath(f.sha256), dst).catch(async (e: NodeJS.ErrnoException) => {
        if (e.code !== 'EXDEV' && e.code !== 'EMLINK') throw e;
        await fs.copyFile(this.blobPath(f.sha256), dst, fsc.COPYFILE_FICLONE);
      });
    }
    await fs.writeFile(path.join(tmp, '.complete'), '');
    await fs.rm(dir, { recursive: true, force: true });
    try {
      await fs.rename(tmp, dir);
    } catch (e) {
      // Another process materialised it first: theirs is as good as ours.
      await fs.rm(tmp, { recursive: true, force: true });
      if ((e as NodeJS.ErrnoException).code !== 'ENOTEMPTY' && (e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    return dir;
  }

  private tmpDir() {
    return path.join(this.root, 'tmp');
  }

  /** A fresh directory under tmp/ (same filesystem as the blobs). Name carries our pid for gc. */
  async staging(label: string): Promise<string> {
    const dir = path.join(this.tmpDir(), `${label}-${process.pid}-${randomBytes(6).toString('hex')}`);
    await fs.mkdir(dir, { recursive: true });
    return dir;
  }

  /**
   * Move a finished stage's outDir into the store and write its record. outDir must
   * be a staging dir from this cache. Only regular files are allowed.
   */
  async commit(key: string, stage: string, parts: KeyParts, outDir: string, meta: Record<string, unknown>): Promise<Entry> {
    const rels = await listFiles(outDir, stage);
    const files: FileRecord[] = [];
    for (const rel of rels) {
      const abs = path.join(outDir, rel);
      const st = await fs.stat(abs);
      const h = await hashFile(abs, { fsverity: true });
      files.push({ path: rel, size: h.size, sha256: h.sha256, fsverity: h.fsverity!, executable: (st.mode & 0o111) !== 0 });
      const blob = this.blobPath(h.sha256);
      try {
        await fs.access(blob);
        await fs.rm(abs);
      } catch {
        await fsyncFile(abs);
        await fs.chmod(abs, 0o444);
        await fs.mkdir(path.dirname(blob), { recursive: true });
        await fs.rename(abs, blob);
      }
    }
    const entry: Entry = { key, kind: parts.kind, stage, parts, files, meta };
    await writeAtomic(this.entryPath(key), JSON.stringify(entry), this.tmpDir());
    return entry;
  }

  async readHistory(spec: string, arch: string, stage: string): Promise<{ key: string; parts: KeyParts } | undefined> {
    try {
      return JSON.parse(await fs.readFile(path.join(this.root, 'history', spec, arch, `${stage}.json`), 'utf8'));
    } catch {
      return undefined;
    }
  }

  async writeHistory(spec: string, arch: string, stage: string, key: string, parts: KeyParts): Promise<void> {
    const file = path.join(this.root, 'history', spec, arch, `${stage}.json`);
    await fs.mkdir(path.dirname(file), { recursive: true });
    await writeAtomic(file, canonicalize({ key, parts }), this.tmpDir());
  }

  /** All entries with their size (sum of their files) and last use. */
  async list(): Promise<{ entry: Entry; size: number; lastUsed: Date }[]> {
    const dir = path.join(this.root, 'entries');
    const names = (await fs.readdir(dir).catch(() => [] as string[])).filter((n) => n.endsWith('.json'));
    const out: { entry: Entry; size: number; lastUsed: Date }[] = [];
    for (const n of names) {
      try {
        const p = path.join(dir, n);
        const [text, st] = await Promise.all([fs.readFile(p, 'utf8'), fs.stat(p)]);
        const entry = JSON.parse(text) as Entry;
        out.push({ entry, size: entry.files.reduce((s, f) => s + f.size, 0), lastUsed: st.mtime });
      } catch {
        /* a record being replaced; skip */
      }
    }
    return out.sort((a, b) => a.lastUsed.getTime() - b.lastUsed.getTime() || a.entry.key.localeCompare(b.entry.key));
  }

  /** Bytes held by blobs (each counted once, however many entries share it). */
  async du(): Promise<{ blobs: number; bytes: number; entries: number }> {
    const blobs = await this.blobSizes();
    const entries = (await fs.readdir(path.join(this.root, 'entries')).catch(() => [] as string[])).length;
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
  async gc(maxBytes: number): Promise<{ evicted: string[]; freed: number; bytes: number }> {
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
      await fs.rm(this.entryPath(entry.key), { force: true });
      await fs.rm(this.treePath(entry.key), { recursive: true, force: true });
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
      if (!refs.has(sha)) {
        await fs.rm(this.blobPath(sha), { force: true });
        await fs.rm(path.join(this.root, 'verified', sha), { force: true });
      }
    }
    const live = new Set((await this.list()).map((e) => e.entry.key));
    for (const t of await fs.readdir(path.join(this.root, 'trees')).catch(() => [] as string[])) {
      if (!live.has(t)) await fs.rm(this.treePath(t), { recursive: true, force: true });
    }
    const after = await this.du();
    return { evicted, freed: before - after.bytes, bytes: after.bytes };
  }

  /** Remove staging dirs whose owning process is gone (interrupted builds). */
  async cleanStaging(): Promise<void> {
    for (const n of await fs.readdir(this.tmpDir()).catch(() => [] as string[])) {
      const pid = Number(/-(\d+)-[0-9a-f]+$/.exec(n)?.[1]);
      if (pid && pid !== process.pid && isAlive(pid)) continue;
      if (pid === process.pid) continue;
      await fs.rm(path.join(this.tmpDir(), n), { recursive: true, force: true });
    }
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
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

async function fsyncFile(p: string): Promise<void> {
  const fh = await fs.open(p, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Write a small file so readers see the old or the new content, never a torn one. */
export async function writeAtomic(file: string, data: string | Buffer, tmpDir = path.dirname(file)): Promise<void> {
  const tmp = path.join(tmpDir, `.${path.basename(file)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  const fh = await fs.open(tmp, 'w', 0o644);
  try {
    await fh.writeFile(data);
    await fh.sync();
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
