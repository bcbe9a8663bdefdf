// Raspberry Pi 4 SD-card image (rpi4.img), laid out like Debian's own Pi images
// (the raspi image-specs recipe): an MBR disk (the Pi's boot ROM reads nothing
// else) with p1 FAT32 `RASPIFIRM` from 4 MiB to 512 MiB and p2 ext4 `RASPIROOT`.
//
// How a Pi 4 boots: boot ROM -> SPI-EEPROM bootloader -> first FAT partition ->
// start4.elf + fixup4.dat -> config.txt -> the DTB for the board -> kernel= and
// initramfs -> cmdline.txt. So RASPIFIRM holds:
//  - raspi-firmware's files (/usr/lib/raspi-firmware/* in the rootfs: start4.elf,
//    fixup4.dat, ...). The package is in Debian's non-free-firmware component, which
//    the rootfs stage must list: checked at plan time (exit 2 naming it).
//  - every bcm*.dtb the kernel package ships under /usr/lib/linux-image-<v>/broadcom
//    (bcm2711-rpi-4-b.dtb for the Pi 4; the Pi 3's too), as Debian's kernel hook
//    z50-raspi-firmware copies them;
//  - vmlinuz-<v> and initrd.img-<v> from the boot input (dracut's initramfs, which
//    must carry sdhci-iproc and the bcm2835 MMC driver: both are modules in Debian's
//    arm64 kernel);
//  - config.txt (arm_64bit, enable_uart, upstream_kernel, kernel=, initramfs) and
//    cmdline.txt (console=ttyS1,115200 root=LABEL=RASPIROOT rw rootwait + `cmdline`).
// The firmware files come only through this arm64 kind and its rootfs; no amd64
// image carries them.
// No QEMU here runs the Pi 4 firmware stage (start4.elf): it is verified only on
// hardware. test/integration/rpi4.test.ts checks the image statically and boots
// its own kernel, initrd and Pi 3 DTB under qemu's raspi3b.
// Reproducibility as for raw: identifiers from the content seed, mke2fs under a fake
// time + debugfs pass, mtools under SOURCE_DATE_EPOCH.
import { existsSync } from 'node:fs';
import { readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { runProcess } from '../src/engine/process.js';
import { ARCH, defineStage, StageError, type BootPlan, type RunContext } from '../src/stage.js';
import { autoExt4Bytes, debugfsTimeScript, deriveFatSerial, deriveUuid, MiB, parseSize, planMbrDisk, raspiConfigFiles, raspiConfigTxt, SECTOR, sfdiskMbrScript } from '../src/lib/diskimage.js';
import { assembleDisk, buildFat, walkTree, type FatFile } from '../src/lib/diskbuild.js';
import { joinCmdline } from './_boot.js';
import { diskInputs, GrubCmdline } from './_disk.js';

const SIZE_RE = /^\d+[KMGT]?$/i;

/** The Debian component raspi-firmware lives in. */
export const FIRMWARE_COMPONENT = 'non-free-firmware';
export const FIRMWARE_DIR = '/usr/lib/raspi-firmware';
/** The DTB the Pi 4's firmware loads with upstream_kernel=1. */
export const PI4_DTB = 'bcm2711-rpi-4-b.dtb';
/** The DTB for qemu's raspi3b (the boot test). */
export const PI3_DTB = 'bcm2837-rpi-3-b.dtb';

export const Params = z
  .object({
    /** Words after `console=ttyS1,115200 root=LABEL=RASPIROOT rw rootwait` in cmdline.txt. */
    cmdline: GrubCmdline.default(''),
    /** Free space left in the root filesystem when root_size is automatic. */
    free: z.string().regex(SIZE_RE).default('256M'),
    /** ext4 root size; default: content + `free`. */
    root_size: z.string().regex(SIZE_RE).optional(),
    /** RASPIFIRM size (Debian's images: 4 MiB to 512 MiB). */
    firmware_size: z.string().regex(SIZE_RE).default('508M'),
  })
  .strict();
export type Rpi4Params = z.infer<typeof Params>;

/** cmdline.txt: the Pi 4's mini UART (ttyS1 with the upstream DTB), the root by label, then the spec's words. */
export function rpi4Cmdline(extra: string): string {
  return joinCmdline('console=ttyS1,115200', 'root=LABEL=RASPIROOT', 'rw', 'rootwait', extra);
}

/** Plan-time check: the rootfs stage must name the component raspi-firmware is in. */
export function checkFirmwareComponent(rootfs: { kind: string; params: unknown } | undefined): string[] {
  if (!rootfs || rootfs.kind !== 'mmdebstrap') return [];
  const p = rootfs.params as { components?: string[]; packages?: string[] };
  const out: string[] = [];
  if (!p.components?.includes(FIRMWARE_COMPONENT)) {
    out.push(`rpi4 needs raspi-firmware, which is in Debian's ${FIRMWARE_COMPONENT} component: add "${FIRMWARE_COMPONENT}" to the rootfs stage's components (e.g. components: [main, ${FIRMWARE_COMPONENT}])`);
  }
  if (!p.packages?.some((x) => x.split('=')[0] === 'raspi-firmware')) out.push('rpi4 needs the raspi-firmware package: add it to the rootfs stage\'s packages');
  return out;
}

/** Regular files directly in dir, sorted (raspi-firmware ships a flat directory). */
async function filesIn(dir: string, keep: (name: string) => boolean): Promise<string[]> {
  const out: string[] = [];
  for (const e of (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1))) {
    if (e.isFile() && keep(e.name)) out.push(e.name);
  }
  return out;
}

