// The pkg-repo kind against the real tools a FreeBSD repository meets: keys made
// by the openssl CLI, signatures compared with `openssl dgst -sign` byte for byte,
// archives read by bsdtar (libarchive, what pkg itself links) and zstd, packages
// crafted in the +COMPACT_MANIFEST/+MANIFEST layout, the `pkg-repo verify` CLI, and
// the fixture spec built end to end. No FreeBSD `pkg` runs here: Debian has none.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmod, cp, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import pkgRepo from '../../outputs/pkg-repo.js';
import { checkManifest, packPkg, packTar, type Manifest } from '../../src/lib/pkgrepo/format.js';
import { inputFrom, listFiles, runStage } from '../helpers/run-stage.js';
import { cli, ROOT } from '../helpers/cli.js';

const run = promisify(execFile);
const sha = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');
const bsdtarOut = async (archive: string, member: string) => (await run('bsdtar', ['-xOf', archive, member], { encoding: 'buffer', maxBuffer: 1 << 26 })).stdout as Buffer;

let dir: string;
let pkgDir: string;
const manifests: Manifest[] = [
  checkManifest({ name: 'nginx', origin: 'www/nginx', version: '1.26.2_1,3', comment: 'Robust web server', maintainer: 'joneum@FreeBSD.org', www: 'https://nginx.org/', abi: 'FreeBSD:14:amd64', arch: 'freebsd:14:x86:64', prefix: '/usr/local', licenselogic: 'single', licenses: ['BSD2CLAUSE'], desc: 'nginx', deps: { pcre2: { origin: 'devel/pcre2', version: '10.44' } }, categories: ['www'] }, 't'),
  checkManifest({ name: 'pcre2', origin: 'devel/pcre2', version: '10.44', comment: 'Perl Compatible Regular Expressions library, version 2', maintainer: 'ports@FreeBSD.org', abi: 'FreeBSD:14:amd64', prefix: '/usr/local', desc: 'pcre2', categories: ['devel'] }, 't'),
];

before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'pkgrepo-it-'));
  pkgDir = path.join(dir, 'pkgs');
  await mkdir(pkgDir);
  // One package gzip-compressed (Node), one zstd-compressed by the real zstd CLI (tzst, poudriere's default).
  await writeFile(path.join(pkgDir, 'nginx-1.26.2_1,3.pkg'), gzipSync(packPkg(manifests[0]!, [{ path: 'sbin/nginx', content: '\x7fELF fake', mode: 0o755 }, { path: 'etc/nginx/nginx.conf-dist', content: 'worker_processes 1;\n' }], 1704067200)));
  await writeFile(path.join(dir, 'pcre2.tar'), packPkg(manifests[1]!, [{ path: 'lib/libpcre2-8.so.0', content: 'lib' }], 1704067200));
  await run('zstd', ['-q', '-19', path.join(dir, 'pcre2.tar'), '-o', path.join(pkgDir, 'pcre2-10.44.pkg')]);
  // Keys from the openssl CLI, as `pkg repo` users make them (pkg-repo(8)).
  await run('openssl', ['genrsa', '-out', path.join(dir, 'repo.key'), '2048']);
  await run('openssl', ['rsa', '-in', path.join(dir, 'repo.key'), '-pubout', '-out', path.join(dir, 'repo.pub')]);
  await run('openssl', ['genrsa', '-out', path.join(dir, 'other.key'), '2048']);
  await run('openssl', ['rsa', '-in', path.join(dir, 'other.key'), '-pubout', '-out', path.join(dir, 'other.pub')]);
  // The signing_command example from pkg-repo(8), with openssl.
  await writeFile(
    path.join(dir, 'sign.sh'),
    `#!/bin/sh\nread -r sum\n[ -n "$sum" ] || exit 1\necho SIGNATURE\nprintf %s "$sum" | openssl dgst -sign "${path.join(dir, 'repo.key')}" -sha256 -binary\necho\necho CERT\ncat "${path.join(dir, 'repo.pub')}"\necho END\n`,
  );
  await chmod(path.join(dir, 'sign.sh'), 0o755);
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

const rel = (p: string) => path.relative(process.cwd(), p);

async function buildRepo(params: Record<string, unknown>, outName: string) {
  const outDir = path.join(dir, outName);
  await mkdir(outDir);
  return runStage(pkgRepo, { params, inputs: { packages: await inputFrom(pkgDir) }, outDir });
}

