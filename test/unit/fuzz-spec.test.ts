// Property test of the spec loader: mutated copies of the shipped specs (insertions,
// deletions, type swaps, random characters and bytes) must each end in success or
// a SpecError/UsageError (exit 2) carrying a location — never another exception,
// never a hang, never a file-system write.
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import fc from 'fast-check';
import { checkSpecPaths } from '../../src/engine/assets.js';
import { compile, requirements } from '../../src/engine/compile.js';
import { formatIssue, SpecError, UsageError } from '../../src/engine/errors.js';
import { KINDS_PATH_ENV, loadKinds } from '../../src/engine/kinds.js';
import { isDeepStrictEqual } from 'node:util';
import YAML from 'yaml';
import { decodeSpec, fastValue, parseSpec } from '../../src/engine/spec.js';
import { ROOT } from '../helpers/paths.js';

// The fixture kinds (fixed-text, wallclock, collect) for fixtures/nondeterministic.yaml.
process.env[KINDS_PATH_ENV] = path.join(ROOT, 'fixtures', 'kinds');

const SEEDS = [path.join(ROOT, 'pipelines', 'powernode.yaml'), ...readdirSync(path.join(ROOT, 'fixtures')).filter((f) => f.endsWith('.yaml') && !f.startsWith('.')).map((f) => path.join(ROOT, 'fixtures', f))];
const SEED_BYTES = SEEDS.map((f) => readFileSync(f));

// YAML-significant pieces, spec vocabulary and odd characters: more likely than
// uniform noise to reach deep parser and schema paths.
const TOKENS = ['[', ']', '{', '}', ':', ': ', ', ', '- ', '-', '? ', '&a ', '*a', '&b [*a, *a, *a]', '!!str ', '!!int ', '!foo ', '"', "'", '\n', '\n  ', '  ', '\t', '#', '|\n', '>-\n', '---\n', '...\n', '%YAML 1.1\n', '<<: *a\n', '${', '${arch}', '${nope}', '$${', '}', '~', 'null', 'true', '0x1F', '1e400', '-0', '.nan', '2026-01-01', '\0', '\uFFFD', '\u2028', '\uD800', '🚀', 'kind: raw', 'inputs: { rootfs: rootfs }', 'with: {}', 'arch: { arm64: { with: {} } }', 'overlay: ../../etc', 'moduleDirs: [/etc]', 'cmdline: "a;b"', '__proto__: 1\n', 'constructor: {}\n', '['.repeat(3000), '{a: '.repeat(200), '- '.repeat(100), 'y'.repeat(2_000)];
const SWAPS = ['3', '-1', '1.5', 'true', 'null', '[]', '{}', '[x]', '{a: 1}', '""', '"x"', 'amd64', 'rootfs', '${arch}'];

type Mutation = { kind: 'insert'; at: number; text: string } | { kind: 'bytes'; at: number; bytes: number[] } | { kind: 'delete'; at: number; len: number } | { kind: 'swap'; at: number; text: string };

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('insert' as const), at: fc.nat(), text: fc.oneof(fc.constantFrom(...TOKENS), fc.string({ maxLength: 8, unit: 'binary' }), fc.string({ maxLength: 4 })) }),
  fc.record({ kind: fc.constant('bytes' as const), at: fc.nat(), bytes: fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 1, maxLength: 4 }) }),
  fc.record({ kind: fc.constant('delete' as const), at: fc.nat(), len: fc.integer({ min: 1, max: 40 }) }),
  fc.record({ kind: fc.constant('swap' as const), at: fc.nat(), text: fc.constantFrom(...SWAPS) }),
);

/** Apply a mutation to bytes; `swap` replaces the scalar after the ': ' nearest to `at`. */
function apply(buf: Buffer, m: Mutation): Buffer {
  const at = buf.length ? m.at % (buf.length + 1) : 0;
  switch (m.kind) {
    case 'insert':
      return Buffer.concat([buf.subarray(0, at), Buffer.from(m.text, 'utf8'), buf.subarray(at)]);
    case 'bytes':
      return Buffer.concat([buf.subarray(0, at), Buffer.from(m.bytes), buf.subarray(at)]);
    case 'delete':
      return Buffer.concat([buf.subarray(0, at), buf.subarray(Math.min(buf.length, at + m.len))]);
    case 'swap': {
      const colon = buf.indexOf(': ', at);
      if (colon < 0) return buf;
      let end = colon + 2;
      while (end < buf.length && ![0x0a, 0x2c, 0x7d, 0x5d, 0x23].includes(buf[end]!)) end++;
      return Buffer.concat([buf.subarray(0, colon + 2), Buffer.from(m.text), buf.subarray(end)]);
    }
  }
}

/** Load, check paths and plan every variant: success, or an exit-2 error with a location. */
function loadAndPlan(bytes: Buffer, kinds: Awaited<ReturnType<typeof loadKinds>>, file: string): 'ok' | 'spec-error' {
  try {
    const loaded = parseSpec(decodeSpec(bytes, 'fuzz.yaml'), 'fuzz.yaml', kinds);
    const located = { ...loaded, dir: path.dirname(file) };
    const pathIssues = checkSpecPaths(located, kinds);
    if (pathIssues.length) throw new SpecError(pathIssues);
    for (const arch of loaded.spec.arches) {
      for (const v of Object.keys(loaded.spec.variants)) {
        try {
          const req = requirements(located, arch, [v], kinds);
          compile(located, arch, [v], kinds, {
            toolVersions: Object.fromEntries(req.tools.map((t) => [t.name, '1'])),
            assetDigests: Object.fromEntries(req.assets.map((a) => [a, 'd'])),
            sourceDateEpoch: 0,
          });
        } catch (e) {
          if (!(e instanceof UsageError)) throw e; // a variant not built for this arch, …
        }
      }
    }
    return 'ok';
  } catch (e) {
    if (!(e instanceof SpecError)) throw new Error(`not a SpecError: ${(e as Error)?.stack ?? String(e)}`);
    assert.ok(e.issues.length > 0);
    for (const i of e.issues) {
      assert.equal(i.loc.file, 'fuzz.yaml');
      assert.ok(Number.isInteger(i.loc.line) && i.loc.line >= 1, `line ${i.loc.line}: ${i.message}`);
      assert.ok(Number.isInteger(i.loc.col) && i.loc.col >= 1, `col ${i.loc.col}: ${i.message}`);
      assert.ok(i.message.length > 0);
      formatIssue(i);
    }
    return 'spec-error';
  }
}

