// The architecture as tests: what may import what. Import specifiers are read with
// TypeScript's own parser (static imports, export-from, import(), import type), so
// a string or a comment that looks like an import is not one, and a dynamic import
// with a computed specifier is seen and has to be allowed by name.
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import ts from 'typescript';
import { ROOT } from '../helpers/paths.js';

const rel = (abs: string) => path.relative(ROOT, abs).split(path.sep).join('/');

interface ImportRef {
  /** The specifier, or undefined for import(expr) with a computed one. */
  spec: string | undefined;
  /** Names bound by the import (value bindings only); '*' for a namespace or default import. */
  names: string[];
  line: number;
}

/** Every import/export-from/import()/require() in a TypeScript file. */
function importsOf(file: string, text = readFileSync(file, 'utf8')): ImportRef[] {
  const sf = ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true, ts.ScriptKind.TS);
  const out: ImportRef[] = [];
  const lineOf = (n: ts.Node) => sf.getLineAndCharacterOfPosition(n.getStart(sf)).line + 1;
  const literal = (e: ts.Expression | undefined) => (e && ts.isStringLiteralLike(e) ? e.text : undefined);
  const visit = (n: ts.Node): void => {
    if (ts.isImportDeclaration(n)) {
      const c = n.importClause;
      const names: string[] = [];
      if (c && !c.isTypeOnly) {
        if (c.name) names.push('*');
        const b = c.namedBindings;
        if (b && ts.isNamespaceImport(b)) names.push('*');
        if (b && ts.isNamedImports(b)) for (const e of b.elements) if (!e.isTypeOnly) names.push((e.propertyName ?? e.name).text);
      }
      out.push({ spec: literal(n.moduleSpecifier), names, line: lineOf(n) });
    } else if (ts.isExportDeclaration(n) && n.moduleSpecifier) {
      out.push({ spec: literal(n.moduleSpecifier), names: n.isTypeOnly ? [] : ['*'], line: lineOf(n) });
    } else if (ts.isImportEqualsDeclaration(n) && ts.isExternalModuleReference(n.moduleReference)) {
      out.push({ spec: literal(n.moduleReference.expression), names: ['*'], line: lineOf(n) });
    } else if (ts.isCallExpression(n) && (n.expression.kind === ts.SyntaxKind.ImportKeyword || (ts.isIdentifier(n.expression) && n.expression.text === 'require'))) {
      out.push({ spec: literal(n.arguments[0]), names: ['*'], line: lineOf(n) });
    } else if (ts.isImportTypeNode(n)) {
      // import('x').T in a type position: erased, but still a dependency on x's shape.
      const a = n.argument;
      out.push({ spec: ts.isLiteralTypeNode(a) && ts.isStringLiteral(a.literal) ? a.literal.text : undefined, names: [], line: lineOf(n) });
    }
    ts.forEachChild(n, visit);
  };
  visit(sf);
  return out;
}

/** A relative specifier as the repo-relative .ts file it names (NodeNext: `./x.js` is `./x.ts`). */
function resolveRel(from: string, spec: string): string {
  return rel(path.resolve(path.dirname(from), spec)).replace(/\.js$/, '.ts');
}

const isLocal = (spec: string) => spec.startsWith('.') || spec.startsWith('/');
const tsFiles = (dir: string) =>
  readdirSync(path.join(ROOT, dir), { recursive: true, encoding: 'utf8' })
    .filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts'))
    .map((f) => path.join(ROOT, dir, f))
    .sort();

test('importsOf sees every kind of import and nothing that only looks like one', () => {
  const src = [
    "import a from './a.js';",
    "import { b, type B } from '../b.js';",
    "import type { C } from './c.js';",
    "import * as d from 'node:fs';",
    "export { e } from './e.js';",
    "export * from './f.js';",
    "const g = await import('../g/g.js');",
    'const h = await import(`${dir}/h.js`);',
    "type I = import('./i.js').I;",
    "// import x from './comment.js';",
    "const s = \"import y from './string.js'\";",
  ].join('\n');
  const got = importsOf('/x/y/z.ts', src).map((r) => [r.spec, r.names.join(',')]);
  assert.deepEqual(got, [
    ['./a.js', '*'],
    ['../b.js', 'b'],
    ['./c.js', ''],
    ['node:fs', '*'],
    ['./e.js', '*'],
    ['./f.js', '*'],
    ['../g/g.js', '*'],
    [undefined, '*'],
    ['./i.js', ''],
  ]);
});

// The engine runs any spec's DAG; it knows kinds only through the contract, so it
// may import itself, src/stage.ts, and the digest the cache addresses content by.
const ENGINE_MAY_IMPORT = new Set(['src/stage.ts', 'src/lib/digest.ts', 'schema/spec.ts']);
// Kind discovery loads stages/ and outputs/ modules by computed path: that is its job.
const COMPUTED_IMPORT_OK = new Set(['src/engine/kinds.ts']);

test('src/engine imports only itself, the stage contract (src/stage.ts), src/lib/digest.ts and the spec schema', () => {
  const bad: string[] = [];
  const files = tsFiles('src/engine');
  assert.ok(files.length >= 10, `found only ${files.length} files under src/engine`);
  for (const file of files) {
    for (const r of importsOf(file)) {
      const where = `${rel(file)}:${r.line}`;
      if (r.spec === undefined) {
        if (!COMPUTED_IMPORT_OK.has(rel(file))) bad.push(`${where}: import() with a computed specifier`);
        continue;
      }
      if (!isLocal(r.spec)) continue; // node: builtins and npm packages
      const target = resolveRel(file, r.spec);
      if (!target.startsWith('src/engine/') && !ENGINE_MAY_IMPORT.has(target)) bad.push(`${where}: ${r.spec} (${target})`);
    }
  }
  assert.deepEqual(bad, [], 'the engine reaches outside src/engine and the contract');
});

