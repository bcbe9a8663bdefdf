// pushLayout against Debian's real distribution registry, read back with skopeo.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { pack } from 'tar-stream';
import {
  InvalidRefError,
  LayoutBlobMissingError,
  RegistryAuthError,
  RegistryDigestMismatchError,
  RegistryUnreachableError,
  pushLayout,
} from '../../src/registry/registry.js';
import { freePort, startRegistry, type RegistryServer } from '../helpers/registry-server.js';

const EPOCH = new Date(1704067200 * 1000);
const sha = (b: Buffer) => 'sha256:' + createHash('sha256').update(b).digest('hex');

async function tarOf(files: Record<string, Buffer>): Promise<Buffer> {
  const p = pack();
  const chunks: Buffer[] = [];
  p.on('data', (c: unknown) => chunks.push(c as Buffer));
  const done = new Promise<void>((res, rej) => (p.on('end', res), p.on('error', rej)));
  for (const name of Object.keys(files).sort()) {
    p.entry({ name, type: 'file', mode: 0o644, mtime: EPOCH, uid: 0, gid: 0 }, files[name]);
  }
  p.finalize();
  await done;
  return Buffer.concat(chunks);
}

function noise(size: number, seed: string): Buffer {
  const c = createCipheriv('aes-128-ctr', createHash('sha256').update(seed).digest().subarray(0, 16), Buffer.alloc(16));
  return c.update(Buffer.alloc(size));
}

interface Layout {
  dir: string;
  manifestDigest: string;
  /** Digest of what index.json's ref points to (the index when wrapped). */
  topDigest: string;
  blobs: string[];
}

/** A minimal valid OCI layout: one gzip layer, a config, a manifest (optionally wrapped in an index). */
async function buildLayout(root: string, tag: string, files: Record<string, Buffer>, opts: { wrapInIndex?: boolean } = {}): Promise<Layout> {
  const dir = join(root, `layout-${tag}-${opts.wrapInIndex ? 'idx' : 'img'}`);
  await mkdir(join(dir, 'blobs', 'sha256'), { recursive: true });
  const put = async (b: Buffer) => {
    const d = sha(b);
    await writeFile(join(dir, 'blobs', 'sha256', d.slice(7)), b);
    return { digest: d, size: b.length };
  };
  const tar = await tarOf(files);
  const layer = await put(gzipSync(tar, { level: 9 }));
  const config = await put(
    Buffer.from(JSON.stringify({ architecture: 'amd64', os: 'linux', config: {}, rootfs: { type: 'layers', diff_ids: [sha(tar)] } })),
  );
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', ...config },
      layers: [{ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', ...layer }],
    }),
  );
  const m = await put(manifest);
  let top = { mediaType: 'application/vnd.oci.image.manifest.v1+json', ...m };
  if (opts.wrapInIndex) {
    const idx = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: 'application/vnd.oci.image.index.v1+json',
        manifests: [{ mediaType: 'application/vnd.oci.image.manifest.v1+json', ...m, platform: { architecture: 'amd64', os: 'linux' } }],
      }),
    );
    top = { mediaType: 'application/vnd.oci.image.index.v1+json', ...(await put(idx)) };
  }
  await writeFile(join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  await writeFile(
    join(dir, 'index.json'),
    JSON.stringify({ schemaVersion: 2, manifests: [{ ...top, annotations: { 'org.opencontainers.image.ref.name': tag } }] }),
  );
  return { dir, manifestDigest: m.digest, topDigest: top.digest, blobs: [config.digest, layer.digest].sort() };
}

