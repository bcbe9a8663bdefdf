#!/usr/bin/env node
// Thin launcher: the CLI is compiled to dist/ by `npm ci` (prepare) so a cached
// no-op build does not pay for a TypeScript loader on every start. The build step
// also bundles dist/ into one script (scripts/bundle.mjs), run here from V8's code
// cache: loading and compiling ~160 modules was most of a no-op build.
// The bundle is used only while every dist/ file it was made from is unchanged
// (a bare `tsc` afterwards makes it stale: then dist/ runs directly, as before).
import { existsSync, readdirSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import vm from 'node:vm';

const root = fileURLToPath(new URL('../', import.meta.url));
const cli = new URL('../dist/src/cli/cli.js', import.meta.url);
const bundle = path.join(root, 'dist', 'bundle', 'cli', 'cli.cjs');
if (!existsSync(cli)) {
  process.stderr.write('pipeline: dist/ is missing; run `npm ci` (or `npm run build`) first\n');
  process.exit(2);
}
if (!runBundle()) await import(cli.href);

function runBundle() {
  // Extra kinds (PIPELINE_KINDS_PATH, src/engine/kinds.ts) are ES modules imported at run
  // time, which a vm.Script cannot do on Node 20 without an experimental flag: dist/ runs them.
  const stamp = process.env.PIPELINE_NO_BUNDLE || process.env.PIPELINE_KINDS_PATH ? undefined : freshStamp();
  if (!stamp) return false;
  let src, st;
  try {
    st = statSync(bundle);
    // An ASCII-only bundle (scripts/bundle.mjs checked) is the same string either way; latin1 decodes faster.
    src = readFileSync(bundle, stamp.ascii === true ? 'latin1' : 'utf8');
  } catch {
    return false;
  }
  // V8 checks a code cache against the source length only, so its name carries the bundle's size and mtime.
  // It holds the functions the run that wrote it compiled: `build` (the no-op that must start
  // fast) keeps its own, so a `--version` or `plan` run first does not leave it half-warm.
  const role = process.argv[2] === 'build' ? 'build' : 'other';
  const cacheFile = `${bundle}.${st.size}-${st.mtimeMs}.${role}.v8cache`;
  let cachedData;
  try {
    cachedData = readFileSync(cacheFile);
  } catch {}
  const script = new vm.Script(`(function (exports, require, module, __filename, __dirname, __pipeline_import_meta_url) {${src}\n})`, { filename: bundle, cachedData });
  if (cachedData === undefined || script.cachedDataRejected) {
    // After the command, so the functions it ran are in the cache too. Best effort (dist/ may be read-only).
    process.once('beforeExit', () => {
      try {
        const tmp = `${cacheFile}.${process.pid}.tmp`;
        writeFileSync(tmp, script.createCachedData());
        renameSync(tmp, cacheFile);
      } catch {}
    });
  }
  const module = { exports: {} };
  script.runInThisContext()(module.exports, createRequire(bundle), module, bundle, path.dirname(bundle), pathToFileURL(bundle).href);
  return true;
}

/** The bundle's stamp while every dist/ file it was made from is unchanged, else undefined. */
function freshStamp() {
  try {
    const stamp = JSON.parse(readFileSync(path.join(root, 'dist', 'bundle', 'cli', 'stamp.json'), 'utf8'));
    if (stamp.v !== 2) return undefined;
    for (const [rel, want] of stamp.inputs) {
      const st = statSync(path.join(root, rel), { throwIfNoEntry: false });
      if (!st || !want || st.size !== want[0] || st.mtimeMs !== want[1]) return undefined;
    }
    // A kind added to (or removed from) dist/ since: discovery must see it.
    for (const [dir, files] of Object.entries(stamp.kinds)) {
      const now = readdirSync(path.join(root, 'dist', dir)).filter((f) => f.endsWith('.js') && !f.startsWith('_')).sort();
      if (now.join('/') !== files.join('/')) return undefined;
    }
    return stamp;
  } catch {
    return undefined;
  }
}