test('no stage kind imports another kind (shared code goes in a _file or src/lib)', () => {
  const kindFiles = [...tsFiles('stages'), ...tsFiles('outputs')].map(rel);
  const isKind = (f: string) => kindFiles.includes(f) && !path.basename(f).startsWith('_');
  const kinds = kindFiles.filter(isKind);
  assert.ok(kinds.includes('stages/mmdebstrap.ts') && kinds.includes('outputs/ipxe.ts'), kinds.join(' '));
  const bad: string[] = [];
  for (const k of kinds) {
    for (const r of importsOf(path.join(ROOT, k))) {
      if (r.spec === undefined) bad.push(`${k}:${r.line}: import() with a computed specifier`);
      else if (isLocal(r.spec) && isKind(resolveRel(path.join(ROOT, k), r.spec))) bad.push(`${k}:${r.line}: ${r.spec}`);
    }
  }
  assert.deepEqual(bad, [], 'a kind imports another kind');
});

// One process runner (process groups, cancellation, timeouts, argument arrays):
// product code starts processes only through src/engine/process.ts.
test('only src/engine/process.ts imports node:child_process (type-only imports aside)', () => {
  const bad: string[] = [];
  for (const file of [...tsFiles('src'), ...tsFiles('schema'), ...tsFiles('stages'), ...tsFiles('outputs')]) {
    if (rel(file) === 'src/engine/process.ts') continue;
    for (const r of importsOf(file)) {
      if ((r.spec === 'node:child_process' || r.spec === 'child_process') && r.names.length > 0) {
        bad.push(`${rel(file)}:${r.line}: ${r.names.join(', ')}`);
      }
    }
  }
  assert.deepEqual(bad, [], 'processes started outside src/engine/process.ts');
});

// Unit tests run without root, without dist/ and without the shared test cache.
// helpers/cli.ts runs bin/pipeline.js with TEST_CACHE; fixture-rootfs builds into
// that cache; crafted-rootfs needs root (mknod, setcap).
const NOT_FOR_UNIT_TESTS = new Set(['test/helpers/cli.ts', 'test/helpers/fixture-rootfs.ts', 'test/helpers/crafted-rootfs.ts']);

/** Code (not comments or messages) in a file that names the CLI launcher, dist/ or the shared cache. */
function launcherUses(file: string, text = readFileSync(file, 'utf8')): string[] {
  const sf = ts.createSourceFile(file, text, ts.ScriptTarget.Latest, true, ts.ScriptKind.TS);
  const out: string[] = [];
  const visit = (n: ts.Node): void => {
    if (ts.isIdentifier(n) && /^(PIPELINE_)?TEST_CACHE$|^BIN$/.test(n.text)) out.push(`uses ${n.text}`);
    if (ts.isStringLiteralLike(n) || ts.isTemplateLiteralToken(n)) {
      const v = n.text;
      // The launcher by name, a path into dist/ (or 'dist' as a path.join segment), the cache.
      if (/(^|\/)pipeline\.js$/.test(v) || /^(\.{1,2}\/)*dist(\/|$)/.test(v) || /PIPELINE_TEST_CACHE|pipeline-test-cache/.test(v)) out.push(`names '${v}'`);
    }
    ts.forEachChild(n, visit);
  };
  visit(sf);
  return out;
}

test('launcherUses finds paths into bin/, dist/ and the test cache in code, not in prose', () => {
  const src = [
    "const a = path.join(ROOT, 'bin', 'pipeline.js');",
    "const b = '../../dist/src/cli/cli.js';",
    "const b2 = path.join(ROOT, 'dist', 'src');",
    'const c = TEST_CACHE;',
    "const d = process.env.PIPELINE_TEST_CACHE ?? '/var/tmp/pipeline-test-cache';",
    '// bin/pipeline.js in a comment',
    "test('regenerate: node bin/pipeline.js schema', () => {});",
    "const e = ['usr/bin/true', 'bin', 'distro'];",
  ].join('\n');
  assert.deepEqual(launcherUses('/x.ts', src), [
    "names 'pipeline.js'",
    "names '../../dist/src/cli/cli.js'",
    "names 'dist'",
    'uses TEST_CACHE',
    'uses PIPELINE_TEST_CACHE',
    "names '/var/tmp/pipeline-test-cache'",
  ]);
});

test('test/unit files do not reach bin/, dist/, the shared test cache or root-only helpers', () => {
  const unit = tsFiles('test/unit').filter((f) => rel(f) !== 'test/unit/layout.test.ts');
  assert.ok(unit.length >= 5, `found only ${unit.length} unit test files`);
  const bad: string[] = [];
  for (const file of unit) {
    for (const u of launcherUses(file)) bad.push(`${rel(file)}: ${u}`);
    // Follow local imports: a helper can pull these in on the test's behalf.
    const seen = new Set<string>();
    const walk = (abs: string, via: string[]): void => {
      for (const r of importsOf(abs)) {
        if (!r.spec || !isLocal(r.spec)) continue;
        const target = resolveRel(abs, r.spec);
        const chain = [...via, target];
        if (NOT_FOR_UNIT_TESTS.has(target) || target.startsWith('bin/') || target.startsWith('dist/')) bad.push(chain.join(' -> '));
        else if (!seen.has(target) && target.endsWith('.ts') && existsSync(path.join(ROOT, target))) {
          seen.add(target);
          walk(path.join(ROOT, target), chain);
        }
      }
    };
    walk(file, [rel(file)]);
  }
  assert.deepEqual(bad, [], 'move these to test/integration/');
});