async function buildRpi4(ctx: RunContext<Rpi4Params>): Promise<void> {
  const p = ctx.params;
  const { vmlinuz, initrd, seed } = await diskInputs(ctx, 'rpi4-v1');
  const w = ctx.workDir;
  const kver = String(ctx.inputs.boot!.meta.kernel ?? '');
  if (!/^[A-Za-z0-9._+-]+$/.test(kver)) throw new StageError(`the boot input records no usable kernel version (${JSON.stringify(kver)})`);
  const tree = await ctx.rootfsTree('rootfs');

  // --- RASPIFIRM content
  const fwDir = join(tree, FIRMWARE_DIR);
  if (!existsSync(fwDir)) throw new StageError(`the rootfs has no ${FIRMWARE_DIR}: add raspi-firmware to the rootfs stage's packages (component ${FIRMWARE_COMPONENT})`);
  const fwNames = await filesIn(fwDir, () => true);
  for (const need of ['start4.elf', 'fixup4.dat']) if (!fwNames.includes(need)) throw new StageError(`${FIRMWARE_DIR} has no ${need} (found: ${fwNames.join(', ')})`);
  const dtbDir = join(tree, 'usr/lib', `linux-image-${kver}`, 'broadcom');
  const dtbs = existsSync(dtbDir) ? await filesIn(dtbDir, (n) => /^bcm.*\.dtb$/.test(n)) : [];
  if (!dtbs.includes(PI4_DTB)) throw new StageError(`the kernel package has no ${PI4_DTB} in /usr/lib/linux-image-${kver}/broadcom`);
  const kernelName = `vmlinuz-${kver}`;
  const initrdName = `initrd.img-${kver}`;
  const cmdline = rpi4Cmdline(p.cmdline);
  const configTxt = join(w, 'config.txt');
  const cmdlineTxt = join(w, 'cmdline.txt');
  await writeFile(configTxt, raspiConfigTxt({ kernel: kernelName, initramfs: initrdName }));
  await writeFile(cmdlineTxt, cmdline + '\n');
  const firmFiles: FatFile[] = [
    ...fwNames.map((n) => ({ src: join(fwDir, n), dest: `/${n}` })),
    ...dtbs.map((n) => ({ src: join(dtbDir, n), dest: `/${n}` })),
    { src: vmlinuz, dest: `/${kernelName}` },
    { src: initrd, dest: `/${initrdName}` },
    { src: configTxt, dest: '/config.txt' },
    { src: cmdlineTxt, dest: '/cmdline.txt' },
  ];
  let firmContent = 0;
  for (const f of firmFiles) firmContent += (await stat(f.src)).size;
  const firmBytes = parseSize(p.firmware_size);
  if (firmContent + 8 * MiB > firmBytes) throw new StageError(`RASPIFIRM needs about ${Math.ceil((firmContent + 8 * MiB) / MiB)} MiB; firmware_size is ${p.firmware_size}`);

  // --- the root as Debian's images have it: RASPIFIRM mounted at /boot/firmware (what
  // raspi-firmware's postinst copied there in the chroot lives on p1 instead) and an
  // fstab naming both labels. The unpacked tree is shared and read-only, so these
  // are debugfs edits of the built filesystem.
  const { stats, entries: all } = await walkTree(tree);
  const shadowed = existsSync(join(tree, 'boot/firmware')) ? await filesIn(join(tree, 'boot/firmware'), () => true) : [];
  const entries = all.filter((e) => !e.path.startsWith('/boot/firmware/'));
  const fstab = join(w, 'fstab');
  await writeFile(fstab, 'LABEL=RASPIROOT / ext4 rw 0 1\nLABEL=RASPIFIRM /boot/firmware vfat rw,nofail 0 2\n', { mode: 0o644 });
  // A removed file's inode keeps the atime/ctime mke2fs copied from the unpacked
  // tree (the time it was unpacked): pin them before the rm, or the image depends on
  // when the shared tree was made.
  const removed = all.filter((e) => e.path.startsWith('/boot/firmware/') || e.path === '/etc/fstab');
  const edits = [
    ...(removed.length ? debugfsTimeScript(removed, ctx.sourceDateEpoch).trimEnd().split('\n') : []),
    ...(existsSync(join(tree, 'boot/firmware')) ? [] : ['mkdir /boot/firmware']),
    ...shadowed.map((n) => `rm "/boot/firmware/${n}"`),
    ...(existsSync(join(tree, 'etc/fstab')) ? ['rm /etc/fstab'] : []),
    `write "${fstab}" /etc/fstab`,
    'sif /etc/fstab mode 0100644',
    'sif /etc/fstab uid 0',
    'sif /etc/fstab gid 0',
  ];

  // --- layout
  const rootBytes = p.root_size ? parseSize(p.root_size) : autoExt4Bytes(stats, parseSize(p.free));
  const plan = planMbrDisk(
    [
      { type: 'c', bytes: firmBytes },
      { type: '83', bytes: rootBytes },
    ],
    seed,
  );
  const [pFirm, pRoot] = plan.partitions as [(typeof plan.partitions)[0], (typeof plan.partitions)[0]];
  ctx.log(`rpi4: firmware ${firmBytes / MiB} MiB (${Math.round(firmContent / MiB)} MiB used); root ${rootBytes / MiB} MiB; disk ${plan.totalBytes / MiB} MiB`);

  const firmImg = join(w, 'firm.img');
  const firmSerial = deriveFatSerial(seed, 'raspifirm');
  await buildFat(ctx, { image: firmImg, bytes: pFirm.sizeLba * SECTOR, serial: firmSerial, label: 'RASPIFIRM', hiddenSectors: pFirm.startLba, fat32: true, files: firmFiles, staging: join(w, 'fat-staging') });
  const rootUuid = deriveUuid(seed, 'ext4-root');
  await assembleDisk(ctx, {
    disk: join(ctx.outDir, 'rpi4.img'), bytes: plan.totalBytes, sfdisk: sfdiskMbrScript(plan),
    parts: [
      { offset: pFirm.startLba * SECTOR, image: firmImg },
      {
        offset: pRoot.startLba * SECTOR,
        ext4: { bytes: pRoot.sizeLba * SECTOR, tree, stats, entries, label: 'RASPIROOT', uuid: rootUuid, hashSeed: deriveUuid(seed, 'ext4-hash-seed'), scratch: w, edits },
      },
    ],
  });

  ctx.setMeta({
    kernel: kver,
    cmdline,
    size: plan.totalBytes,
    disk_id: plan.labelId,
    root_uuid: rootUuid,
    firmware: fwNames,
    dtbs,
    partitions: plan.partitions.map((x) => ({ number: x.number, label: x.number === 1 ? 'RASPIFIRM' : 'RASPIROOT', type: x.type, start: x.startLba, size: x.sizeLba })),
  });
}

