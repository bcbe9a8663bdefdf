// I/O steps shared by the disk emitters (raw, iso, rpi4): walking the tree, building
// a FAT image with mtools and GRUB images with the host's grub-mkimage. All of it
// without mounting anything. (Unpacking a rootfs is the RunContext's: ctx.rootfsTree.)
import { createHash } from 'node:crypto';
import { copyFile, lstat, mkdir, readdir, utimes, writeFile } from 'node:fs/promises';
import { join, posix } from 'node:path';
import { debugfsTimeScript, ext4InodeCount, GRUB_COMMON_MODULES, type TreeEntry, type TreeStats } from './diskimage.js';
import { hashFile } from './digest.js';
import { StageError, type RunContext, type StageInput } from '../stage.js';

type Ctx = Pick<RunContext<unknown>, 'exec' | 'log' | 'sourceDateEpoch'>;

/**
 * Seed for every derived identifier: the content of the inputs plus a purpose tag.
 * knownSha256 gives a file's sha256 when it is already known (a cache record's),
 * so a 650 MB rootfs tar is not read again just to name it; same seed either way.
 */
export async function contentSeed(tag: string, files: string[], extra: unknown, knownSha256: (file: string) => Promise<string | undefined> = async () => undefined): Promise<string> {
  const h = createHash('sha256').update(`${tag}\0`);
  for (const f of files) h.update(`${(await knownSha256(f)) ?? (await hashFile(f)).sha256}\0`);
  h.update(JSON.stringify(extra));
  return h.digest('hex');
}

/** Sorted walk of a tree: sizes for filesystem sizing and entries for time fixing. */
export async function walkTree(root: string): Promise<{ stats: TreeStats; entries: TreeEntry[] }> {
  const entries: TreeEntry[] = [];
  let dataBytes = 0;
  const seen = new Set<string>();
  async function visit(rel: string): Promise<void> {
    const abs = rel === '/' ? root : join(root, rel);
    const st = await lstat(abs, { bigint: true });
    entries.push({ path: rel, mtimeSec: Number(st.mtimeMs / 1000n) });
    if (st.isFile()) {
      const id = `${st.dev}:${st.ino}`;
      if (!seen.has(id)) dataBytes += Math.ceil(Number(st.size) / 4096) * 4096;
      seen.add(id);
    } else if (st.isDirectory()) {
      dataBytes += 4096;
      const names = (await readdir(abs)).sort();
      for (const n of names) await visit(posix.join(rel, n));
    }
  }
  await visit('/');
  return { stats: { dataBytes, inodes: entries.length }, entries };
}

export interface FatFile {
  /** Host file to copy. */
  src: string;
  /** Path inside the FAT filesystem, e.g. /EFI/BOOT/BOOTX64.EFI. */
  dest: string;
}

/**
 * A FAT filesystem image filled by mtools: fixed serial, label and (through
 * SOURCE_DATE_EPOCH and pre-set source mtimes) fixed timestamps.
 */
export async function buildFat(
  ctx: Ctx,
  opts: { image: string; bytes: number; serial: string; label: string; hiddenSectors: number; fat32: boolean; files: FatFile[]; staging: string },
): Promise<void> {
  const env = { SOURCE_DATE_EPOCH: String(ctx.sourceDateEpoch), MTOOLS_SKIP_CHECK: '1', TZ: 'UTC' };
  // A fresh, sparse image of exactly the requested size.
  await writeFile(opts.image, '');
  await ctx.exec('truncate', ['--size', String(opts.bytes), opts.image]);
  const fmt = ['-i', opts.image, '-N', opts.serial, '-v', opts.label, '-H', String(opts.hiddenSectors)];
  if (opts.fat32) fmt.push('-F');
  await ctx.exec('mformat', [...fmt, '::'], { env });
  const dirs = new Set<string>();
  for (const f of opts.files) {
    const parts = f.dest.split('/').filter(Boolean);
    for (let i = 1; i < parts.length; i++) dirs.add('/' + parts.slice(0, i).join('/'));
  }
  const sortedDirs = [...dirs].sort();
  if (sortedDirs.length) await ctx.exec('mmd', ['-i', opts.image, ...sortedDirs.map((d) => `::${d}`)], { env });
  await mkdir(opts.staging, { recursive: true });
  let i = 0;
  for (const f of [...opts.files].sort((a, b) => (a.dest < b.dest ? -1 : 1))) {
    // mcopy -m carries the source mtime into the FAT entry: stage a copy stamped with the epoch.
    const tmp = join(opts.staging, `f${i++}`);
    await copyFile(f.src, tmp);
    await utimes(tmp, ctx.sourceDateEpoch, ctx.sourceDateEpoch);
    await ctx.exec('mcopy', ['-i', opts.image, '-m', '-o', tmp, `::${f.dest}`], { env });
  }
}

export type GrubTarget = 'x86_64-efi' | 'arm64-efi' | 'i386-pc' | 'i386-pc-eltorito';

/** A GRUB image with the early config and every module it needs built in (host grub-mkimage). */
export async function grubImage(ctx: Ctx, target: GrubTarget, out: string, earlyCfg: string, scratch: string, extraModules: string[] = []): Promise<void> {
  const cfg = join(scratch, `grub-early-${target}.cfg`);
  await writeFile(cfg, earlyCfg);
  const platform = target === 'x86_64-efi' ? ['efi_gop', 'efi_uga', 'all_video'] : target === 'arm64-efi' ? ['efi_gop', 'all_video'] : ['biosdisk'];
  const modules = [...new Set([...platform, ...GRUB_COMMON_MODULES, ...extraModules])];
  const dir = `/usr/lib/grub/${target === 'i386-pc-eltorito' ? 'i386-pc' : target}`;
  await ctx.exec('grub-mkimage', ['--directory', dir, '--format', target, '--output', out, '--config', cfg, '--prefix', '/boot/grub', ...modules]);
}