test('mutated specs load, or fail with a located SpecError; no hang, no write', { timeout: 120_000 }, async () => {
  const kinds = await loadKinds();
  const cwd = process.cwd();
  const scratch = mkdtempSync(path.join(os.tmpdir(), 'fuzz-spec-'));
  const cacheDir = path.join(scratch, 'no-cache');
  const prevCache = process.env.PIPELINE_CACHE_DIR;
  process.env.PIPELINE_CACHE_DIR = cacheDir;
  const work = path.join(scratch, 'cwd');
  (await import('node:fs')).mkdirSync(work);
  process.chdir(work);
  const outcomes = { ok: 0, 'spec-error': 0 };
  let slowest = 0;
  const t0 = performance.now();
  try {
    // The unmutated seeds are valid.
    SEEDS.forEach((f, i) => assert.equal(loadAndPlan(SEED_BYTES[i]!, kinds, f), 'ok', f));
    fc.assert(
      fc.property(fc.nat({ max: SEEDS.length - 1 }), fc.array(mutation, { minLength: 1, maxLength: 4 }), (seed, muts) => {
        const bytes = muts.reduce(apply, SEED_BYTES[seed]!);
        const c0 = performance.now();
        outcomes[loadAndPlan(bytes, kinds, SEEDS[seed]!)]++;
        const ms = performance.now() - c0;
        slowest = Math.max(slowest, ms);
        // A case is bounded: the loader is linear, so a slow case means a blow-up.
        assert.ok(ms < 3000, `one case took ${ms.toFixed(0)} ms`);
      }),
      { numRuns: Number(process.env.FUZZ_RUNS ?? 2000), seed: process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : undefined },
    );
  } finally {
    process.chdir(cwd);
    if (prevCache === undefined) delete process.env.PIPELINE_CACHE_DIR;
    else process.env.PIPELINE_CACHE_DIR = prevCache;
  }
  const seconds = (performance.now() - t0) / 1000;
  try {
    assert.deepEqual(readdirSync(work), [], 'validate wrote into the working directory');
    assert.equal(existsSync(cacheDir), false, 'validate created a cache');
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
  // Both outcomes occur (the mutations are neither all harmless nor all fatal).
  assert.ok(outcomes.ok > 0 && outcomes['spec-error'] > 0, JSON.stringify(outcomes));
  assert.ok(seconds < 60, `property took ${seconds.toFixed(1)} s`);
  process.stderr.write(`fuzz: ${JSON.stringify(outcomes)}, slowest case ${slowest.toFixed(0)} ms, ${seconds.toFixed(1)} s\n`);
});

// Valid specs are read by js-yaml (fast); anything else by the yaml library, with
// positions. Where the fast path accepts a document, the yaml library must accept
// it too and read the same values — else keys or verdicts would depend on the path.
const SCALARS = ['~', 'null', 'Null', 'true', 'True', 'FALSE', 'yes', 'on', '0x1F', '0o17', '0b101', '017', '1_000', '+5', '-0', '.5', '5.', '1e3', '1E+3', '.inf', '-.Inf', '.nan', '2026-01-01', '"\\x41\\u00e9\\N\\_"', "'it''s'", '|\n  a\n', '>-\n  a\n  b\n', '|2\n   x\n', '"a\n  b"', '[a,\n b]', '{a: 1,\n b: 2}', '\r\n', '\r', '\ufeff', '\u0085', '#c', ' #c', '"x"#c', '[a]#c', '<<: {a: 1}', '? k', '[a]: 1', '= '];
test('the fast path reads what the located path reads, or declines', { timeout: 120_000 }, () => {
  let fast = 0;
  fc.assert(
    fc.property(fc.nat({ max: SEEDS.length - 1 }), fc.array(fc.record({ at: fc.nat(), text: fc.oneof(fc.constantFrom(...SCALARS, ...TOKENS), fc.string({ maxLength: 4 })), del: fc.nat({ max: 6 }) }), { minLength: 1, maxLength: 5 }), (seed, muts) => {
      let text = SEED_BYTES[seed]!.toString('utf8');
      for (const m of muts) {
        const at = m.at % (text.length + 1);
        text = text.slice(0, at) + m.text + text.slice(at + m.del);
      }
      const f = fastValue(text);
      if (!f) return;
      fast++;
      const doc = YAML.parseDocument(text, { uniqueKeys: true, logLevel: 'error' });
      assert.deepEqual(doc.errors.map((e) => e.message), [], `the fast path accepted what the yaml library rejects:\n${text}`);
      const slow = doc.toJS({ maxAliasCount: 100 });
      assert.ok(isDeepStrictEqual(f.value, slow), `values differ:\n${text}`);
    }),
    { numRuns: Number(process.env.FUZZ_RUNS ?? 2000), seed: process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : undefined },
  );
  assert.ok(fast > 0, 'no case took the fast path');
});
