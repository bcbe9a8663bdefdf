// Locked, offline rebuilds end to end through the real CLI, real mmdebstrap and
// the real Debian mirror. The spec is a small dedicated one (bookworm, variant
// essential + hello: 70 packages, no kernel) written into a temp dir, so the lock
// can be written next to it and edited.
//   1. `lock` resolves it; a spec that adds a package is refused (exit 2) until
//      `lock` runs again, and `lock --update` prints only the added/removed ones;
//   2. `fetch` fills a store; a build under `unshare -n` (no network at all)
//      succeeds and its rootfs.tar is byte-identical to an online locked build;
//   3. a .deb changed in the store is caught before anything installs (exit 1);
//   4. "mirror moved": a lock needing a version the mirror does not serve builds
//      from the store when the .deb is there, and fails clearly offline when not.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync, appendFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { BIN } from '../helpers/cli.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'lock-test-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

const SPEC = (pkgs: string) => `name: lockfix
arches: [amd64]
source_date_epoch: 1704067200
stages:
  rootfs:
    kind: mmdebstrap
    with: { suite: bookworm, variant: essential, packages: [${pkgs}] }
variants:
  rootfs: [rootfs]
`;
const specFile = path.join(tmp, 'lockfix.yaml');
const lockFile = path.join(tmp, 'lockfix.lock');
const cacheOf = (n: string) => path.join(tmp, `cache-${n}`);

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** The CLI, optionally inside a new network namespace (`unshare -n`: only a loopback, down). */
function pipeline(args: string[], cache: string, opts: { netns?: boolean } = {}): Promise<Run> {
  const cmd = opts.netns ? 'unshare' : process.execPath;
  const argv = opts.netns ? ['-n', process.execPath, BIN, ...args] : [BIN, ...args];
  return new Promise((resolve, reject) => {
    const c = spawn(cmd, argv, { cwd: tmp, env: { ...process.env, PIPELINE_CACHE_DIR: cache }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d) => (stdout += d));
    c.stderr.on('data', (d) => (stderr += d));
    c.on('error', reject);
    c.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

const sha256 = (f: string) => createHash('sha256').update(readFileSync(f)).digest('hex');
const debLine = (pkg: string) => readFileSync(lockFile, 'utf8').split('\n').find((l) => l.startsWith(`deb ${pkg} `))!;
const storeDir = (cache: string) => path.join(cache, 'debs', 'sha256');

let skip: string | undefined;
before(async () => {
  if (process.getuid?.() !== 0) skip = 'needs root (mmdebstrap root mode, unshare -n)';
  else if (spawnSync('unshare', ['-n', 'true']).status !== 0) skip = 'unshare -n does not work here';
  else {
    const ok = await fetch('http://deb.debian.org/debian/dists/bookworm/InRelease', { method: 'HEAD', signal: AbortSignal.timeout(10_000) }).then((r) => r.ok, () => false);
    if (!ok) skip = 'the Debian mirror is not reachable';
  }
});

test('lock, then a spec that adds a package is refused until lock --update, which shows only the change', async (t) => {
  if (skip) return t.skip(skip);
  writeFileSync(specFile, SPEC('hello'));
  const r = await pipeline(['lock', '-f', specFile], cacheOf('a'));
  assert.equal(r.code, 0, r.stderr);
  const text = readFileSync(lockFile, 'utf8');
  assert.match(text, /^stage rootfs amd64$/m);
  assert.match(text, /^deb hello \S+ amd64 \S+ [0-9a-f]{64} \d+ pool\/main\/h\/hello\/hello_\S+_amd64\.deb$/m);
  // Essential packages count too, not only the listed one.
  for (const p of ['base-files', 'dpkg', 'libc6', 'coreutils']) assert.ok(debLine(p), `${p} is locked`);

  try {
    await staleThenUpdate();
  } finally {
    // Back to the original request and lock for the tests below.
    writeFileSync(specFile, SPEC('hello'));
    writeFileSync(lockFile, text);
  }
});

async function staleThenUpdate(): Promise<void> {
  writeFileSync(specFile, SPEC('hello, tree'));
  const stale = await pipeline(['build', 'amd64', 'rootfs', '-f', specFile, '-o', path.join(tmp, 'never')], cacheOf('a'));
  assert.equal(stale.code, 2, stale.stderr);
  assert.match(stale.stderr, /stage rootfs \(amd64\) does not match .*lockfix\.lock: package tree not in the lock: run `pipeline lock`/);

  writeFileSync(specFile, SPEC('tree'));
  const up = await pipeline(['lock', '--update', '-f', specFile], cacheOf('a'));
  assert.equal(up.code, 0, up.stderr);
  const lines = up.stdout.trim().split('\n');
  assert.equal(lines[0], 'rootfs (amd64):');
  assert.deepEqual(
    lines.slice(1).map((l) => l.replace(/: \S+ → \(removed\)$/, ': V → (removed)').replace(/\(added\) → \S+$/, '(added) → V')),
    ['  hello: V → (removed)', '  tree: (added) → V'],
  );
}

let onlineTar = '';
test('fetch, then a build with the network cut succeeds and matches an online locked build byte for byte', async (t) => {
  if (skip) return t.skip(skip);
  assert.ok(existsSync(lockFile), 'the first test wrote the lock');
  // The namespace really has no way out: only a loopback device.
  const dev = spawnSync('unshare', ['-n', 'cat', '/proc/net/dev'], { encoding: 'utf8' }).stdout;
  assert.deepEqual(dev.split('\n').slice(2).filter(Boolean).map((l) => l.trim().split(':')[0]), ['lo']);

  const f = await pipeline(['fetch', '-f', specFile], cacheOf('off'));
  assert.equal(f.code, 0, f.stderr);
  const locked = readFileSync(lockFile, 'utf8').split('\n').filter((l) => l.startsWith('deb ')).length;
  assert.equal(readdirSync(storeDir(cacheOf('off'))).length, locked);

  const off = await pipeline(['build', 'amd64', 'rootfs', '--offline', '-f', specFile, '-o', path.join(tmp, 'out-off')], cacheOf('off'), { netns: true });
  assert.equal(off.code, 0, off.stderr);

  // Online: an empty store, so the build itself downloads (and checks) every .deb.
  const on = await pipeline(['build', 'amd64', 'rootfs', '-f', specFile, '-o', path.join(tmp, 'out-on')], cacheOf('on'));
  assert.equal(on.code, 0, on.stderr);
  assert.equal(readdirSync(storeDir(cacheOf('on'))).length, locked);

  onlineTar = path.join(tmp, 'out-on', 'rootfs', 'amd64', 'rootfs.tar');
  assert.equal(sha256(path.join(tmp, 'out-off', 'rootfs', 'amd64', 'rootfs.tar')), sha256(onlineTar));
  // The image points at the real mirror, not at the local flat repository.
  const sources = spawnSync('tar', ['-xOf', onlineTar, './etc/apt/sources.list'], { encoding: 'utf8' }).stdout;
  assert.equal(sources, 'deb http://deb.debian.org/debian bookworm main\n');
  // Provenance names the lock section the stage installed.
  const prov = readFileSync(path.join(tmp, 'out-off', 'rootfs', 'amd64', 'provenance.intoto.json'), 'utf8');
  assert.match(prov, /"name": "pipeline-lock:rootfs"/);
});

/** A fresh cache whose store holds copies of the fetched .debs (copies: a tamper must not reach the others). */
function seededCache(name: string): string {
  const c = cacheOf(name);
  mkdirSync(storeDir(c), { recursive: true });
  for (const f of readdirSync(storeDir(cacheOf('off')))) copyFileSync(path.join(storeDir(cacheOf('off')), f), path.join(storeDir(c), f));
  return c;
}

test('a .deb changed in the store is detected before anything is installed', async (t) => {
  if (skip) return t.skip(skip);
  const c = seededCache('tamper');
  const [, name, version, , , want] = debLine('hello').split(' ');
  const file = path.join(storeDir(c), `${want}.deb`);
  appendFileSync(file, 'x');
  const found = sha256(file);
  const r = await pipeline(['build', 'amd64', 'rootfs', '--offline', '-f', specFile, '-o', path.join(tmp, 'out-t')], c, { netns: true });
  assert.equal(r.code, 1, r.stderr);
  assert.ok(r.stderr.includes(`${name} ${version} (amd64): .deb sha256 mismatch`), r.stderr);
  assert.ok(r.stderr.includes(`lock:  ${want}`) && r.stderr.includes(`found: ${found}`), r.stderr);
  // Nothing ran: no stage entry, no mmdebstrap log.
  assert.deepEqual(readdirSync(path.join(c, 'entries')), []);
  assert.ok(!existsSync(path.join(c, 'logs', 'lockfix', 'amd64', 'rootfs.log')));
});

test('mirror moved: a locked version the mirror no longer serves builds from the store, and fails clearly offline without it', async (t) => {
  if (skip) return t.skip(skip);
  // A hello .deb the mirror has never served: the real one, repacked under a new version.
  const [, , version, , , sha] = debLine('hello').split(' ');
  const work = path.join(tmp, 'repack');
  spawnSync('dpkg-deb', ['-R', path.join(storeDir(cacheOf('off')), `${sha}.deb`), work], { stdio: 'inherit' });
  const control = path.join(work, 'DEBIAN', 'control');
  const newVersion = `${version}+pipeline1`;
  writeFileSync(control, readFileSync(control, 'utf8').replace(/^Version: .*$/m, `Version: ${newVersion}`));
  const newDeb = path.join(tmp, 'hello-moved.deb');
  assert.equal(spawnSync('dpkg-deb', ['--root-owner-group', '-b', work, newDeb]).status, 0);
  const newSha = sha256(newDeb);

  const dir = path.join(tmp, 'moved');
  mkdirSync(dir);
  const spec = path.join(dir, 'lockfix.yaml');
  copyFileSync(specFile, spec);
  const edited = readFileSync(lockFile, 'utf8').replace(debLine('hello'), `deb hello ${newVersion} amd64 optional ${newSha} ${statSync(newDeb).size} pool/main/h/hello/hello_${newVersion}_amd64.deb`);
  writeFileSync(path.join(dir, 'lockfix.lock'), edited);

  const c = seededCache('moved');
  const out = path.join(tmp, 'out-moved');
  // Not in the store, offline: exit 1 naming the package and the fetch line.
  const miss = await pipeline(['build', 'amd64', 'rootfs', '--offline', '-f', spec, '-o', out], c, { netns: true });
  assert.equal(miss.code, 1, miss.stderr);
  assert.ok(miss.stderr.includes(`--offline: 1 locked .deb is not in the store`), miss.stderr);
  assert.ok(miss.stderr.includes(`hello ${newVersion} (amd64)`), miss.stderr);
  assert.ok(miss.stderr.includes(`pipeline fetch amd64 -f ${spec}`), miss.stderr);
  // Online the mirror cannot help either: it does not serve that version.
  const gone = await pipeline(['fetch', '-f', spec], c);
  assert.equal(gone.code, 1, gone.stderr);
  assert.match(gone.stderr, new RegExp(`hello ${newVersion.replace(/\+/g, '\\+')} \\(amd64\\): GET .*: HTTP 404`));

  // With the .deb in the store, the build works with the network cut.
  copyFileSync(newDeb, path.join(storeDir(c), `${newSha}.deb`));
  const ok = await pipeline(['build', 'amd64', 'rootfs', '--offline', '-f', spec, '-o', out], c, { netns: true });
  assert.equal(ok.code, 0, ok.stderr);
  const manifest = JSON.parse(readFileSync(path.join(out, 'rootfs', 'amd64', 'build-manifest.json'), 'utf8')) as { resolved: { packages: { name: string; version: string }[] } };
  assert.equal(manifest.resolved.packages.find((p) => p.name === 'hello')?.version, newVersion);
  assert.notEqual(sha256(path.join(out, 'rootfs', 'amd64', 'rootfs.tar')), onlineTar && sha256(onlineTar));
});


test('a hand-edited lock that does not parse stops plan and build with its location (exit 2)', async (t) => {
  if (skip) return t.skip(skip);
  const dir = path.join(tmp, 'broken');
  mkdirSync(dir);
  const spec = path.join(dir, 'lockfix.yaml');
  writeFileSync(spec, SPEC('hello'));
  writeFileSync(path.join(dir, 'lockfix.lock'), 'lock 1\nspec lockfix\n\nstage rootfs amd64\nmirror http://deb.debian.org/debian\ndeb hello 2.10-3 amd64 optional 12ab 1 pool/h.deb\n');
  for (const args of [['plan', 'amd64', 'rootfs'], ['build', 'amd64', 'rootfs', '--offline', '-o', path.join(dir, 'out')]]) {
    const r = await pipeline([...args, '-f', spec], cacheOf('broken'));
    assert.equal(r.code, 2, r.stderr);
    assert.ok(r.stderr.includes(`${path.join(dir, 'lockfix.lock')}:6:33: error: expected a sha256`), r.stderr);
  }
  assert.ok(!existsSync(path.join(dir, 'out')));
});
