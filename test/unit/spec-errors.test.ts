// Errors that must come early, exactly located, and say what was expected.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { SpecError } from '../../src/engine/errors.js';
import { loadKinds } from '../../src/engine/kinds.js';
import { decodeSpec, firstInvalidUtf8, loadSpecFile, parseSpec, type Kinds } from '../../src/engine/spec.js';
import { testKinds } from '../helpers/test-kinds.js';

const kinds = testKinds();

function issues(text: string, k: Kinds = kinds): { line: number; col: number; message: string; path: string }[] {
  try {
    parseSpec(text, 'spec.yaml', k);
  } catch (e) {
    assert.ok(e instanceof SpecError, `expected SpecError, got ${(e as Error)?.stack ?? e}`);
    return e.issues.map((i) => ({ line: i.loc.line, col: i.loc.col, message: i.message, path: i.path }));
  }
  assert.fail('expected the spec to be rejected');
}

const ONE = (withBlock: string, kind = 'text') => `name: t
arches: [amd64]
stages:
  a:
    kind: ${kind}
    with: ${withBlock}
variants:
  v: [a]
`;

test('a wrong type says what was expected and what was found, not that the key is missing', async () => {
  const real = await loadKinds();
  const e = issues(ONE('{ packages: 3 }', 'mmdebstrap'), real);
  assert.equal(e.length, 1);
  assert.equal(e[0]!.message, 'expected an array of strings, found a number (3)');
  assert.deepEqual([e[0]!.line, e[0]!.col, e[0]!.path], [6, 23, 'stages.a.with.packages']);
  const top = issues(ONE('{ content: x }').replace('arches: [amd64]', 'arches: 3'));
  assert.match(top[0]!.message, /^expected an array of values, each one of: "amd64", "arm64", found a number \(3\)$/);
  const str = issues(ONE('{ content: [a, b] }'));
  assert.equal(str[0]!.message, 'expected a string, found an array (2 items)');
});

test('a key that is really missing is named, with the type it needs', () => {
  const e = issues(ONE('{}'));
  assert.equal(e[0]!.message, 'missing required parameter "content" for kind "text" (expected a string)');
  const top = issues('name: t\narches: [amd64]\nvariants: {}\n');
  assert.equal(top[0]!.message, 'missing required key "stages" (expected a map (key: value))');
});

test('enum and range errors list what is allowed and show the value', async () => {
  const real = await loadKinds();
  const e = issues(ONE('{ compress: lzma }', 'dracut').replace('    with:', '    inputs: { rootfs: r }\n    with:').replace('variants:', '  r: { kind: mmdebstrap }\nvariants:'), real);
  assert.equal(e[0]!.message, 'expected one of: "gzip", "zstd", "xz", "none"; found a string ("lzma")');
});

test('invalid UTF-8 is refused at the first bad byte, not turned into U+FFFD', () => {
  const bytes = Buffer.concat([Buffer.from('name: t\n# café ok\nx: ab'), Buffer.from([0xc3, 0x28]), Buffer.from('\n')]);
  assert.equal(firstInvalidUtf8(bytes), Buffer.byteLength('name: t\n# café ok\nx: ab'));
  assert.throws(
    () => decodeSpec(bytes, 'spec.yaml'),
    (e: unknown) => e instanceof SpecError && e.issues[0]!.loc.line === 3 && e.issues[0]!.loc.col === 6 && /invalid UTF-8 \(a sequence starting with byte 0xc3\)/.test(e.issues[0]!.message),
  );
  // Overlong encodings, surrogates and truncated sequences are invalid too; valid text passes.
  for (const bad of [[0xc0, 0xaf], [0xed, 0xa0, 0x80], [0xe2, 0x82], [0xf5, 0x80, 0x80, 0x80], [0xff]]) assert.equal(firstInvalidUtf8(Buffer.from([0x61, ...bad])), 1, String(bad));
  assert.equal(firstInvalidUtf8(Buffer.from('ünïcödé 🚀 ok', 'utf8')), -1);
  assert.equal(decodeSpec(Buffer.from('\ufeffa: 1', 'utf8'), 'x'), '\ufeffa: 1', 'a BOM is kept, as before (spec digest unchanged)');
});

