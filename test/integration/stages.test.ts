// Real-tool test of the first slice: mmdebstrap rootfs -> dracut initramfs with the
// pipeline-test and powernode modules -> ipxe bundle -> qemu (TCG) boots it, both
// directly and through the iPXE ROM over qemu's user-mode TFTP, and the serial
// console shows the markers. Needs root, mmdebstrap, qemu-system-x86, ipxe-qemu and
// the Debian mirror. The rootfs is the fixture's, from the shared test cache.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync } from 'node:fs';
import { copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runProcess } from '../../src/engine/process.js';
import { runStage } from '../helpers/run-stage.js';
import { fixtureRootfs } from '../helpers/fixture-rootfs.js';
import { bootTest, ConsoleScanner, DEFAULT_FORBID } from '../../src/boot/boot.js';
import type { StageInput, StageModule } from '../../src/stage.js';
import mmdebstrap, { installedPackages, mmdebstrapArgs, Params as MmParams } from '../../stages/mmdebstrap.js';
import dracut, { dracutArgs, pickKernel, Params as DrParams } from '../../stages/dracut.js';
import ipxe, { ipxeScript, parseIpxeScript } from '../../outputs/ipxe.js';

const SDE = 1704067200;

async function sha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(file)) h.update(c as Buffer);
  return h.digest('hex');
}

/** Run a stage through the engine's RunContext (test/helpers/run-stage.ts) and hand its output on as an input. */
async function stage(mod: StageModule, base: string, params: unknown, inputs: Record<string, StageInput> = {}): Promise<StageInput> {
  const r = await runStage(mod, { params, inputs, sourceDateEpoch: SDE, outDir: join(base, 'out') });
  return { dir: r.outDir, files: r.files, meta: r.meta, key: base, kind: mod.kind };
}

