// Fault injection into the cache, through the real CLI. Every test has its own
// PIPELINE_CACHE_DIR and uses the fixture kinds (fixtures/kinds, no Debian
// mirror): `base` writes shared.txt and `copy` copies it, so the two records
// share one blob, as the initramfs and ipxe records share the initrd.
// The property: after any damage, a build either publishes exactly what a clean
// build publishes, or exits 1 naming the stage, the file and both digests.
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { cli, ROOT, summary, type CliResult } from '../helpers/cli.js';

const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-cache-faults-'));
after(() => fs.rm(work, { recursive: true, force: true }));
const SPEC = path.join(work, 'spec.yaml');
const SLOW_KINDS = path.join(work, 'kinds');
const KINDS = `${path.join(ROOT, 'fixtures', 'kinds')}:${SLOW_KINDS}`;

let n = 0;
const fresh = (label: string) => path.join(work, `${label}-${n++}`);

function build(cache: string, out: string, variants = ['a', 'b'], env: Record<string, string> = {}, extra: string[] = []): Promise<CliResult> {
  return cli(['build', 'amd64', ...variants, '-f', SPEC, '--out', out, '--json', ...extra], { env: { PIPELINE_CACHE_DIR: cache, PIPELINE_KINDS_PATH: KINDS, ...env } });
}
function cacheCmd(cache: string, args: string[]): Promise<CliResult> {
  return cli(['cache', ...args, '--cache-dir', cache], { env: { PIPELINE_KINDS_PATH: KINDS } });
}

/** Every published file (SHA256SUMS, manifest and provenance included) -> sha256 of its bytes. */
async function published(out: string): Promise<Record<string, string>> {
  const res: Record<string, string> = {};
  const walk = async (dir: string) => {
    for (const e of await fs.readdir(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) await walk(p);
      else res[path.relative(out, p)] = createHash('sha256').update(await fs.readFile(p)).digest('hex');
    }
  };
  await walk(out);
  return res;
}

let clean: Record<string, string>;
let cleanCache: string;

before(async () => {
  await fs.writeFile(
    SPEC,
    `name: faults
arches: [amd64]
source_date_epoch: 1704067200
stages:
  base:
    kind: fixed-text
    with: { name: shared.txt, content: "the same bytes in two records\\n" }
  copy:
    kind: collect
    inputs: { src: base }
  slow:
    kind: slow-copy
    inputs: { src: base }
variants:
  a: [base]
  b: [copy]
  s: [slow]
`,
  );
  await fs.mkdir(SLOW_KINDS);
  // Lives outside the package, so zod is imported by its resolved URL.
  // Writes scratch and output bytes, then waits (FAULTS_SLEEP_MS, not part of the key) so a test can kill the build mid-stage.
  await fs.writeFile(
    path.join(SLOW_KINDS, 'slow-copy.mjs'),
    `import { copyFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from '${import.meta.resolve('zod')}';
export default {
  kind: 'slow-copy', version: '1', summary: 'copies its input after writing scratch (test)', params: z.object({}).strict(), inputs: ['src'], tools: () => [],
  async run(ctx) {
    await writeFile(join(ctx.workDir, 'scratch.bin'), Buffer.alloc(3 << 20, 1));
    await writeFile(join(ctx.outDir, 'big.bin'), Buffer.alloc(2 << 20, 2));
    for (const f of ctx.inputs.src.files) await copyFile(join(ctx.inputs.src.dir, f), join(ctx.outDir, f));
    await writeFile(join(ctx.workDir, 'ready'), '');
    await new Promise((r) => setTimeout(r, Number(process.env.FAULTS_SLEEP_MS ?? 0)));
  },
};
`,
  );
  cleanCache = fresh('clean-cache');
  const out = fresh('clean-out');
  const r = await build(cleanCache, out);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(summary(r).executed.sort(), ['base', 'copy']);
  clean = await published(out);
  assert.ok(clean['a/amd64/SHA256SUMS'] && clean['b/amd64/shared.txt']);
});

/** A built cache to damage: a hardlink-preserving copy of the clean one. */
async function builtCache(): Promise<string> {
  const c = fresh('cache');
  execFileSync('cp', ['-a', cleanCache, c]);
  return c;
}

