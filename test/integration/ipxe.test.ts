// The first real slice, end to end through the CLI: mmdebstrap rootfs -> dracut
// initramfs -> iPXE bundle, booted under qemu; then the cache contract.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { cli, ROOT, summary } from '../helpers/cli.js';

const FIXTURE = path.join(ROOT, 'fixtures', 'minimal.yaml');
const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-ipxe-'));
const out = path.join(work, 'images');

test('build amd64 ipxe produces a bundle with sums, manifest and provenance', async () => {
  const r = await cli(['build', 'amd64', 'ipxe', '-f', FIXTURE, '--out', out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(summary(r).ok, true);
  const dir = path.join(out, 'ipxe', 'amd64');
  const files = (await fs.readdir(dir)).sort();
  assert.deepEqual(files, ['SHA256SUMS', 'boot.ipxe', 'build-manifest.json', 'initrd.img', 'provenance.intoto.json', 'vmlinuz']);
  // sha256sum is the consumer of SHA256SUMS.
  execFileSync('sha256sum', ['--check', '--strict', 'SHA256SUMS'], { cwd: dir });
  const script = await fs.readFile(path.join(dir, 'boot.ipxe'), 'utf8');
  assert.match(script, /^#!ipxe\n/);
  assert.match(script, /^kernel vmlinuz initrd=initrd.img console=ttyS0 panic=-1$/m);
  assert.match(script, /^initrd initrd.img$/m);
  const m = JSON.parse(await fs.readFile(path.join(dir, 'build-manifest.json'), 'utf8'));
  assert.equal(m.sourceDateEpoch, 1704067200);
  assert.match(m.spec.sha256, /^[0-9a-f]{64}$/);
  assert.deepEqual(m.stages.map((s: { name: string }) => s.name), ['rootfs', 'initramfs', 'ipxe']);
  for (const s of m.stages) assert.match(s.key, /^[0-9a-f]{64}$/);
  const kernelPkg = m.resolved.packages.find((p: { name: string }) => /^linux-image-6/.test(p.name));
  assert.ok(kernelPkg?.version, 'the kernel package and its exact version are recorded');
  assert.ok(m.resolved.packages.find((p: { name: string }) => p.name === 'dracut-core'));
  assert.match(m.resolved.meta.initramfs.kernel, /^6\.\d+/);
  assert.ok(m.resolved.tools.mmdebstrap);
  for (const o of m.outputs) {
    assert.match(o.sha256, /^[0-9a-f]{64}$/);
    assert.match(o.fsverity, /^[0-9a-f]{64}$/);
    assert.equal((await fs.stat(path.join(dir, o.path))).size, o.size);
  }
  // fsverity digest is the consumer of the recorded fs-verity roots.
  const fv = execFileSync('fsverity', ['digest', 'vmlinuz'], { cwd: dir, encoding: 'utf8' });
  assert.equal(fv.split(' ')[0], `sha256:${m.outputs.find((o: { path: string }) => o.path === 'vmlinuz').fsverity}`);
});

test('the initramfs boots under qemu and the test module reports on the serial console', async () => {
  const r = await cli(['test', 'amd64', 'ipxe', '-f', FIXTURE, '--out', out, '--json']);
  const boots = r.events.filter((e) => e.event === 'boot-test');
  assert.ok(boots.length >= 1, r.stderr);
  for (const b of boots) assert.equal(b.ok, true, `${b.label}: ${JSON.stringify(b)}\n${r.stderr}`);
  assert.equal(r.code, 0, r.stderr);
});

test('a second build executes zero stages', async () => {
  const r = await cli(['build', 'amd64', 'ipxe', '-f', FIXTURE, '--out', out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(summary(r).executed, []);
  assert.deepEqual(summary(r).cached.sort(), ['initramfs', 'ipxe', 'rootfs']);
});

test('changing only the kernel command line reruns only what is downstream of it, and explain says why', async () => {
  const spec = path.join(work, 'minimal.yaml');
  const text = await fs.readFile(FIXTURE, 'utf8');
  const changed = text.replace('cmdline: "console=${console} panic=-1"', `cmdline: "console=\${console} panic=-1 test.nonce=${process.pid}"`);
  assert.notEqual(changed, text);
  await fs.writeFile(spec, changed);
  // The copy must see the same spec-relative overlay: a copy (owners, modes kept),
  // since a spec path may not resolve outside the spec's directory.
  execFileSync('cp', ['-a', path.join(ROOT, 'fixtures', 'os-overlay'), path.join(work, 'os-overlay')]);
  // History is per spec name and arch, so the copy's explain compares with the fixture's builds.
  const ex = await cli(['explain', 'amd64', 'ipxe', '-f', spec, '--json']);
  assert.equal(ex.code, 0, ex.stderr);
  const rows = JSON.parse(ex.stdout) as { stage: string; status: string; reasons: string[] }[];
  assert.deepEqual(rows.map((x) => [x.stage, x.status]), [['rootfs', 'hit'], ['initramfs', 'hit'], ['ipxe', 'miss']]);
  assert.match(rows[2]!.reasons.join('\n'), /params\.cmdline: .*test\.nonce/);
  const r = await cli(['build', 'amd64', 'ipxe', '-f', spec, '--out', out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(summary(r).executed, ['ipxe']);
  assert.match(await fs.readFile(path.join(out, 'ipxe', 'amd64', 'boot.ipxe'), 'utf8'), /test\.nonce/);
});
