// Shared by the disk emitters (raw, qcow2, iso, rpi4): their common run() preamble
// and how qemu boots a disk image under the arch's firmwares (SeaBIOS, OVMF,
// AAVMF). Not a kind (leading `_`).
import { copyFileSync, existsSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { z } from 'zod';
import { contentSeed, type FatFile } from '../src/lib/diskbuild.js';
import { systemdBootConfig } from '../src/lib/diskimage.js';
import { ARCH, type Arch, type Firmware } from '../src/arch.js';
import { qemuMachine } from '../src/boot/boot.js';
import { recordedSha256 } from '../src/engine/context.js';
import { StageError, type BootPlan, type RunContext } from '../src/stage.js';

/**
 * raw's and iso's `cmdline`: a command line that goes verbatim into a grub.cfg `linux` line, checked at
 * validate time, since grubConfig (src/lib/diskimage.ts) refuses these same
 * characters only after the rootfs and initramfs were built.
 */
export const GrubCmdline = z
  .string()
  .regex(/^[^\n\r;'"`$\\{}]*$/, 'expected a kernel command line GRUB takes verbatim: one line without quotes, $, ;, \\, ` or { }');

export interface DiskInputs {
  /** The rootfs input's tarball. */
  tarPath: string;
  vmlinuz: string;
  initrd: string;
  /** Seed for every UUID, serial and label the image derives: inputs' content, params, epoch. */
  seed: string;
}

/** Input paths of a disk emitter (rootfs + boot) and its content seed; rootFiles replace the rootfs tar in the seed (raw's composefs root). */
export async function diskInputs(ctx: RunContext<unknown>, tag: string, rootFiles?: string[]): Promise<DiskInputs> {
  const tarPath = rootFiles ? '' : ctx.rootfsTar('rootfs');
  const vmlinuz = ctx.input('boot', 'vmlinuz');
  const initrd = ctx.input('boot', 'initrd.img');
  const seed = await contentSeed(tag, [...(rootFiles ?? [tarPath]), vmlinuz, initrd], { params: ctx.params, epoch: ctx.sourceDateEpoch }, (f) => recordedSha256(ctx.inputs, f));
  return { tarPath, vmlinuz, initrd, seed };
}

export interface DiskBootContext {
  arch: Arch;
  dir: string;
  workDir: string;
  firmware?: string;
}

/** qemu plans for a bootable disk image under each firmware the arch boots disks with (SeaBIOS, OVMF/AAVMF). */
export function diskBootPlans(ctx: DiskBootContext, file: string, format: 'raw' | 'qcow2', what: string): BootPlan[] {
  // snapshot=on: the guest writes to its root filesystem; keep the published file pristine.
  const drive = virtioDisk(join(ctx.dir, file), format);
  return firmwarePlans(
    ctx,
    ARCH[ctx.arch].firmwares.map((firmware) => ({ firmware, args: drive, label: `${what} (${firmwareName(ctx.arch, firmware)})` })),
  );
}

/** How boot labels name a firmware: SeaBIOS, or the UEFI build the arch boots with (OVMF, AAVMF). */
export function firmwareName(arch: Arch, firmware: Firmware): string {
  return firmware === 'bios' ? 'SeaBIOS' : basename(dirname(ARCH[arch].uefiFirmware.code));
}

/**
 * The plans the chosen firmware allows (all when none is chosen) on the arch's qemu
 * machine; UEFI gets its pflash drives. Plans for a firmware the arch does not have
 * are dropped.
 */
export function firmwarePlans(ctx: DiskBootContext, plans: { firmware: Firmware; args: string[]; label: string }[]): BootPlan[] {
  const m = qemuMachine(ctx.arch);
  // Disk boots get no NIC: with one, AAVMF tries PXE over IPv4 and IPv6 first (minutes).
  const noNic = ['-nic', 'none'];
  return plans
    .filter((p) => ARCH[ctx.arch].firmwares.includes(p.firmware) && (!ctx.firmware || ctx.firmware === p.firmware))
    .map((p) => ({ qemu: m.qemu, args: [...m.args, ...noNic, ...(p.firmware === 'uefi' ? uefiArgs(ctx.arch, ctx.workDir) : []), ...p.args], label: p.label }));
}

/**
 * A virtio disk that firmware boots first. An explicit bootindex matters for OVMF:
 * with some disks (the hybrid ISO) it otherwise puts no boot option for the disk
 * in its boot order and falls through to PXE and the UEFI shell.
 */
export function virtioDisk(path: string, format: 'raw' | 'qcow2'): string[] {
  return [
    '-drive', `if=none,id=disk0,file=${path.replace(/,/g, ',,')},format=${format},snapshot=on`,
    '-device', 'virtio-blk-pci,drive=disk0,bootindex=0',
  ];
}

/** The arch's UEFI code (read-only pflash) + a private writable copy of its variable store. */
export function uefiArgs(arch: Arch, workDir: string): string[] {
  const fw = ARCH[arch].uefiFirmware;
  const vars = join(workDir, basename(fw.vars));
  copyFileSync(fw.vars, vars);
  return [
    '-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${fw.code.replace(/,/g, ',,')}`,
    '-drive', `if=pflash,format=raw,unit=1,file=${vars.replace(/,/g, ',,')}`,
  ];
}

/** Where Debian's systemd-boot-efi package puts the loaders in the target tree. */
export const SYSTEMD_BOOT_DIR = '/usr/lib/systemd/boot/efi';

/**
 * ESP files for a UEFI-only disk booted by systemd-boot taken from the target rootfs
 * (the arch's own build, from the arch's archive; no host tool builds anything):
 * the loader at the removable-media path, loader.conf, one entry, kernel, initrd.
 */
export async function systemdBootEspFiles(
  o: { arch: Arch; tree: string; workDir: string; vmlinuz: string; initrd: string; title: string; cmdline: string; timeout: number },
): Promise<FatFile[]> {
  const efi = ARCH[o.arch].efi;
  const loader = join(o.tree, SYSTEMD_BOOT_DIR, efi.systemdBoot);
  if (!existsSync(loader)) {
    throw new StageError(`the rootfs has no ${SYSTEMD_BOOT_DIR}/${efi.systemdBoot}: add systemd-boot-efi to the rootfs stage's packages (the ${o.arch} disk boots with systemd-boot)`);
  }
  const cfg = systemdBootConfig({ title: o.title, kernel: '/boot/vmlinuz', initrd: '/boot/initrd.img', cmdline: o.cmdline }, o.timeout);
  const loaderConf = join(o.workDir, 'loader.conf');
  const entry = join(o.workDir, 'linux.conf');
  await writeFile(loaderConf, cfg.loader);
  await writeFile(entry, cfg.entry);
  return [
    { src: loader, dest: `/EFI/BOOT/${efi.removable}` },
    { src: loaderConf, dest: '/loader/loader.conf' },
    { src: entry, dest: '/loader/entries/linux.conf' },
    { src: o.vmlinuz, dest: '/boot/vmlinuz' },
    { src: o.initrd, dest: '/boot/initrd.img' },
  ];
}
