// Resolve one mmdebstrap stage × arch to its exact package set without building
// it: mmdebstrap --simulate runs apt's solver for the same variant, includes and
// mirror (essential and priority packages included), and keeps the apt lists it
// fetched so every chosen package gets its .deb sha256, size and pool path.
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { sha256 } from '../engine/canonical.js';
import { runProcess } from '../engine/process.js';
import { safeRemove } from '../engine/fsutil.js';
import { parseDeb822 } from '../lib/deb822.js';
import { StageError } from '../stage.js';
import { sortDebs, type LockedDeb, type LockRequest, type LockSection } from './format.js';

export interface ResolveInput extends LockRequest {
  stage: string;
  arch: string;
  ignoreValidUntil: boolean;
}

/**
 * "Inst" lines of apt's simulation → name, version, arch. mmdebstrap simulates the
 * essential download and the remaining install separately, so names repeat: the
 * union is the installed set (checked against a real build of the fixture).
 */
export function parseInstLines(text: string): { name: string; version: string; arch: string }[] {
  const out = new Map<string, { name: string; version: string; arch: string }>();
  for (const m of text.matchAll(/^Inst (\S+) (?:\[\S+\] )?\((\S+) .*?\[([^\]\s]+)\]\)/gm)) {
    const name = m[1]!.replace(/:.*$/, '');
    out.set(`${name}:${m[3]}`, { name, version: m[2]!, arch: m[3]! });
  }
  return [...out.values()];
}

/** Look each chosen package up in the Packages indices; a package apt chose but no index lists is an error. */
export function lockedDebs(chosen: { name: string; version: string; arch: string }[], indices: string[]): LockedDeb[] {
  const byId = new Map<string, Record<string, string>>();
  for (const idx of indices) for (const r of parseDeb822(idx)) if (r.Package) byId.set(`${r.Package} ${r.Version} ${r.Architecture}`, r);
  const missing: string[] = [];
  const debs: LockedDeb[] = [];
  for (const c of chosen) {
    const r = byId.get(`${c.name} ${c.version} ${c.arch}`);
    if (!r?.SHA256 || !r.Size || !r.Filename) {
      missing.push(`${c.name} ${c.version} ${c.arch}`);
      continue;
    }
    debs.push({ name: c.name, version: c.version, arch: c.arch, priority: r.Priority || '-', sha256: r.SHA256, size: Number(r.Size), path: r.Filename });
  }
  if (missing.length) throw new StageError(`apt chose packages no Packages index lists (with sha256, size and file name): ${missing.join(', ')}`);
  return sortDebs(debs);
}

/** The Date: field of an InRelease (inside its clearsigned body). */
export function inReleaseDate(text: string): string {
  return /^Date: (.+)$/m.exec(text)?.[1]?.trim() ?? 'unknown';
}

export async function resolveStage(r: ResolveInput, opts: { signal?: AbortSignal } = {}): Promise<LockSection> {
  const tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-lock-'));
  try {
    const root = path.join(tmp, 'root');
    const args = [
      '--simulate',
      '--verbose',
      // The lists are what gives every package its sha256, size and pool path.
      '--skip=cleanup/apt/lists',
      `--variant=${r.variant}`,
      `--arch=${r.arch}`,
      `--components=${r.components.join(',')}`,
    ];
    if (r.ignoreValidUntil) args.push('--aptopt=Acquire::Check-Valid-Until "false"');
    if (r.packages.length) args.push(`--include=${r.packages.join(',')}`);
    args.push('--', r.suite, root, r.mirror);
    const res = await runProcess('mmdebstrap', args, { capture: true, signal: opts.signal, env: { LC_ALL: 'C.UTF-8', TMPDIR: tmp }, maxCapture: 64 << 20 });
    const chosen = parseInstLines(res.stdout + '\n' + res.stderr);
    if (!chosen.length && r.variant !== 'custom') throw new StageError(`mmdebstrap --simulate chose no packages for stage ${r.stage} (${r.arch})`, res.stderr.slice(-4000));
    const listDir = path.join(root, 'var', 'lib', 'apt', 'lists');
    const names = (await fs.readdir(listDir)).sort();
    const indices = await Promise.all(names.filter((n) => n.endsWith('_Packages')).map((n) => fs.readFile(path.join(listDir, n), 'utf8')));
    const inRel = names.filter((n) => n.endsWith('_InRelease') || n.endsWith('_Release'));
    if (inRel.length !== 1) throw new StageError(`expected one InRelease for ${r.mirror} ${r.suite}, found: ${inRel.join(', ') || 'none'}`);
    const relText = await fs.readFile(path.join(listDir, inRel[0]!));
    return {
      stage: r.stage,
      arch: r.arch,
      mirror: r.mirror,
      suite: r.suite,
      components: [...r.components],
      variant: r.variant,
      packages: [...r.packages],
      inRelease: { sha256: sha256(relText), date: inReleaseDate(relText.toString('utf8')) },
      debs: lockedDebs(chosen, indices),
    };
  } finally {
    await safeRemove(tmp);
  }
}
