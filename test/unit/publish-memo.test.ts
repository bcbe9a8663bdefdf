// The publish memo: republishing an unchanged set costs a stat per file (nothing is
// copied, hashed or written), a file changed in images/ since is copied again from
// the cache and checked, and a file already published from the same blob and
// untouched is linked instead of copied.
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Cache } from '../../src/engine/cache.js';
import { compile, type Facts } from '../../src/engine/compile.js';
import { BuildError } from '../../src/engine/errors.js';
import { publish, type PublishOptions } from '../../src/engine/publish.js';
import { runPlan } from '../../src/engine/scheduler.js';
import { parseSpec } from '../../src/engine/spec.js';
import { testKinds } from '../helpers/test-kinds.js';

const kinds = testKinds();
const facts: Facts = { toolVersions: { sh: 'dash' }, assetDigests: {}, sourceDateEpoch: 0 };
const spec = (b: string) => `name: p
arches: [amd64]
stages:
  a: { kind: text, with: { name: a.txt, content: "alpha bytes" } }
  b: { kind: text, with: { name: b.txt, content: "${b}" } }
variants:
  v: [a, b]
`;

async function setup() {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-publish-memo-'));
  const cache = new Cache(path.join(dir, 'cache'));
  await cache.init();
  const build = async (b: string) => {
    const plan = compile(parseSpec(spec(b), 'spec.yaml', kinds), 'amd64', ['v'], kinds, facts);
    const r = await runPlan(plan, { cache, specDir: dir, jobs: 2, logDir: path.join(dir, 'logs') });
    return { plan, entries: r.entries };
  };
  const opts: PublishOptions = { outRoot: path.join(dir, 'images'), blobPath: (s) => cache.blobPath(s), builderVersion: 't', onCorrupt: (s) => cache.dropBlob(s), memoDir: path.join(dir, 'cache', 'published') };
  return { dir, cache, build, opts };
}

const ids = async (dir: string) => {
  const out: Record<string, string> = {};
  for (const n of (await fs.readdir(dir)).sort()) {
    const st = await fs.stat(path.join(dir, n), { bigint: true });
    out[n] = `${st.ino}:${st.ctimeNs}`;
  }
  const st = await fs.stat(dir, { bigint: true });
  out['.'] = `${st.ino}:${st.ctimeNs}`;
  return out;
};

test('an unchanged published set is left as it is: same inodes and ctimes, nothing rewritten', async () => {
  const { build, opts } = await setup();
  const { plan, entries } = await build('beta bytes');
  const first = await publish(plan, 'v', entries, opts);
  const before = await ids(first.dir);
  const again = await publish(plan, 'v', entries, opts);
  assert.equal(again.dir, first.dir);
  assert.deepEqual(await ids(first.dir), before);
  assert.equal(await fs.readFile(path.join(first.dir, 'b.txt'), 'utf8'), 'beta bytes');
});

test('a published file changed since is copied again from the cache, checked, and the memo does not vouch for it', async () => {
  const { build, opts } = await setup();
  const { plan, entries } = await build('beta bytes');
  const first = await publish(plan, 'v', entries, opts);
  // Same size, different bytes, mtime put back: only ctime tells.
  const f = path.join(first.dir, 'b.txt');
  const st = await fs.stat(f);
  await fs.writeFile(f, 'BETA bytes');
  await fs.utimes(f, st.atime, st.mtime);
  await publish(plan, 'v', entries, opts);
  assert.equal(await fs.readFile(f, 'utf8'), 'beta bytes');
});

test('a copy that must happen still fails on a corrupt blob', async () => {
  const { build, cache, opts } = await setup();
  const { plan, entries } = await build('beta bytes');
  const first = await publish(plan, 'v', entries, opts);
  await fs.writeFile(path.join(first.dir, 'b.txt'), 'tampered!!');
  const blob = cache.blobPath(entries.get('b')!.files[0]!.sha256);
  await fs.chmod(blob, 0o644);
  await fs.writeFile(blob, 'BETA bytes');
  await assert.rejects(publish(plan, 'v', entries, opts), (e: unknown) => e instanceof BuildError && /stage b file b\.txt: .*corrupt/.test(e.message));
});

test('when one file changes, the untouched ones are linked from the last publish, not copied', async () => {
  const { build, opts } = await setup();
  const one = await build('beta bytes');
  const first = await publish(one.plan, 'v', one.entries, opts);
  const aBefore = (await fs.stat(path.join(first.dir, 'a.txt'))).ino;
  const two = await build('gamma bytes');
  const second = await publish(two.plan, 'v', two.entries, opts);
  assert.equal((await fs.stat(path.join(second.dir, 'a.txt'))).ino, aBefore);
  assert.equal(await fs.readFile(path.join(second.dir, 'b.txt'), 'utf8'), 'gamma bytes');
  assert.match(await fs.readFile(path.join(second.dir, 'SHA256SUMS'), 'utf8'), /b\.txt/);
  // And without a memo dir every file is a fresh copy.
  const third = await publish(one.plan, 'v', one.entries, { ...opts, memoDir: undefined });
  assert.notEqual((await fs.stat(path.join(third.dir, 'a.txt'))).ino, aBefore);
});
