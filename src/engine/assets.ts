// Digests of repo files a stage reads (dracut modules, overlays): they are part
// of the cache key, so editing a module's script rebuilds the initramfs.
import { createHash } from 'node:crypto';
import { lstatSync, promises as fs, readdirSync, readlinkSync, realpathSync, type Stats } from 'node:fs';
import path from 'node:path';
import { sha256File } from '../lib/digest.js';
import type { SpecIssue } from './errors.js';
import { PACKAGE_ROOT, type Kinds } from './kinds.js';
import { dotted, resolveParams, type LoadedSpec } from './spec.js';
import { specPaths, StageError, type SpecPathRule } from '../stage.js';

/** Asset paths with this prefix name files shipped in the pipeline package itself. */
export const PACKAGE_ASSET = 'pipeline:';

/** A package asset's name: relative, so cache keys do not depend on where pipeline is installed. */
export function packageAsset(abs: string): string {
  return PACKAGE_ASSET + path.relative(PACKAGE_ROOT, abs);
}

/** Where an asset resolves: `pipeline:<path>` in the package, anything else next to the spec. */
export async function resolveAsset(name: string, specDir: string): Promise<string | undefined> {
  const abs = name.startsWith(PACKAGE_ASSET) ? path.resolve(PACKAGE_ROOT, name.slice(PACKAGE_ASSET.length)) : path.resolve(specDir, name);
  try {
    await fs.lstat(abs);
    return abs;
  } catch {
    return undefined;
  }
}

/** sha256 over (relative path, type, exec bit, content) of every entry, sorted. */
export async function digestTree(abs: string): Promise<string> {
  const h = createHash('sha256');
  const walk = async (p: string, rel: string) => {
    // The asset itself may be a symlink (followed); links inside it are hashed as links.
    const st = rel ? await fs.lstat(p) : await fs.stat(p);
    if (st.isSymbolicLink()) h.update(`L ${rel} ${await fs.readlink(p)}\n`);
    else if (st.isDirectory()) {
      h.update(`D ${rel}\n`);
      for (const n of (await fs.readdir(p)).sort()) await walk(path.join(p, n), rel ? `${rel}/${n}` : n);
    } else if (st.isFile()) {
      const c = await sha256File(p);
      h.update(`F ${rel} ${st.mode & 0o111 ? 'x' : '-'} ${c}\n`);
    }
  };
  await walk(abs, '');
  return h.digest('hex');
}

export async function assetDigests(assets: string[], specDir: string): Promise<{ digests: Record<string, string>; missing: string[] }> {
  const digests: Record<string, string> = {};
  const missing: string[] = [];
  await Promise.all(
    assets.map(async (a) => {
      const abs = await resolveAsset(a, specDir);
      if (!abs) missing.push(a);
      else digests[a] = await digestTree(abs);
    }),
  );
  return { digests, missing: missing.sort() };
}

// ---------------------------------------------------------------------------
// Spec paths (overlays, module dirs): checked here, centrally, with the file
// system — parse and compile stay pure. A kind marks such params with
// specPath() (src/stage.ts) and opens them with resolveSpecPath.

type PathSeg = string | number;
type Def = { type: string; [k: string]: unknown };
const defOf = (s: unknown): Def | undefined => (s as { _zod?: { def?: Def } } | undefined)?._zod?.def;

function inside(dir: string, p: string): boolean {
  return p === dir || p.startsWith(dir.endsWith(path.sep) ? dir : dir + path.sep);
}

/**
 * Check one spec path against its rule: relative, inside the spec dir after
 * resolving every symlink, of the right type, and its tree free of symlinks
 * (rule `reject`) and of devices, fifos and sockets. Returns the real path, or
 * a message saying what was expected and what was found.
 */
