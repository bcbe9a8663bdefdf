// Pure helpers for the disk emitters (raw, qcow2, iso): identifiers derived from
// content, GPT layout arithmetic, sfdisk scripts, GRUB configuration and the
// GRUB i386-pc boot-sector patching. No I/O here except firstDifference.
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { ARCH } from '../arch.js';

export const SECTOR = 512;
export const MiB = 1024 * 1024;

/**
 * GPT partition type GUIDs. The root types per arch (Discoverable Partitions
 * Specification) live in the arch table (src/arch.ts, gptRootType).
 */
export const GPT_TYPE = {
  biosBoot: '21686148-6E69-6E6F-7445-656564454649',
  esp: 'C12A7328-F81F-11D2-BA4B-00A0C93EC93B',
  rootX86_64: ARCH.amd64.gptRootType,
} as const;

/** n bytes derived from a seed and a purpose label (sha256 in counter mode). */
export function deriveBytes(seed: string, purpose: string, n: number): Buffer {
  const out: Buffer[] = [];
  for (let i = 0; out.length * 32 < n; i++) {
    out.push(createHash('sha256').update(`${seed}\0${purpose}\0${i}`).digest());
  }
  return Buffer.concat(out).subarray(0, n);
}

/**
 * A UUID derived from the seed: same inputs, same UUID. Formatted as an RFC 4122
 * version-4/variant-1 UUID so every consumer (mke2fs, sfdisk, blkid) accepts it.
 */
