// Shared by the disk emitters (raw, qcow2, iso): their common run() preamble and
// how qemu boots a disk image under SeaBIOS and OVMF. Not a kind (leading `_`).
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { contentSeed } from '../src/lib/diskbuild.js';
import type { BootPlan, RunContext } from '../src/stage.js';

/**
 * raw's and iso's `cmdline`: a command line that goes verbatim into a grub.cfg `linux` line, checked at
 * validate time, since grubConfig (src/lib/diskimage.ts) refuses these same
 * characters only after the rootfs and initramfs were built.
 */
export const GrubCmdline = z
  .string()
  .regex(/^[^\n\r;'"`$\\{}]*$/, 'expected a kernel command line GRUB takes verbatim: one line without quotes, $, ;, \\, ` or { }');

export const OVMF_CODE = '/usr/share/OVMF/OVMF_CODE_4M.fd';
export const OVMF_VARS = '/usr/share/OVMF/OVMF_VARS_4M.fd';

export interface DiskInputs {
  /** The rootfs input's tarball. */
  tarPath: string;
  vmlinuz: string;
  initrd: string;
  /** Seed for every UUID, serial and label the image derives: inputs' content, params, epoch. */
  seed: string;
}

/** Input paths of a disk emitter (rootfs + boot) and its content seed. */
export async function diskInputs(ctx: RunContext<unknown>, tag: string): Promise<DiskInputs> {
  const tarPath = ctx.rootfsTar('rootfs');
  const vmlinuz = ctx.input('boot', 'vmlinuz');
  const initrd = ctx.input('boot', 'initrd.img');
  const seed = await contentSeed(tag, [tarPath, vmlinuz, initrd], { params: ctx.params, epoch: ctx.sourceDateEpoch });
  return { tarPath, vmlinuz, initrd, seed };
}

export interface DiskBootContext {
  dir: string;
  workDir: string;
  firmware?: string;
}

/** qemu plans for a bootable disk image under SeaBIOS and/or OVMF. */
export function diskBootPlans(ctx: DiskBootContext, file: string, format: 'raw' | 'qcow2', what: string): BootPlan[] {
  // snapshot=on: the guest writes to its root filesystem; keep the published file pristine.
  const drive = virtioDisk(join(ctx.dir, file), format);
  return firmwarePlans(ctx, [
    { firmware: 'bios', args: drive, label: `${what} (SeaBIOS)` },
    { firmware: 'uefi', args: drive, label: `${what} (OVMF)` },
  ]);
}

/** The plans the chosen firmware allows (all when none is chosen); OVMF gets its pflash drives. */
export function firmwarePlans(ctx: DiskBootContext, plans: { firmware: 'bios' | 'uefi'; args: string[]; label: string }[]): BootPlan[] {
  return plans
    .filter((p) => !ctx.firmware || ctx.firmware === p.firmware)
    .map((p) => ({ qemu: 'qemu-system-x86_64', args: p.firmware === 'uefi' ? [...ovmfArgs(ctx.workDir), ...p.args] : [...p.args], label: p.label }));
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

/** OVMF code (read-only) + a private writable copy of the variable store. */
export function ovmfArgs(workDir: string): string[] {
  const vars = join(workDir, 'OVMF_VARS.fd');
  copyFileSync(OVMF_VARS, vars);
  return [
    '-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${OVMF_CODE}`,
    '-drive', `if=pflash,format=raw,unit=1,file=${vars.replace(/,/g, ',,')}`,
  ];
}
