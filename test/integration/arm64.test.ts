// arm64 end to end on an amd64 host: mmdebstrap --arch=arm64 (maintainer scripts via
// binfmt + qemu-user) -> dracut inside the arm64 rootfs (emulated) -> iPXE and
// kernel+initrd bundles, booted under qemu-system-aarch64 (TCG) to the probe marker.
//
// A cold run costs about 4 minutes on 2 cores (rootfs ~1.7 min, dracut ~1.5 min,
// boots ~10 s each). It needs the host setup scripts/setup does: qemu-user-static,
// binfmt-support, qemu-system-arm, and binfmt_misc mounted with qemu-aarch64 enabled.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { cli, ROOT, summary } from '../helpers/cli.js';

const FIXTURE = path.join(ROOT, 'fixtures', 'minimal-arm64.yaml');
const BUILD = ['arm64', 'ipxe', 'kernel-initrd', '-f', FIXTURE];

// Each test publishes into its own dir and builds what it needs itself: the stages
// come from the shared test cache, so only the first test to run pays for them.
async function outDir(t: TestContext): Promise<string> {
  const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-arm64-'));
  t.after(() => fs.rm(work, { recursive: true, force: true }));
  return path.join(work, 'images');
}

test('build arm64 ipxe produces an arm64 kernel, an initramfs and a boot script for ttyAMA0', async (t) => {
  const out = await outDir(t);
  const r = await cli(['build', ...BUILD, '--out', out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(summary(r).ok, true);
  const dir = path.join(out, 'ipxe', 'arm64');
  assert.deepEqual((await fs.readdir(dir)).sort(), ['SHA256SUMS', 'boot.ipxe', 'build-manifest.json', 'initrd.img', 'provenance.intoto.json', 'vmlinuz']);
  execFileSync('sha256sum', ['--check', '--strict', 'SHA256SUMS'], { cwd: dir });
  assert.match(await fs.readFile(path.join(dir, 'boot.ipxe'), 'utf8'), /^kernel vmlinuz initrd=initrd.img console=ttyAMA0 panic=-1$/m);

  // The arm64 Linux Image header: magic "ARM\x64" at offset 0x38.
  const kernel = await fs.readFile(path.join(dir, 'vmlinuz'));
  assert.equal(kernel.subarray(0x38, 0x3c).toString('latin1'), 'ARM\x64', 'vmlinuz is an arm64 Image');
  // zstd (the dracut stage's default compressor, run natively on the host): its frame magic.
  const initrd = await fs.readFile(path.join(dir, 'initrd.img'));
  assert.deepEqual([...initrd.subarray(0, 4)], [0x28, 0xb5, 0x2f, 0xfd]);
  // cpio lists the archive: the virt machine's virtio-mmio driver and the probe hook are in it.
  const list = execFileSync('sh', ['-c', 'zstd -dc < "$1" | cpio -t --quiet', 'sh', path.join(dir, 'initrd.img')], {
    encoding: 'utf8',
    maxBuffer: 64 * 1024 * 1024,
  });
  assert.match(list, /\/virtio_mmio\.ko/);
  assert.match(list, /pre-udev\/99-pipeline-test\.sh$/m);

  const m = JSON.parse(await fs.readFile(path.join(dir, 'build-manifest.json'), 'utf8'));
  assert.equal(m.arch, 'arm64');
  assert.match(m.resolved.meta.initramfs.kernel, /-arm64$/);
  const kernelPkg = m.resolved.packages.find((p: { name: string }) => /^linux-image-6/.test(p.name));
  assert.equal(kernelPkg?.arch, 'arm64');
  assert.ok(m.resolved.tools['qemu-aarch64-static'], 'the emulator version is part of what the build used');
  // The initramfs is compressed by the host's zstd (natively), so its version is recorded.
  assert.ok(m.resolved.tools.zstd);
});

test('the arm64 bundles boot under qemu-system-aarch64 and the probe reports on ttyAMA0', async (t) => {
  // `pipeline test` builds (cached) before it boots.
  const r = await cli(['test', ...BUILD, '--out', await outDir(t), '--json']);
  const boots = r.events.filter((e) => e.event === 'boot-test');
  assert.equal(boots.length, 2, r.stderr);
  for (const b of boots) assert.equal(b.ok, true, `${b.label}: ${JSON.stringify(b)}\n${r.stderr}`);
  assert.equal(r.code, 0, r.stderr);
});

test('a second arm64 build executes zero stages', async (t) => {
  const out = await outDir(t);
  const first = await cli(['build', ...BUILD, '--out', out, '--json']);
  assert.equal(first.code, 0, first.stderr);
  const r = await cli(['build', ...BUILD, '--out', out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(summary(r).executed, []);
  assert.deepEqual(summary(r).cached.sort(), ['initramfs', 'ipxe', 'kernel-initrd', 'rootfs']);
});

// Cheap and host-only: the pieces arm64 builds and boots rely on.
test('parseLdd finds the host gzip loader and libc that dracut runs natively for foreign arches', async () => {
  const { parseLdd } = await import('../../stages/dracut.js');
  const text = execFileSync('ldd', ['/usr/bin/gzip'], { encoding: 'utf8' });
  const { loader, libs } = parseLdd(text);
  assert.ok(loader && path.isAbsolute(loader), text);
  assert.ok(libs.some((l) => path.basename(l) === 'libc.so.6'), text);
  for (const f of [loader!, ...libs]) await fs.access(f);
});

test('an arm64 guest is never booted with KVM on an amd64 host', async () => {
  const { effectiveAccel } = await import('../../src/boot/boot.js');
  if (process.arch === 'x64') {
    assert.equal(effectiveAccel('qemu-system-aarch64', 'kvm'), 'tcg');
    assert.equal(effectiveAccel('qemu-system-x86_64', 'kvm'), 'kvm');
  }
  assert.equal(effectiveAccel('qemu-system-aarch64', 'tcg'), 'tcg');
  assert.equal(effectiveAccel('qemu-system-x86_64', undefined), 'tcg');
});