export function deriveUuid(seed: string, purpose: string): string {
  const b = deriveBytes(seed, purpose, 16);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** FAT volume serial as 8 upper-case hex digits (mformat -N takes it like this). */
export function deriveFatSerial(seed: string, purpose: string): string {
  return deriveBytes(seed, purpose, 4).toString('hex').toUpperCase();
}

/** How blkid, udev and GRUB print a FAT serial: XXXX-XXXX. */
export function fatUuid(serial: string): string {
  return `${serial.slice(0, 4)}-${serial.slice(4, 8)}`;
}

/** Size strings like "512M", "2G", "1.5GiB", "1048576" (bytes) to whole bytes (binary units). */
export function parseSize(s: string | number): number {
  if (typeof s === 'number') return s;
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?$/i.exec(s.trim());
  if (!m) throw new Error(`invalid size "${s}" (use e.g. 512M, 2G)`);
  const mult = { '': 1, K: 1024, M: MiB, G: 1024 * MiB, T: 1024 * 1024 * MiB }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  return Math.floor(Number(m[1]) * mult);
}

export function alignUp(n: number, to: number): number {
  return Math.ceil(n / to) * to;
}

export interface TreeStats {
  /** Bytes of regular file data, each file rounded up to 4 KiB blocks. */
  dataBytes: number;
  /** Files, directories, links, devices. */
  inodes: number;
}

/**
 * ext4 size for a tree: data + per-inode overhead (inode table, directory blocks),
 * a journal, plus the requested free space, rounded to MiB. mke2fs -d fails outright
 * when it runs out of room, so this errs on the generous side.
 */
export function autoExt4Bytes(t: TreeStats, freeBytes: number): number {
  const inodeOverhead = t.inodes * (256 + 512);
  const journal = 64 * MiB;
  const metadata = Math.ceil(t.dataBytes * 0.06);
  return alignUp(t.dataBytes + inodeOverhead + journal + metadata + freeBytes, MiB);
}

/** Inode count for mke2fs -N: the tree's plus room to grow. */
export function ext4InodeCount(t: TreeStats, fsBytes: number): number {
  return Math.max(t.inodes * 2 + 4096, Math.floor(fsBytes / 16384));
}

/** FAT ESP size: content + slack, at least 64 MiB (keeps FAT32 valid with 512-byte clusters). */
export function autoEspBytes(contentBytes: number): number {
  return Math.max(64 * MiB, alignUp(Math.ceil(contentBytes * 1.1) + 8 * MiB, MiB));
}

export interface PartitionRequest {
  name: string;
  type: string;
  bytes: number;
}

export interface PlannedPartition {
  /** 1-based partition number. */
  number: number;
  name: string;
  type: string;
  uuid: string;
  startLba: number;
  sizeLba: number;
}

export interface DiskPlan {
  labelId: string;
  totalBytes: number;
  firstLba: number;
  partitions: PlannedPartition[];
}

/**
 * GPT layout: partitions back to back, each starting on a 1 MiB boundary, first at
 * LBA 2048; the disk ends 1 MiB after the last partition, which leaves room for the
 * backup GPT (33 sectors). GUIDs derive from the seed and partition name.
 */
export function planGptDisk(parts: PartitionRequest[], seed: string): DiskPlan {
  const align = MiB / SECTOR;
  let lba = align;
  const partitions = parts.map((p, i) => {
    const sizeLba = alignUp(p.bytes, MiB) / SECTOR;
    const out: PlannedPartition = {
      number: i + 1,
      name: p.name,
      type: p.type,
      uuid: deriveUuid(seed, `gpt-part:${p.name}`).toUpperCase(),
      startLba: lba,
      sizeLba,
    };
    lba += sizeLba;
    return out;
  });
  return {
    labelId: deriveUuid(seed, 'gpt-disk').toUpperCase(),
    totalBytes: (lba + align) * SECTOR,
    firstLba: align,
    partitions,
  };
}

/** sfdisk input that writes exactly the plan (no defaults left for sfdisk to choose). */
export function sfdiskScript(plan: DiskPlan): string {
  const lines = ['label: gpt', `label-id: ${plan.labelId}`, 'unit: sectors', `first-lba: ${plan.firstLba}`, 'sector-size: 512', ''];
  for (const p of plan.partitions) {
    if (!/^[A-Za-z0-9 _.-]*$/.test(p.name)) throw new Error(`partition name "${p.name}" has characters sfdisk would need quoted`);
    lines.push(`start=${p.startLba}, size=${p.sizeLba}, type=${p.type}, uuid=${p.uuid}, name="${p.name}"`);
  }
  return lines.join('\n') + '\n';
}

export interface DumpedPartition {
  start: number;
  size: number;
  type: string;
  uuid: string;
  name: string;
}

/** The parts of `sfdisk --dump` output a test compares against a plan. */
export function parseSfdiskDump(text: string): { label: string; labelId: string; partitions: DumpedPartition[] } {
  let label = '';
  let labelId = '';
  const partitions: DumpedPartition[] = [];
  for (const line of text.split('\n')) {
    const h = /^([a-z-]+): (.*)$/.exec(line);
    if (h) {
      if (h[1] === 'label') label = h[2]!;
      if (h[1] === 'label-id') labelId = h[2]!.toUpperCase();
      continue;
    }
    const m = /^\S+ : (.*)$/.exec(line);
    if (!m) continue;
    const f: Record<string, string> = {};
    for (const kv of m[1]!.split(/,\s*/)) {
      const i = kv.indexOf('=');
      if (i > 0) f[kv.slice(0, i).trim()] = kv.slice(i + 1).trim().replace(/^"(.*)"$/, '$1');
    }
    partitions.push({ start: Number(f.start), size: Number(f.size), type: (f.type ?? '').toUpperCase(), uuid: (f.uuid ?? '').toUpperCase(), name: f.name ?? '' });
  }
  return { label, labelId, partitions };
}

/** What `sfdisk --dump` should report for a plan (for comparing with parseSfdiskDump). */
export function expectedDump(plan: DiskPlan): { label: string; labelId: string; partitions: DumpedPartition[] } {
  return {
    label: 'gpt',
    labelId: plan.labelId,
    partitions: plan.partitions.map((p) => ({ start: p.startLba, size: p.sizeLba, type: p.type, uuid: p.uuid, name: p.name })),
  };
}

// GRUB 2 i386-pc boot sector layout (include/grub/i386/pc/boot.h).
const BOOT_BPB_START = 0x03;
const BOOT_BPB_END = 0x5a;
const BOOT_KERNEL_SECTOR = 0x5c;
const BOOT_DRIVE_CHECK = 0x66;
const BOOT_PART_TABLE_START = 0x1b8; // disk signature + MBR partition table + 0x55AA
/** Segment diskboot loads the rest of core.img to (GRUB_BOOT_I386_PC_KERNEL_SEG + 0x20). */
const CORE_LOAD_SEGMENT = 0x820;

/**
 * Install GRUB's BIOS boot code without grub-bios-setup (which probes the host's
 * devices and refuses a plain image file): returns the new MBR and core.img.
 * - MBR: boot.img code, keeping the existing protective MBR's BPB area and
 *   partition table; kernel_sector points at core.img; the boot-drive check is
 *   NOPed, as grub-bios-setup does for hard disks.
 * - core.img: the blocklist at the end of its first sector (diskboot.img) says
 *   "load the remaining sectors, which follow contiguously".
 */
export function patchGrubBios(mbr: Buffer, bootImg: Buffer, coreImg: Buffer, coreLba: number): { mbr: Buffer; core: Buffer } {
  if (mbr.length !== SECTOR || bootImg.length !== SECTOR) throw new Error('boot.img and the MBR must be 512 bytes');
  const out = Buffer.from(bootImg);
  mbr.copy(out, BOOT_BPB_START, BOOT_BPB_START, BOOT_BPB_END);
  mbr.copy(out, BOOT_PART_TABLE_START, BOOT_PART_TABLE_START, SECTOR);
  out.writeBigUInt64LE(BigInt(coreLba), BOOT_KERNEL_SECTOR);
  out[BOOT_DRIVE_CHECK] = 0x90;
  out[BOOT_DRIVE_CHECK + 1] = 0x90;

  const sectors = Math.ceil(coreImg.length / SECTOR);
  const core = Buffer.alloc(sectors * SECTOR);
  coreImg.copy(core);
  if (sectors - 1 > 0xffff) throw new Error('core.img too large for one blocklist entry');
  // Entries grow downwards from the sector's end: {u64 start, u16 len, u16 segment}.
  const entry = SECTOR - 12;
  core.writeBigUInt64LE(BigInt(coreLba + 1), entry);
  core.writeUInt16LE(sectors - 1, entry + 8);
  core.writeUInt16LE(CORE_LOAD_SEGMENT, entry + 10);
  core.fill(0, entry - 12, entry); // terminator
  return { mbr: out, core };
}

export interface GrubEntry {
  title: string;
  kernel: string;
  initrd: string;
  cmdline: string;
}

/** grub.cfg: serial + screen console, one entry, short timeout. */
export function grubConfig(entry: GrubEntry, timeout: number): string {
  for (const v of [entry.title, entry.kernel, entry.initrd, entry.cmdline]) {
    // The cmdline goes verbatim into a GRUB script line: no newlines, quotes or
    // GRUB metacharacters that could start another command.
    if (/[\n\r;'"`$\\{}]/.test(v)) throw new Error(`"${v}" contains characters not allowed in a GRUB menu entry`);
  }
  return [
    'serial --unit=0 --speed=115200',
    'terminal_input serial console',
    'terminal_output serial console',
    `set timeout=${timeout}`,
    'set default=0',
    `menuentry '${entry.title}' {`,
    `  linux ${entry.kernel} ${entry.cmdline}`,
    `  initrd ${entry.initrd}`,
    '}',
    '',
  ].join('\n');
}

/** Characters no boot-loader config line (grub.cfg, loader entry, cmdline.txt) may carry. */
function checkConfigValue(v: string): void {
  if (/[\n\r;'"`$\\{}]/.test(v)) throw new Error(`"${v}" contains characters not allowed in a boot menu entry`);
}

/**
 * systemd-boot's loader.conf and its one Type #1 entry (paths relative to the ESP).
 * systemd-boot hands the initrd to the kernel's EFI stub, which every Debian arm64
 * kernel has.
 */
export function systemdBootConfig(entry: GrubEntry, timeout: number): { loader: string; entry: string } {
  for (const v of [entry.title, entry.kernel, entry.initrd, entry.cmdline]) checkConfigValue(v);
  return {
    // `timeout 0` would hide the menu entirely; the menu shows on the firmware console.
    loader: [`timeout ${timeout}`, 'default linux.conf', 'editor no', ''].join('\n'),
    entry: [`title ${entry.title}`, `linux ${entry.kernel}`, `initrd ${entry.initrd}`, `options ${entry.cmdline}`, ''].join('\n'),
  };
}

/** Early config embedded in GRUB images: find our filesystem, then load grub.cfg from it. */
export function grubEarlyConfig(search: { fsUuid: string } | { label: string }): string {
  const how = 'fsUuid' in search ? `--fs-uuid ${search.fsUuid}` : `--label ${search.label}`;
  return [`search --no-floppy ${how} --set=root`, 'set prefix=($root)/boot/grub', ''].join('\n');
}

/** Modules every GRUB image we build embeds (nothing is loaded from disk later). */
export const GRUB_COMMON_MODULES = [
  'normal', 'configfile', 'linux', 'search', 'search_fs_uuid', 'search_label', 'search_fs_file',
  'part_gpt', 'part_msdos', 'fat', 'iso9660', 'serial', 'terminal', 'echo', 'test', 'sleep', 'halt', 'reboot', 'ls', 'cat',
];

export interface TreeEntry {
  /** Path inside the filesystem, "/" for the root. */
  path: string;
  mtimeSec: number;
}

/**
 * debugfs commands that pin every inode's atime and ctime (which mke2fs -d copies
 * from the build host's extracted tree: extraction time, last read) to the epoch
 * and clamp mtimes to it.
 */
export function debugfsTimeScript(entries: TreeEntry[], epoch: number): string {
  const lines: string[] = [];
  for (const e of entries) {
    if (/["\n\r]/.test(e.path)) throw new Error(`cannot put path ${JSON.stringify(e.path)} into an ext4 image reproducibly (quote or newline in its name)`);
    const q = `"${e.path}"`;
    lines.push(`sif ${q} atime @${epoch}`, `sif ${q} ctime @${epoch}`);
    if (e.mtimeSec > epoch) lines.push(`sif ${q} mtime @${epoch}`);
  }
  return lines.join('\n') + '\n';
}

export interface MbrPartitionRequest {
  /** MBR type byte in hex, e.g. "c" (FAT32 LBA), "83" (Linux). */
  type: string;
  bytes: number;
}

export interface MbrPlan {
  /** Disk identifier, 0x + 8 hex digits. */
  labelId: string;
  totalBytes: number;
  partitions: { number: number; type: string; startLba: number; sizeLba: number }[];
}

/**
 * MBR layout for boards whose boot ROM reads only MBR (the Raspberry Pi): the first
 * partition starts at `firstBytes`, each MiB aligned, back to back, and the disk ends
 * with the last partition. The disk id derives from the seed.
 */
export function planMbrDisk(parts: MbrPartitionRequest[], seed: string, firstBytes = 4 * MiB): MbrPlan {
  let lba = alignUp(firstBytes, MiB) / SECTOR;
  const partitions = parts.map((p, i) => {
    if (!/^[0-9a-f]{1,2}$/.test(p.type)) throw new Error(`MBR type "${p.type}" is not a hex byte`);
    const sizeLba = alignUp(p.bytes, MiB) / SECTOR;
    const out = { number: i + 1, type: p.type, startLba: lba, sizeLba };
    lba += sizeLba;
    return out;
  });
  if (partitions.length > 4) throw new Error('an MBR disk holds at most 4 primary partitions');
  return { labelId: `0x${deriveBytes(seed, 'mbr-disk-id', 4).toString('hex')}`, totalBytes: lba * SECTOR, partitions };
}

/** sfdisk input that writes exactly the MBR plan. */
export function sfdiskMbrScript(plan: MbrPlan): string {
  const lines = ['label: dos', `label-id: ${plan.labelId}`, 'unit: sectors', 'sector-size: 512', ''];
  for (const p of plan.partitions) lines.push(`start=${p.startLba}, size=${p.sizeLba}, type=${p.type}`);
  return lines.join('\n') + '\n';
}

/**
 * The Raspberry Pi firmware's config.txt for a 64-bit upstream (Debian) kernel, as
 * Debian's raspi-firmware kernel hook writes it: 64-bit mode, the UART on, the
 * upstream device-tree names, and the kernel + initramfs by file name.
 */
export function raspiConfigTxt(o: { kernel: string; initramfs: string }): string {
  for (const v of [o.kernel, o.initramfs]) if (!/^[A-Za-z0-9._+-]+$/.test(v)) throw new Error(`"${v}" is not a plain file name for config.txt`);
  return ['[all]', 'arm_64bit=1', 'enable_uart=1', 'upstream_kernel=1', `kernel=${o.kernel}`, `initramfs ${o.initramfs} followkernel`, ''].join('\n');
}

/** Files config.txt names (kernel=, initramfs, device_tree=…): what the firmware will load. */
export function raspiConfigFiles(text: string): string[] {
  const out: string[] = [];
  for (const raw of text.split('\n')) {
    const l = raw.trim();
    let m = /^(kernel|device_tree|ramfsfile)=(\S+)$/.exec(l);
    if (m) out.push(m[2]!);
    m = /^initramfs\s+(\S+)/.exec(l);
    if (m) out.push(m[1]!);
  }
  return out;
}

/** ISO 9660 volume ids: upper case, digits, underscore; at most 32. */
export function isoLabel(s: string): string {
  const l = s.toUpperCase().replace(/[^A-Z0-9_]/g, '_').slice(0, 32);
  if (!l) throw new Error('empty ISO volume label');
  return l;
}

/**
 * First offset at which two byte sources differ, or null when identical. Paths are
 * read in chunks (disk images are large); a length difference reports the shorter length.
 */
export async function firstDifference(a: Buffer | string, b: Buffer | string): Promise<number | null> {
  if (Buffer.isBuffer(a) && Buffer.isBuffer(b)) return diffBuffers(a, b, 0, a.length, b.length);
  const CH = 4 * MiB;
  const ha = Buffer.isBuffer(a) ? undefined : await open(a, 'r');
  const hb = Buffer.isBuffer(b) ? undefined : await open(b, 'r');
  try {
    const sa = ha ? (await ha.stat()).size : (a as Buffer).length;
    const sb = hb ? (await hb.stat()).size : (b as Buffer).length;
    const ba = Buffer.alloc(CH);
    const bb = Buffer.alloc(CH);
    const n = Math.min(sa, sb);
    for (let off = 0; off < n; off += CH) {
      const len = Math.min(CH, n - off);
      const ca = ha ? (await ha.read(ba, 0, len, off), ba.subarray(0, len)) : (a as Buffer).subarray(off, off + len);
      const cb = hb ? (await hb.read(bb, 0, len, off), bb.subarray(0, len)) : (b as Buffer).subarray(off, off + len);
      if (!ca.equals(cb)) return off + (diffBuffers(ca, cb, 0, len, len) ?? 0);
    }
    return sa === sb ? null : n;
  } finally {
    await ha?.close();
    await hb?.close();
  }
}

function diffBuffers(a: Buffer, b: Buffer, base: number, la: number, lb: number): number | null {
  const n = Math.min(la, lb);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return base + i;
  return la === lb ? null : base + n;
}
