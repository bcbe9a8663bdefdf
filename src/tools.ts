// Versions of the host tools stages run. They are part of every cache key, so
// they must be right; they are memoised by the binary's identity (realpath, size,
// mtime, inode) so a warm build does not spawn every tool on every run.
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { writeAtomic } from './cache.js';
import type { ToolSpec } from './stage.js';

const run = promisify(execFile);

export async function which(name: string, env = process.env): Promise<string | undefined> {
  if (name.includes('/')) return (await isExec(name)) ? name : undefined;
  for (const dir of (env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(':')) {
    if (!dir) continue;
    const p = path.join(dir, name);
    if (await isExec(p)) return p;
  }
  return undefined;
}

async function isExec(p: string): Promise<boolean> {
  try {
    const st = await fs.stat(p);
    return st.isFile() && (st.mode & 0o111) !== 0;
  } catch {
    return false;
  }
}

/** First line of a version banner that carries a version number, trimmed. */
export function parseVersion(output: string): string {
  const lines = output.split('\n').map((l) => l.trim()).filter(Boolean);
  return (lines.find((l) => /\d+\.\d+/.test(l)) ?? lines[0] ?? 'unknown').slice(0, 200);
}

type Memo = Record<string, { stamp: string; version: string }>;

export interface ToolVersions {
  versions: Record<string, string>;
  missing: ToolSpec[];
}

export async function toolVersions(tools: ToolSpec[], memoFile: string): Promise<ToolVersions> {
  let memo: Memo = {};
  try {
    memo = JSON.parse(await fs.readFile(memoFile, 'utf8')) as Memo;
  } catch {
    /* first run */
  }
  let dirty = false;
  const versions: Record<string, string> = {};
  const missing: ToolSpec[] = [];
  await Promise.all(
    tools.map(async (t) => {
      const found = await which(t.name);
      if (!found) {
        missing.push(t);
        return;
      }
      const real = await fs.realpath(found);
      const st = await fs.stat(real);
      const stamp = `${real}:${st.size}:${st.mtimeMs}:${st.ino}:${(t.versionArgs ?? ['--version']).join(' ')}`;
      const hit = memo[t.name];
      if (hit && hit.stamp === stamp) {
        versions[t.name] = hit.version;
        return;
      }
      let out = '';
      try {
        const r = await run(found, t.versionArgs ?? ['--version'], { timeout: 20000, env: { ...process.env, LC_ALL: 'C' } });
        out = r.stdout + '\n' + r.stderr;
      } catch (e) {
        const err = e as { stdout?: string; stderr?: string };
        out = `${err.stdout ?? ''}\n${err.stderr ?? ''}`; // some tools exit non-zero on --version
      }
      versions[t.name] = parseVersion(out);
      memo[t.name] = { stamp, version: versions[t.name]! };
      dirty = true;
    }),
  );
  if (dirty) {
    await fs.mkdir(path.dirname(memoFile), { recursive: true });
    await writeAtomic(memoFile, JSON.stringify(memo));
  }
  missing.sort((a, b) => a.name.localeCompare(b.name));
  return { versions, missing };
}

/** The one apt-get line that installs every missing tool. */
export function aptLine(missing: ToolSpec[]): string {
  return `apt-get install -y ${[...new Set(missing.map((t) => t.apt))].sort().join(' ')}`;
}