test('signatures match `openssl dgst -sha256 -sign` byte for byte; key and fingerprint files as openssl sees them', async () => {
  const r = await buildRepo({ signing_key: rel(path.join(dir, 'repo.key')) }, 'out-key');
  assert.deepEqual(r.files, ['All/nginx-1.26.2_1,3.pkg', 'All/pcre2-10.44.pkg', 'data.pkg', 'meta.conf', 'packagesite.pkg', 'repo.fingerprint', 'repo.pub']);
  for (const [archive, member] of [['packagesite.pkg', 'packagesite.yaml'], ['data.pkg', 'data']] as const) {
    const a = path.join(r.outDir, archive);
    const listing = (await run('bsdtar', ['-tf', a])).stdout.trim().split('\n');
    assert.deepEqual(listing, ['signature', `${member}.sig`, `${member}.pub`, member]);
    const hex = sha(await bsdtarOut(a, member));
    const { stdout: want } = await run('sh', ['-c', 'printf %s "$1" | openssl dgst -sha256 -sign "$2"', 'sh', hex, path.join(dir, 'repo.key')], { encoding: 'buffer' });
    assert.deepEqual(await bsdtarOut(a, 'signature'), want, `${archive}: signature differs from openssl's`);
    assert.deepEqual(await bsdtarOut(a, `${member}.sig`), want);
    // And openssl accepts it under the public key.
    await writeFile(path.join(dir, 'sig.bin'), want);
    const v = await run('sh', ['-c', 'printf %s "$1" | openssl dgst -sha256 -verify "$2" -signature "$3"', 'sh', hex, path.join(dir, 'repo.pub'), path.join(dir, 'sig.bin')]);
    assert.match(v.stdout, /Verified OK/);
  }
  const pub = await readFile(path.join(dir, 'repo.pub'));
  assert.deepEqual(await readFile(path.join(r.outDir, 'repo.pub')), pub);
  assert.equal(await readFile(path.join(r.outDir, 'repo.fingerprint'), 'utf8'), `function: "sha256"\nfingerprint: "${sha(pub)}"\n`);
  assert.equal(r.meta.fingerprint, sha(pub));
});

test('catalogue entries match the crafted manifests; packages copied byte for byte with their sums', async () => {
  const out = path.join(dir, 'out-key');
  assert.match(await readFile(path.join(out, 'meta.conf'), 'utf8'), /^version = 2;\npacking_format = "tgz";/);
  const lines = (await bsdtarOut(path.join(out, 'packagesite.pkg'), 'packagesite.yaml')).toString().trim().split('\n').map((l) => JSON.parse(l));
  const data = JSON.parse((await bsdtarOut(path.join(out, 'data.pkg'), 'data')).toString());
  assert.deepEqual(data.packages, lines, 'data and packagesite.yaml carry the same entries');
  assert.deepEqual(data.groups, []);
  assert.deepEqual(lines.map((l) => l.name), ['nginx', 'pcre2']);
  for (const m of manifests) {
    const e = lines.find((l) => l.name === m.name);
    for (const k of ['origin', 'version', 'comment', 'abi', 'prefix', 'deps', 'categories'] as const) assert.deepEqual(e[k], (m as Record<string, unknown>)[k], `${m.name}.${k}`);
    const src = await readFile(path.join(pkgDir, `${m.name}-${m.version}.pkg`));
    const pub = await readFile(path.join(out, e.repopath));
    assert.deepEqual(pub, src, `${e.repopath} is the input package unchanged`);
    assert.equal(e.sum, (await run('sha256sum', [path.join(out, e.repopath)])).stdout.split(' ')[0]);
    assert.equal(e.pkgsize, src.length);
    assert.equal(e.path, `All/${m.name}-${m.version}.pkg`);
    assert.equal(e.files, undefined);
    // bsdtar reads the package and finds the manifest first, as pkg expects.
    const members = (await run('bsdtar', ['-tf', path.join(out, e.repopath)])).stdout.trim().split('\n');
    assert.deepEqual(members.slice(0, 2), ['+COMPACT_MANIFEST', '+MANIFEST']);
  }
  await run('zstd', ['-t', '-q', path.join(out, 'All/pcre2-10.44.pkg')]);
});

test('two builds from the same packages are byte-identical', async () => {
  const a = path.join(dir, 'out-key');
  const b = (await buildRepo({ signing_key: rel(path.join(dir, 'repo.key')) }, 'out-key-2')).outDir;
  const files = await listFiles(a);
  assert.deepEqual(await listFiles(b), files);
  for (const f of files) assert.deepEqual(await readFile(path.join(b, f)), await readFile(path.join(a, f)), f);
});

test('signing_command (pkg protocol) gives the same signatures as the key; a lying command fails the stage', async () => {
  const r = await buildRepo({ signing_command: [path.join(dir, 'sign.sh')] }, 'out-cmd');
  for (const f of ['packagesite.pkg', 'data.pkg', 'repo.fingerprint', 'repo.pub']) {
    assert.deepEqual(await readFile(path.join(r.outDir, f)), await readFile(path.join(dir, 'out-key', f)), `${f}: PKCS#1 v1.5 is deterministic`);
  }
  await writeFile(path.join(dir, 'liar.sh'), `#!/bin/sh\nread -r sum\necho SIGNATURE\nhead -c 256 /dev/zero\necho\necho CERT\ncat "${path.join(dir, 'repo.pub')}"\necho END\n`);
  await chmod(path.join(dir, 'liar.sh'), 0o755);
  await assert.rejects(buildRepo({ signing_command: [path.join(dir, 'liar.sh')] }, 'out-liar'), /does not verify under the CERT it printed/);
  assert.throws(() => pkgRepo.params.parse({}), /exactly one of signing_key or signing_command/);
});

