import assert from 'node:assert/strict';
import { test } from 'node:test';
import { compile, diffParts, requirements, type Facts } from '../../src/engine/compile.js';
import { SpecError, UsageError } from '../../src/engine/errors.js';
import { parseSpec } from '../../src/engine/spec.js';
import { testKinds } from '../helpers/test-kinds.js';

const kinds = testKinds();
const SPEC = `name: t
arches: [amd64, arm64]
vars:
  v: one
stages:
  a: { kind: text, with: { content: "\${v}-\${arch}" } }
  b: { kind: text, with: { content: b } }
  c: { kind: text, with: { content: c } }
  j: { kind: concat, inputs: { a: a, b: b } }
  k: { kind: concat, inputs: { a: j, b: c } }
  only: { kind: amd64-only }
variants:
  joined: [j]
  all: [k]
  amd: { stages: [only], arches: [amd64] }
`;
const facts: Facts = { toolVersions: { sh: 'dash 0.5.12' }, assetDigests: {}, sourceDateEpoch: 1704067200 };
const load = (t = SPEC) => parseSpec(t, 'spec.yaml', kinds);

test('plan holds only the stages the variants need, inputs first', () => {
  const plan = compile(load(), 'amd64', ['joined'], kinds, facts);
  assert.deepEqual(plan.stages.map((s) => s.name), ['a', 'b', 'j']);
  assert.deepEqual(plan.sinks, { joined: ['j'] });
  assert.equal(plan.stages[0]!.params && (plan.stages[0]!.params as { content: string }).content, 'one-amd64');
});

test('keys are stable, depend on arch, params, tool versions, epoch and inputs', () => {
  const k = (f: Facts, arch = 'amd64', text = SPEC) => Object.fromEntries(compile(load(text), arch, ['all'], kinds, f).stages.map((s) => [s.name, s.key]));
  const base = k(facts);
  assert.deepEqual(k(facts), base);
  const arm = k(facts, 'arm64');
  assert.notEqual(arm.a, base.a);
  assert.notEqual(arm.b, base.b, 'arch is part of every key');
  const newTool = k({ ...facts, toolVersions: { sh: 'dash 0.5.13' } });
  assert.notEqual(newTool.a, base.a);
  assert.notEqual(newTool.j, base.j, 'j has no tools, but its input a changed');
  const epoch = k({ ...facts, sourceDateEpoch: 1 });
  assert.notEqual(epoch.b, base.b);
  const changedC = k(facts, 'amd64', SPEC.replace('content: c }', 'content: cc }'));
  assert.equal(changedC.a, base.a);
  assert.equal(changedC.j, base.j);
  assert.notEqual(changedC.c, base.c);
  assert.notEqual(changedC.k, base.k, 'downstream of a change gets a new key');
});

test('arch differs in every key (it is part of the key)', () => {
  const a = compile(load(), 'amd64', ['joined'], kinds, facts);
  const b = compile(load(), 'arm64', ['joined'], kinds, facts);
  assert.notEqual(a.stages[1]!.key, b.stages[1]!.key);
});

test('a change to the stage implementation version changes the key', () => {
  const k1 = compile(load(), 'amd64', ['joined'], kinds, facts).stages[0]!.key;
  const mod = kinds.get('text')!;
  const saved = mod.version;
  try {
    (mod as { version: string }).version = '2';
    const k2 = compile(load(), 'amd64', ['joined'], kinds, facts).stages[0]!.key;
    assert.notEqual(k1, k2);
  } finally {
    (mod as { version: string }).version = saved;
  }
});

test('key order in the spec does not change keys', () => {
  const reordered = SPEC.replace('a: { kind: text, with: { content: "${v}-${arch}" } }', 'a: { with: { content: "${v}-${arch}" }, kind: text }');
  assert.equal(compile(load(reordered), 'amd64', ['joined'], kinds, facts).stages[0]!.key, compile(load(), 'amd64', ['joined'], kinds, facts).stages[0]!.key);
});

test('usage errors: unknown arch, unknown variant, variant not for arch', () => {
  assert.throws(() => compile(load(), 'riscv64', ['joined'], kinds, facts), (e: unknown) => e instanceof UsageError && /unknown arch "riscv64".*amd64, arm64/.test(e.message));
  assert.throws(() => compile(load(), 'amd64', ['nope'], kinds, facts), (e: unknown) => e instanceof UsageError && /unknown variant "nope".*joined, all, amd/.test(e.message));
  assert.throws(() => compile(load(), 'arm64', ['amd'], kinds, facts), (e: unknown) => e instanceof UsageError && /not built for arm64/.test(e.message));
});

test('a kind that does not support the arch is a spec error at its kind line', () => {
  const text = SPEC.replace('amd: { stages: [only], arches: [amd64] }', 'amd: [only]');
  assert.throws(() => compile(load(text), 'arm64', ['amd'], kinds, facts), (e: unknown) => e instanceof SpecError && e.issues[0]!.loc.line === 11);
});

test('requirements lists tools once', () => {
  const r = requirements(load(), 'amd64', ['all'], kinds);
  assert.deepEqual(r.tools.map((t) => t.name), ['sh']);
  assert.deepEqual(r.stages, ['a', 'b', 'j', 'c', 'k']);
});

test('diffParts explains what changed', () => {
  const p1 = compile(load(), 'amd64', ['all'], kinds, facts).stages;
  const p2 = compile(load(SPEC.replace('vars:\n  v: one', 'vars:\n  v: two')), 'amd64', ['all'], kinds, { ...facts, toolVersions: { sh: 'dash 9' } }).stages;
  assert.deepEqual(diffParts(p1[0]!.parts, p2[0]!.parts), ['params.content: "one-amd64" -> "two-amd64"', 'tool sh: dash 0.5.12 -> dash 9']);
  assert.match(diffParts(p1[2]!.parts, p2[2]!.parts).join('\n'), /input a changed/);
});

test('a 200-stage spec compiles (correctness; timing lives in bench/)', () => {
  const lines = ['name: big', 'arches: [amd64]', 'stages:', '  s0: { kind: text, with: { content: "0" } }', '  t0: { kind: text, with: { content: "t" } }'];
  for (let i = 1; i < 200; i++) lines.push(`  s${i}: { kind: concat, inputs: { a: s${i - 1}, b: t0 } }`);
  lines.push('variants:', '  v: [s199]');
  const plan = compile(load(lines.join('\n')), 'amd64', ['v'], kinds, facts);
  assert.equal(plan.stages.length, 201);
  assert.equal(new Set(plan.stages.map((s) => s.key)).size, 201);
});
