// keygen -> build --sign -> verify through the CLI, on the real (cached) iPXE build.
import assert from 'node:assert/strict';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { cli, ROOT, summary } from '../helpers/cli.js';

const FIXTURE = path.join(ROOT, 'fixtures', 'minimal.yaml');
const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-prov-'));
const out = path.join(work, 'images');
const keys = path.join(work, 'keys');
const dir = path.join(out, 'ipxe', 'amd64');

test('keygen writes a 0600 private key and a public key', async () => {
  const r = await cli(['keygen', '--out', keys]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal((await fs.stat(path.join(keys, 'signing.key'))).mode & 0o777, 0o600);
  assert.match(await fs.readFile(path.join(keys, 'signing.pub'), 'utf8'), /BEGIN PUBLIC KEY/);
  const again = await cli(['keygen', '--out', keys]);
  assert.notEqual(again.code, 0, 'an existing key is never overwritten');
});

test('build --sign writes a bundle that verify accepts offline', async () => {
  const r = await cli(['build', 'amd64', 'ipxe', '-f', FIXTURE, '--out', out, '--json', '--sign', path.join(keys, 'signing.key')]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(summary(r).ok, true);
  assert.doesNotMatch(r.stdout + r.stderr, /PRIVATE KEY/);
  const m = JSON.parse(await fs.readFile(path.join(dir, 'build-manifest.json'), 'utf8'));
  assert.equal(m.attestation.bundle, 'provenance.sigstore.json');
  const v = await cli(['verify', dir, '--key', path.join(keys, 'signing.pub')]);
  assert.equal(v.code, 0, v.stderr);
  assert.match(v.stderr, /verified .*: \d+ files, signed by SHA256:/);
});

test('verify names a tampered artifact, a wrong key and an extra file', async () => {
  const tampered = path.join(work, 'tampered');
  await fs.cp(dir, tampered, { recursive: true });
  await fs.appendFile(path.join(tampered, 'boot.ipxe'), '# evil\n');
  const t = await cli(['verify', tampered, '--key', path.join(keys, 'signing.pub')]);
  assert.equal(t.code, 1);
  assert.match(t.stderr, /TAMPERED_ARTIFACT.*boot\.ipxe/);

  const other = path.join(work, 'other-keys');
  await cli(['keygen', '--out', other]);
  const w = await cli(['verify', dir, '--key', path.join(other, 'signing.pub')]);
  assert.equal(w.code, 1);
  assert.match(w.stderr, /BAD_SIGNATURE/);

  const extra = path.join(work, 'extra');
  await fs.cp(dir, extra, { recursive: true });
  await fs.writeFile(path.join(extra, 'payload.sh'), 'echo hi\n');
  const e = await cli(['verify', extra, '--key', path.join(keys, 'signing.pub')]);
  assert.equal(e.code, 1);
  assert.match(e.stderr, /EXTRA_FILE.*payload\.sh/);
});

test('an unsigned build fails verify with a missing-signature error', async () => {
  const unsigned = path.join(work, 'unsigned');
  const r = await cli(['build', 'amd64', 'ipxe', '-f', FIXTURE, '--out', unsigned, '--json']);
  assert.equal(r.code, 0, r.stderr);
  const v = await cli(['verify', path.join(unsigned, 'ipxe', 'amd64'), '--key', path.join(keys, 'signing.pub')]);
  assert.equal(v.code, 1);
  assert.match(v.stderr, /MISSING_SIGNATURE/);
});