test('pure helpers', () => {
  const p = MmParams.parse({ packages: ['linux-image-amd64', 'dracut-core'] });
  const a = mmdebstrapArgs(p, 'amd64', '/t/rootfs.tar');
  assert.deepEqual(a.slice(-4), ['--', 'bookworm', '/t/rootfs.tar', 'http://deb.debian.org/debian']);
  assert.ok(a.includes('--arch=amd64') && a.includes('--include=linux-image-amd64,dracut-core'));
  assert.throws(() => MmParams.parse({ packages: ['--evil'] }));
  assert.throws(() => MmParams.parse({ mirror: 'http://x/ y' }));

  const status = 'Package: b\nStatus: install ok installed\nArchitecture: all\nVersion: 2\n\nPackage: a\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:1.0\nDescription: x\n more\n\nPackage: c\nStatus: deinstall ok config-files\nVersion: 3\n';
  const idx = 'Package: a\nVersion: 1:1.0\nArchitecture: amd64\nSHA256: aa\n\nPackage: b\nVersion: 1\nArchitecture: all\nSHA256: bb\n';
  assert.deepEqual(installedPackages(status, [idx]), [
    { name: 'a', version: '1:1.0', arch: 'amd64', sha256: 'aa' },
    { name: 'b', version: '2', arch: 'all' },
  ]);

  assert.equal(pickKernel('auto', ['6.1.0-1-amd64']), '6.1.0-1-amd64');
  assert.throws(() => pickKernel('auto', ['6.1', '6.2']), /6\.1, 6\.2/);
  assert.throws(() => pickKernel('auto', []), /no kernel/);
  const d = dracutArgs(DrParams.parse({ modules: ['pipeline-test'], drivers: ['virtio_mmio'], cmdline: 'quiet' }), 'K');
  assert.deepEqual(d.slice(0, 5), ['--reproducible', '--no-hostonly', '--force', '--kver', 'K']);
  assert.ok(d.join(' ').includes('--add pipeline-test --add-drivers virtio_mmio --kernel-cmdline quiet --compress /var/tmp/pipeline-host-zstd/zstd -q -T0 -10'));
  assert.throws(() => DrParams.parse({ modules: ['a b'] }));

  assert.equal(ipxeScript('console=ttyS0'), '#!ipxe\nkernel vmlinuz initrd=initrd.img console=ttyS0\ninitrd initrd.img\nboot\n');
  assert.throws(() => ipxe.params.parse({ cmdline: 'a\nshell' }));
  // The boot test boots what boot.ipxe says, so the parser reads back what the emitter writes.
  assert.deepEqual(parseIpxeScript(ipxeScript(' console=ttyS0 quiet ')), { kernel: 'vmlinuz', initrd: 'initrd.img', args: 'initrd=initrd.img console=ttyS0 quiet' });
  assert.throws(() => parseIpxeScript('#!ipxe\nkernel http://evil/vmlinuz\ninitrd initrd.img\nboot\n'), /not a file in its own directory/);
  assert.throws(() => parseIpxeScript('#!ipxe\nkernel ../vmlinuz\ninitrd initrd.img\nboot\n'), /not a file in its own directory/);
  assert.throws(() => parseIpxeScript('kernel vmlinuz\ninitrd initrd.img\n'), /#!ipxe/);

  const s = new ConsoleScanner(['OK-1', 'OK-2'], DEFAULT_FORBID);
  s.push('\x1b[0;32mOK-1\x1b[0m\r\nabc');
  assert.deepEqual(s.missing(), ['OK-2']);
  s.push('OK-2'); // no newline yet: still counts
  assert.ok(s.done);
  s.push('\n[  1.0] Kernel panic - not syncing\n');
  assert.deepEqual(s.forbidden, ['Kernel panic']);
});

const ready =
  process.getuid?.() === 0 &&
  existsSync('/usr/bin/mmdebstrap') &&
  existsSync('/usr/bin/qemu-system-x86_64') &&
  existsSync('/usr/lib/ipxe/qemu/efi-virtio.rom');

test('rootfs -> dracut -> ipxe boots under qemu', { skip: !ready && 'needs root, mmdebstrap, qemu-system-x86, ipxe-qemu', timeout: 30 * 60_000 }, async () => {
  const base = await mkdtemp(join(tmpdir(), 'pipeline-stages-'));
  try {
    // The fixture's rootfs, built by the engine (or found in the shared test cache).
    const dir = join(base, 'rootfs');
    await mkdir(dir);
    await copyFile(await fixtureRootfs(), join(dir, 'rootfs.tar'));
    const rootfs: StageInput = { dir, files: ['rootfs.tar'], meta: {}, key: 'fixture', kind: 'mmdebstrap' };
    // No initramfs was generated inside the rootfs stage, and update-initramfs is restored.
    const list = await runProcess('tar', ['-tf', join(dir, 'rootfs.tar')], { capture: true });
    assert.doesNotMatch(list.stdout, /^\.\/boot\/initrd\.img-/m);
    assert.match(list.stdout, /^\.\/usr\/sbin\/update-initramfs$/m);
    assert.deepEqual(rootfs.files, ['rootfs.tar']);

    const dparams = { modules: ['pipeline-test', 'powernode'] };
    const boot1 = await stage(dracut, join(base, 'dracut1'), dparams, { rootfs });
    assert.deepEqual(boot1.files, ['initrd.img', 'vmlinuz']);
    assert.match(String(boot1.meta.kernel), /amd64$/);
    // Byte-identical rebuilds are `pipeline repro`'s job (test/integration/repro.test.ts).

    const ipxeParams = ipxe.params.parse({ cmdline: 'console=ttyS0 powernode.id=from-cmdline' });
    const out = await stage(ipxe, join(base, 'ipxe'), ipxeParams, { boot: boot1 });
    assert.deepEqual(out.files, ['boot.ipxe', 'initrd.img', 'vmlinuz']);
    assert.match(await readFile(join(out.dir, 'boot.ipxe'), 'utf8'), /^#!ipxe\nkernel vmlinuz initrd=initrd.img console=ttyS0/);

    const plans = [await ipxe.boot!({ arch: 'amd64', params: ipxeParams, dir: out.dir, workDir: base })].flat();
    assert.equal(plans.length, 2);
    const [direct, net] = plans;
    // The direct boot takes its command line from the published boot.ipxe, not from params.
    assert.ok(direct.args.join(' ').includes('-append initrd=initrd.img console=ttyS0 powernode.id=from-cmdline'), direct.args.join(' '));

    // Direct boot, with a fw_cfg identity the powernode module must pick over the cmdline one.
    direct.args.push('-fw_cfg', 'name=opt/powernode/identity,string=node-42');
    const r1 = await bootTest(direct, {
      expect: ['powernode: identity node-42 (from fw_cfg)', 'PIPELINE-BOOT-OK'],
      forbid: DEFAULT_FORBID,
      timeoutMs: 300_000,
    });
    assert.ok(r1.ok, `direct boot failed: ${r1.reason}\n${r1.logTail}`);

    // The real consumer of boot.ipxe: iPXE ROM, DHCP + TFTP from qemu's user netdev.
    const r2 = await bootTest(net, {
      expect: ['powernode: identity from-cmdline (from cmdline)', 'PIPELINE-BOOT-OK'],
      forbid: DEFAULT_FORBID,
      timeoutMs: 300_000,
    });
    assert.ok(r2.ok, `iPXE boot failed: ${r2.reason}\n${r2.logTail}`);

    // A forbidden pattern fails the test at once: no root and pipeline.test=0 ends in
    // emergency mode. boot() boots what boot.ipxe says, so the bad line goes there
    // (in a copy of the bundle); the params it gets are the good ones.
    const badDir = join(base, 'ipxe-bad');
    await mkdir(badDir);
    for (const f of out.files) await copyFile(join(out.dir, f), join(badDir, f));
    await writeFile(join(badDir, 'boot.ipxe'), ipxeScript('console=ttyS0 pipeline.test=0 root=/dev/nonexistent rd.retry=1 rd.timeout=5'));
    const bad = [await ipxe.boot!({ arch: 'amd64', params: ipxeParams, dir: badDir, workDir: base })].flat()[0];
    const r3 = await bootTest(bad, { expect: ['PIPELINE-BOOT-OK'], forbid: DEFAULT_FORBID, timeoutMs: 300_000 });
    assert.equal(r3.ok, false);
    assert.deepEqual(r3.missing, ['PIPELINE-BOOT-OK']);
    assert.ok(r3.forbidden.length > 0, `expected a forbidden match, got: ${r3.reason}`);
  } finally {
    await rm(base, { recursive: true, force: true });
  }
});
