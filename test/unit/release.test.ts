// Release publishing, pure parts and webhook delivery against a real local HTTP
// server. Signatures are checked with the npm `standardwebhooks` package, an
// independent implementation of the spec.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { test } from 'node:test';
import { Webhook } from 'standardwebhooks';
import { artifactManifest, describeFiles } from '../../src/registry/artifact.js';
import { entryTag, imageIndex, releaseManifest, releaseManifestBytes, releaseStatement, webhookId, webhookPayload, type PublishedDir } from '../../src/release/manifest.js';
import { parseRegistry } from '../../src/release/publish.js';
import { backoff, deliverWebhook, WebhookError, webhookHeaders, WebhookSecret } from '../../src/release/webhook.js';
import type { BuildManifest } from '../../src/engine/manifest-types.js';
import { freePort } from '../helpers/registry-server.js';

const rawSecret = () => `whsec_${randomBytes(32).toString('base64')}`;

function dir(variant: string, arch: string, image = false): PublishedDir {
  const manifest = {
    spec: { name: 'minimal', path: 'x.yaml', sha256: 'a'.repeat(64) },
    builder: { id: 'b', version: '0.1.0' },
    sourceDateEpoch: 1704067200,
    outputs: [{ path: `${variant}.bin`, size: 3, sha256: 'b'.repeat(64), fsverity: 'c'.repeat(64), stage: variant }],
  } as unknown as BuildManifest;
  return {
    arch,
    variant,
    dir: `/x/${variant}/${arch}`,
    manifest,
    digests: { buildManifest: 'd'.repeat(64), statement: 'e'.repeat(64), bundle: 'f'.repeat(64) },
    ...(image ? { image: { digest: `sha256:${'1'.repeat(64)}`, size: 500, mediaType: 'application/vnd.oci.image.manifest.v1+json', platform: { os: 'linux', architecture: arch } } } : {}),
  };
}

test('release manifest is deterministic, sorted, and carries every file digest and the provenance bundle digest', () => {
  const dirs = [dir('oci', 'amd64', true), dir('ipxe', 'amd64')];
  const a = releaseManifestBytes(releaseManifest('v1.0.0', dirs, []));
  const b = releaseManifestBytes(releaseManifest('v1.0.0', [...dirs].reverse(), []));
  assert.ok(a.equals(b));
  const m = JSON.parse(a.toString());
  assert.deepEqual(m.entries.map((e: { variant: string }) => e.variant), ['ipxe', 'oci']);
  assert.equal(m.entries[1].ociDigest, `sha256:${'1'.repeat(64)}`);
  assert.equal(m.entries[0].provenance.bundle, `sha256:${'f'.repeat(64)}`);
  assert.deepEqual(m.entries[0].files[0], { path: 'ipxe.bin', size: 3, sha256: 'b'.repeat(64), fsverity: 'c'.repeat(64) });
  assert.doesNotMatch(a.toString(), /20\d\d-\d\d-\d\dT/, 'no wall-clock time');
  const st = JSON.parse(releaseStatement(a, m).toString());
  assert.equal(st.subject[0].name, 'release-manifest.json');
  // Builds of different specs cannot be one release.
  const other = dir('raw', 'amd64');
  other.manifest.spec = { ...other.manifest.spec, sha256: '9'.repeat(64) };
  assert.throws(() => releaseManifest('v1', [dirs[0]!, other], []), /another spec/);
});