test('invalid UTF-8 in a spec file is a SpecError with its location', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'spec-utf8-'));
  try {
    const f = path.join(dir, 'bad.yaml');
    writeFileSync(f, Buffer.concat([Buffer.from('name: t\narches: [amd64]\nstages:\n  a: { kind: text, with: { content: "'), Buffer.from([0xff]), Buffer.from('" } }\nvariants: { v: [a] }\n')]));
    assert.throws(() => loadSpecFile(f, kinds), (e: unknown) => e instanceof SpecError && e.issues[0]!.loc.line === 4 && e.issues[0]!.loc.col === 38);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('an alias bomb is a SpecError located at the first alias', () => {
  const bomb = [
    'name: t',
    'a: &a [x, x, x, x, x, x, x, x, x]',
    'b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]',
    'c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]',
    'd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]',
    'e: [*d, *d, *d, *d, *d, *d, *d, *d, *d]',
    '',
  ].join('\n');
  const e = issues(bomb);
  assert.deepEqual([e[0]!.line, e[0]!.col], [3, 8]);
  assert.match(e[0]!.message, /aliases expand to too many nodes/);
});

test('an unclosed [ or { is reported where it opened, not where the parser gave up', () => {
  const seq = issues('name: t\narches: [amd64\nstages:\n  a: { kind: text }\nvariants: {}\n');
  assert.deepEqual([seq[0]!.line, seq[0]!.col], [2, 9]);
  assert.match(seq[0]!.message, /unclosed "\[": expected a matching "\]"/);
  const map = issues('name: t\narches: [amd64]\nstages:\n  a: { kind: text,\n    with: { content: x }\n\n\nvariants: {}\n');
  assert.deepEqual([map[0]!.line, map[0]!.col], [4, 6]);
  assert.match(map[0]!.message, /unclosed "\{"/);
});

test('duplicate keys are found in linear time, 1 and "1" included', () => {
  const e = issues('name: t\nvars:\n  "1": a\n  1: b\n');
  assert.deepEqual([e[0]!.line, e[0]!.col], [4, 3]);
  assert.match(e[0]!.message, /duplicate key "1"/);
  // 40,000 keys took 21 s with the yaml library's quadratic check; allow a loaded machine 6 s.
  const lines = ['name: t', 'arches: [amd64]', 'vars:'];
  for (let i = 0; i < 40_000; i++) lines.push(`  v${i}: ${i}`);
  lines.push('stages:', '  a: { kind: text, with: { content: "${v39999}" } }', 'variants: { v: [a] }', '');
  const t0 = performance.now();
  parseSpec(lines.join('\n'), 'big.yaml', kinds);
  const s = (performance.now() - t0) / 1000;
  assert.ok(s < 6, `40,000 keys parsed in ${s.toFixed(2)} s`);
  const dup = issues(lines.join('\n').replace('  v39999: 39999', '  v5: 39999'));
  assert.equal(dup.length, 1);
  assert.equal(dup[0]!.line, 40_003);
});

test('a GRUB-unsafe kernel command line fails validate at its location, before anything builds', async () => {
  const real = await loadKinds();
  const spec = (cmdline: string, kind = 'raw') => `name: t
arches: [amd64]
vars:
  extra: 'a"b'
stages:
  r: { kind: mmdebstrap }
  d: { kind: dracut, inputs: { rootfs: r } }
  x:
    kind: ${kind}
    inputs: { rootfs: r, boot: d }
    with:
      cmdline: ${cmdline}
variants:
  v: [x]
`;
  for (const bad of [`'quiet "x"'`, `"a;b"`, `'a\\b'`, "'$${root}'", `'a\`b'`, `"{x}"`]) {
    for (const kind of ['raw', 'iso']) {
      const e = issues(spec(bad, kind), real);
      assert.deepEqual([e[0]!.line, e[0]!.col, e[0]!.path], [12, 16, 'stages.x.with.cmdline'], `${kind} ${bad}`);
      assert.match(e[0]!.message, /expected a kernel command line GRUB takes verbatim/);
    }
  }
  // Through a variable: located at the use site.
  const v = issues(spec(`"\${extra}"`), real);
  assert.equal(v[0]!.line, 12);
  parseSpec(spec('"console=ttyS0 panic=30 root=LABEL=x"'), 'spec.yaml', real);
});

test('deep nesting and huge lines end in a short, located SpecError, not a crash', () => {
  const cases: [string, RegExp][] = [
    ['name: t\nx: ' + '['.repeat(100_000) + '\n', /nested too deeply for the parser; expected at most 64 levels/],
    ['name: t\nx: ' + '['.repeat(100) + ']'.repeat(100) + '\n', /nested more than 64 levels deep; expected a flatter spec/],
    ['name: t\nx:\n' + Array.from({ length: 3000 }, (_, i) => ' '.repeat(i + 1) + `k${i}:`).join('\n') + ' 1\n', /nested/],
  ];
  for (const [text, re] of cases) {
    let err: unknown;
    try {
      parseSpec(text, 'deep.yaml', kinds);
    } catch (e) {
      err = e;
    }
    assert.ok(err instanceof SpecError, String(err));
    assert.equal(err.issues.length, 1);
    assert.match(err.issues[0]!.message, re);
    assert.ok(err.issues[0]!.loc.line >= 2);
    assert.ok(err.message.length < 1000, `message of ${err.message.length} chars`);
  }
  // A thousand bad lines print 50 issues and a count; a 100k-char line is cut around the column.
  const many = issues('name: t\n' + Array.from({ length: 1000 }, (_, i) => `k${i}: 1`).join('\n') + '\n');
  assert.ok(many.length > 1000);
  try {
    parseSpec('name: t\n' + Array.from({ length: 1000 }, (_, i) => `k${i}: 1`).join('\n') + '\n', 'spec.yaml', kinds);
  } catch (e) {
    assert.match((e as Error).message, /… and \d+ more$/);
  }
  const long = 'name: t\nx: ' + 'y'.repeat(100_000) + ' [\n';
  try {
    parseSpec(long, 'spec.yaml', kinds);
    assert.fail('expected an error');
  } catch (e) {
    assert.ok(e instanceof SpecError);
    assert.ok(e.message.length < 2000, `message of ${e.message.length} chars`);
  }
});
