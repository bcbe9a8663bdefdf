import assert from 'node:assert/strict';
import { test } from 'node:test';
import { SpecError } from '../../src/engine/errors.js';
import { parseSpec } from '../../src/engine/spec.js';
import { testKinds } from '../helpers/test-kinds.js';

const kinds = testKinds();

function errors(text: string): { line: number; col: number; message: string; path: string }[] {
  try {
    parseSpec(text, 'spec.yaml', kinds);
  } catch (e) {
    assert.ok(e instanceof SpecError, `expected SpecError, got ${e}`);
    return e.issues.map((i) => ({ line: i.loc.line, col: i.loc.col, message: i.message, path: i.path }));
  }
  assert.fail('expected the spec to be rejected');
}

const GOOD = `name: t
arches: [amd64, arm64]
vars:
  greeting: hello
  console: { amd64: ttyS0, arm64: ttyAMA0 }
stages:
  a:
    kind: text
    with: { content: "\${greeting} \${arch} \${console}" }
  b:
    kind: text
    with: { content: b }
    arch:
      arm64: { with: { content: b-arm } }
  j:
    kind: concat
    inputs: { a: a, b: b }
variants:
  joined: [j]
`;

test('a good spec parses, with vars and arch overrides left for compile', () => {
  const l = parseSpec(GOOD, 'spec.yaml', kinds);
  assert.equal(l.spec.name, 't');
  assert.deepEqual(Object.keys(l.spec.stages), ['a', 'b', 'j']);
  assert.match(l.sha256, /^[0-9a-f]{64}$/);
});

test('YAML syntax error names line and column', () => {
  const e = errors('name: t\narches: [amd64\nstages: {}\n');
  assert.equal(e.length >= 1, true);
  assert.equal(e[0]!.line >= 2, true);
});

test('duplicate keys are reported where the duplicate stands', () => {
  const e = errors(GOOD.replace('  b:\n    kind: text\n    with: { content: b }', '  a:\n    kind: text\n    with: { content: b }'));
  assert.equal(e[0]!.line, 10);
  assert.match(e[0]!.message, /duplicate key/);
});

test('wrong type points at the value', () => {
  const e = errors(GOOD.replace('arches: [amd64, arm64]', 'arches: amd64'));
  assert.deepEqual([e[0]!.line, e[0]!.col, e[0]!.path], [2, 9, 'arches']);
  assert.match(e[0]!.message, /^expected an array of .*, found a string \("amd64"\)$/);
});

test('unknown top-level key points at the key', () => {
  const e = errors(GOOD + 'bogus: 1\n');
  assert.equal(e[0]!.line, 20);
  assert.equal(e[0]!.col, 1);
  assert.match(e[0]!.message, /unknown key "bogus"/);
});

test('unknown stage kind lists the known kinds', () => {
  const e = errors(GOOD.replace('kind: concat', 'kind: concatt'));
  assert.equal(e[0]!.line, 16);
  assert.equal(e[0]!.col, 11);
  assert.match(e[0]!.message, /unknown stage kind "concatt"; expected one of: .*concat/);
});

test('unknown input reference', () => {
  const e = errors(GOOD.replace('inputs: { a: a, b: b }', 'inputs: { a: a, b: c }'));
  assert.equal(e[0]!.line, 17);
  assert.match(e[0]!.message, /unknown stage "c"/);
});

test('cycle is printed', () => {
  const text = `name: t
arches: [amd64]
stages:
  a:
    kind: concat
    inputs: { a: b, b: b }
  b:
    kind: concat
    inputs: { a: a, b: a }
variants:
  v: [a]
`;
  const e = errors(text);
  assert.ok(e.some((i) => /dependency cycle: a -> b -> a/.test(i.message)));
});

test('bad stage param is located in the with block, per arch override', () => {
  const e = errors(GOOD.replace('arm64: { with: { content: b-arm } }', 'arm64: { with: { content: 42 } }'));
  assert.equal(e.length, 1);
  assert.equal(e[0]!.line, 14);
  assert.match(e[0]!.message, /^expected a string, found a number \(42\) \(arch arm64\)$/);
});

test('missing required param', () => {
  const e = errors(GOOD.replace('with: { content: b }', 'with: {}'));
  assert.match(e[0]!.message, /missing required parameter/);
  assert.equal(e[0]!.path, 'stages.b.with.content');
});

test('unknown variable is located at the string', () => {
  const e = errors(GOOD.replace('${greeting}', '${nope}'));
  assert.equal(e[0]!.line, 9);
  assert.match(e[0]!.message, /unknown variable \$\{nope\}/);
});

test('variant naming an unknown stage', () => {
  const e = errors(GOOD.replace('joined: [j]', 'joined: [j, zz]'));
  assert.equal(e[0]!.line, 19);
  assert.match(e[0]!.message, /unknown stage "zz"/);
});

test('missing required input', () => {
  const e = errors(GOOD.replace('inputs: { a: a, b: b }', 'inputs: { a: a }'));
  assert.match(e[0]!.message, /needs input "b"/);
});

test('an error message carries a code frame', () => {
  try {
    parseSpec(GOOD.replace('kind: concat', 'kind: concatt'), 'spec.yaml', kinds);
  } catch (e) {
    assert.match((e as Error).message, /^spec.yaml:16:11: error: stages\.j\.kind: unknown stage kind/);
    assert.match((e as Error).message, /16 \|     kind: concatt\n\s+\|           \^{7}/);
  }
});