export function checkSpecPath(specDir: string, rel: string, rule: SpecPathRule): { real: string } | { error: string } {
  if (rel.startsWith(PACKAGE_ASSET)) return { error: `expected a path relative to the spec, found "${rel}" ("${PACKAGE_ASSET}" names files of the pipeline package and cannot be used here)` };
  if (rel.includes('\0')) return { error: 'expected a path, found a NUL character in it' };
  if (path.isAbsolute(rel)) return { error: `expected a path relative to the spec's directory, found the absolute path "${rel}"` };
  let base: string;
  try {
    base = realpathSync(specDir);
  } catch {
    return { error: `the spec's directory ${specDir} cannot be resolved` };
  }
  const lexical = path.resolve(base, rel);
  if (!inside(base, lexical)) return { error: `expected a path inside the spec's directory, found "${rel}", which leaves it` };
  let real: string;
  try {
    real = realpathSync(lexical);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    return { error: code === 'ENOENT' ? `expected a ${rule.type === 'dir' ? 'directory' : 'file'} at "${rel}" (next to the spec), found nothing there` : `cannot resolve "${rel}": ${code}` };
  }
  if (!inside(base, real)) return { error: `expected a path inside the spec's directory, found "${rel}", a symlink that resolves to ${real} outside it` };
  const st = lstatSync(real);
  if (rule.type === 'dir' && !st.isDirectory()) return { error: `expected a directory at "${rel}", found ${kindOf(st)}` };
  if (rule.type === 'file' && !st.isFile()) return { error: `expected a regular file at "${rel}", found ${kindOf(st)}` };
  if (st.isDirectory()) {
    const bad = badEntry(real, rule);
    if (bad) return { error: `"${rel}" contains ${bad}` };
  }
  return { real };
}

function kindOf(st: Stats): string {
  return st.isDirectory() ? 'a directory' : st.isFile() ? 'a file' : st.isSymbolicLink() ? 'a symlink' : st.isFIFO() ? 'a fifo' : st.isSocket() ? 'a socket' : 'a device';
}

/** The first entry (depth first, sorted) a tree of this rule may not hold, described; links are never followed. */
function badEntry(root: string, rule: SpecPathRule): string | undefined {
  const stack: string[] = [''];
  while (stack.length) {
    const rel = stack.pop()!;
    for (const name of readdirSync(path.join(root, rel)).sort().reverse()) {
      const r = rel ? `${rel}/${name}` : name;
      const st = lstatSync(path.join(root, r));
      if (st.isSymbolicLink()) {
        if (rule.symlinks === 'reject') return `a symlink (${r} -> ${readlinkSync(path.join(root, r))}); expected only regular files and directories (symlinks would be followed)`;
      } else if (st.isDirectory()) stack.push(r);
      else if (!st.isFile()) return `${kindOf(st)} (${r}); expected only regular files, directories${rule.symlinks === 'copy' ? ' and symlinks' : ''}`;
    }
  }
  return undefined;
}

/**
 * For a kind's run(): the real path of a spec path, checked again right before it
 * is read (the tree may have changed since plan). Pass the result to tools, never
 * the spec's text, so a link swapped in later is not followed out of the spec dir.
 */
export function resolveSpecPath(specDir: string, rel: string, rule: SpecPathRule): string {
  const r = checkSpecPath(specDir, rel, rule);
  if ('error' in r) throw new StageError(r.error);
  return r.real;
}

type Tagged = { p: PathSeg[]; value: string; rule: SpecPathRule };
type Extract = (value: unknown, p: PathSeg[], out: Tagged[]) => void;
const extractors = new WeakMap<object, Extract>();

/** Every specPath()-tagged value in a parsed params object, with its param path. */
export function taggedPaths(schema: unknown, value: unknown): Tagged[] {
  const out: Tagged[] = [];
  extractor(schema)(value, [], out);
  return out;
}

