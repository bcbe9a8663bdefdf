// Hybrid BIOS+UEFI live ISO (live.iso): boots as a CD (El Torito) under SeaBIOS
// and OVMF, and as a disk (USB stick, virtio) through an MBR/GPT hybrid.
//
// What boots: GRUB (host grub-mkimage) loads /boot/vmlinuz + /boot/initrd.img from
// the ISO; the initramfs must contain dracut's dmsquash-live module, which finds
// the ISO by label (root=live:CDLABEL=…), mounts /LiveOS/squashfs.img (the whole
// rootfs) and an overlayfs with a tmpfs upper layer over it, and switches root
// into it: the real OS runs, not just the initramfs.
// So the spec must have: the rootfs package `dracut-live` (ships the module), and
// the dracut stage `modules: [dmsquash-live]` (it pulls in dm, img-lib,
// rootfs-block; overlayfs is used via rd.live.overlay.overlayfs=1).
//
// Layout (xorriso -as mkisofs, the same recipe grub-mkrescue uses):
//  - El Torito entry 1 (BIOS): GRUB i386-pc-eltorito image, with boot info table.
//  - El Torito entry 2 (UEFI): a small FAT image holding EFI/BOOT/BOOTX64.EFI,
//    also appended as GPT partition 2 (an ESP) for UEFI disk boot.
//  - MBR: GRUB's boot_hybrid.img, pointed at the El Torito image (BIOS disk boot).
// arm64 (UEFI only): one El Torito entry, a FAT image holding systemd-boot from the
// rootfs (as for raw) with its entry, the kernel and the initrd; no MBR code.
// Reproducibility: xorriso under SOURCE_DATE_EPOCH fixes volume dates, the volume
// UUID and the GPT GUIDs; all staged files are stamped with the epoch; mksquashfs
// is reproducible by design with -mkfs-time; the FAT image comes from mtools with
// a derived serial.
import { copyFile, mkdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { ARCH, defineStage, type BootPlan, type RunContext } from '../src/stage.js';
import { alignUp, deriveFatSerial, GPT_TYPE, grubConfig, grubEarlyConfig, isoLabel, MiB } from '../src/lib/diskimage.js';
import { buildFat, grubImage, stampTree, type FatFile } from '../src/lib/diskbuild.js';
import { joinCmdline, kernelCmdline } from './_boot.js';
import { diskInputs, firmwareName, firmwarePlans, GrubCmdline, systemdBootEspFiles, virtioDisk, type DiskBootContext } from './_disk.js';

export const Params = z
  .object({
    /** Kernel command line after the live-boot arguments the emitter adds; default: serial console only. */
    cmdline: GrubCmdline.optional(),
    /** ISO volume label (root=live:CDLABEL=); default derived from the content. */
    label: z.string().regex(/^[A-Z0-9_]{1,32}$/, 'label: upper case, digits, _ (max 32)').optional(),
    /** squashfs compressor; zstd is fast to build and to boot. */
    compression: z.enum(['zstd', 'xz', 'gzip', 'lz4']).default('zstd'),
    /** GRUB menu timeout in seconds. */
    timeout: z.number().int().min(0).max(60).default(1),
  })
  .strict();
export type IsoParams = z.infer<typeof Params>;

/** The live-boot arguments the emitter must add (they name this ISO), then the spec's command line. */
export function liveCmdline(label: string, cmdline: string): string {
  return joinCmdline(`root=live:CDLABEL=${label}`, 'rd.live.image', 'rd.live.overlay.overlayfs=1', cmdline);
}

export function squashfsArgs(tree: string, out: string, p: IsoParams, epoch: number): string[] {
  const comp = p.compression === 'zstd' ? ['-comp', 'zstd', '-Xcompression-level', '6'] : ['-comp', p.compression];
  return [tree, out, '-noappend', ...comp, '-mkfs-time', String(epoch), '-no-progress', '-quiet'];
}

export function xorrisoArgs(o: { out: string; label: string; staging: string; efiImg: string; bios?: boolean }): string[] {
  const common = ['-as', 'mkisofs', '-iso-level', '3', '-rational-rock', '-volid', o.label, '-output', o.out];
  // The FAT image, also appended as GPT partition 2 (an ESP) so the ISO boots from a USB stick too.
  const esp = ['-append_partition', '2', GPT_TYPE.esp, o.efiImg, '-appended_part_as_gpt', '-eltorito-catalog', 'boot/boot.cat'];
  const uefiEntry = ['-e', '--interval:appended_partition_2:all::', '-no-emul-boot'];
  if (o.bios === false) {
    // UEFI only (arm64): one El Torito entry, the FAT image.
    return [...common, '-partition_offset', '16', ...esp, ...uefiEntry, o.staging];
  }
  return [
    ...common,
    '--grub2-mbr', '/usr/lib/grub/i386-pc/boot_hybrid.img',
    '-partition_offset', '16',
    '--mbr-force-bootable',
    ...esp,
    '-eltorito-boot', 'boot/grub/eltorito.img',
    '-no-emul-boot', '-boot-load-size', '4', '-boot-info-table', '--grub2-boot-info',
    '-eltorito-alt-boot',
    ...uefiEntry,
    o.staging,
  ];
}

async function buildIso(ctx: RunContext<IsoParams>): Promise<void> {
  const p = ctx.params;
  const { vmlinuz, initrd, seed } = await diskInputs(ctx, 'iso-v1');
  const w = ctx.workDir;
  const epoch = ctx.sourceDateEpoch;
  const label = p.label ?? isoLabel(`LIVE_${seed.slice(0, 12)}`);

  const tree = await ctx.rootfsTree('rootfs');
  const staging = join(w, 'iso');
  await mkdir(join(staging, 'LiveOS'), { recursive: true });
  await mkdir(join(staging, 'boot', 'grub'), { recursive: true });
  await ctx.exec('mksquashfs', squashfsArgs(tree, join(staging, 'LiveOS', 'squashfs.img'), p, epoch), {
    // mksquashfs refuses SOURCE_DATE_EPOCH together with -mkfs-time, and the variable
    // would also reset every file's mtime; the explicit option fixes only the mkfs time.
    env: { SOURCE_DATE_EPOCH: undefined },
  });

  const cmdline = liveCmdline(label, kernelCmdline(ctx.arch, p.cmdline));
  const bios = ARCH[ctx.arch].firmwares.includes('bios');
  let efiFiles: FatFile[];
  if (bios) {
    // amd64: GRUB reads kernel, initrd and grub.cfg from the ISO 9660 tree.
    const early = grubEarlyConfig({ label });
    await grubImage(ctx, 'i386-pc-eltorito', join(staging, 'boot', 'grub', 'eltorito.img'), early, w);
    const efiBin = join(w, ARCH[ctx.arch].efi.removable);
    await grubImage(ctx, ARCH[ctx.arch].efi.grubTarget, efiBin, early, w);
    await writeFile(join(staging, 'boot', 'grub', 'grub.cfg'), grubConfig({ title: 'Linux (live)', kernel: '/boot/vmlinuz', initrd: '/boot/initrd.img', cmdline }, p.timeout));
    await copyFile(vmlinuz, join(staging, 'boot', 'vmlinuz'));
    await copyFile(initrd, join(staging, 'boot', 'initrd.img'));
    efiFiles = [{ src: efiBin, dest: `/EFI/BOOT/${ARCH[ctx.arch].efi.removable}` }];
  } else {
    // UEFI only (arm64): systemd-boot from the rootfs reads only its own FAT image,
    // so kernel, initrd and the loader entry live in the El Torito image.
    efiFiles = await systemdBootEspFiles({ arch: ctx.arch, tree, workDir: w, vmlinuz, initrd, title: 'Linux (live)', cmdline, timeout: p.timeout });
  }

  const efiImg = join(w, 'efi.img');
  let efiContent = 0;
  for (const f of efiFiles) efiContent += (await stat(f.src)).size;
  // Slack for FAT metadata; the kernel and initrd need more than GRUB's one binary.
  const efiBytes = Math.max(4 * MiB, alignUp((bios ? efiContent : Math.ceil(efiContent * 1.05)) + MiB, MiB));
  await buildFat(ctx, { image: efiImg, bytes: efiBytes, serial: deriveFatSerial(seed, 'iso-efi'), label: 'EFIBOOT', hiddenSectors: 0, fat32: efiBytes > 256 * MiB, files: efiFiles, staging: join(w, 'fat-staging') });

  await stampTree(staging, epoch);
  const iso = join(ctx.outDir, 'live.iso');
  await ctx.exec('xorriso', xorrisoArgs({ out: iso, label, staging, efiImg, bios }), { env: { SOURCE_DATE_EPOCH: String(epoch), TZ: 'UTC' } });
  ctx.setMeta({ kernel: ctx.inputs.boot!.meta.kernel, cmdline, label, size: (await stat(iso)).size });
}

export function isoBootPlans(ctx: DiskBootContext): BootPlan[] {
  const iso = join(ctx.dir, 'live.iso').replace(/,/g, ',,');
  if (!ARCH[ctx.arch].firmwares.includes('bios')) {
    // virt has no IDE: the CD sits on virtio-scsi. One boot per firmware (TCG is slow).
    const scsiCd = ['-device', 'virtio-scsi-pci,id=scsi0', '-drive', `if=none,id=cd0,file=${iso},format=raw,media=cdrom,readonly=on`, '-device', 'scsi-cd,bus=scsi0.0,drive=cd0,bootindex=0'];
    return firmwarePlans(ctx, [{ firmware: 'uefi', args: scsiCd, label: `iso as CD (${firmwareName(ctx.arch, 'uefi')})` }]);
  }
  const cd = ['-drive', `if=none,id=cd0,file=${iso},format=raw,media=cdrom,readonly=on`, '-device', 'ide-cd,drive=cd0,bootindex=0'];
  const usb = ['-device', 'qemu-xhci', '-drive', `if=none,id=stick,file=${iso},format=raw,snapshot=on`, '-device', 'usb-storage,drive=stick,bootindex=0'];
  return firmwarePlans(ctx, [
    { firmware: 'bios', args: cd, label: 'iso as CD (SeaBIOS)' },
    { firmware: 'bios', args: usb, label: 'iso as USB disk (SeaBIOS)' },
    { firmware: 'uefi', args: cd, label: 'iso as CD (OVMF)' },
    { firmware: 'uefi', args: virtioDisk(join(ctx.dir, 'live.iso'), 'raw'), label: 'iso as virtio disk (OVMF)' },
  ]);
}

export default defineStage({
  kind: 'iso',
  // 2: `cmdline` is the whole command line after the live-boot args; console=ttyS0 is no longer added.
  version: '2',
  summary: 'hybrid BIOS+UEFI live ISO (GRUB, squashfs rootfs via dracut dmsquash-live)',
  params: Params,
  inputs: ['rootfs', 'boot'],
  // The rootfs is unpacked with its owners and device nodes (squashfs keeps them).
  requires: ['root'],
  // Not heavy: the emitters fed by one rootfs are meant to run side by side
  // (they share one read-only unpacked rootfs, see RunContext.rootfsTree; no chroot, no network).
  tools: (_p, arch) => [
    { name: 'tar', apt: 'tar' },
    { name: 'mksquashfs', apt: 'squashfs-tools', versionArgs: ['-version'] },
    { name: 'xorriso', apt: 'xorriso' },
    { name: 'mformat', apt: 'mtools' },
    // grub-mkimage reads the platform modules from /usr/lib/grub/{i386-pc,x86_64-efi}.
    // UEFI-only arches boot systemd-boot from the rootfs instead.
    ...(ARCH[arch].firmwares.includes('bios') ? [{ name: 'grub-mkimage', apt: 'grub-common', packages: ['grub-pc-bin', 'grub-efi-amd64-bin'] }] : []),
  ],
  run: buildIso,
  boot: isoBootPlans,
});
