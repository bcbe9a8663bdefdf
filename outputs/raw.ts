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
import { copyFileSync } from 'node:fs';
import { open, readFile, rename, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { defineStage, inputFile, StageError, type BootPlan, type RunContext, type ToolSpec } from '../src/stage.js';
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
import { buildFat, contentSeed, ddInto, extractRootfs, grubImage, requireRoot, walkTree } from '../src/lib/diskbuild.js';

const SIZE_RE = /^\d+[KMGT]?$/i;

export const Params = z
  .object({
    /** Extra kernel command line after `root=UUID=… rw console=ttyS0`. */
    cmdline: z.string().regex(/^[^\n\r]*$/, 'cmdline must be a single line').default(''),
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

export const OVMF_CODE = '/usr/share/OVMF/OVMF_CODE_4M.fd';
export const OVMF_VARS = '/usr/share/OVMF/OVMF_VARS_4M.fd';

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
  { name: 'grub-mkimage', apt: 'grub-common' },
  { name: 'dd', apt: 'coreutils' },
];

/** qemu plans for a bootable disk image under SeaBIOS and/or OVMF. */
export function diskBootPlans(
  ctx: { dir: string; workDir: string; firmware?: string },
  file: string,
  format: 'raw' | 'qcow2',
  what: string,
): BootPlan[] {
  // snapshot=on: the guest writes to its root filesystem; keep the published file pristine.
  const drive = virtioDisk(join(ctx.dir, file), format);
  const plans: BootPlan[] = [];
  if (!ctx.firmware || ctx.firmware === 'bios') {
    plans.push({ qemu: 'qemu-system-x86_64', args: [...drive], label: `${what} (SeaBIOS)` });
  }
  if (!ctx.firmware || ctx.firmware === 'uefi') {
    plans.push({ qemu: 'qemu-system-x86_64', args: [...ovmfArgs(ctx.workDir), ...drive], label: `${what} (OVMF)` });
  }
  return plans;
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

export function rawCmdline(rootUuid: string, extra: string): string {
  return [`root=UUID=${rootUuid}`, 'rw', 'console=ttyS0', extra.trim()].filter(Boolean).join(' ');
}

async function buildRaw(ctx: RunContext<RawParams>): Promise<void> {
  requireRoot('the raw emitter');
  const p = ctx.params;
  const tarPath = inputFile(ctx.inputs, 'rootfs', 'rootfs.tar');
  const vmlinuz = inputFile(ctx.inputs, 'boot', 'vmlinuz');
  const initrd = inputFile(ctx.inputs, 'boot', 'initrd.img');
  const w = ctx.workDir;
  const epoch = ctx.sourceDateEpoch;

  const seed = await contentSeed('raw-v1', [tarPath, vmlinuz, initrd], { params: p, epoch });
  const rootUuid = deriveUuid(seed, 'ext4-root');
  const hashSeed = deriveUuid(seed, 'ext4-hash-seed');
  const espSerial = deriveFatSerial(seed, 'esp');

  const tree = join(w, 'tree');
  await extractRootfs(ctx, tarPath, tree);
  const { stats, entries } = await walkTree(tree);

  // --- GRUB images and ESP content
  const early = grubEarlyConfig({ fsUuid: fatUuid(espSerial) });
  const efiImg = join(w, 'BOOTX64.EFI');
  const coreImg = join(w, 'core.img');
  await grubImage(ctx, 'x86_64-efi', efiImg, early, w);
  await grubImage(ctx, 'i386-pc', coreImg, early, w);
  const cmdline = rawCmdline(rootUuid, p.cmdline);
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
  const tmpDisk = join(ctx.outDir, '.disk.raw.partial');
  await writeFile(tmpDisk, '');
  await ctx.exec('truncate', ['--size', String(plan.totalBytes), tmpDisk]);
  await ctx.exec('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', tmpDisk], { input: sfdiskScript(plan) });
  await ddInto(ctx, espImg, tmpDisk, pEsp.startLba * SECTOR);
  await ddInto(ctx, rootImg, tmpDisk, pRoot.startLba * SECTOR);

  const h = await open(tmpDisk, 'r+');
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
  await rename(tmpDisk, join(ctx.outDir, 'disk.raw'));

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
  version: '1',
  summary: 'raw GPT disk (BIOS boot + ESP + ext4 root), GRUB for SeaBIOS and UEFI',
  params: Params,
  inputs: ['rootfs', 'boot'],
  arches: ['amd64'],
  // Not heavy: the emitters fed by one rootfs are meant to run side by side
  // (each unpacks its own copy; no chroot, no network).
  tools: () => TOOLS,
  run: buildRaw,
  boot: (ctx) => diskBootPlans(ctx, 'disk.raw', 'raw', 'raw disk'),
});
