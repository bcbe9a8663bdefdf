// `pipeline release` end to end against real things: Debian's docker-registry on
// loopback, skopeo and the oras CLI reading the release back, cosign and
// `pipeline verify` checking the release manifest's bundle, and a webhook receiver
// that verifies with the npm standardwebhooks package. Inputs are the fixture's
// ipxe and oci variants, cached in the shared test cache.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { createServer, request, type IncomingMessage } from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { Webhook } from 'standardwebhooks';
import { cli, type CliResult } from '../helpers/cli.js';
import { findOrFetchCosign } from '../helpers/cosign.js';
import { FIXTURE } from '../helpers/fixture-rootfs.js';
import { findOrFetchOras } from '../helpers/oras.js';
import { freePort, startRegistry, type RegistryServer } from '../helpers/registry-server.js';

const run = promisify(execFile);
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-release-'));
const out = path.join(work, 'images');
const keys = path.join(work, 'keys');
const secret = `whsec_${randomBytes(32).toString('base64')}`;
const secretFile = path.join(work, 'webhook.secret');
let registry: RegistryServer;
let repo: string;

interface Seen {
  id: string;
  body: string;
  headers: Record<string, string>;
  verified: boolean;
}
/** A receiver that verifies every delivery with standardwebhooks and answers from a script. */
async function receiver(answers: number[]) {
  const seen: Seen[] = [];
  const wh = new Webhook(secret);
  const server = createServer((req: IncomingMessage, res) => {
    let body = '';
    req.on('data', (d) => (body += d));
    req.on('end', () => {
      const headers = req.headers as Record<string, string>;
      let verified = true;
      try {
        wh.verify(body, headers);
      } catch {
        verified = false;
      }
      seen.push({ id: headers['webhook-id']!, body, headers, verified });
      const status = verified ? answers[Math.min(seen.length - 1, answers.length - 1)]! : 401;
      res.writeHead(status).end(status === 400 ? 'unknown artifact family' : '');
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const url = `http://127.0.0.1:${(server.address() as { port: number }).port}/api/v1/system/webhooks/disk_image_built`;
  return { url, seen, close: () => new Promise<void>((r) => server.close(() => r())) };
}

const FAST = { PIPELINE_WEBHOOK_BACKOFF_MS: '50', PIPELINE_WEBHOOK_TIMEOUT_MS: '3000' };
function release(version: string, extra: string[], env: Record<string, string> = {}): Promise<CliResult> {
  return cli(['release', version, 'amd64', 'ipxe', 'oci', '-f', FIXTURE, '--out', out, '--registry', `oci://${repo}`, '--sign', path.join(keys, 'signing.key'), '--json', ...extra], { env: { ...FAST, ...env }, timeoutMs: 10 * 60 * 1000 });
}
const resultOf = (r: CliResult) => r.events.find((e) => e.event === 'release') as { ok: boolean; manifestDigest: string; steps: { what: string; ref: string; digest?: string; status: string; uploaded?: number }[]; webhook?: { id: string; attempts: number } };

before(async () => {
  registry = await startRegistry();
  repo = `${registry.host}/powernode`;
  assert.equal((await cli(['keygen', '--out', keys])).code, 0);
  await fs.writeFile(secretFile, secret + '\n', { mode: 0o600 });
});
after(async () => {
  await registry?.stop();
  await fs.rm(work, { recursive: true, force: true });
});

let first: ReturnType<typeof resultOf>;
let firstHookId = '';

test('release publishes image, index, artifacts and a signed manifest; the webhook verifies with standardwebhooks', async () => {
  const rx = await receiver([200]);
  try {
    const r = await release('v1.0.0', ['--webhook', rx.url, '--webhook-secret-file', secretFile]);
    assert.equal(r.code, 0, r.stderr);
    first = resultOf(r);
    assert.deepEqual(new Set(first.steps.map((s) => s.status)), new Set(['published']));
    assert.equal(rx.seen.length, 1);
    assert.ok(rx.seen[0]!.verified);
    firstHookId = rx.seen[0]!.id;
    const payload = JSON.parse(rx.seen[0]!.body);
    assert.equal(payload.data.version, 'v1.0.0');
    assert.equal(payload.data.releaseManifest.digest, first.manifestDigest);
    assert.deepEqual(payload.data.artifacts.map((a: { variant: string }) => a.variant).sort(), ['ipxe', 'oci']);
    const local = await fs.readFile(path.join(out, 'releases', 'v1.0.0', 'release-manifest.json'));
    assert.equal(`sha256:${sha(local)}`, first.manifestDigest);
    // The receiver's library rejects a changed body, an old timestamp and another secret.
    const wh = new Webhook(secret);
    const h = rx.seen[0]!.headers;
    assert.throws(() => wh.verify(rx.seen[0]!.body.replace('v1.0.0', 'v6.6.6'), h));
    assert.throws(() => wh.verify(rx.seen[0]!.body, { ...h, 'webhook-timestamp': String(Math.floor(Date.now() / 1000) - 3600) }));
    assert.throws(() => new Webhook(`whsec_${randomBytes(32).toString('base64')}`).verify(rx.seen[0]!.body, h));
    // Neither the webhook secret nor the signing key leaks into output or images/.
    const keyBody = (await fs.readFile(path.join(keys, 'signing.key'), 'utf8')).split('\n')[1]!;
    for (const needle of [secret, secret.slice(6), keyBody]) {
      assert.ok(!r.stdout.includes(needle) && !r.stderr.includes(needle), 'secret in command output');
      const grep = await run('grep', ['-rlF', needle, out]).catch((e: { code: number }) => e);
      assert.equal((grep as { code?: number }).code, 1, `secret found under images/: ${(grep as { stdout?: string }).stdout}`);
    }
  } finally {
    await rx.close();
  }
});

test('skopeo reads the image and the multi-arch index; the provenance referrer points at the image', async () => {
  const m = JSON.parse(await fs.readFile(path.join(out, 'releases', 'v1.0.0', 'release-manifest.json'), 'utf8'));
  const oci = m.entries.find((e: { variant: string }) => e.variant === 'oci');
  const index = JSON.parse((await run('skopeo', ['inspect', '--raw', '--tls-verify=false', `docker://${repo}:v1.0.0`])).stdout);
  assert.equal(index.mediaType, 'application/vnd.oci.image.index.v1+json');
  assert.deepEqual(index.manifests.map((d: { digest: string; platform: { architecture: string } }) => [d.digest, d.platform.architecture]), [[oci.ociDigest, 'amd64']]);
  const img = JSON.parse((await run('skopeo', ['inspect', '--tls-verify=false', '--override-arch', 'amd64', `docker://${repo}:v1.0.0`])).stdout);
  // skopeo names the index by its own digest and resolves the amd64 image through it.
  assert.equal(img.Digest, m.indexes[0].digest);
  assert.equal(img.Architecture, 'amd64');
  assert.equal(img.Labels['containers.bootc'], '1');
  const byArch = JSON.parse((await run('skopeo', ['inspect', '--tls-verify=false', `docker://${repo}:${oci.tag}`])).stdout);
  assert.equal(byArch.Digest, oci.ociDigest);
  const ref = JSON.parse((await run('skopeo', ['inspect', '--raw', '--tls-verify=false', `docker://${repo}:${oci.ociDigest.replace(':', '-')}`])).stdout);
  assert.equal(ref.subject.digest, oci.ociDigest);
  assert.equal(`sha256:${ref.layers[0].digest.slice(7)}`, oci.provenance.bundle);
});

test('oras pulls every artifact with matching sha256s; the release manifest verifies with pipeline verify and cosign', async (t) => {
  const oras = await findOrFetchOras();
  t.diagnostic(`oras: ${oras.origin}`);
  const m = JSON.parse(await fs.readFile(path.join(out, 'releases', 'v1.0.0', 'release-manifest.json'), 'utf8'));
  const ipxe = m.entries.find((e: { variant: string }) => e.variant === 'ipxe');
  const pulled = path.join(work, 'oras-ipxe');
  await run(oras.path, ['pull', '--plain-http', '-o', pulled, `${repo}:${ipxe.tag}`], { env: { ...process.env, HOME: work } });
  for (const f of ipxe.files) assert.equal(sha(await fs.readFile(path.join(pulled, f.path))), f.sha256, f.path);
  assert.equal(`sha256:${sha(await fs.readFile(path.join(pulled, 'provenance.sigstore.json')))}`, ipxe.provenance.bundle);
  // The pulled artifact is a complete signed image dir.
  const v1 = await cli(['verify', pulled, '--key', path.join(keys, 'signing.pub')]);
  assert.equal(v1.code, 0, v1.stderr);

  const rel = path.join(work, 'oras-release');
  await run(oras.path, ['pull', '--plain-http', '-o', rel, `${repo}:v1.0.0-release`], { env: { ...process.env, HOME: work } });
  assert.equal(`sha256:${sha(await fs.readFile(path.join(rel, 'release-manifest.json')))}`, first.manifestDigest);
  const v2 = await cli(['verify', rel, '--key', path.join(keys, 'signing.pub')]);
  assert.equal(v2.code, 0, v2.stderr);
  assert.match(v2.stderr, /verified release v1\.0\.0/);

  const cosign = await findOrFetchCosign();
  const trustedRoot = path.join(work, 'empty-trusted-root.json');
  await fs.writeFile(trustedRoot, JSON.stringify({ mediaType: 'application/vnd.dev.sigstore.trustedroot+json;version=0.1' }));
  const home = path.join(work, 'cosign-home');
  await fs.mkdir(home, { recursive: true });
  const cosignVerify = (blob: string) =>
    run(cosign.path, ['verify-blob-attestation', '--key', path.join(keys, 'signing.pub'), '--insecure-ignore-tlog', '--new-bundle-format', '--trusted-root', trustedRoot, '--bundle', path.join(rel, 'release-manifest.sigstore.json'), '--type', 'https://pipeline.dev/release/v1', blob], { env: { PATH: process.env.PATH, HOME: home }, timeout: 120_000 });
  assert.match((await cosignVerify(path.join(rel, 'release-manifest.json'))).stderr, /Verified OK/);

  // A doctored manifest fails both.
  await fs.appendFile(path.join(rel, 'release-manifest.json'), ' ');
  const v3 = await cli(['verify', rel, '--key', path.join(keys, 'signing.pub')]);
  assert.equal(v3.code, 1);
  assert.match(v3.stderr, /TAMPERED_MANIFEST/);
  await assert.rejects(cosignVerify(path.join(rel, 'release-manifest.json')));
});

test('re-running the release uploads nothing and re-sends the webhook with the same id; 500,500,200 is one id three times', async () => {
  const rx = await receiver([500, 500, 200]);
  try {
    const r = await release('v1.0.0', ['--webhook', rx.url, '--webhook-header-style', 'github'], { PIPELINE_WEBHOOK_SECRET: secret });
    assert.equal(r.code, 0, r.stderr);
    const res = resultOf(r);
    assert.equal(res.manifestDigest, first.manifestDigest);
    for (const s of res.steps.filter((x) => x.what !== 'webhook')) {
      assert.equal(s.status, 'unchanged', `${s.what}: ${s.status}`);
      assert.ok(!s.uploaded, `${s.what} uploaded ${s.uploaded}`);
    }
    assert.deepEqual(res.steps.map((s) => s.digest).filter(Boolean), first.steps.map((s) => s.digest).filter(Boolean));
    assert.deepEqual(rx.seen.map((s) => s.id), [firstHookId, firstHookId, firstHookId]);
    assert.ok(rx.seen.every((s) => s.verified));
    // GitHub's form too: hex HMAC-SHA256 of the raw body, keyed with the configured secret string.
    for (const s of rx.seen) assert.equal(s.headers['x-hub-signature-256'], `sha256=${createHmac('sha256', secret).update(s.body).digest('hex')}`);
    assert.equal(res.webhook?.attempts, 3);
  } finally {
    await rx.close();
  }
});

test('a receiver answering 400 gets one attempt; the release exits 1 naming the status and the receiver message', async () => {
  const rx = await receiver([400]);
  try {
    const r = await release('v1.0.0', ['--webhook', rx.url, '--webhook-secret-file', secretFile]);
    assert.equal(r.code, 1);
    assert.equal(rx.seen.length, 1);
    assert.match(r.stderr, /HTTP 400 — unknown artifact family \(not retried\)/);
    assert.match(r.stderr, /published \(5\)[\s\S]*not published \(1\):\n.*webhook/);
  } finally {
    await rx.close();
  }
});

test('an unreachable receiver: exit 1 after bounded retries, with what was published listed', async () => {
  const port = await freePort();
  const t0 = Date.now();
  const r = await release('v1.0.0', ['--webhook', `http://127.0.0.1:${port}/hook`, '--webhook-secret-file', secretFile]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /undeliverable after 5 attempts.*ECONNREFUSED/);
  assert.match(r.stderr, /published \(5\):[\s\S]*v1\.0\.0-release@sha256:[\s\S]*not published \(1\)/);
  assert.ok(Date.now() - t0 < 60_000);
  assert.ok(!r.stderr.includes(secret.slice(6)));
});

test('registry down: exit 1, nothing published, and the list says so', async () => {
  const port = await freePort();
  const r = await cli(['release', 'v9', 'amd64', 'ipxe', '-f', FIXTURE, '--out', out, '--registry', `oci://127.0.0.1:${port}/powernode`], { env: FAST });
  assert.equal(r.code, 1);
  assert.match(r.stderr, /unreachable/);
  assert.match(r.stderr, /published \(0\):[\s\S]*not published \(2\)/);
});

test('dry run publishes nothing; a different spec under the same version is refused unless --force', async () => {
  const d = await release('v2.0.0', ['--dry-run']);
  assert.equal(d.code, 0, d.stderr);
  await assert.rejects(run('skopeo', ['inspect', '--raw', '--tls-verify=false', `docker://${repo}:v2.0.0-release`]));
  // Same build inputs, another spec file (a comment differs): cached, but another spec digest.
  const other = path.join(path.dirname(FIXTURE), `.release-test-${process.pid}.yaml`);
  await fs.writeFile(other, (await fs.readFile(FIXTURE, 'utf8')) + '\n# another spec\n');
  try {
    const args = (extra: string[]) => ['release', 'v1.0.0', 'amd64', 'ipxe', 'oci', '-f', other, '--out', out, '--registry', `oci://${repo}`, ...extra];
    const refused = await cli(args([]), { env: FAST });
    assert.equal(refused.code, 2, refused.stderr);
    assert.match(refused.stderr, /different spec.*--force/);
    const forced = await cli(args(['--force', '--json']), { env: FAST });
    assert.equal(forced.code, 0, forced.stderr);
    assert.notEqual(resultOf(forced).manifestDigest, first.manifestDigest);
  } finally {
    await fs.rm(other, { force: true });
  }
});

/** A proxy to the registry that refuses PUTs of one manifest tag with a 500, like a registry failing mid-release. */
async function failingProxy(target: RegistryServer, failTag: string) {
  const server = createServer((req, res) => {
    if (req.method === 'PUT' && req.url?.endsWith(`/manifests/${failTag}`)) {
      req.resume();
      res.writeHead(500, { 'content-type': 'application/json' }).end('{"errors":[{"code":"UNKNOWN","message":"storage backend unavailable"}]}');
      return;
    }
    // Host is kept, so upload Locations the registry hands out point back through the proxy.
    const up = request({ host: '127.0.0.1', port: target.port, method: req.method, path: req.url, headers: req.headers }, (r) => {
      res.writeHead(r.statusCode ?? 502, r.headers);
      r.pipe(res);
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { host: `127.0.0.1:${(server.address() as { port: number }).port}`, close: () => new Promise<void>((r) => server.close(() => r())) };
}

test('a registry failing mid-release: exit 1 naming what is published and what is not; a re-run finishes the job', async () => {
  const proxy = await failingProxy(registry, 'v3.0.0');
  try {
    const r = await cli(['release', 'v3.0.0', 'amd64', 'ipxe', 'oci', '-f', FIXTURE, '--out', out, '--registry', `oci://${proxy.host}/powernode`, '--sign', path.join(keys, 'signing.key')], { env: FAST });
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /index oci failed: .*HTTP 500 \(UNKNOWN: storage backend unavailable\)/);
    const published = r.stderr.slice(r.stderr.indexOf('published ('), r.stderr.indexOf('not published ('));
    const notPublished = r.stderr.slice(r.stderr.indexOf('not published ('));
    for (const w of ['artifact ipxe/amd64', 'image oci/amd64', 'provenance oci/amd64']) assert.match(published, new RegExp(w));
    for (const w of ['index oci', 'release manifest']) assert.match(notPublished, new RegExp(w));
  } finally {
    await proxy.close();
  }
  await assert.rejects(run('skopeo', ['inspect', '--raw', '--tls-verify=false', `docker://${repo}:v3.0.0-release`]));
  const again = await release('v3.0.0', []);
  assert.equal(again.code, 0, again.stderr);
  const steps = resultOf(again).steps;
  assert.deepEqual(Object.fromEntries(steps.map((s) => [s.what, s.status])), {
    'artifact ipxe/amd64': 'unchanged',
    'image oci/amd64': 'unchanged',
    'provenance oci/amd64': 'unchanged',
    'index oci': 'published',
    'release manifest': 'published',
  });
});