/** A walker for one schema, built once: only the branches that can hold a tagged value. */
function extractor(schema: unknown): Extract {
  const none: Extract = () => {};
  if (!schema || typeof schema !== 'object') return none;
  const cached = extractors.get(schema);
  if (cached) return cached;
  extractors.set(schema, none); // recursive schemas: no tags through the cycle
  let fn: Extract = none;
  const rule = specPaths.get(schema as never);
  const d = defOf(schema);
  if (rule) {
    fn = (v, p, out) => {
      if (typeof v === 'string') out.push({ p, value: v, rule });
    };
  } else if (d && hasSpecPaths(schema)) {
    const isObj = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);
    switch (d.type) {
      case 'object': {
        const fields = Object.entries(d.shape as Record<string, unknown>)
          .filter(([, s]) => hasSpecPaths(s))
          .map(([k, s]) => [k, extractor(s)] as const);
        fn = (v, p, out) => {
          if (isObj(v)) for (const [k, f] of fields) if (v[k] !== undefined) f(v[k], [...p, k], out);
        };
        break;
      }
      case 'record': {
        const f = extractor(d.valueType);
        fn = (v, p, out) => {
          if (isObj(v)) for (const [k, x] of Object.entries(v)) f(x, [...p, k], out);
        };
        break;
      }
      case 'array': {
        const f = extractor(d.element);
        fn = (v, p, out) => {
          if (Array.isArray(v)) v.forEach((x, i) => f(x, [...p, i], out));
        };
        break;
      }
      case 'union': {
        const fs = (d.options as unknown[]).map(extractor);
        fn = (v, p, out) => fs.forEach((f) => f(v, p, out));
        break;
      }
      case 'pipe':
        fn = extractor(d.out);
        break;
      default:
        if (d.innerType) fn = extractor(d.innerType);
    }
  }
  extractors.set(schema, fn);
  return fn;
}

const hasTagCache = new WeakMap<object, boolean>();

/** Whether a params schema has any specPath() inside (most kinds do not: skip them fast). */
export function hasSpecPaths(schema: unknown, seen = new Set<unknown>()): boolean {
  if (!schema || typeof schema !== 'object') return false;
  const cached = hasTagCache.get(schema);
  if (cached !== undefined) return cached;
  if (seen.has(schema)) return false;
  seen.add(schema);
  const d = defOf(schema);
  const kids: unknown[] = !d ? [] : [d.innerType, d.element, d.valueType, d.in, d.out, ...Object.values((d.shape ?? {}) as object), ...((d.options as unknown[]) ?? [])];
  const r = specPaths.has(schema as never) || kids.some((k) => hasSpecPaths(k, seen));
  hasTagCache.set(schema, r);
  return r;
}

/**
 * Check every spec path of every stage for every arch it builds for; each
 * problem is a SpecIssue at the value's file:line:col. Reads the file system.
 */
export function checkSpecPaths(loaded: LoadedSpec, kinds: Kinds): SpecIssue[] {
  const { spec } = loaded;
  const issues: SpecIssue[] = [];
  const seen = new Set<string>();
  const results = new Map<string, ReturnType<typeof checkSpecPath>>();
  for (const [name, st] of Object.entries(spec.stages)) {
    const mod = kinds.get(st.kind);
    if (!mod || !hasSpecPaths(mod.params)) continue;
    for (const arch of spec.arches) {
      if (mod.arches && !mod.arches.includes(arch)) continue;
      const r = resolveParams(spec, name, st, mod, arch);
      if (r.issues.length) continue; // reported by the parser
      for (const t of taggedPaths(mod.params, r.params)) {
        const ck = `${t.rule.type}:${t.rule.symlinks}:${t.value}`;
        let res = results.get(ck);
        if (!res) results.set(ck, (res = checkSpecPath(loaded.dir, t.value, t.rule)));
        if (!('error' in res)) continue;
        const loc = loaded.locate(r.origin(t.p));
        const key = `${loc.line}:${loc.col}:${res.error}`;
        if (seen.has(key)) continue;
        seen.add(key);
        issues.push({ loc, path: dotted(['stages', name, 'with', ...t.p]), message: res.error });
      }
    }
  }
  return issues;
}