async function verify(repo: string, ...trust: string[]) {
  const r = await cli(['pkg-repo', 'verify', repo, ...trust]);
  return { code: r.code, err: r.stderr };
}

test('pkg-repo verify: passes a good repo; each attack fails with its own message', async () => {
  const good = path.join(dir, 'out-key');
  const ok = await verify(good, '--pubkey', path.join(dir, 'repo.pub'));
  assert.equal(ok.code, 0, ok.err);
  assert.match(ok.err, /2 packages/);
  const okFp = await verify(good, '--fingerprint', path.join(good, 'repo.fingerprint'));
  assert.equal(okFp.code, 0, okFp.err);

  const wrongKey = await verify(good, '--pubkey', path.join(dir, 'other.pub'));
  assert.equal(wrongKey.code, 1);
  assert.match(wrongKey.err, /failed \(wrong-key\): packagesite\.pkg: the signature was not made with the given key/);

  await writeFile(path.join(dir, 'other.fp'), `function: "sha256"\nfingerprint: "${sha(await readFile(path.join(dir, 'other.pub')))}"\n`);
  const untrusted = await verify(good, '--fingerprint', path.join(dir, 'other.fp'));
  assert.equal(untrusted.code, 1);
  assert.match(untrusted.err, /failed \(untrusted\): packagesite\.pkg is signed by a key with fingerprint [0-9a-f]{64}, which is not among the trusted/);

  // Tampered catalogue: a sum changed, the old signature entries kept.
  const tampered = path.join(dir, 'tampered');
  await cp(good, tampered, { recursive: true });
  const yaml = (await bsdtarOut(path.join(good, 'packagesite.pkg'), 'packagesite.yaml')).toString().replace(/"comment":"Robust web server"/, '"comment":"Robust web server, trust me"');
  const sig = await bsdtarOut(path.join(good, 'packagesite.pkg'), 'signature');
  await writeFile(path.join(tampered, 'packagesite.pkg'), gzipSync(packTar([{ name: 'signature', data: sig }, { name: 'packagesite.yaml', data: Buffer.from(yaml) }], 0)));
  const t = await verify(tampered, '--pubkey', path.join(dir, 'repo.pub'));
  assert.equal(t.code, 1);
  assert.match(t.err, /failed \(tampered\): packagesite\.pkg: packagesite\.yaml does not match its signature/);

  // A package whose bytes changed after the catalogue was signed.
  const swapped = path.join(dir, 'swapped');
  await cp(good, swapped, { recursive: true });
  const p = path.join(swapped, 'All/pcre2-10.44.pkg');
  const bytes = await readFile(p);
  bytes[bytes.length - 1] ^= 1;
  await writeFile(p, bytes);
  const s = await verify(swapped, '--pubkey', path.join(dir, 'repo.pub'));
  assert.equal(s.code, 1);
  assert.match(s.err, /failed \(sum-mismatch\): All\/pcre2-10\.44\.pkg: bytes do not match its sum/);

  assert.equal(new Set([wrongKey.err, untrusted.err, t.err, s.err]).size, 4);

  // A poudriere-made repository has zstd catalogues (tzst): the verifier reads them with the zstd CLI.
  const tzst = path.join(dir, 'tzst');
  await cp(good, tzst, { recursive: true });
  for (const f of ['packagesite.pkg', 'data.pkg']) {
    await run('sh', ['-c', 'gzip -dc "$1" | zstd -q -c > "$1.new" && mv "$1.new" "$1"', 'sh', path.join(tzst, f)]);
  }
  const z = await verify(tzst, '--pubkey', path.join(dir, 'repo.pub'));
  assert.equal(z.code, 0, z.err);
  await run('zstd', ['-t', '-q', path.join(tzst, 'data.pkg')]);
  assert.equal((await verify(good)).code, 2, 'no trust given is a usage error');
});

test('fixtures/pkgrepo.yaml publishes a verifiable repository on Debian (pkg-create -> pkg-repo)', async () => {
  const work = path.join(dir, 'fixture');
  await mkdir(work);
  await cp(path.join(ROOT, 'fixtures'), path.join(work, 'fixtures'), { recursive: true });
  const b = await cli(['build', '-f', 'fixtures/pkgrepo.yaml', 'amd64', 'pkgrepo'], { cwd: work });
  assert.equal(b.code, 0, b.stderr);
  const out = path.join(work, 'images/pkgrepo/amd64');
  const files = await listFiles(out);
  for (const f of ['meta.conf', 'packagesite.pkg', 'data.pkg', 'repo.pub', 'repo.fingerprint', 'All/pipeline-motd-1.0.pkg', 'All/pipeline-config-2.1_1.pkg']) assert.ok(files.includes(f), `${f} published (have ${files.join(', ')})`);
  const v = await verify(out, '--fingerprint', path.join(out, 'repo.fingerprint'));
  assert.equal(v.code, 0, v.err);
  const cfg = (await bsdtarOut(path.join(out, 'All/pipeline-config-2.1_1.pkg'), '/usr/local/etc/pipeline/site.conf')).toString();
  assert.equal(cfg, 'site = example\n');
});
