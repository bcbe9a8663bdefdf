// Raw GPT disk image (disk.raw): dd it to a block device or a USB stick.
// What differs by arch comes from the arch table (src/arch.ts): firmwares, loader
// path, root partition type.
//
// arm64 (UEFI only): systemd-boot, systemd-bootaa64.efi taken from the target
// rootfs (package systemd-boot-efi) at \EFI\BOOT\BOOTAA64.EFI, so no NVRAM entry
// is needed. Chosen over GRUB's arm64-efi because it is one prebuilt EFI binary
// from the arch's own archive plus two text files: nothing is built on the host, so
// no amd64 grub-mkimage has to match the target's GRUB module ABI, and the kernel's
// EFI stub does the loading. Layout: p1 ESP | p2 root (type "Linux root arm64").
//
// amd64 bootloader: GRUB 2 for both firmwares, built on the host with grub-mkimage
// (grub-pc-bin + grub-efi-amd64-bin), not inside the rootfs.
//  - One bootloader and one grub.cfg for SeaBIOS and OVMF, so both boot paths run
//    the same menu entry and command line; systemd-boot would cover UEFI only and
//    still need GRUB (or syslinux) for BIOS.
//  - Built from the host's GRUB, so the rootfs needs no bootloader package and no
//    chroot runs at image time; the images are self-contained (all modules built
//    in, early config embedded) and grub-mkimage output is byte-reproducible.
//  - Kernel, initrd and grub.cfg live on the FAT ESP, so GRUB never has to read the
//    ext4 root (GRUB 2.06 does not know every ext4 feature a newer mke2fs sets) and
//    the root partition holds exactly the rootfs tree.
//  - BIOS: boot.img in the MBR and core.img in a 1 MiB BIOS boot partition, patched
//    in place (patchGrubBios) because grub-bios-setup probes the host's disks and
//    refuses an image file.
//
// Layout: p1 BIOS boot (1 MiB) | p2 ESP (FAT32, >= 64 MiB) | p3 root (ext4, type
// "Linux root x86-64"). Built without mounting or loop devices: mke2fs -d from the
// unpacked tree straight into the root partition of the disk file (-E offset), mtools
// for the ESP (dd into place), sfdisk on the image file.
// Reproducibility: every UUID/GUID, the ext4 hash seed and the FAT serial derive
// from the content of the inputs; mke2fs runs under E2FSPROGS_FAKE_TIME and a
// debugfs pass pins the atime/ctime mke2fs copies from the unpacked tree; mtools
// run under SOURCE_DATE_EPOCH with pre-stamped sources.
import { open, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { ARCH, defineStage, StageError, type Arch, type RunContext, type ToolSpec } from '../src/stage.js';
import {
  autoEspBytes,
  autoExt4Bytes,
  debugfsTimeScript,
  deriveFatSerial,
  deriveUuid,
  ext4InodeCount,
  fatUuid,
  GPT_TYPE,
  grubConfig,
  grubEarlyConfig,
  MiB,
  parseSize,
  patchGrubBios,
  planGptDisk,
  SECTOR,
  sfdiskScript,
  type DiskPlan,
} from '../src/lib/diskimage.js';
import { assembleDisk, buildFat, grubImage, walkTree, type FatFile } from '../src/lib/diskbuild.js';

export { MKE2FS_CONF } from '../src/lib/diskbuild.js';
import { joinCmdline, kernelCmdline } from './_boot.js';
import { diskBootPlans, diskInputs, GrubCmdline, systemdBootEspFiles } from './_disk.js';
import { COMPOSEFS_MKE2FS_FEATURES, composefsCmdline, RootMode, stageComposefsRoot } from './_composefs-root.js';

const SIZE_RE = /^\d+[KMGT]?$/i;

export const Params = z
  .object({
    /** Kernel command line after the `root=UUID=… rw` the emitter adds; default: serial console only. */
    cmdline: GrubCmdline.optional(),
    /** ext4 root partition size (e.g. 4G); default: content + `free`. */
    root_size: z.string().regex(SIZE_RE).optional(),
    /** Free space left in the root filesystem when root_size is automatic. */
    free: z.string().regex(SIZE_RE).default('256M'),
    /** ESP size; default: kernel + initrd + GRUB with slack, at least 64M. */
    esp_size: z.string().regex(SIZE_RE).optional(),
    /** GRUB menu timeout in seconds. */
    timeout: z.number().int().min(0).max(60).default(1),
    /** ext4 volume label of the root filesystem. */
    label: z.string().regex(/^[A-Za-z0-9_-]{1,16}$/).default('root'),
    /** composefs: the rootfs input is a composefs stage, the root is its verified image (outputs/_composefs-root.ts). Default ext4. */
    root: RootMode.optional(),
  })
  .strict();
export type RawParams = z.infer<typeof Params>;

export const TOOLS: ToolSpec[] = [
  { name: 'tar', apt: 'tar' },
  { name: 'mke2fs', apt: 'e2fsprogs', versionArgs: ['-V'] },
  { name: 'debugfs', apt: 'e2fsprogs', versionArgs: ['-V'] },
  { name: 'mformat', apt: 'mtools' },
  { name: 'sfdisk', apt: 'fdisk' },
  // grub-mkimage reads the platform modules from /usr/lib/grub/{i386-pc,x86_64-efi}.
  { name: 'grub-mkimage', apt: 'grub-common', packages: ['grub-pc-bin', 'grub-efi-amd64-bin'] },
  { name: 'dd', apt: 'coreutils' },
];

/** What raw runs for an arch: GRUB only where it builds the BIOS+UEFI GRUB (see the header). */
export function rawTools(arch: Arch): ToolSpec[] {
  return ARCH[arch].firmwares.includes('bios') ? TOOLS : TOOLS.filter((x) => x.name !== 'grub-mkimage');
}

/** The root filesystem the emitter must name, then the spec's command line. */
export function rawCmdline(rootUuid: string, cmdline: string): string {
  return joinCmdline(`root=UUID=${rootUuid}`, 'rw', cmdline);
}

async function buildRaw(ctx: RunContext<RawParams>): Promise<void> {
  const p = ctx.params;
  const cfs = p.root === 'composefs' ? await stageComposefsRoot(ctx) : undefined;
  const { vmlinuz, initrd, seed } = await diskInputs(ctx, 'raw-v1', cfs?.seedFiles);
  const w = ctx.workDir;
  const epoch = ctx.sourceDateEpoch;
  const rootUuid = deriveUuid(seed, 'ext4-root');
  const hashSeed = deriveUuid(seed, 'ext4-hash-seed');
  const espSerial = deriveFatSerial(seed, 'esp');

  const tree = cfs ? cfs.tree : await ctx.rootfsTree('rootfs');
  const { stats, entries } = await walkTree(tree);

  // --- bootloader and ESP content
  const cmdline = rawCmdline(rootUuid, joinCmdline(cfs ? composefsCmdline(cfs) : '', kernelCmdline(ctx.arch, p.cmdline)));
  const bios = ARCH[ctx.arch].firmwares.includes('bios');
  const coreImg = join(w, 'core.img');
  let espFiles: FatFile[];
  if (bios) {
    // GRUB from the host: one menu for SeaBIOS and UEFI.
    const early = grubEarlyConfig({ fsUuid: fatUuid(espSerial) });
    const efiImg = join(w, ARCH[ctx.arch].efi.removable);
    await grubImage(ctx, ARCH[ctx.arch].efi.grubTarget, efiImg, early, w);
    await grubImage(ctx, 'i386-pc', coreImg, early, w);
    const cfg = join(w, 'grub.cfg');
    await writeFile(cfg, grubConfig({ title: 'Linux', kernel: '/boot/vmlinuz', initrd: '/boot/initrd.img', cmdline }, p.timeout));
    espFiles = [
      { src: efiImg, dest: `/EFI/BOOT/${ARCH[ctx.arch].efi.removable}` },
      { src: cfg, dest: '/boot/grub/grub.cfg' },
      { src: vmlinuz, dest: '/boot/vmlinuz' },
      { src: initrd, dest: '/boot/initrd.img' },
    ];
  } else {
    // UEFI only: systemd-boot from the target rootfs (see the header).
    // A composefs root is no tree: the loader comes from the `loader` input (checkInputs).
    const loaderTree = cfs ? await ctx.rootfsTree('loader') : tree;
    espFiles = await systemdBootEspFiles({ arch: ctx.arch, tree: loaderTree, workDir: w, vmlinuz, initrd, title: 'Linux', cmdline, timeout: p.timeout });
  }
  let espContent = 0;
  for (const f of espFiles) espContent += (await stat(f.src)).size;

  // --- layout
  const coreBytes = bios ? (await readFile(coreImg)).length : 0;
  const rootBytes = p.root_size ? parseSize(p.root_size) : autoExt4Bytes(stats, parseSize(p.free));
  const espBytes = p.esp_size ? parseSize(p.esp_size) : autoEspBytes(espContent);
  const plan = planGptDisk(
    [
      ...(bios ? [{ name: 'bios-boot', type: GPT_TYPE.biosBoot, bytes: Math.max(MiB, coreBytes) }] : []),
      { name: 'esp', type: GPT_TYPE.esp, bytes: espBytes },
      { name: 'root', type: ARCH[ctx.arch].gptRootType, bytes: rootBytes },
    ],
    seed,
  );
  const part = (name: string) => plan.partitions.find((x) => x.name === name)!;
  const [pBios, pEsp, pRoot] = [part('bios-boot'), part('esp'), part('root')] as [DiskPlan['partitions'][0] | undefined, DiskPlan['partitions'][0], DiskPlan['partitions'][0]];
  ctx.log(`raw: root ${rootBytes / MiB} MiB for ${stats.inodes} inodes / ${Math.round(stats.dataBytes / MiB)} MiB data; esp ${espBytes / MiB} MiB; disk ${plan.totalBytes / MiB} MiB`);

  // --- ESP
  const espImg = join(w, 'esp.img');
  await buildFat(ctx, { image: espImg, bytes: pEsp.sizeLba * SECTOR, serial: espSerial, label: 'ESP', hiddenSectors: pEsp.startLba, fat32: true, files: espFiles, staging: join(w, 'fat-staging') });

  // --- the disk: partition table, the ESP copied in, the ext4 root built in place
  const disk = join(ctx.outDir, 'disk.raw');
  await assembleDisk(ctx, {
    disk, bytes: plan.totalBytes, sfdisk: sfdiskScript(plan),
    parts: [
      { offset: pEsp.startLba * SECTOR, image: espImg },
      {
        offset: pRoot.startLba * SECTOR,
        ext4: { bytes: pRoot.sizeLba * SECTOR, tree, stats, entries, label: p.label, uuid: rootUuid, hashSeed, extraArgs: cfs ? COMPOSEFS_MKE2FS_FEATURES : [], scratch: w },
      },
    ],
  });

  // BIOS: GRUB's boot.img in the MBR, core.img in the BIOS boot partition.
  const h = pBios ? await open(disk, 'r+') : undefined;
  if (h && pBios) try {
    const mbr = Buffer.alloc(SECTOR);
    await h.read(mbr, 0, SECTOR, 0);
    const bootImg = await readFile('/usr/lib/grub/i386-pc/boot.img');
    const patched = patchGrubBios(mbr, bootImg, await readFile(coreImg), pBios.startLba);
    if (patched.core.length > pBios.sizeLba * SECTOR) throw new StageError('core.img does not fit the BIOS boot partition');
    await h.write(patched.mbr, 0, SECTOR, 0);
    await h.write(patched.core, 0, patched.core.length, pBios.startLba * SECTOR);
  } finally {
    await h.close();
  }

  ctx.setMeta({
    kernel: ctx.inputs.boot!.meta.kernel,
    cmdline,
    size: plan.totalBytes,
    root_uuid: rootUuid,
    esp_uuid: fatUuid(espSerial),
    disk_guid: plan.labelId,
    partitions: plan.partitions.map((x) => ({ number: x.number, name: x.name, type: x.type, uuid: x.uuid, start: x.startLba, size: x.sizeLba })),
  });
}

export default defineStage({
  kind: 'raw',
  // 2: `cmdline` is the whole command line after root=…; console=ttyS0 is no longer added.
  version: '2',
  summary: 'raw GPT disk (ESP + ext4 root; amd64: + BIOS boot, GRUB for SeaBIOS and UEFI; arm64: systemd-boot, UEFI)',
  params: Params,
  inputs: ['rootfs', 'boot'],
  // UEFI-only arches take systemd-boot from a rootfs tree; with root: composefs the
  // rootfs input is the composefs stage, so the tree it was made from comes here.
  optionalInputs: ['loader'],
  checkInputs: (p, inputs, arch) => {
    const needs = p.root === 'composefs' && !ARCH[arch].firmwares.includes('bios');
    if (needs && !inputs.loader) return [`root: composefs on ${arch} boots with systemd-boot from a rootfs tree: add \`loader: <the rootfs stage the composefs image was made from>\` to inputs`];
    if (inputs.loader && inputs.loader.kind !== 'mmdebstrap') return [`input loader must be a rootfs (mmdebstrap) stage, not a ${inputs.loader.kind} stage`];
    return [];
  },
  // The rootfs is unpacked with its owners and device nodes. No loop device: the
  // filesystems are built in image files.
  requires: ['root'],
  // Not heavy: the emitters fed by one rootfs are meant to run side by side
  // (they share one read-only unpacked rootfs, see RunContext.rootfsTree; no chroot, no network).
  tools: (_p, arch) => rawTools(arch),
  run: buildRaw,
  boot: (ctx) => diskBootPlans(ctx, 'disk.raw', 'raw', 'raw disk'),
});