/** The manifest digest as skopeo sees it after copying the image back out of the registry. */
function skopeoPullDigest(host: string, repo: string, tag: string, dest: string): string {
  execFileSync('skopeo', ['copy', '--quiet', '--src-tls-verify=false', `docker://${host}/${repo}:${tag}`, `oci:${dest}:${tag}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  const idx = JSON.parse(readFileSync(join(dest, 'index.json'), 'utf8')) as { manifests: { digest: string }[] };
  assert.equal(idx.manifests.length, 1);
  return idx.manifests[0].digest;
}

let tmp: string;
let reg: RegistryServer;
let authReg: RegistryServer;
let tokenReg: RegistryServer;
const savedEnv = { ...process.env };
const USER = 'pipeline';
const PASS = 's3cret-Pa55word';

before(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'registry-test-'));
  // No ambient credentials: every test states where its credentials come from.
  delete process.env.PIPELINE_REGISTRY_USER;
  delete process.env.PIPELINE_REGISTRY_PASSWORD;
  process.env.DOCKER_CONFIG = join(tmp, 'no-docker-config');
  [reg, authReg, tokenReg] = await Promise.all([
    startRegistry(),
    startRegistry({ auth: { username: USER, password: PASS } }),
    startRegistry({ auth: { username: USER, password: PASS, mode: 'token' } }),
  ]);
});

after(async () => {
  await Promise.all([reg?.stop(), authReg?.stop(), tokenReg?.stop()]);
  process.env = savedEnv;
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

test('push a layout, push again (all blobs skipped), pull back with skopeo', async () => {
  const l = await buildLayout(tmp, 'v1', { 'etc/hello.txt': Buffer.from('hello from pipeline\n') });
  const lines: string[] = [];
  const first = await pushLayout(l.dir, `${reg.host}/pipeline/test:v1`, { log: (s) => lines.push(s) });
  assert.equal(first.digest, l.manifestDigest);
  assert.deepEqual([...first.pushed].sort(), l.blobs);
  assert.deepEqual(first.skipped, []);

  const second = await pushLayout(l.dir, `${reg.host}/pipeline/test:v1`);
  assert.equal(second.digest, l.manifestDigest);
  assert.deepEqual(second.pushed, []);
  assert.deepEqual([...second.skipped].sort(), l.blobs);

  const dest = join(tmp, 'pulled-v1');
  assert.equal(skopeoPullDigest(reg.host, 'pipeline/test', 'v1', dest), l.manifestDigest);
  // The layer came back byte for byte.
  const manifest = JSON.parse(await readFile(join(l.dir, 'blobs', 'sha256', l.manifestDigest.slice(7)), 'utf8'));
  const layerDigest: string = manifest.layers[0].digest;
  assert.deepEqual(await readFile(join(dest, 'blobs', 'sha256', layerDigest.slice(7))), await readFile(join(l.dir, 'blobs', 'sha256', layerDigest.slice(7))));
});

test('the tag is taken from index.json when the ref has none; an index is pushed with its child', async () => {
  const l = await buildLayout(tmp, 'multi', { 'a.txt': Buffer.from('index test\n') }, { wrapInIndex: true });
  const r = await pushLayout(l.dir, `${reg.host}/pipeline/indexed`);
  assert.equal(r.digest, l.topDigest);
  const raw = execFileSync('skopeo', ['inspect', '--raw', '--tls-verify=false', `docker://${reg.host}/pipeline/indexed:multi`]);
  assert.equal(sha(raw), l.topDigest);
  const child = execFileSync('skopeo', ['inspect', '--raw', '--tls-verify=false', `docker://${reg.host}/pipeline/indexed@${l.manifestDigest}`]);
  assert.equal(sha(child), l.manifestDigest);
});

test('chunked upload with a small chunkSize', async () => {
  const l = await buildLayout(tmp, 'big', { 'data.bin': noise(300_000, 'chunked') });
  const lines: string[] = [];
  const r = await pushLayout(l.dir, `${reg.host}/pipeline/chunked:big`, { chunkSize: 64 * 1024, log: (s) => lines.push(s) });
  assert.equal(r.digest, l.manifestDigest);
  assert.ok(lines.some((s) => /chunks of 65536/.test(s)), lines.join('\n'));
  assert.ok(lines.filter((s) => /\d+\/\d+ bytes/.test(s)).length >= 4, 'several PATCH chunks were sent');
  const dest = join(tmp, 'pulled-big');
  assert.equal(skopeoPullDigest(reg.host, 'pipeline/chunked', 'big', dest), l.manifestDigest);
});

test('auth: wrong and missing credentials are rejected with a clear error', async () => {
  const l = await buildLayout(tmp, 'auth', { 'x.txt': Buffer.from('auth\n') });
  const ref = `${authReg.host}/pipeline/private:auth`;
  await assert.rejects(pushLayout(l.dir, ref, { auth: { username: USER, password: 'wrong-password' } }), (e: unknown) => {
    assert.ok(e instanceof RegistryAuthError, String(e));
    assert.match(e.message, new RegExp(`registry ${authReg.host}.*rejected the credentials`));
    assert.doesNotMatch(e.message, /wrong-password/);
    return true;
  });
  await assert.rejects(pushLayout(l.dir, ref), (e: unknown) => {
    assert.ok(e instanceof RegistryAuthError, String(e));
    assert.match(e.message, /requires credentials and none were found/);
    return true;
  });
});

test('auth: credentials from opts, env and docker config.json are accepted', async () => {
  const l = await buildLayout(tmp, 'auth', { 'x.txt': Buffer.from('auth ok\n') });
  const ref = `${authReg.host}/pipeline/private:auth`;
  const r1 = await pushLayout(l.dir, ref, { auth: { username: USER, password: PASS } });
  assert.equal(r1.digest, l.manifestDigest);

  process.env.PIPELINE_REGISTRY_USER = USER;
  process.env.PIPELINE_REGISTRY_PASSWORD = PASS;
  try {
    const r2 = await pushLayout(l.dir, ref);
    assert.deepEqual(r2.pushed, []);
  } finally {
    delete process.env.PIPELINE_REGISTRY_USER;
    delete process.env.PIPELINE_REGISTRY_PASSWORD;
  }

  const cfgDir = join(tmp, 'docker-config');
  await mkdir(cfgDir, { recursive: true });
  const auth = Buffer.from(`${USER}:${PASS}`).toString('base64');
  await writeFile(join(cfgDir, 'config.json'), JSON.stringify({ auths: { [`http://${authReg.host}`]: { auth } } }));
  process.env.DOCKER_CONFIG = cfgDir;
  try {
    const r3 = await pushLayout(l.dir, ref);
    assert.equal(r3.digest, l.manifestDigest);
  } finally {
    process.env.DOCKER_CONFIG = join(tmp, 'no-docker-config');
  }
});

test('auth: bearer tokens from the WWW-Authenticate realm', async () => {
  const l = await buildLayout(tmp, 'tok', { 'b.txt': Buffer.from('bearer\n') });
  const ref = `${tokenReg.host}/pipeline/bearer:tok`;
  await assert.rejects(pushLayout(l.dir, ref, { auth: { username: USER, password: 'nope-nope' } }), (e: unknown) => {
    assert.ok(e instanceof RegistryAuthError, String(e));
    assert.match(e.message, new RegExp(`registry ${tokenReg.host}.*rejected the credentials.*token service`));
    assert.doesNotMatch(e.message, /nope-nope/);
    return true;
  });
  const r = await pushLayout(l.dir, ref, { auth: { username: USER, password: PASS }, chunkSize: 256 });
  assert.equal(r.digest, l.manifestDigest);
  assert.equal(r.pushed.length, 2);
  const again = await pushLayout(l.dir, ref, { auth: { username: USER, password: PASS } });
  assert.deepEqual([...again.skipped].sort(), l.blobs);
});

test('unreachable registry names the host and the error code', async () => {
  const l = await buildLayout(tmp, 'v1', { 'etc/hello.txt': Buffer.from('hello from pipeline\n') });
  const port = await freePort();
  await assert.rejects(pushLayout(l.dir, `127.0.0.1:${port}/pipeline/test:v1`), (e: unknown) => {
    assert.ok(e instanceof RegistryUnreachableError, String(e));
    assert.match(e.message, new RegExp(`registry 127\\.0\\.0\\.1:${port} is unreachable \\(ECONNREFUSED\\)`));
    return true;
  });
});

test('a blob missing from the layout fails before any upload', async () => {
  const l = await buildLayout(tmp, 'missing', { 'm.txt': Buffer.from('missing\n') });
  await unlink(join(l.dir, 'blobs', 'sha256', l.blobs[0].slice(7)));
  await assert.rejects(pushLayout(l.dir, `${reg.host}/pipeline/missing:missing`), (e: unknown) => {
    assert.ok(e instanceof LayoutBlobMissingError, String(e));
    assert.match(e.message, new RegExp(`${l.blobs[0]} is missing from the layout`));
    return true;
  });
});

test('a layout blob whose bytes do not match its digest is a digest-mismatch error', async () => {
  const l = await buildLayout(tmp, 'corrupt', { 'c.txt': Buffer.from('corrupt me\n') });
  const manifest = JSON.parse(await readFile(join(l.dir, 'blobs', 'sha256', l.manifestDigest.slice(7)), 'utf8'));
  const layerPath = join(l.dir, 'blobs', 'sha256', manifest.layers[0].digest.slice(7));
  const bytes = await readFile(layerPath);
  bytes[bytes.length - 1] ^= 0xff; // same size, different content
  await writeFile(layerPath, bytes);
  await assert.rejects(pushLayout(l.dir, `${reg.host}/pipeline/corrupt:corrupt`), (e: unknown) => {
    assert.ok(e instanceof RegistryDigestMismatchError, String(e));
    assert.match(e.message, /hashes to sha256:[0-9a-f]{64}, not sha256:.*the layout is corrupt/);
    return true;
  });
});

test('invalid refs are rejected before any I/O', async () => {
  for (const ref of ['nohost', 'repo:tag', 'Registry.example/UPPER:tag', 'localhost/repo:bad tag', 'localhost/repo@sha256:00', 'example.com/:x']) {
    await assert.rejects(pushLayout('/nonexistent', ref), InvalidRefError, ref);
  }
});
