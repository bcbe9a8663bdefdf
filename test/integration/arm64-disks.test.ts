// arm64 disk images on an amd64 host: the fixtures/minimal-arm64.yaml rootfs
// (systemd-boot-efi, raspi-firmware, the os-overlay boot probe) and its dracut
// initramfs-os feed raw, qcow2, arm64-uefi (raw with other defaults) and iso.
// Each image is checked on disk, then booted once under qemu-system-aarch64 -M virt
// (TCG) with AAVMF: firmware -> systemd-boot at \EFI\BOOT\BOOTAA64.EFI -> kernel ->
// initramfs -> the real root -> systemd -> PIPELINE-OS-OK. Panics and the emergency
// shell fail the boot (the spec's forbid list).
// Time on 2 cores with the rootfs and initramfs cached: emitters ~2-3 min, boots
// ~1-2 min each. Needs what arm64.test.ts needs plus qemu-efi-aarch64, mtools,
// e2fsprogs, fdisk, squashfs-tools, xorriso, qemu-utils.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { ARCH } from '../../src/arch.js';
import { cli, ROOT, summary } from '../helpers/cli.js';

const FIXTURE = path.join(ROOT, 'fixtures', 'minimal-arm64.yaml');
const POWERNODE = path.join(ROOT, 'pipelines', 'powernode.yaml');
const VARIANTS = ['raw', 'qcow2', 'arm64-uefi', 'iso'];
let work = '';
let out = '';

before(async () => {
  work = await fs.mkdtemp(path.join(process.env.PIPELINE_TEST_TMP ?? os.tmpdir(), 'pipeline-arm64-disks-'));
  out = path.join(work, 'images');
});
after(async () => {
  if (work && !process.env.PIPELINE_KEEP_TEST_TMP) await fs.rm(work, { recursive: true, force: true });
});

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', env: { ...process.env, MTOOLS_SKIP_CHECK: '1' }, maxBuffer: 64 * 1024 * 1024 });
}

/** A PE/COFF image's machine field (0xAA64 for arm64 EFI binaries). */
function peMachine(b: Buffer): number {
  assert.equal(b.subarray(0, 2).toString('latin1'), 'MZ');
  const pe = b.readUInt32LE(0x3c);
  assert.equal(b.subarray(pe, pe + 4).toString('latin1'), 'PE\0\0');
  return b.readUInt16LE(pe + 4);
}

test('build --all (no arch: every arch the spec lists) then the arm64 disks: GPT with an ESP and an arm64 root, systemd-boot at BOOTAA64.EFI, no BIOS parts', async () => {
  const r = await cli(['build', '--all', '-f', FIXTURE, '--out', out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(summary(r).ok, true);
  // The fixture lists arm64 only: every variant lands in images/<variant>/arm64.
  assert.deepEqual((await fs.readdir(out)).sort(), ['arm64-uefi', 'ipxe', 'iso', 'kernel-initrd', 'qcow2', 'raw', 'rpi4']);
  for (const v of await fs.readdir(out)) assert.deepEqual(await fs.readdir(path.join(out, v)), ['arm64']);
  for (const v of VARIANTS) {
    const dir = path.join(out, v, 'arm64');
    execFileSync('sha256sum', ['--check', '--strict', 'SHA256SUMS'], { cwd: dir });
    const m = JSON.parse(await fs.readFile(path.join(dir, 'build-manifest.json'), 'utf8'));
    assert.equal(m.arch, 'arm64');
  }

  for (const v of ['raw', 'arm64-uefi']) {
    const disk = path.join(out, v, 'arm64', 'disk.raw');
    const pt = JSON.parse(sh('sfdisk', ['--json', disk])).partitiontable;
    assert.equal(pt.label, 'gpt');
    assert.deepEqual(
      pt.partitions.map((p: { type: string }) => p.type.toUpperCase()),
      ['C12A7328-F81F-11D2-BA4B-00A0C93EC93B', ARCH.arm64.gptRootType],
      `${v}: ESP + root (Linux root arm64), no BIOS boot partition`,
    );
    const esp = `${disk}@@${pt.partitions[0].start * 512}`;
    const loader = path.join(work, `${v}-BOOTAA64.EFI`);
    sh('mcopy', ['-n', '-i', esp, '::/EFI/BOOT/BOOTAA64.EFI', loader]);
    assert.equal(peMachine(await fs.readFile(loader)), 0xaa64, 'an arm64 EFI binary');
    const entry = sh('mtype', ['-i', esp, '::/loader/entries/linux.conf']);
    assert.match(entry, /^linux \/boot\/vmlinuz$/m);
    assert.match(entry, /^options root=UUID=[0-9a-f-]{36} rw .*console=ttyAMA0/m);
    sh('mdir', ['-i', esp, '::/boot/initrd.img']);
    // The MBR is a protective one only: no boot code (nothing for a BIOS to run).
    const mbr = Buffer.alloc(440);
    const h = await fs.open(disk, 'r');
    await h.read(mbr, 0, 440, 0);
    await h.close();
    assert.ok(mbr.every((b) => b === 0), `${v}: no MBR boot code`);
  }
  // arm64-uefi is the same emitter with other defaults: the graphical console too, a longer menu.
  const uefiEsp = (() => {
    const disk = path.join(out, 'arm64-uefi', 'arm64', 'disk.raw');
    return `${disk}@@${JSON.parse(sh('sfdisk', ['--json', disk])).partitiontable.partitions[0].start * 512}`;
  })();
  assert.match(sh('mtype', ['-i', uefiEsp, '::/loader/entries/linux.conf']), /console=tty0 console=ttyAMA0/);
  assert.match(sh('mtype', ['-i', uefiEsp, '::/loader/loader.conf']), /^timeout 3$/m);

  sh('qemu-img', ['check', '-f', 'qcow2', path.join(out, 'qcow2', 'arm64', 'disk.qcow2')]);

  // The ISO: one El Torito entry, for EFI; no BIOS entry.
  const iso = path.join(out, 'iso', 'arm64', 'live.iso');
  const report = sh('xorriso', ['-indev', iso, '-report_el_torito', 'plain']);
  const entries = report.split('\n').filter((l) => /^El Torito boot img :/.test(l));
  assert.equal(entries.length, 1, report);
  assert.match(entries[0]!, /\bUEFI\b/, report);
});

test('every arm64 disk and the ISO boot under qemu-system-aarch64 virt + AAVMF to the OS marker', async () => {
  const r = await cli(['test', 'arm64', ...VARIANTS, '-f', FIXTURE, '--out', out, '--json']);
  const boots = r.events.filter((e) => e.event === 'boot-test') as { label: string; ok: boolean; seconds: number }[];
  assert.equal(boots.length, VARIANTS.length, r.stderr);
  for (const b of boots) {
    assert.match(b.label, /AAVMF/);
    assert.equal(b.ok, true, `${b.label}: ${JSON.stringify(b)}\n${r.stderr}`);
  }
  assert.equal(r.code, 0, r.stderr);
  console.log(boots.map((b) => `${b.label}: ${b.seconds} s`).join('\n'));
});

test('build with neither an arch nor --all exits 2', async () => {
  const r = await cli(['build', '-f', FIXTURE]);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /give an arch/);
});

test('an arm64-only variant asked for amd64 exits 2 and names the arches it supports', async () => {
  for (const v of ['rpi4', 'arm64-uefi']) {
    const r = await cli(['plan', 'amd64', v, '-f', POWERNODE]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, new RegExp(`variant "${v}" is not built for amd64; it is for: arm64`));
  }
});
