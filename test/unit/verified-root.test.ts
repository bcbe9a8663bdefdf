// Pure parts of verified boot from composefs: the command line raw writes for a
// composefs root, the layer order of the composefs stage, doctor's keyring check.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { composefsCmdline, composefsMeta } from '../../outputs/_composefs-root.js';
import { orderLayers } from '../../stages/composefs.js';
import { suiteKeyFindings } from '../../src/doctor/keyring.js';

const A = 'a'.repeat(64);
const B = 'b'.repeat(64);
const C = 'c'.repeat(64);

test('composefs root: the command line names the image digest, then the layers top first', () => {
  const m = composefsMeta('composefs', { imageDigest: A, layers: [{ digest: B, priority: 20 }, { digest: C, priority: 10 }] });
  assert.equal(composefsCmdline(m), `composefs=${A} powernode.layers=${B},${C}`);
  assert.equal(composefsCmdline(composefsMeta('composefs', { imageDigest: A })), `composefs=${A}`);
});

test('composefs root: only a composefs stage with well-formed digests is accepted', () => {
  assert.throws(() => composefsMeta('mmdebstrap', { packages: [] }), /needs a composefs stage as the rootfs input \(got a mmdebstrap stage\)/);
  assert.throws(() => composefsMeta('composefs', { imageDigest: 'A'.repeat(64) }), /needs a composefs stage/);
  assert.throws(() => composefsMeta('composefs', { imageDigest: A, layers: [{ digest: 'x' }] }), /malformed layer digest x/);
});

test('layers stack highest priority first; equal priorities are refused', () => {
  assert.deepEqual(
    orderLayers([{ dir: 'low', priority: 10 }, { dir: 'high', priority: 20 }, { dir: 'mid', priority: 15 }]).map((l) => l.dir),
    ['high', 'mid', 'low'],
  );
  assert.throws(() => orderLayers([{ dir: 'a', priority: 5 }, { dir: 'b', priority: 5 }]), /a and b have the same priority 5/);
});

test('doctor: trixie is verifiable only when the host keyrings carry its archive key', () => {
  const ok = suiteKeyFindings(['debian-archive-trixie-automatic.asc', 'debian-archive-trixie-stable.asc', 'debian-archive-bookworm-automatic.gpg'], ['bookworm', 'trixie']);
  assert.deepEqual(ok.map((f) => [f.what, f.level]), [['keyring bookworm', 'ok'], ['keyring trixie', 'ok']]);
  const missing = suiteKeyFindings(['debian-archive-bookworm-automatic.gpg'], ['trixie']);
  assert.equal(missing[0]!.level, 'warn');
  assert.match(missing[0]!.detail, /no Debian trixie archive key/);
  assert.match(missing[0]!.fix!, /debian-archive-keyring/);
});

test('arm64 verified: raw with root: composefs needs a `loader` rootfs (systemd-boot comes from a tree), amd64 does not', async () => {
  const { loadKinds } = await import('../../src/engine/kinds.js');
  const { parseSpec } = await import('../../src/engine/spec.js');
  const { requirements } = await import('../../src/engine/compile.js');
  const { readFileSync } = await import('node:fs');
  const kinds = await loadKinds();
  const file = new URL('../../pipelines/powernode.yaml', import.meta.url).pathname;
  const text = readFileSync(file, 'utf8');
  const check = (t: string, arch: string) => requirements(parseSpec(t, file, kinds), arch, ['verified'], kinds);
  for (const arch of ['amd64', 'arm64']) assert.doesNotThrow(() => check(text, arch));
  const noLoader = text.replace(', loader: rootfs-trixie }', ' }');
  assert.notEqual(noLoader, text);
  assert.doesNotThrow(() => check(noLoader, 'amd64'));
  assert.throws(() => check(noLoader, 'arm64'), (e: Error) => /powernode\.yaml:\d+:\d+/.test(e.message) && /add `loader: <the rootfs stage/.test(e.message));
  const wrongKind = text.replace('loader: rootfs-trixie }', 'loader: composefs-trixie }');
  assert.throws(() => check(wrongKind, 'arm64'), /input loader must be a rootfs \(mmdebstrap\) stage, not a composefs stage/);
});
