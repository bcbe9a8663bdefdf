// The OCI and composefs variants through the CLI: skopeo reads the published
// layout, `pipeline push` round-trips through a real registry, and the composefs
// image's fs-verity digest matches `fsverity digest`.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { cli, summary } from '../helpers/cli.js';
import { FIXTURE } from '../helpers/fixture-rootfs.js';
import { startRegistry, type RegistryServer } from '../helpers/registry-server.js';

const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-oci-'));
const out = path.join(work, 'images');
const layout = path.join(out, 'oci', 'amd64');
let registry: RegistryServer;

before(async () => {
  registry = await startRegistry();
});
after(async () => {
  await registry?.stop();
});

test('build amd64 oci publishes a bootc layout that skopeo reads', async () => {
  const r = await cli(['build', 'amd64', 'oci', '-f', FIXTURE, '--out', out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(summary(r).ok, true);
  const info = JSON.parse(execFileSync('skopeo', ['inspect', `oci:${layout}:latest`], { encoding: 'utf8' }));
  assert.equal(info.Labels['containers.bootc'], '1');
  assert.equal(info.Architecture, 'amd64');
  assert.ok(info.Layers.length >= 1);
});

test('pipeline push uploads to a real registry, skips what is there, and skopeo pulls the same digest', async () => {
  const ref = `${registry.host}/powernode:1.0`;
  const p1 = await cli(['push', 'amd64', 'oci', '--to', ref, '-f', FIXTURE, '--out', out, '--json']);
  assert.equal(p1.code, 0, p1.stderr);
  const ev1 = p1.events.find((e) => e.event === 'push') as { digest: string; pushed: string[]; skipped: string[] };
  assert.ok(ev1.pushed.length >= 2);
  const p2 = await cli(['push', 'amd64', 'oci', '--to', ref, '-f', FIXTURE, '--out', out, '--json']);
  const ev2 = p2.events.find((e) => e.event === 'push') as { digest: string; pushed: string[]; skipped: string[] };
  assert.deepEqual(ev2.pushed, []);
  assert.equal(ev2.digest, ev1.digest);
  const index = JSON.parse(await fs.readFile(path.join(layout, 'index.json'), 'utf8'));
  assert.equal(ev1.digest, index.manifests[0].digest);
  const pulled = path.join(work, 'pulled');
  execFileSync('skopeo', ['copy', '--src-tls-verify=false', `docker://${ref}`, `oci:${pulled}:1.0`], { stdio: 'pipe' });
  const back = JSON.parse(await fs.readFile(path.join(pulled, 'index.json'), 'utf8'));
  assert.equal(back.manifests[0].digest, ev1.digest);
});

test('push --sign attaches the signed provenance as a referrer whose subject is the pushed image', async () => {
  const keys = path.join(work, 'keys');
  assert.equal((await cli(['keygen', '--out', keys])).code, 0);
  const ref = `${registry.host}/powernode:signed`;
  const signedOut = path.join(work, 'signed');
  const p = await cli(['push', 'amd64', 'oci', '--to', ref, '--sign', path.join(keys, 'signing.key'), '-f', FIXTURE, '--out', signedOut, '--json']);
  assert.equal(p.code, 0, p.stderr);
  const ev = p.events.find((e) => e.event === 'push') as { digest: string; attestation: { tag: string; digest: string } };
  assert.equal(ev.attestation.tag, ev.digest.replace(':', '-'));
  // A real client reads the referrer from the registry.
  const raw = JSON.parse(execFileSync('skopeo', ['inspect', '--raw', '--tls-verify=false', `docker://${registry.host}/powernode:${ev.attestation.tag}`], { encoding: 'utf8' }));
  assert.equal(raw.subject.digest, ev.digest);
  assert.equal(raw.artifactType, 'application/vnd.dev.sigstore.bundle.v0.3+json');
  const pulled = path.join(work, 'referrer');
  execFileSync('skopeo', ['copy', '--src-tls-verify=false', `docker://${registry.host}/powernode:${ev.attestation.tag}`, `oci:${pulled}:x`], { stdio: 'pipe' });
  const bundle = await fs.readFile(path.join(pulled, 'blobs', 'sha256', raw.layers[0].digest.slice(7)));
  const dir = path.join(signedOut, 'oci', 'amd64');
  // The registry holds exactly the bundle `verify` accepts, and it covers the pushed manifest.
  assert.ok(bundle.equals(await fs.readFile(path.join(dir, 'provenance.sigstore.json'))));
  const v = await cli(['verify', dir, '--key', path.join(keys, 'signing.pub')]);
  assert.equal(v.code, 0, v.stderr);
  const statement = JSON.parse(Buffer.from(JSON.parse(bundle.toString()).dsseEnvelope.payload, 'base64').toString());
  assert.ok(statement.subject.some((s: { name: string; digest: { sha256: string } }) => `sha256:${s.digest.sha256}` === ev.digest && s.name === `blobs/sha256/${ev.digest.slice(7)}`));
});

test('push to an unreachable registry fails with a clear error', async () => {
  const r = await cli(['push', 'amd64', 'oci', '--to', '127.0.0.1:1/x:y', '-f', FIXTURE, '--out', out]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /127\.0\.0\.1:1.*(unreachable|ECONNREFUSED|cannot reach)/i);
});

test('build amd64 composefs publishes an image whose digest fsverity agrees with', async () => {
  const r = await cli(['build', 'amd64', 'composefs', '-f', FIXTURE, '--out', out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  const dir = path.join(out, 'composefs', 'amd64');
  const m = JSON.parse(await fs.readFile(path.join(dir, 'build-manifest.json'), 'utf8'));
  const image = m.outputs.find((o: { path: string }) => o.path === 'image.cfs');
  const fv = execFileSync('fsverity', ['digest', path.join(dir, 'image.cfs')], { encoding: 'utf8' }).split(' ')[0];
  assert.equal(fv, `sha256:${image.fsverity}`);
  // Every object is named by its own fs-verity digest.
  const objects = m.outputs.filter((o: { path: string }) => o.path.startsWith('objects/')).slice(0, 20);
  assert.ok(objects.length > 0);
  for (const o of objects) {
    const d = execFileSync('fsverity', ['digest', path.join(dir, o.path)], { encoding: 'utf8' }).split(' ')[0]!.slice('sha256:'.length);
    assert.equal(o.path, `objects/${d.slice(0, 2)}/${d.slice(2)}`);
  }
});
