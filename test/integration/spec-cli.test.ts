// End to end through the CLI (bin/pipeline.js -> dist/; run `npx tsc -p tsconfig.json`
// first): a rejected command exits 2 with file:line:col and creates nothing — no
// cache dir, no images/ — and --out is checked before anything runs.
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { cli, ROOT } from '../helpers/cli.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'spec-cli-'));
after(() => rmSync(tmp, { recursive: true, force: true }));
let n = 0;

const GOOD = `name: t
arches: [amd64]
stages:
  a: { kind: fixed-text, with: { content: "hello \${arch}" } }
variants:
  v: [a]
`;

/** A fresh project dir holding spec.yaml, and a cache path that does not exist yet. */
function project(spec: string | Buffer): { dir: string; cache: string; env: Record<string, string> } {
  const dir = path.join(tmp, `p${n++}`);
  mkdirSync(dir);
  writeFileSync(path.join(dir, 'spec.yaml'), spec);
  const cache = path.join(tmp, `cache${n}`);
  return { dir, cache, env: { PIPELINE_CACHE_DIR: cache, PIPELINE_KINDS_PATH: path.join(ROOT, 'fixtures', 'kinds') } };
}

function assertNothingWritten(p: { dir: string; cache: string }): void {
  assert.equal(existsSync(p.cache), false, 'a rejected command created the cache dir');
  assert.deepEqual(readdirSync(p.dir), ['spec.yaml'], 'a rejected command wrote into the project');
}

test('validate of a broken spec exits 2 with file:line:col and writes nothing', async () => {
  const p = project(GOOD.replace('arches: [amd64]', 'arches: [amd64'));
  const r = await cli(['validate', '-f', 'spec.yaml'], { cwd: p.dir, env: p.env });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /^spec\.yaml:2:9: error: unclosed "\[": expected a matching "\]"/);
  assertNothingWritten(p);
});

test('invalid UTF-8 and wrong types exit 2 with the location and what was expected', async () => {
  const bad = project(Buffer.concat([Buffer.from(GOOD.slice(0, 20)), Buffer.from([0xe2, 0x28, 0xa1]), Buffer.from(GOOD.slice(20))]));
  const r = await cli(['validate', '-f', 'spec.yaml'], { cwd: bad.dir, env: bad.env });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /^spec\.yaml:2:13: error: invalid UTF-8/);
  const typ = project(GOOD.replace('content: "hello ${arch}"', 'content: 3'));
  const t = await cli(['plan', 'amd64', 'v', '-f', 'spec.yaml'], { cwd: typ.dir, env: typ.env });
  assert.equal(t.code, 2, t.stderr);
  assert.match(t.stderr, /^spec\.yaml:4:43: error: stages\.a\.with\.content: expected a string, found a number \(3\)/);
  assertNothingWritten(typ);
});

test('plan with an overlay outside the spec dir exits 2 at the value and hashes nothing', async () => {
  const p = project(`name: t\narches: [amd64]\nstages:\n  r:\n    kind: mmdebstrap\n    with: { overlay: ../../../etc }\nvariants:\n  v: [r]\n`);
  const r = await cli(['plan', 'amd64', 'v', '-f', 'spec.yaml'], { cwd: p.dir, env: p.env });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /^spec\.yaml:6:22: error: stages\.r\.with\.overlay: expected a path inside the spec's directory/);
  assertNothingWritten(p);
});

test('build: a bad variant, an --out that is a file, or --out under /proc or /sys exits 2 at once', async () => {
  const variant = project(GOOD);
  const v = await cli(['build', 'amd64', 'nope', '-f', 'spec.yaml'], { cwd: variant.dir, env: variant.env });
  assert.equal(v.code, 2, v.stderr);
  assertNothingWritten(variant);

  const file = project(GOOD);
  writeFileSync(path.join(file.dir, 'out'), 'x');
  const f = await cli(['build', 'amd64', 'v', '-f', 'spec.yaml', '--out', 'out'], { cwd: file.dir, env: file.env });
  assert.equal(f.code, 2, f.stderr);
  assert.match(f.stderr, /--out .*out: expected a directory \(or a path that can be created\), found a file/);
  assert.equal(existsSync(file.cache), false);

  for (const [out, fs] of [['/proc/pipeline-out', 'proc'], ['/sys/kernel/pipeline-out', 'sysfs'], ['/dev/pipeline-out', 'devtmpfs']] as const) {
    const p = project(GOOD);
    const t0 = performance.now();
    const r = await cli(['build', 'amd64', 'v', '-f', 'spec.yaml', '--out', out], { cwd: p.dir, env: p.env, timeoutMs: 30_000 });
    assert.equal(r.code, 2, `${out}: ${r.stderr}`);
    assert.match(r.stderr, new RegExp(`expected a directory on a real file system, found .* on ${fs}`));
    assert.ok(performance.now() - t0 < 20_000);
    assertNothingWritten(p);
  }
});

test('a good build still creates the cache and publishes (the cache is made when the build starts)', async () => {
  const p = project(GOOD);
  const r = await cli(['build', 'amd64', 'v', '-f', 'spec.yaml', '--json'], { cwd: p.dir, env: p.env });
  assert.equal(r.code, 0, r.stderr);
  assert.ok(existsSync(path.join(p.cache, 'entries')) || readdirSync(p.cache).length > 0);
  assert.ok(existsSync(path.join(p.dir, 'images', 'v', 'amd64', 'text.txt')));
});
