// Stage kinds are discovered, not registered: every module in stages/ and
// outputs/ that default-exports a StageModule is a kind. Adding one never
// touches the engine.
import { readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { StageModule } from '../stage.js';

export type Kinds = Map<string, StageModule>;

/** Root of the compiled or source tree: this file lives at <code root>/src/engine/. */
const CODE_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

/** The package root (works from src/ under tsx and from dist/src/ when compiled). */
export const PACKAGE_ROOT = path.basename(CODE_ROOT) === 'dist' ? path.resolve(CODE_ROOT, '..') : CODE_ROOT;

let cached: Promise<Kinds> | undefined;

/** A kind module compiled into a one-file bundle: its directory (stages, outputs), file name and module. */
export type BundledKind = [dir: string, file: string, mod: { default?: unknown }];
let bundled: BundledKind[] | undefined;

/**
 * The bundle (scripts/bundle.mjs) hands over the package's kinds it was built
 * with, so discovery does not import them again from dist/ (a second copy of
 * every module they share with the engine). Extra kind dirs still load at run time.
 */
export function useBundledKinds(list: BundledKind[]): void {
  bundled = list;
}

export function loadKinds(): Promise<Kinds> {
  cached ??= discover();
  return cached;
}

async function discover(): Promise<Kinds> {
  const kinds: Kinds = new Map();
  const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
  for (const dir of ['stages', 'outputs']) {
    if (bundled) {
      const mine = bundled.filter(([d]) => d === dir).sort((a, b) => (a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0));
      addKinds(kinds, dir, mine.map(([, f]) => f), mine.map(([, , m]) => m));
      continue;
    }
    const abs = path.join(CODE_ROOT, dir);
    let files: string[] = [];
    try {
      files = readdirSync(abs).filter((f) => f.endsWith(ext) && !f.endsWith('.d.ts') && !f.startsWith('_')).sort();
    } catch {
      continue;
    }
    await importKinds(kinds, abs, dir, files);
  }
  // Extra kinds from outside the package (test fixtures, site-local kinds) are
  // plain JavaScript so they load the same under tsx and from dist/.
  for (const abs of extraKindDirs()) {
    let files: string[];
    try {
      files = readdirSync(abs).filter((f) => (f.endsWith('.js') || f.endsWith('.mjs')) && !f.startsWith('_')).sort();
    } catch {
      throw new Error(`${KINDS_PATH_ENV}: cannot read directory ${abs}`);
    }
    await importKinds(kinds, abs, abs, files);
  }
  return kinds;
}

/** Environment variable naming extra stage-module directories, colon-separated. */
export const KINDS_PATH_ENV = 'PIPELINE_KINDS_PATH';

/** The extra stage-module directories, absolute (relative entries resolve against the cwd). */
export function extraKindDirs(env: NodeJS.ProcessEnv = process.env): string[] {
  return (env[KINDS_PATH_ENV] ?? '')
    .split(':')
    .filter((d) => d !== '')
    .map((d) => path.resolve(d));
}

async function importKinds(kinds: Kinds, abs: string, label: string, files: string[]): Promise<void> {
  const mods = await Promise.all(files.map((f) => import(new URL(`file://${path.join(abs, f)}`).href)));
  addKinds(kinds, label, files, mods);
}

function addKinds(kinds: Kinds, label: string, files: string[], mods: { default?: unknown }[]): void {
  mods.forEach((m, i) => {
    const mod = m.default as StageModule | undefined;
    if (!mod || typeof mod.run !== 'function' || !mod.kind) throw new Error(`${label}/${files[i]}: does not default-export a stage module (defineStage({...}))`);
    if (kinds.has(mod.kind)) throw new Error(`${label}/${files[i]}: kind "${mod.kind}" is defined twice`);
    kinds.set(mod.kind, mod);
  });
}