test('tags, registry refs and the index', () => {
  assert.equal(entryTag('v1.4.0', 'ipxe', 'amd64'), 'v1.4.0-ipxe-amd64');
  assert.throws(() => entryTag('v1', 'x'.repeat(130), 'amd64'), /not a valid registry tag/);
  assert.equal(parseRegistry('oci://127.0.0.1:5000/powernode'), '127.0.0.1:5000/powernode');
  assert.throws(() => parseRegistry('oci://127.0.0.1:5000/powernode:tag'), /without a tag/);
  assert.throws(() => parseRegistry('https://x.example/powernode'), /oci:\/\//);
  const ix = JSON.parse(imageIndex('v1', 'a'.repeat(64), [dir('oci', 'arm64', true), dir('oci', 'amd64', true)]).toString());
  assert.deepEqual(ix.manifests.map((m: { platform: { architecture: string } }) => m.platform.architecture), ['amd64', 'arm64']);
  assert.equal(ix.mediaType, 'application/vnd.oci.image.index.v1+json');
});

test('artifact manifest has the oras form: artifactType, empty config, titled layers', async () => {
  const m = JSON.parse(artifactManifest('application/x-t', [{ mediaType: 'application/octet-stream', digest: `sha256:${'2'.repeat(64)}`, size: 1, annotations: { 'org.opencontainers.image.title': 'a/b' } }], { z: '1', a: '2' }).toString());
  assert.equal(m.artifactType, 'application/x-t');
  assert.equal(m.config.mediaType, 'application/vnd.oci.empty.v1+json');
  assert.equal(m.config.digest, 'sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a');
  assert.deepEqual(Object.keys(m.annotations), ['a', 'z']);
  await assert.rejects(describeFiles([{ path: '/etc/hostname', name: '../x' }]), /not a safe relative path/);
});

test('Standard Webhooks headers verify with the standardwebhooks package; a changed body, an old timestamp and a wrong secret do not', () => {
  const raw = rawSecret();
  const secret = new WebhookSecret(raw);
  const wh = new Webhook(raw);
  const body = Buffer.from('{"type":"disk_image_built","data":{"version":"v1"}}');
  const now = Math.floor(Date.now() / 1000);
  const h = webhookHeaders(secret, 'msg_1', now, body);
  assert.deepEqual(wh.verify(body.toString(), h), JSON.parse(body.toString()));
  assert.throws(() => wh.verify(body.toString().replace('v1', 'v2'), h));
  const old = webhookHeaders(secret, 'msg_1', now - 600, body);
  assert.throws(() => wh.verify(body.toString(), old), /timestamp/i);
  assert.throws(() => new Webhook(rawSecret()).verify(body.toString(), h));
  const gh = webhookHeaders(secret, 'msg_1', now, body, 'github');
  assert.match(gh['x-hub-signature-256']!, /^sha256=[0-9a-f]{64}$/);
});

test('the webhook secret never shows in its string or JSON forms, and bad secrets are refused without echoing them', () => {
  const raw = rawSecret();
  const s = new WebhookSecret(raw);
  assert.ok(!String(s).includes(raw.slice(6, 20)) && !JSON.stringify({ s }).includes(raw.slice(6, 20)));
  for (const bad of ['plainsecretvalue1234', 'whsec_!!notbase64!!', 'whsec_c2hvcnQ=']) {
    assert.throws(() => new WebhookSecret(bad), (e: Error) => !e.message.includes(bad.slice(6)));
  }
});

test('webhook id depends only on the release manifest digest; backoff is bounded', () => {
  assert.equal(webhookId('sha256:abc'), webhookId('sha256:abc'));
  assert.notEqual(webhookId('sha256:abc'), webhookId('sha256:abd'));
  assert.deepEqual([1, 2, 3, 4, 10].map((n) => backoff(n, 100, 1000)), [100, 200, 400, 800, 1000]);
  const m = releaseManifest('v1', [dir('ipxe', 'amd64')], []);
  const p = JSON.parse(webhookPayload(m, 'sha256:x', 'r.example/p', [], []).toString());
  assert.equal(p.data.artifacts[0].ref, 'r.example/p:v1-ipxe-amd64');
});

async function receiver(answers: number[]): Promise<{ url: string; seen: { id: string; body: string; headers: IncomingMessage['headers'] }[]; close: () => Promise<void> }> {
  const seen: { id: string; body: string; headers: IncomingMessage['headers'] }[] = [];
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    let body = '';
    req.on('data', (d) => (body += d));
    req.on('end', () => {
      seen.push({ id: String(req.headers['webhook-id']), body, headers: req.headers });
      const status = answers[Math.min(seen.length - 1, answers.length - 1)]!;
      res.writeHead(status, { 'content-type': 'text/plain' }).end(status >= 400 ? `receiver says no (${status})` : 'ok');
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const a = server.address() as { port: number };
  return { url: `http://127.0.0.1:${a.port}/hook`, seen, close: () => new Promise((r) => server.close(() => r())) };
}

test('delivery retries 500s with the same id and a fresh valid signature each time', async () => {
  const raw = rawSecret();
  const rx = await receiver([500, 500, 200]);
  try {
    const body = Buffer.from('{"a":1}');
    const r = await deliverWebhook(rx.url, body, 'msg_same', new WebhookSecret(raw), { backoffMs: 20 });
    assert.deepEqual({ status: r.status, attempts: r.attempts }, { status: 200, attempts: 3 });
    assert.deepEqual(rx.seen.map((s) => s.id), ['msg_same', 'msg_same', 'msg_same']);
    for (const s of rx.seen) new Webhook(raw).verify(s.body, s.headers as Record<string, string>);
  } finally {
    await rx.close();
  }
});

test('a 4xx is final: one attempt, the status and the receiver message reported, no secret in it', async () => {
  const raw = rawSecret();
  const rx = await receiver([400]);
  try {
    const err = await deliverWebhook(rx.url, Buffer.from('{}'), 'msg_x', new WebhookSecret(raw), { backoffMs: 20 }).catch((e) => e);
    assert.ok(err instanceof WebhookError);
    assert.equal(rx.seen.length, 1);
    assert.match(err.message, /HTTP 400.*receiver says no/);
    assert.ok(!err.message.includes(raw.slice(6)));
  } finally {
    await rx.close();
  }
});

test('an unreachable receiver fails after the bounded attempts', async () => {
  const port = await freePort();
  const t0 = Date.now();
  const err = await deliverWebhook(`http://127.0.0.1:${port}/hook`, Buffer.from('{}'), 'msg_y', new WebhookSecret(rawSecret()), { backoffMs: 20, attempts: 4 }).catch((e) => e);
  assert.ok(err instanceof WebhookError);
  assert.match(err.message, /undeliverable after 4 attempts.*ECONNREFUSED/);
  assert.ok(Date.now() - t0 < 5000);
});
