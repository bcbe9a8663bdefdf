// Raw GPT disk image (disk.raw): dd it to a block device or a USB stick.
//
// Bootloader: GRUB 2 for both firmwares, built on the host with grub-mkimage
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
// unpacked tree, mtools for the ESP, sfdisk on the image file, dd into place.
// Reproducibility: every UUID/GUID, the ext4 hash seed and the FAT serial derive
// from the content of the inputs; mke2fs runs under E2FSPROGS_FAKE_TIME and a
// debugfs pass pins the atime/ctime mke2fs copies from the unpacked tree; mtools
// run under SOURCE_DATE_EPOCH with pre-stamped sources.
import { open, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { defineStage, StageError, type RunContext, type ToolSpec } from '../src/stage.js';
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
import { buildFat, ddInto, grubImage, walkTree } from '../src/lib/diskbuild.js';
import { joinCmdline, kernelCmdline } from './_boot.js';
import { diskBootPlans, diskInputs, GrubCmdline } from './_disk.js';

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
  })
  .strict();
export type RawParams = z.infer<typeof Params>;

/** Fixed mke2fs defaults so the filesystem does not depend on the host's /etc/mke2fs.conf. */
export const MKE2FS_CONF = `[defaults]
	base_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
`;

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

/** The root filesystem the emitter must name, then the spec's command line. */
export function rawCmdline(rootUuid: string, cmdline: string): string {
  return joinCmdline(`root=UUID=${rootUuid}`, 'rw', cmdline);
}

async function buildRaw(ctx: RunContext<RawParams>): Promise<void> {
  const p = ctx.params;
  const { vmlinuz, initrd, seed } = await diskInputs(ctx, 'raw-v1');
  const w = ctx.workDir;
  const epoch = ctx.sourceDateEpoch;
  const rootUuid = deriveUuid(seed, 'ext4-root');
  const hashSeed = deriveUuid(seed, 'ext4-hash-seed');
  const espSerial = deriveFatSerial(seed, 'esp');

  const tree = await ctx.rootfsTree('rootfs');
  const { stats, entries } = await walkTree(tree);

  // --- GRUB images and ESP content
  const early = grubEarlyConfig({ fsUuid: fatUuid(espSerial) });
  const efiImg = join(w, 'BOOTX64.EFI');
  const coreImg = join(w, 'core.img');
  await grubImage(ctx, 'x86_64-efi', efiImg, early, w);
  await grubImage(ctx, 'i386-pc', coreImg, early, w);
  const cmdline = rawCmdline(rootUuid, kernelCmdline(ctx.arch, p.cmdline));
  const cfg = join(w, 'grub.cfg');
  await writeFile(cfg, grubConfig({ title: 'Linux', kernel: '/boot/vmlinuz', initrd: '/boot/initrd.img', cmdline }, p.timeout));
  const espFiles = [
    { src: efiImg, dest: '/EFI/BOOT/BOOTX64.EFI' },
    { src: cfg, dest: '/boot/grub/grub.cfg' },
    { src: vmlinuz, dest: '/boot/vmlinuz' },
    { src: initrd, dest: '/boot/initrd.img' },
  ];
  let espContent = 0;
  for (const f of espFiles) espContent += (await stat(f.src)).size;

  // --- layout
  const coreBytes = (await readFile(coreImg)).length;
  const rootBytes = p.root_size ? parseSize(p.root_size) : autoExt4Bytes(stats, parseSize(p.free));
  const espBytes = p.esp_size ? parseSize(p.esp_size) : autoEspBytes(espContent);
  const plan = planGptDisk(
    [
      { name: 'bios-boot', type: GPT_TYPE.biosBoot, bytes: Math.max(MiB, coreBytes) },
      { name: 'esp', type: GPT_TYPE.esp, bytes: espBytes },
      { name: 'root', type: GPT_TYPE.rootX86_64, bytes: rootBytes },
    ],
    seed,
  );
  const [pBios, pEsp, pRoot] = plan.partitions as [DiskPlan['partitions'][0], DiskPlan['partitions'][0], DiskPlan['partitions'][0]];
  ctx.log(`raw: root ${rootBytes / MiB} MiB for ${stats.inodes} inodes / ${Math.round(stats.dataBytes / MiB)} MiB data; esp ${espBytes / MiB} MiB; disk ${plan.totalBytes / MiB} MiB`);

  // --- ESP
  const espImg = join(w, 'esp.img');
  await buildFat(ctx, { image: espImg, bytes: pEsp.sizeLba * SECTOR, serial: espSerial, label: 'ESP', hiddenSectors: pEsp.startLba, fat32: true, files: espFiles, staging: join(w, 'fat-staging') });

  // --- ext4 root
  const rootImg = join(w, 'root.img');
  const conf = join(w, 'mke2fs.conf');
  await writeFile(conf, MKE2FS_CONF);
  const e2env = { MKE2FS_CONFIG: conf, E2FSPROGS_FAKE_TIME: String(epoch), SOURCE_DATE_EPOCH: String(epoch), TZ: 'UTC' };
  await writeFile(rootImg, '');
  await ctx.exec('truncate', ['--size', String(pRoot.sizeLba * SECTOR), rootImg]);
  await ctx.exec(
    'mke2fs',
    [
      '-q', '-F', '-t', 'ext4', '-d', tree, '-L', p.label, '-U', rootUuid,
      '-N', String(ext4InodeCount(stats, pRoot.sizeLba * SECTOR)),
      '-E', `hash_seed=${hashSeed},root_owner=0:0,lazy_itable_init=0,nodiscard`,
      '-m', '0', rootImg,
    ],
    { env: e2env },
  );
  const script = join(w, 'debugfs.cmds');
  await writeFile(script, debugfsTimeScript(entries, epoch));
  const dbg = await ctx.exec('debugfs', ['-w', '-f', script, rootImg], { env: e2env, capture: true });
  // debugfs reports per-command errors on stderr but exits 0.
  const errs = dbg.stderr.split('\n').filter((l) => l.trim() && !/^debugfs \d/.test(l));
  if (errs.length) throw new StageError(`debugfs could not pin timestamps: ${errs.slice(0, 5).join('; ')}`);

  // --- assemble the disk
  const disk = join(ctx.outDir, 'disk.raw');
  await writeFile(disk, '');
  await ctx.exec('truncate', ['--size', String(plan.totalBytes), disk]);
  await ctx.exec('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', disk], { input: sfdiskScript(plan) });
  await ddInto(ctx, espImg, disk, pEsp.startLba * SECTOR);
  await ddInto(ctx, rootImg, disk, pRoot.startLba * SECTOR);

  const h = await open(disk, 'r+');
  try {
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
  summary: 'raw GPT disk (BIOS boot + ESP + ext4 root), GRUB for SeaBIOS and UEFI',
  params: Params,
  inputs: ['rootfs', 'boot'],
  arches: ['amd64'],
  // The rootfs is unpacked with its owners and device nodes. No loop device: the
  // filesystems are built in image files.
  requires: ['root'],
  // Not heavy: the emitters fed by one rootfs are meant to run side by side
  // (each unpacks its own copy; no chroot, no network).
  tools: () => TOOLS,
  run: buildRaw,
  boot: (ctx) => diskBootPlans(ctx, 'disk.raw', 'raw', 'raw disk'),
});