async function record(cache: string, stage: string): Promise<{ file: string; key: string; files: { path: string; sha256: string }[] }> {
  for (const n of await fs.readdir(path.join(cache, 'entries'))) {
    const file = path.join(cache, 'entries', n);
    const v = JSON.parse(await fs.readFile(file, 'utf8'));
    if (v.stage === stage) return { file, key: v.key, files: v.files };
  }
  throw new Error(`no record for ${stage}`);
}
const blobOf = (cache: string, sha: string) => path.join(cache, 'blobs', 'sha256', sha.slice(0, 2), sha);

async function flip(file: string, at: number): Promise<void> {
  const b = await fs.readFile(file);
  b[at] = b[at]! ^ 0x20;
  const mode = (await fs.stat(file)).mode;
  await fs.chmod(file, 0o644);
  await fs.writeFile(file, b); // in place: the same inode, as a stray writer would
  await fs.chmod(file, mode & 0o777);
}

/** The property: exactly the clean bytes, or exit 1 naming stage, file and both digests (and nothing new published). */
async function assertCleanOrNamed(r: CliResult, out: string, what: string): Promise<'clean' | 'named'> {
  if (r.code === 0) {
    assert.deepEqual(await published(out), clean, `${what}: exit 0 must mean the clean bytes`);
    return 'clean';
  }
  assert.equal(r.code, 1, `${what}: exit ${r.code}\n${r.stderr}`);
  assert.match(r.stderr, /stage \S+ .*file \S+.*expected sha256 [0-9a-f]{64}.*found/s, `${what}: ${r.stderr}`);
  assert.equal(existsSync(out) ? (await published(out))['a/amd64/SHA256SUMS'] : undefined, undefined, `${what}: nothing published`);
  return 'named';
}