/** Stamp every file and directory below root (and root) with the epoch, deepest first. */
export async function stampTree(root: string, epoch: number): Promise<void> {
  const walk = async (d: string): Promise<void> => {
    for (const e of await readdir(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) await walk(p);
      if (!e.isSymbolicLink()) await utimes(p, epoch, epoch);
    }
  };
  await walk(root);
  await utimes(root, epoch, epoch);
}

/** `dd` one filesystem image into a disk at a byte offset (MiB aligned). */
export async function ddInto(ctx: Ctx, src: string, disk: string, offsetBytes: number): Promise<void> {
  if (offsetBytes % (1024 * 1024) !== 0) throw new StageError(`internal: offset ${offsetBytes} is not MiB aligned`);
  await ctx.exec('dd', [`if=${src}`, `of=${disk}`, 'bs=1M', `seek=${offsetBytes / (1024 * 1024)}`, 'conv=notrunc,sparse', 'status=none']);
}

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

export interface Ext4Options {
  image: string; bytes: number; tree: string; stats: TreeStats; entries: TreeEntry[]; label: string; uuid: string; hashSeed: string; extraArgs?: string[]; scratch: string;
  /** debugfs commands that change the filesystem after mke2fs (the tree is shared and read-only); run before the times are pinned. */
  edits?: string[];
  /**
   * Build the filesystem in place at this byte offset of `image` (an existing disk
   * file, partitioned already) instead of as a file of its own: the same bytes
   * land in the partition without a separate image to write, read back and copy.
   */
  offset?: number;
}

/**
 * An ext4 image of exactly `bytes` filled from `tree` with mke2fs -d: fixed features
 * (MKE2FS_CONF), UUID and hash seed given, time faked to the epoch, then a debugfs
 * pass pins atime/ctime (mke2fs copies them from the unpacked tree).
 */
export async function buildExt4(ctx: Ctx, o: Ext4Options): Promise<void> {
  const epoch = ctx.sourceDateEpoch;
  const conf = join(o.scratch, 'mke2fs.conf');
  await writeFile(conf, MKE2FS_CONF);
  const e2env = { MKE2FS_CONFIG: conf, E2FSPROGS_FAKE_TIME: String(epoch), SOURCE_DATE_EPOCH: String(epoch), TZ: 'UTC' };
  const inPlace = o.offset !== undefined;
  if (inPlace && o.image.includes('?')) throw new StageError(`internal: debugfs cannot open ${o.image} at an offset (the name has a "?")`);
  if (!inPlace) {
    await writeFile(o.image, '');
    await ctx.exec('truncate', ['--size', String(o.bytes), o.image]);
  }
  await ctx.exec(
    'mke2fs',
    [
      '-q', '-F', '-t', 'ext4', '-d', o.tree, '-L', o.label, '-U', o.uuid,
      '-N', String(ext4InodeCount(o.stats, o.bytes)),
      // One -E: mke2fs keeps only the last. In place the size is explicit (in KiB, the unit mke2fs reads without -b).
      '-E', `hash_seed=${o.hashSeed},root_owner=0:0,lazy_itable_init=0,nodiscard${inPlace ? `,offset=${o.offset}` : ''}`,
      ...(o.extraArgs ?? []),
      '-m', '0', o.image,
      ...(inPlace ? [`${Math.floor(o.bytes / 1024)}k`] : []),
    ],
    { env: e2env },
  );
  const script = join(o.scratch, 'debugfs.cmds');
  await writeFile(script, (o.edits?.length ? o.edits.join('\n') + '\n' : '') + debugfsTimeScript(o.entries, epoch));
  // debugfs opens a filesystem at an offset through the io manager's `name?offset=N`.
  const dbg = await ctx.exec('debugfs', ['-w', '-f', script, inPlace ? `${o.image}?offset=${o.offset}` : o.image], { env: e2env, capture: true });
  // debugfs reports per-command errors on stderr but exits 0.
  const errs = dbg.stderr.split('\n').filter((l) => l.trim() && !/^debugfs \d/.test(l));
  if (errs.length) throw new StageError(`debugfs could not edit the filesystem or pin timestamps: ${errs.slice(0, 5).join('; ')}`);
}

/** What goes into one partition of a disk: a filesystem image copied in, or an ext4 built in place. */
export type DiskPart =
  | { offset: number; image: string }
  | { offset: number; ext4: Omit<Ext4Options, 'image' | 'offset'> };

/**
 * Assemble a disk image file: a sparse file of `bytes`, its partition table from an
 * sfdisk script (GPT or MBR), then each partition's content at its offset.
 */
export async function assembleDisk(ctx: Ctx, o: { disk: string; bytes: number; sfdisk: string; parts: DiskPart[] }): Promise<void> {
  await writeFile(o.disk, '');
  await ctx.exec('truncate', ['--size', String(o.bytes), o.disk]);
  await ctx.exec('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', o.disk], { input: o.sfdisk });
  for (const p of o.parts) {
    if ('image' in p) await ddInto(ctx, p.image, o.disk, p.offset);
    else await buildExt4(ctx, { ...p.ext4, image: o.disk, offset: p.offset });
  }
}
