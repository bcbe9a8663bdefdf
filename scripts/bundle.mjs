#!/usr/bin/env node
// Bundle dist/ (after tsc) into one CommonJS file, dist/bundle/cli/cli.cjs, so a
// cached no-op build loads one script instead of ~160 ES modules, and (through
// bin/pipeline.js) starts from V8's code cache instead of compiling it.
// The package's kinds (dist/stages, dist/outputs) are compiled in and handed to
// discovery (useBundledKinds). bin/pipeline.js uses the bundle only while every
// dist/ file it was built from is unchanged (stamp.json); after a bare `tsc` it
// runs dist/src/cli/cli.js as before.
import { build } from 'esbuild';
import { readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';

const ROOT = path.resolve(import.meta.dirname, '..');
const DIST = path.join(ROOT, 'dist');
// Depth 2 under dist/, like dist/src/cli/: kinds.ts finds the code root two levels up.
const OUT = path.join(DIST, 'bundle', 'cli');

/** The kind files discovery would import (same filter as src/engine/kinds.ts). */
function kindFiles(dir) {
  try {
    return readdirSync(path.join(DIST, dir))
      .filter((f) => f.endsWith('.js') && !f.startsWith('_'))
      .sort();
  } catch {
    return [];
  }
}

const kinds = { stages: kindFiles('stages'), outputs: kindFiles('outputs') };
const list = Object.entries(kinds).flatMap(([d, fs]) => fs.map((f) => [d, f]));
// The kinds are registered by a module of their own, evaluated before the CLI's
// (which starts the command as it is evaluated).
const REGISTER = path.join(DIST, 'bundle-kinds.js');
writeFileSync(
  REGISTER,
  [
    `import { useBundledKinds } from './src/engine/kinds.js';`,
    ...list.map(([d, f], i) => `import * as k${i} from './${d}/${f}';`),
    `useBundledKinds([${list.map(([d, f], i) => `[${JSON.stringify(d)}, ${JSON.stringify(f)}, k${i}]`).join(', ')}]);`,
    '',
  ].join('\n'),
);
const entry = `import './bundle-kinds.js';\nimport './src/cli/cli.js';\n`;

rmSync(path.join(DIST, 'bundle'), { recursive: true, force: true }); // the old code cache goes with it
let r;
try {
  r = await build({
    stdin: { contents: entry, resolveDir: DIST, sourcefile: 'bundle-entry.js', loader: 'js' },
    absWorkingDir: ROOT,
    bundle: true,
    format: 'cjs',
    platform: 'node',
    target: 'node20',
    outfile: path.join(OUT, 'cli.cjs'),
    metafile: true,
    logLevel: 'warning',
    // No comments or indentation (names are kept): ~27% less to read at every start, and
    // ASCII only (non-ASCII in strings is escaped), so bin/pipeline.js reads it as latin1,
    // several ms faster than decoding UTF-8. PIPELINE_NO_BUNDLE=1 runs dist/ for readable stacks.
    minifyWhitespace: true,
    legalComments: 'none',
    charset: 'ascii',
    // bin/pipeline.js passes the bundle's own file URL in (import.meta does not exist in CommonJS).
    define: { 'import.meta.url': '__pipeline_import_meta_url' },
  });
} finally {
  rmSync(REGISTER, { force: true });
}

// What the bundle was built from: dist/ files (and node_modules' install stamp) with size and mtime.
const inputs = Object.keys(r.metafile.inputs)
  .filter((p) => !['<stdin>', 'dist/bundle-entry.js', 'dist/bundle-kinds.js'].includes(p))
  .map((p) => path.resolve(ROOT, p))
  .filter((p) => p.startsWith(DIST + path.sep) && !p.includes(`${path.sep}node_modules${path.sep}`))
  .concat(path.join(ROOT, 'node_modules', '.package-lock.json'))
  .map((p) => {
    const st = statSync(p, { throwIfNoEntry: false });
    return [path.relative(ROOT, p), st ? [st.size, st.mtimeMs] : null];
  });
// ascii: the launcher may read the bundle as latin1 (the same string, decoded faster).
const ascii = !/[^\x00-\x7f]/.test(readFileSync(path.join(OUT, 'cli.cjs'), 'latin1'));
writeFileSync(path.join(OUT, 'stamp.json'), JSON.stringify({ v: 2, kinds, inputs, ascii }));
