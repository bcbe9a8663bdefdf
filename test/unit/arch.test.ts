// The arch table (src/arch.ts) and the code that must read it instead of spelling arch values.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { ARCH, ARCHES, archOfQemu, emulatorTools, hostArch } from '../../src/arch.js';
import * as stage from '../../src/stage.js';
import { directKernelBoot, SERIAL_CONSOLE } from '../../src/boot/boot.js';
import { diskBootPlans, firmwarePlans } from '../../outputs/_disk.js';
import { isoBootPlans, xorrisoArgs } from '../../outputs/iso.js';
import { rawTools } from '../../outputs/raw.js';
import { platformOf } from '../../src/lib/oci-layout.js';
import { ROOT } from '../helpers/paths.js';

test('one row per arch with every field, and the Discoverable Partitions root types', () => {
  assert.deepEqual(Object.keys(ARCH).sort(), [...ARCHES].sort());
  for (const a of ARCHES) assert.equal(ARCH[a].debian, a);
  assert.equal(ARCH.amd64.gptRootType, '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709');
  assert.equal(ARCH.arm64.gptRootType, 'B921B045-1DF0-41C3-AF44-4C6F280D3FAE');
  assert.equal(ARCH.amd64.efi.removable, 'BOOTX64.EFI');
  assert.equal(ARCH.arm64.efi.removable, 'BOOTAA64.EFI');
  assert.deepEqual(ARCH.arm64.qemuMachine, ['-M', 'virt', '-cpu', 'cortex-a57']);
  assert.deepEqual(ARCH.arm64.firmwares, ['uefi']);
  assert.deepEqual(platformOf('arm64'), { architecture: 'arm64', os: 'linux', variant: 'v8' });
  assert.deepEqual(platformOf('amd64'), { architecture: 'amd64', os: 'linux' });
  assert.equal(SERIAL_CONSOLE.arm64, 'ttyAMA0');
  assert.equal(archOfQemu('qemu-system-aarch64'), 'arm64');
  assert.equal(archOfQemu('qemu-system-riscv64'), undefined);
});

test('src/stage.ts re-exports the table helpers (kinds keep importing one module)', () => {
  assert.equal(stage.ARCHES, ARCHES);
  assert.equal(stage.hostArch, hostArch);
  assert.equal(stage.emulatorTools, emulatorTools);
  if (process.arch === 'x64') {
    assert.equal(hostArch(), 'amd64');
    assert.deepEqual(emulatorTools('amd64'), []);
    assert.equal(emulatorTools('arm64')[0]!.name, 'qemu-aarch64-static');
  }
});

test('arm64 disk boots: qemu-system-aarch64 virt/cortex-a57, AAVMF code read-only + a private vars copy, no NIC, UEFI only', (t) => {
  const workDir = mkdtempSync(join(tmpdir(), 'arch-test-'));
  t.after(() => rmSync(workDir, { recursive: true, force: true }));
  const plans = diskBootPlans({ arch: 'arm64', dir: '/img', workDir }, 'disk.raw', 'raw', 'raw disk');
  assert.equal(plans.length, 1);
  const p = plans[0]!;
  assert.equal(p.qemu, 'qemu-system-aarch64');
  assert.equal(p.label, 'raw disk (AAVMF)');
  const a = p.args.join(' ');
  assert.match(a, /^-M virt -cpu cortex-a57 -nic none /);
  assert.match(a, /if=pflash,format=raw,unit=0,readonly=on,file=\/usr\/share\/AAVMF\/AAVMF_CODE\.fd/);
  assert.ok(a.includes(`if=pflash,format=raw,unit=1,file=${join(workDir, 'AAVMF_VARS.fd')}`), a);
  // The vars are a private copy: the firmware writes there, never to the template.
  assert.deepEqual(readFileSync(join(workDir, 'AAVMF_VARS.fd')), readFileSync(ARCH.arm64.uefiFirmware.vars));
  // Asking an arm64 disk for BIOS yields nothing to boot.
  assert.deepEqual(firmwarePlans({ arch: 'arm64', dir: '/img', workDir, firmware: 'bios' }, [{ firmware: 'bios', args: [], label: 'x' }]), []);
  // amd64 keeps SeaBIOS + OVMF.
  assert.deepEqual(diskBootPlans({ arch: 'amd64', dir: '/img', workDir }, 'disk.raw', 'raw', 'raw disk').map((x) => x.label), ['raw disk (SeaBIOS)', 'raw disk (OVMF)']);
  // The arm64 ISO boots as a CD on virtio-scsi (virt has no IDE).
  const iso = isoBootPlans({ arch: 'arm64', dir: '/img', workDir });
  assert.equal(iso.length, 1);
  assert.match(iso[0]!.args.join(' '), /scsi-cd,bus=scsi0\.0,drive=cd0,bootindex=0/);
});

test('direct kernel boots use the table machine', () => {
  const p = directKernelBoot('arm64', '/k', '/i', 'console=ttyAMA0', 'x');
  assert.deepEqual(p.args.slice(0, 4), ['-M', 'virt', '-cpu', 'cortex-a57']);
  assert.equal(directKernelBoot('amd64', '/k', '/i', 'c', 'x').qemu, 'qemu-system-x86_64');
});

test('arm64 raw and iso need no host GRUB; the arm64 ISO has no BIOS El Torito entry or MBR code', () => {
  assert.ok(rawTools('amd64').some((x) => x.name === 'grub-mkimage'));
  assert.ok(!rawTools('arm64').some((x) => x.name === 'grub-mkimage'));
  const a = xorrisoArgs({ out: 'o', label: 'L', staging: 's', efiImg: 'e', bios: false });
  assert.ok(!a.includes('--grub2-mbr') && !a.includes('-eltorito-boot'));
  assert.deepEqual(a.slice(a.indexOf('-e'), a.indexOf('-e') + 3), ['-e', '--interval:appended_partition_2:all::', '-no-emul-boot']);
});

test('no arch value is spelled outside the table in engine, stages, doctor and boot code', () => {
  // Arch words that belong in src/arch.ts only. Comments are allowed to mention them.
  const re = /'(amd64|arm64|x86_64|aarch64|ttyS0|ttyAMA0|BOOTX64\.EFI|BOOTAA64\.EFI|qemu-system-x86_64|qemu-system-aarch64|qemu-aarch64|qemu-x86_64)'|\/usr\/share\/(OVMF|AAVMF)/;
  const files = execFileSync('git', ['ls-files', '--cached', '--others', '--exclude-standard', 'src/engine', 'src/doctor', 'src/boot', 'stages', 'outputs'], { cwd: ROOT, encoding: 'utf8' })
    .split('\n')
    .filter((f) => f.endsWith('.ts'));
  const hits: string[] = [];
  for (const f of files) {
    let text: string;
    try {
      text = readFileSync(join(ROOT, f), 'utf8');
    } catch {
      continue;
    }
    text.split('\n').forEach((line, i) => {
      // Comments may name arches; a kind's own `arches:` declaration is what kinds are for.
      const code = line.replace(/\/\/.*$/, '').replace(/^\s*\*.*$/, '').replace(/^\s*arches: \[.*\],?$/, '');
      if (re.test(code)) hits.push(`${f}:${i + 1}: ${line.trim()}`);
    });
  }
  assert.deepEqual(hits, []);
});