test('a flipped byte in a blob two records share: both stages rebuilt, the clean bytes published', async () => {
  const cache = await builtCache();
  const base = await record(cache, 'base');
  const copy = await record(cache, 'copy');
  assert.equal(base.files[0]!.sha256, copy.files[0]!.sha256, 'the fixture shares the blob');
  await flip(blobOf(cache, base.files[0]!.sha256), 4);
  const out = fresh('out');
  const r = await build(cache, out, ['a', 'b'], {}, ['--verbose']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(summary(r).executed.sort(), ['base', 'copy']);
  assert.match(r.stdout + r.stderr, new RegExp(`corrupt for stage (base|copy) file shared\\.txt.*expected sha256 ${base.files[0]!.sha256}.*found sha256 [0-9a-f]{64}`));
  assert.deepEqual(await published(out), clean);
  const again = await build(cache, fresh('out'));
  assert.deepEqual(summary(again).executed, [], 'repaired: the next build is a no-op');
});

test('a missing blob is a miss that is rebuilt, not an ENOENT crash', async () => {
  const cache = await builtCache();
  const base = await record(cache, 'base');
  await fs.rm(blobOf(cache, base.files[0]!.sha256));
  const out = fresh('out');
  const r = await build(cache, out);
  assert.equal(r.code, 0, r.stderr);
  assert.doesNotMatch(r.stderr, /ENOENT/);
  assert.deepEqual(summary(r).executed.sort(), ['base', 'copy']);
  assert.deepEqual(await published(out), clean);
});

test('a tree file replaced by other bytes is not handed to a stage; one changed in place is a corrupt blob', async () => {
  const cache = await builtCache();
  const base = await record(cache, 'base');
  const copy = await record(cache, 'copy');
  const treeFile = path.join(cache, 'trees', base.key, 'shared.txt');
  assert.ok(existsSync(treeFile));
  // New inode with other bytes, and copy must run again (its record is gone) so the tree is used.
  await fs.rm(treeFile);
  await fs.writeFile(treeFile, 'evil bytes\n');
  await fs.rm(copy.file);
  let out = fresh('out');
  let r = await build(cache, out);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(summary(r).executed, ['copy']);
  assert.deepEqual(await published(out), clean);
  // In place: the tree file is the blob's inode.
  await flip(treeFile, 0);
  await fs.rm((await record(cache, 'copy')).file);
  out = fresh('out');
  r = await build(cache, out);
  assert.equal(await assertCleanOrNamed(r, out, 'tree changed in place'), 'clean');
  assert.deepEqual(summary(r).executed.sort(), ['base', 'copy']);
});

test('a garbage record, or a record filed under another key, is a miss', async () => {
  const cache = await builtCache();
  const base = await record(cache, 'base');
  const copy = await record(cache, 'copy');
  await fs.writeFile(base.file, 'garbage{');
  let out = fresh('out');
  let r = await build(cache, out);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(summary(r).executed, ['base']);
  assert.deepEqual(await published(out), clean);
  await fs.copyFile(base.file, copy.file); // copy's file name, base's content
  out = fresh('out');
  r = await build(cache, out);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(summary(r).executed, ['copy']);
  assert.deepEqual(await published(out), clean);
});

test('a tampered verified memo costs a re-hash, nothing more', async () => {
  const cache = await builtCache();
  const base = await record(cache, 'base');
  const memo = path.join(cache, 'verified', base.key);
  await flip(memo, 70);
  const out = fresh('out');
  const r = await build(cache, out);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(summary(r).executed, []);
  assert.deepEqual(await published(out), clean);
});

test('a corrupted history file does not crash explain or build', async () => {
  const cache = await builtCache();
  const hist = path.join(cache, 'history', 'faults', 'amd64', 'base.json');
  // Misses, so explain diffs against the history.
  await fs.rm(path.join(cache, 'entries'), { recursive: true });
  await fs.writeFile(hist, '{"key":"abc","parts":null}');
  const e = await cli(['explain', 'amd64', 'a', 'b', '-f', SPEC], { env: { PIPELINE_CACHE_DIR: cache, PIPELINE_KINDS_PATH: KINDS } });
  assert.equal(e.code, 0, e.stderr);
  await fs.writeFile(hist, 'not json at all');
  const e2 = await cli(['explain', 'amd64', 'a', 'b', '-f', SPEC], { env: { PIPELINE_CACHE_DIR: cache, PIPELINE_KINDS_PATH: KINDS } });
  assert.equal(e2.code, 0, e2.stderr);
  assert.match(e2.stdout, /never built/);
  const out = fresh('out');
  const r = await build(cache, out);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(await published(out), clean);
});

test('any byte of any cache file changed: the next build publishes the clean bytes or exits 1 naming it', async () => {
  const probe = await builtCache();
  const files: string[] = [];
  for (const top of ['blobs', 'entries', 'trees', 'history', 'verified']) {
    const walk = async (d: string) => {
      for (const e of await fs.readdir(d, { withFileTypes: true })) {
        if (e.isDirectory()) await walk(path.join(d, e.name));
        else files.push(path.relative(probe, path.join(d, e.name)));
      }
    };
    await walk(path.join(probe, top));
  }
  assert.ok(files.length >= 7, files.join(' '));
  const outcomes: Record<string, number> = { clean: 0, named: 0 };
  for (const rel of files.sort()) {
    const size = (await fs.stat(path.join(probe, rel))).size;
    for (const at of [...new Set([0, Math.floor(size / 2), size - 1])].filter((i) => i >= 0 && size > 0)) {
      const cache = await builtCache();
      await flip(path.join(cache, rel), at);
      const out = fresh('out');
      const r = await build(cache, out);
      outcomes[await assertCleanOrNamed(r, out, `${rel} byte ${at}`)]!++;
      // And the build after that is clean whatever happened.
      const out2 = fresh('out');
      const r2 = await build(cache, out2);
      assert.equal(r2.code, 0, `${rel} byte ${at}, second build: ${r2.stderr}`);
      assert.deepEqual(await published(out2), clean, `${rel} byte ${at}, second build`);
    }
  }
  assert.ok(outcomes.clean! > 0);
});

test('cache verify lists a bad blob with both digests and its records; --repair drops it and the next build rebuilds', async () => {
  const cache = await builtCache();
  const ok = await cacheCmd(cache, ['verify']);
  assert.equal(ok.code, 0, ok.stdout + ok.stderr);
  assert.match(ok.stdout, /^ok: 2 records and 1 blobs re-hashed/m);
  const base = await record(cache, 'base');
  const sha = base.files[0]!.sha256;
  await flip(blobOf(cache, sha), 1);
  await fs.writeFile(path.join(cache, 'verified', base.key), 'forged memo\n');
  const bad = await cacheCmd(cache, ['verify']);
  assert.equal(bad.code, 1);
  assert.match(bad.stdout, new RegExp(`bad blob blobs/sha256/${sha.slice(0, 2)}/${sha}: .*expected sha256 ${sha}, found sha256 (?!${sha})[0-9a-f]{64} \\(records: (base|copy) \\w+, (base|copy) \\w+\\)`));
  assert.ok(existsSync(blobOf(cache, sha)), 'verify alone changes nothing');
  const rep = await cacheCmd(cache, ['verify', '--repair']);
  assert.equal(rep.code, 1);
  assert.match(rep.stdout, /repaired/);
  const after = await cacheCmd(cache, ['verify']);
  assert.equal(after.code, 0, after.stdout);
  const out = fresh('out');
  const r = await build(cache, out);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(summary(r).executed.sort(), ['base', 'copy']);
  assert.deepEqual(await published(out), clean);
});

/** A real process that takes a staging dir from the cache (the compiled CLI's code) and holds it until killed. */
function holder(cache: string, label: string): Promise<{ kill: () => Promise<void>; dir: string }> {
  const script = `import { Cache } from ${JSON.stringify(path.join(ROOT, 'dist', 'src', 'engine', 'cache.js'))};
    const c = new Cache(${JSON.stringify(cache)});
    await c.init();
    const d = await c.staging(${JSON.stringify(label)});
    const fs = await import('node:fs/promises');
    await fs.writeFile(d + '/scratch.bin', Buffer.alloc(1 << 20));
    console.log(d);
    setInterval(() => {}, 1000);`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  const exited = new Promise((r) => child.once('exit', r));
  return new Promise((resolve, reject) => {
    child.stdout.once('data', (d) =>
      resolve({
        dir: String(d).trim(),
        kill: async () => {
          child.kill('SIGKILL');
          await exited;
        },
      }),
    );
    child.once('exit', (code) => reject(new Error(`holder exited ${code}`)));
  });
}

test('a build removes a SIGKILLed owner\'s temp dirs and keeps a live concurrent owner\'s', async () => {
  const cache = await builtCache();
  const dead = await holder(cache, 'work-dead');
  const live = await holder(cache, 'work-live');
  try {
    await dead.kill();
    const r = await build(cache, fresh('out'));
    assert.equal(r.code, 0, r.stderr);
    assert.equal(existsSync(dead.dir), false, 'dead owner\'s dir removed');
    assert.ok(existsSync(path.join(live.dir, 'scratch.bin')), 'live owner\'s dir kept');
    assert.deepEqual(await fs.readdir(path.join(cache, 'tmp')), [path.basename(live.dir)]);
  } finally {
    await live.kill();
  }
});

/** Every file under the cache with its size, and the total. */
async function footprint(cache: string): Promise<{ files: [string, number][]; bytes: number }> {
  const files: [string, number][] = [];
  const walk = async (d: string) => {
    for (const e of await fs.readdir(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) await walk(p);
      // The scheduler's stage timings (durations.json) are wall-clock seconds: their length varies.
      else files.push([path.relative(cache, p), e.name === 'durations.json' ? -1 : (await fs.lstat(p)).size]);
    }
  };
  await walk(cache);
  files.sort((a, b) => (a[0] < b[0] ? -1 : 1));
  return { files, bytes: files.reduce((s, f) => s + f[1], 0) };
}

test('kill -9 mid-stage, then a build: the cache holds exactly what an uninterrupted build leaves', async () => {
  const straight = fresh('straight');
  // One output dir for all three builds: the cache's publish memo is named after it.
  const out = fresh('out');
  const r0 = await build(straight, out, ['s']);
  assert.equal(r0.code, 0, r0.stderr);

  const cache = fresh('killed');
  const child = spawn(process.execPath, [path.join(ROOT, 'bin', 'pipeline.js'), 'build', 'amd64', 's', '-f', SPEC, '--out', out], {
    env: { ...process.env, PIPELINE_CACHE_DIR: cache, PIPELINE_KINDS_PATH: KINDS, FAULTS_SLEEP_MS: '60000' },
    stdio: 'ignore',
  });
  const exited = new Promise((r) => child.once('exit', r));
  const tmp = path.join(cache, 'tmp');
  const deadline = Date.now() + 30_000;
  const ready = async () => (await fs.readdir(tmp).catch(() => [] as string[])).some((n) => n.startsWith('work-slow-') && existsSync(path.join(tmp, n, 'ready')));
  while (!(await ready())) {
    assert.ok(Date.now() < deadline, 'the slow stage never started');
    await new Promise((r) => setTimeout(r, 50));
  }
  child.kill('SIGKILL');
  await exited;
  assert.ok((await footprint(cache)).files.some(([p]) => p.startsWith('tmp/')), 'the killed build left its temp dirs');

  const r = await build(cache, out, ['s']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(await fs.readdir(tmp), []);
  const [a, b] = [await footprint(straight), await footprint(cache)];
  assert.deepEqual(b.files, a.files);
  assert.equal(b.bytes, a.bytes);
});