export default defineStage({
  kind: 'rpi4',
  // 3: removed files' inodes no longer keep the unpack time (the image was not reproducible across unpacks).
  version: '3',
  summary: 'Raspberry Pi 4 SD image (MBR: FAT32 RASPIFIRM with raspi-firmware, DTBs, kernel, initrd; ext4 RASPIROOT)',
  params: Params,
  inputs: ['rootfs', 'boot'],
  arches: ['arm64'],
  // The rootfs is unpacked with its owners and device nodes; the filesystems are built in image files.
  requires: ['root'],
  checkInputs: (_p, inputs) => checkFirmwareComponent(inputs.rootfs),
  tools: () => [
    { name: 'tar', apt: 'tar' },
    { name: 'mke2fs', apt: 'e2fsprogs', versionArgs: ['-V'] },
    { name: 'debugfs', apt: 'e2fsprogs', versionArgs: ['-V'] },
    { name: 'mformat', apt: 'mtools' },
    { name: 'sfdisk', apt: 'fdisk' },
    { name: 'dd', apt: 'coreutils' },
  ],
  run: buildRpi4,
  boot: (ctx) => rpi4BootPlan(ctx.dir, ctx.workDir),
});

/** The first power of two >= n (QEMU's SD card model refuses other sizes). */
export function nextPowerOfTwo(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/** The words of a cmdline.txt minus its console= (the Pi 4's UART is not the Pi 3's). */
export function withoutConsole(cmdline: string): string {
  return cmdline.split(/\s+/).filter((w) => w && !w.startsWith('console=')).join(' ');
}

/**
 * No QEMU here runs the Pi 4 firmware, so the closest boot: qemu's raspi3b with the
 * image's own kernel, initrd and Pi 3 DTB (read from RASPIFIRM with mtools) and its
 * cmdline.txt, the image itself as the SD card behind a qcow2 overlay whose size is
 * a power of two (the published file stays untouched). The root comes from the ext4
 * RASPIROOT on mmcblk0p2, found by label through the bcm2835 MMC driver.
 */
export async function rpi4BootPlan(dir: string, workDir: string): Promise<BootPlan> {
  const img = join(dir, 'rpi4.img');
  const run = async (cmd: string, args: string[]) => (await runProcess(cmd, args, { capture: true, env: { MTOOLS_SKIP_CHECK: '1' } })).stdout;
  const offset = Number(/start=\s*(\d+)/.exec(await run('sfdisk', ['--dump', img]))![1]) * SECTOR;
  const fat = `${img}@@${offset}`;
  const [kernel, initrd] = raspiConfigFiles(await run('mtype', ['-i', fat, '::config.txt']));
  if (!kernel || !initrd) throw new StageError(`config.txt on RASPIFIRM names no kernel and initramfs`);
  const cmdline = withoutConsole(await run('mtype', ['-i', fat, '::cmdline.txt']));
  const files = { kernel: join(workDir, 'kernel'), initrd: join(workDir, 'initrd'), dtb: join(workDir, PI3_DTB) };
  await run('mcopy', ['-i', fat, '-n', `::${kernel}`, files.kernel]);
  await run('mcopy', ['-i', fat, '-n', `::${initrd}`, files.initrd]);
  await run('mcopy', ['-i', fat, '-n', `::${PI3_DTB}`, files.dtb]);
  const sd = join(workDir, 'sd.qcow2');
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', img, '-F', 'raw', sd, String(nextPowerOfTwo((await stat(img)).size))]);
  return {
    qemu: ARCH.arm64.qemuSystem.name,
    // raspi3b has exactly 1 GiB; its first serial port is the PL011 (ttyAMA0).
    args: ['-M', 'raspi3b', '-m', '1024', '-kernel', files.kernel, '-initrd', files.initrd, '-dtb', files.dtb, '-append', `console=ttyAMA0,115200 ${cmdline}`, '-drive', `if=sd,format=qcow2,file=${sd.replace(/,/g, ',,')}`],
    label: 'rpi4 image: its kernel, initrd and Pi 3 DTB on qemu raspi3b (SD card)',
  };
}
