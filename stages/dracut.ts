// Kernel + initramfs from a rootfs tarball: dracut runs inside the target rootfs
// with that rootfs's own kernel, modules and dracut, so the result does not depend
// on what the build host has installed.
import { chmod, chown, copyFile, cp, lstat, mkdir, readFile, readdir, realpath, stat, writeFile } from 'node:fs/promises';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { basename, delimiter, dirname, join } from 'node:path';
import { z } from 'zod';
import { gunzipSync } from 'node:zlib';
import { packageAsset, resolveSpecPath } from '../src/engine/assets.js';
import { PACKAGE_ROOT } from '../src/engine/kinds.js';
import { defineStage, emulatorTools, hostArch, specPath, StageError, type Arch, type SpecPathRule, type ToolSpec } from '../src/stage.js';
import { parseDeb822 } from '../src/lib/deb822.js';

// dracut splits module/driver lists on whitespace; keep names to a safe alphabet.
const ITEM_RE = /^[A-Za-z0-9_.+-]+$/;
const Item = z.string().regex(ITEM_RE, 'expected a dracut module or kernel driver name');

// Module files are stat()ed, copied and chmod()ed following links: no symlinks at all.
const MODULE_DIR_PATH: SpecPathRule = { type: 'dir', symlinks: 'reject' };

export const Params = z
  .object({
    /** dracut modules to add; repo modules (dracut/modules.d/NN<name>) are installed first. */
    modules: z.array(Item).default([]),
    /** Spec-relative directories holding extra NN<name> dracut module directories. */
    moduleDirs: z.array(specPath(MODULE_DIR_PATH)).default([]),
    /** Kernel drivers to add (--add-drivers). */
    drivers: z.array(Item).default([]),
    /** dracut modules to omit. */
    omit: z.array(Item).default([]),
    /** Kernel command line baked into the initramfs (/etc/cmdline.d). */
    cmdline: z.string().optional(),
    // zstd is the default: the host's zstd runs natively at level 10 on every core
    // (its output does not depend on the thread count); gzip -9 ran on one core and
    // was most of the stage. xz and gzip use the rootfs's tools (gzip the host's on
    // foreign arches). Nothing else about the initramfs depends on this choice.
    compress: z.enum(['gzip', 'zstd', 'xz', 'none']).default('zstd'),
    /** Kernel version, or "auto" for the only one installed. */
    kernel: z
      .string()
      .regex(/^(auto|[A-Za-z0-9][A-Za-z0-9._+-]*)$/)
      .default('auto'),
  })
  .strict();
export type DracutParams = z.infer<typeof Params>;


/** The pipeline's own dracut/modules.d, found from this file (works from source and from dist/). */
export function builtinModulesDir(): string | undefined {
  const c = join(PACKAGE_ROOT, 'dracut', 'modules.d');
  return existsSync(c) ? c : undefined;
}

/** Directory in `base` holding module `name` (dracut's NN<name> convention). */
export function findModuleDir(base: string, name: string): string | undefined {
  if (!existsSync(base)) return undefined;
  const hit = readdirSync(base)
    .sort()
    .find((e) => /^\d\d/.test(e) && e.slice(2) === name && statSync(join(base, e)).isDirectory());
  return hit ? join(base, hit) : undefined;
}

/** Module directories to install for the given params, spec-local dirs winning over built-ins. */
export function moduleSources(p: DracutParams, specDir: string): string[] {
  const out: string[] = [];
  const builtin = builtinModulesDir();
  for (const name of p.modules) {
    let hit: string | undefined;
    for (const d of p.moduleDirs) hit ??= findModuleDir(resolveSpecPath(specDir, d, MODULE_DIR_PATH), name);
    if (!hit && builtin) hit = findModuleDir(builtin, name);
    if (hit) out.push(hit);
    // Otherwise it is one of dracut's own modules in the rootfs.
  }
  return out;
}

/** Pick the kernel version: explicit (must exist) or "auto" (must be unique). */
export function pickKernel(requested: string, installed: string[]): string {
  const vs = [...installed].sort();
  if (requested !== 'auto') {
    if (!vs.includes(requested)) {
      throw new StageError(`kernel ${requested} is not in the rootfs (found: ${vs.join(', ') || 'none'})`);
    }
    return requested;
  }
  if (vs.length === 1) return vs[0];
  if (vs.length === 0) throw new StageError('no kernel in the rootfs (/usr/lib/modules is empty); add linux-image-<arch>');
  throw new StageError(`several kernels in the rootfs, set kernel: to one of ${vs.join(', ')}`);
}

const INITRD_IN_ROOT = '/var/tmp/pipeline-initrd.img';

export function dracutArgs(p: DracutParams, kver: string): string[] {
  const args = ['--reproducible', '--no-hostonly', '--force', '--kver', kver];
  for (const m of p.modules) args.push('--add', m);
  for (const m of p.omit) args.push('--omit', m);
  for (const d of p.drivers) args.push('--add-drivers', d);
  if (p.cmdline !== undefined && p.cmdline.trim() !== '') args.push('--kernel-cmdline', p.cmdline);
  // zstd names the host zstd's wrapper: dracut's `--zstd` checks for `zstd` on the
  // rootfs's PATH and, not finding it, silently falls back to gzip.
  if (p.compress === 'zstd') args.push('--compress', `${hostToolPath('zstd')} -q -T0 -${ZSTD_LEVEL}`);
  else args.push(p.compress === 'none' ? '--no-compress' : `--${p.compress}`);
  args.push(INITRD_IN_ROOT);
  return args;
}

// Runs under `unshare --mount --propagation private`: these mounts live only in a
// private namespace and vanish with it, even if everything is SIGKILLed. The rootfs
// tree is shared with other stages and never written: dracut runs on an overlay whose
// upper layer is this stage's scratch. Paths come in as arguments, never inside the
// script text.
const CHROOT_SCRIPT = [
  'set -e',
  'lower=$1 upper=$2 work=$3 root=$4',
  'shift 4',
  'mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"',
  'mount -t proc proc "$root/proc"',
  'mount -t sysfs sysfs "$root/sys"',
  'mount --rbind /dev "$root/dev"',
  // dracut creates the initramfs tree with the caller's umask: pin it.
  'umask 022',
  'exec chroot "$root" "$@"',
].join('\n');

/** The overlay dracut runs in: the shared read-only tree below, this stage's scratch above. */
export interface OverlayDirs {
  lower: string;
  upper: string;
  work: string;
  merged: string;
}

export function chrootArgs(o: OverlayDirs, cmd: string[]): string[] {
  // overlayfs splits its options on commas and lowerdir on colons.
  for (const d of [o.lower, o.upper, o.work]) {
    if (/[,:\\]/.test(d)) throw new StageError(`cannot overlay ${d}: overlayfs options cannot hold a path with ',', ':' or '\\' (move the cache or scratch dir)`);
  }
  return ['--mount', '--propagation', 'private', '--fork', '--', 'sh', '-c', CHROOT_SCRIPT, 'sh', o.lower, o.upper, o.work, o.merged, ...cmd];
}

// Host compressors run natively inside the chroot: copied into the tree (the overlay's
// upper layer) with their own dynamic loader and libraries, an x86-64 program exec'd
// from the chroot's shell runs natively whatever the target arch. dracut takes them
// from $DRACUT_COMPRESS_<NAME>. The output of each depends only on its version and
// settings, not the CPU or the thread count (checked: gzip 1.12 arm64 emulated vs
// amd64 native; zstd 1.5.4 -T0/-T1/-T2/-T8 identical), so the host tool is in the
// stage's tools. run() checks the archive dracut wrote is really in that format.
//  - gzip, foreign arches only: `--gzip` stays on the command line; gzip -9 of the
//    ~120 MB cpio was 79 s of a 135 s arm64 run under emulation.
//  - zstd, always: `--compress "<wrapper> -q -T0 -10"` (in the image's
//    build-parameter.txt): 4 s of CPU instead of 35 s for gzip -9 (25 s at dracut's
//    zstd -15), on every core, and smaller.
export const ZSTD_LEVEL = 10;
type HostTool = 'gzip' | 'zstd';
const hostToolDir = (t: HostTool) => `/var/tmp/pipeline-host-${t}`;
/** The wrapper dracut runs, inside the tree. */
export const hostToolPath = (t: HostTool) => `${hostToolDir(t)}/${t}`;
export function hostToolWrapper(t: HostTool): string {
  const d = hostToolDir(t);
  return ['#!/bin/sh', `exec ${d}/ld.so --library-path ${d} ${d}/${t}.bin "$@"`, ''].join('\n');
}
/** Kept for callers of the gzip-only name. */
export const HOST_GZIP_WRAPPER = hostToolWrapper('gzip');

/** ldd output -> the dynamic loader (absent for static binaries) and the libraries. */
export function parseLdd(text: string): { loader?: string; libs: string[] } {
  let loader: string | undefined;
  const libs: string[] = [];
  for (const raw of text.split('\n')) {
    const l = raw.trim();
    const m = /^\S+ => (\/\S+) \(0x[0-9a-f]+\)$/.exec(l);
    if (m) libs.push(m[1]);
    else if (/^\/\S+ \(0x[0-9a-f]+\)$/.test(l)) loader = l.split(' ')[0];
  }
  return { loader, libs: [...new Set(libs)].sort() };
}

/** The host compressor this build runs natively, if any. */
export function hostCompressor(p: Pick<DracutParams, 'compress'>, arch: Arch): HostTool | undefined {
  if (p.compress === 'zstd') return 'zstd';
  if (p.compress === 'gzip' && hostArch() !== arch) return 'gzip';
  return undefined;
}

function onPath(name: string): string | undefined {
  for (const d of (process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(delimiter)) {
    if (d && existsSync(join(d, name))) return join(d, name);
  }
  return undefined;
}

/**
 * Copy the host's compressor (plus loader and libraries) into the overlay's upper
 * layer and return the env that makes dracut use it. gzip falls back to the rootfs's
 * own (emulated) gzip when that is impossible; zstd has no such fallback (the rootfs
 * need not have zstd), so it fails.
 */
async function installHostTool(
  t: HostTool,
  tree: string,
  upper: string,
  exec: (cmd: string, args: string[], o?: { capture?: boolean }) => Promise<{ stdout: string }>,
  log: (l: string) => void,
): Promise<Record<string, string>> {
  const envName = `DRACUT_COMPRESS_${t.toUpperCase()}`;
  const dracutScript = await readFile(join(tree, 'usr/bin/dracut'), 'utf8').catch(() => '');
  const bin = onPath(t);
  const { loader, libs } = bin ? parseLdd((await exec('ldd', [bin], { capture: true }).catch(() => ({ stdout: '' }))).stdout) : { loader: undefined, libs: [] };
  const why = !dracutScript.includes(envName) ? `this dracut has no $${envName}` : !bin ? `no ${t} on the host` : !loader ? `no dynamic loader found for ${bin}` : undefined;
  if (why) {
    if (t === 'zstd') throw new StageError(`compress: zstd runs the host's zstd natively, but ${why}; use compress: gzip`);
    log(`compressing with the rootfs ${t} under emulation (${why})`);
    return {};
  }
  const inTree = hostToolDir(t);
  await mkdirsLike(tree, upper, inTree);
  const dir = join(upper, inTree);
  for (const f of libs) await copyFile(await realpath(f), join(dir, basename(f)));
  await copyFile(await realpath(loader!), join(dir, 'ld.so'));
  await copyFile(await realpath(bin!), join(dir, `${t}.bin`));
  for (const f of await readdir(dir)) await chmod(join(dir, f), 0o755);
  await writeFile(join(dir, t), hostToolWrapper(t), { mode: 0o755 });
  log(`compressing with the host ${t} (${bin}) natively${t === 'zstd' ? ` at level ${ZSTD_LEVEL}` : ''}`);
  return { [envName]: hostToolPath(t) };
}

/**
 * Create rel (absolute inside the tree) in the upper layer, each directory with the
 * owner and mode of the one below it, so the merged view looks as if the file had
 * been added to the tree itself (as the old in-place copy did). Directory mtimes do
 * not reach the image: dracut --reproducible clamps what it copies. A directory the
 * tree lacks is made 0755.
 */
async function mkdirsLike(lower: string, upper: string, rel: string): Promise<void> {
  let cur = '';
  for (const part of rel.split('/').filter(Boolean)) {
    cur = join(cur, part);
    const dst = join(upper, cur);
    if (existsSync(dst)) continue;
    const st = await lstat(join(lower, cur)).catch(() => undefined);
    await mkdir(dst);
    if (st?.isDirectory()) {
      await chown(dst, st.uid, st.gid);
      await chmod(dst, st.mode & 0o7777);
    } else await chmod(dst, 0o755);
  }
}

// (issue 11, speed) A foreign-arch dracut spends its time starting emulated processes:
// measured on the arm64 fixture (bookworm, dracut 059), 75 s of CPU, of which ~36 s
// were 1,338 `cp` runs (dracut-install copies each file with a forked
// `cp --reflink=auto …`; no reflink on ext4/overlayfs) and ~12 s the 100 `ldd` runs
// (a bash script plus two ld.so runs each); the rest is dracut's own bash. So, on a
// foreign arch, the host's bash and cp run natively in the chroot: the host's
// dynamic loader goes to its own path (/lib64/ld-linux-x86-64.so.2, absent from other
// arches' trees) and its libraries to their own multiarch directory, both in the
// overlay's upper layer, so the kernel runs the host binaries directly by path.
// What dracut installs is still resolved in the tree, among the target's files:
//  - dracut-install is the target's (emulated); only the `cp` it forks is the host's,
//    found first on the PATH its wrapper gives it, while DRACUT_INSTALL_PATH (which it
//    resolves names with) stays dracut's own PATH: the target's directories;
//  - dracut's main script and the target's `ldd` script run under the host's bash, but
//    only when its upstream version is the target's (same bash, other CPU): they are
//    the target's scripts, and the libraries ldd lists come from the target's ld.so.
// cp's output does not depend on its version (the bytes, modes and owners it copies;
// dracut --reproducible clamps the times). After the run every ELF file in the
// initramfs is checked to be for the target machine. The arm64 fixture's initramfs
// came out byte-identical to the all-emulated one, with 33 s of CPU instead of 75 s.
export const HOST_RUNTIME_DIR = '/var/tmp/pipeline-host';
const HOST_BASH = `${HOST_RUNTIME_DIR}/bin/bash`;
/** dracut-install's wrapper: the host cp first on its PATH, names resolved on dracut's PATH only. */
export const HOST_DRACUT_INSTALL = `${HOST_RUNTIME_DIR}/bin/dracut-install`;
export const HOST_LDD = `${HOST_RUNTIME_DIR}/bin/ldd`;
export function hostDracutInstallWrapper(target: string): string {
  return [`#!${HOST_BASH}`, `DRACUT_INSTALL_PATH=$PATH PATH=${HOST_RUNTIME_DIR}/path:$PATH exec ${target} "$@"`, ''].join('\n');
}
export function hostLddWrapper(): string {
  return [`#!${HOST_BASH}`, `exec ${HOST_BASH} /usr/bin/ldd "$@"`, ''].join('\n');
}

/** Upstream part of a Debian version ("1:5.2.15-2+b7" -> "5.2.15"); bash's $BASH_VERSION ("5.2.15(1)-release") too. */
export function upstreamVersion(v: string): string {
  return v.replace(/^\d+:/, '').replace(/\(.*$/, '').replace(/-[^-]*$/, '');
}

/** Version of an installed package in a dpkg status file. */
export function dpkgVersion(status: string, pkg: string): string | undefined {
  return parseDeb822(status).find((r) => r.Package === pkg && /\binstalled$/.test(r.Status ?? ''))?.Version;
}

export interface HostRuntimeChoice {
  /** The host's cp for dracut-install's copies. */
  copies: boolean;
  /** The host's bash for dracut's main script and the target's ldd script. */
  shell: boolean;
  /** Why either is not used (recorded in the stage's metadata). */
  why: string[];
}

/** Which host tools a foreign-arch dracut run may use natively. Pure. */
export function chooseHostRuntime(f: {
  foreign: boolean;
  runtimeError?: string;
  hostBash?: string;
  targetBash?: string;
  lddIsBashScript: boolean;
  dracutInstallHonoursPath: boolean;
}): HostRuntimeChoice {
  if (!f.foreign) return { copies: false, shell: false, why: ['native arch: everything runs natively'] };
  if (f.runtimeError) return { copies: false, shell: false, why: [f.runtimeError] };
  const why: string[] = [];
  const copies = f.dracutInstallHonoursPath;
  if (!copies) why.push("the target's dracut-install has no DRACUT_INSTALL_PATH: its cp stays emulated");
  const same = !!f.hostBash && !!f.targetBash && upstreamVersion(f.hostBash) === upstreamVersion(f.targetBash);
  if (!same) why.push(`host bash ${f.hostBash ?? 'unknown'} is not the target's ${f.targetBash ?? '(none)'}: dracut's script stays emulated`);
  const shell = same && f.lddIsBashScript;
  if (same && !f.lddIsBashScript) why.push("the target's ldd is not a bash script: dracut's script stays emulated");
  return { copies, shell, why };
}

/** ELF e_machine of each arch's binaries. */
const ELF_MACHINE: Record<Arch, number> = { amd64: 62, arm64: 183 };

/**
 * Regular files in newc cpio archives (concatenated, zero-padded) that are ELF
 * objects for another machine than `arch`'s. Pure, on the uncompressed bytes.
 */
export function foreignElfFiles(cpio: Buffer, arch: Arch): string[] {
  const bad: string[] = [];
  let off = 0;
  while (off + 110 <= cpio.length) {
    if (cpio.toString('latin1', off, off + 6) !== '070701') {
      if (cpio[off] === 0) {
        off++;
        continue;
      }
      throw new StageError(`initramfs: not a newc cpio at byte ${off}`);
    }
    const field = (i: number) => parseInt(cpio.toString('latin1', off + 6 + i * 8, off + 14 + i * 8), 16);
    const mode = field(1);
    const size = field(6);
    const nameSize = field(11);
    const name = cpio.toString('latin1', off + 110, off + 110 + nameSize - 1);
    const data = (off + 110 + nameSize + 3) & ~3;
    if ((mode & 0o170000) === 0o100000 && size >= 20 && cpio.readUInt32BE(data) === 0x7f454c46) {
      const le = cpio[data + 5] === 1;
      const machine = le ? cpio.readUInt16LE(data + 18) : cpio.readUInt16BE(data + 18);
      if (machine !== ELF_MACHINE[arch]) bad.push(`${name} (e_machine ${machine})`);
    }
    off = (data + size + 3) & ~3;
  }
  return bad;
}

/** True when every existing component of rel in the tree is a real directory (no symlink we would shadow). */
async function plainDirsIn(tree: string, rel: string): Promise<boolean> {
  let cur = tree;
  for (const part of rel.split('/').filter(Boolean)) {
    cur = join(cur, part);
    const st = await lstat(cur).catch(() => undefined);
    if (!st) return true;
    if (!st.isDirectory()) return false;
  }
  return true;
}

/**
 * Copy the host's bash and cp, their loader and libraries into the overlay's upper
 * layer (see above), plus the wrappers. Returns why it cannot (then nothing runs
 * natively) or undefined.
 */
async function installHostRuntime(
  tree: string,
  upper: string,
  dracutInstall: string,
  exec: (cmd: string, args: string[], o?: { capture?: boolean }) => Promise<{ stdout: string }>,
): Promise<string | undefined> {
  const bins = { bash: onPath('bash'), cp: onPath('cp') };
  if (!bins.bash || !bins.cp) return 'no bash or cp on the host PATH';
  const files = new Map<string, string>(); // path in the tree -> host file
  let loader: string | undefined;
  for (const b of [bins.bash, bins.cp]) {
    const l = parseLdd((await exec('ldd', [b], { capture: true }).catch(() => ({ stdout: '' }))).stdout);
    if (!l.loader || (loader && l.loader !== loader)) return `cannot find the host loader of ${b}`;
    loader = l.loader;
    // Libraries keep their soname but go to their directory's real (merged-/usr) path,
    // which the host loader searches by default.
    for (const f of l.libs) files.set(join(await realpath(dirname(f)), basename(f)), f);
  }
  files.set(loader!, loader!);
  files.set(HOST_BASH, bins.bash);
  files.set(`${HOST_RUNTIME_DIR}/path/cp`, bins.cp);
  for (const rel of files.keys()) {
    const dir = rel.slice(0, rel.lastIndexOf('/'));
    if (!(await plainDirsIn(tree, dir))) return `${dir} is a symlink in the rootfs`;
    if (existsSync(join(tree, rel))) return `the rootfs already has ${rel}`;
  }
  for (const [rel, src] of files) {
    await mkdirsLike(tree, upper, rel.slice(0, rel.lastIndexOf('/')));
    await copyFile(await realpath(src), join(upper, rel));
    await chmod(join(upper, rel), 0o755);
  }
  await writeFile(join(upper, HOST_DRACUT_INSTALL), hostDracutInstallWrapper(dracutInstall), { mode: 0o755 });
  await writeFile(join(upper, HOST_LDD), hostLddWrapper(), { mode: 0o755 });
  return undefined;
}

/** Decide, and install, the host tools a foreign-arch run uses (nothing on the native arch). */
async function hostRuntimeFor(
  arch: Arch,
  tree: string,
  upper: string,
  exec: (cmd: string, args: string[], o?: { capture?: boolean }) => Promise<{ stdout: string }>,
): Promise<HostRuntimeChoice> {
  const foreign = hostArch() !== arch;
  if (!foreign) return chooseHostRuntime({ foreign, lddIsBashScript: false, dracutInstallHonoursPath: false });
  // dracut's default: dracut-install on its PATH, else next to its scripts.
  const dracutInstall = ['/usr/sbin', '/usr/bin', '/sbin', '/bin', '/usr/lib/dracut'].map((d) => `${d}/dracut-install`).find((f) => existsSync(join(tree, f)));
  const honours = !!dracutInstall && (await readFile(join(tree, dracutInstall))).includes('DRACUT_INSTALL_PATH');
  const ldd = await readFile(join(tree, 'usr/bin/ldd'), 'utf8').catch(() => '');
  const status = await readFile(join(tree, 'var/lib/dpkg/status'), 'utf8').catch(() => '');
  const hostBash = (await exec('bash', ['-c', 'echo "$BASH_VERSION"'], { capture: true }).catch(() => ({ stdout: '' }))).stdout.trim() || undefined;
  const facts = { foreign, hostBash, targetBash: dpkgVersion(status, 'bash'), lddIsBashScript: /^#!\s*\/(usr\/)?bin\/bash\b/.test(ldd), dracutInstallHonoursPath: honours };
  const choice = chooseHostRuntime(facts);
  if (!choice.copies && !choice.shell) return choice;
  const err = await installHostRuntime(tree, upper, dracutInstall!, exec);
  return err ? chooseHostRuntime({ ...facts, runtimeError: `host tools not installed: ${err}` }) : choice;
}

/** The initramfs's main archive, uncompressed (with the early cpio in front), for checks. */
async function unpackedInitramfs(
  initrd: string,
  compress: DracutParams['compress'],
  workDir: string,
  exec: (cmd: string, args: string[]) => Promise<unknown>,
): Promise<Buffer> {
  const b = await readFile(initrd);
  const off = mainArchiveOffset(b);
  if (off === undefined || compress === 'none') return b;
  const early = b.subarray(0, off);
  if (compress === 'gzip') return Buffer.concat([early, gunzipSync(b.subarray(off))]);
  const packed = join(workDir, 'initramfs-main');
  await writeFile(`${packed}.${compress}`, b.subarray(off));
  if (compress === 'zstd') await exec('zstd', ['-d', '-q', '-f', `${packed}.zstd`, '-o', packed]);
  else await exec('xz', ['-d', '-q', '-f', `${packed}.xz`]);
  return Buffer.concat([early, await readFile(packed)]);
}

const MAGIC: Record<DracutParams['compress'], { name: string; bytes: number[] }> = {
  zstd: { name: 'zstd', bytes: [0x28, 0xb5, 0x2f, 0xfd] },
  gzip: { name: 'gzip', bytes: [0x1f, 0x8b] },
  xz: { name: 'xz', bytes: [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00] },
  none: { name: 'an uncompressed cpio', bytes: [...Buffer.from('070701')] },
};

/**
 * The first bytes of an initramfs's main archive: past the uncompressed early cpio
 * (microcode) dracut may put first, a run of newc archives ending in TRAILER!!! and
 * zero padding. Pure, on the file's bytes.
 */
export function mainArchiveHead(b: Buffer): Buffer {
  const off = mainArchiveOffset(b);
  // A file that is one uncompressed cpio (compress: none) has nothing after it.
  return off === undefined ? Buffer.from('070701') : b.subarray(off, off + 16);
}

/** Offset of the main archive (past any uncompressed early cpio); undefined when the file is all uncompressed cpio. */
export function mainArchiveOffset(b: Buffer): number | undefined {
  let off = 0;
  const newc = () => b.toString('latin1', off, off + 6) === '070701';
  if (!newc()) return 0;
  let last = off;
  for (;;) {
    // Every newc archive of the early part, each ending in its trailer.
    while (off + 110 <= b.length && newc()) {
      const field = (i: number) => parseInt(b.toString('latin1', off + 6 + i * 8, off + 14 + i * 8), 16);
      const size = field(6);
      const nameSize = field(11);
      const name = b.toString('latin1', off + 110, off + 110 + nameSize - 1);
      off = (off + 110 + nameSize + 3) & ~3;
      off = (off + size + 3) & ~3;
      if (name === 'TRAILER!!!') break;
    }
    while (off < b.length && b[off] === 0) off++;
    if (off === last || off >= b.length || !newc()) break;
    last = off;
  }
  return off >= b.length ? undefined : off;
}

/** Directories and executables 0755, other files 0644, recursively. */
async function normaliseModes(p: string): Promise<void> {
  const st = await stat(p);
  if (st.isDirectory()) {
    await chmod(p, 0o755);
    for (const e of await readdir(p)) await normaliseModes(join(p, e));
  } else if (st.isFile()) await chmod(p, st.mode & 0o111 ? 0o755 : 0o644);
}

async function copyOut(src: string, dst: string): Promise<void> {
  await copyFile(src, dst);
  await chmod(dst, 0o644); // dracut writes the image 0600
}

export default defineStage({
  kind: 'dracut',
  // 4: compress defaults to zstd (host zstd, level 10) instead of gzip -9; the rootfs
  //    tree is shared and read-only, dracut runs on an overlay of it (same content).
  //    (3 meant zstd but dracut fell back to gzip: never published.)
  version: '4',
  summary: 'kernel (vmlinuz) + initramfs (initrd.img) built by dracut inside the rootfs',
  params: Params,
  inputs: ['rootfs'],
  heavy: true,
  // The overlay's upper layer and dracut's staging tree (~150 MB) live in workDir.
  memoryWorkDir: 512 * 1024 ** 2,
  // Extraction keeps owners, unshare/mount/chroot need root; dracut runs the target's binaries.
  requires: ['root', 'foreign-exec'],
  tools(p, arch): ToolSpec[] {
    const tools: ToolSpec[] = [
      { name: 'tar', apt: 'tar' },
      { name: 'unshare', apt: 'util-linux' },
      { name: 'chroot', apt: 'coreutils' },
    ];
    tools.push(...emulatorTools(arch));
    const host = hostCompressor(p, arch);
    if (host) tools.push({ name: host, apt: host });
    // Foreign arches run the host's cp and (same version as the target's) bash in the chroot.
    if (hostArch() !== arch) {
      tools.push({ name: 'bash', apt: 'bash' }, { name: 'cp', apt: 'coreutils' });
      // Reads the initramfs back to check it holds no host binary (zstd and gzip are there already).
      if (p.compress === 'xz') tools.push({ name: 'xz', apt: 'xz-utils' });
    }
    return tools;
  },
  assets(p) {
    // Spec-local module dirs are spec-relative; built-in ones are named relative to
    // the package (pipeline:…) so keys do not depend on where pipeline is checked out.
    const builtin = builtinModulesDir();
    const out = [...p.moduleDirs];
    if (builtin) {
      for (const m of p.modules) {
        const d = findModuleDir(builtin, m);
        if (d) out.push(packageAsset(d));
      }
    }
    return [...new Set(out)].sort();
  },
  async run(ctx) {
    const p = ctx.params;
    const root = await ctx.rootfsTree('rootfs');

    const modulesRoot = join(root, 'usr/lib/modules');
    const installed = existsSync(modulesRoot) ? await readdir(modulesRoot) : [];
    const kver = pickKernel(p.kernel, installed);
    const vmlinuz = join(root, 'boot', `vmlinuz-${kver}`);
    if (!existsSync(vmlinuz)) throw new StageError(`rootfs has modules for ${kver} but no /boot/vmlinuz-${kver}`);

    const dracutDir = join(root, 'usr/lib/dracut');
    if (!existsSync(join(dracutDir, 'dracut-init.sh'))) {
      throw new StageError('dracut is not installed in the rootfs; add dracut-core to its packages');
    }
    if (p.compress === 'xz' && !existsSync(join(root, 'usr/bin/xz'))) {
      throw new StageError('compress: xz needs the xz-utils package in the rootfs');
    }
    // Everything this stage adds to the tree goes to the overlay's upper layer.
    const ov: OverlayDirs = { lower: root, upper: join(ctx.workDir, 'upper'), work: join(ctx.workDir, 'overlay-work'), merged: join(ctx.workDir, 'merged') };
    for (const d of [ov.upper, ov.work, ov.merged]) await mkdir(d, { recursive: true });
    const modulesD = '/usr/lib/dracut/modules.d';
    const sources = moduleSources(p, ctx.specDir);
    if (sources.length) await mkdirsLike(root, ov.upper, modulesD);
    for (const src of sources) {
      const rel = join(modulesD, src.split('/').pop()!);
      const dst = join(ov.upper, rel);
      ctx.log(`installing dracut module ${src} -> ${rel}`);
      await cp(src, dst, { recursive: true, force: true });
      // Modes from the checkout follow the umask it was made with; normalise them.
      await normaliseModes(dst);
    }
    const dracutVersion = (await readFile(join(dracutDir, 'dracut-version.sh'), 'utf8').catch(() => ''))
      .match(/DRACUT_VERSION=["']?([^"'\s]+)/)?.[1];

    const host = hostCompressor(p, ctx.arch);
    const compressEnv = host ? await installHostTool(host, root, ov.upper, (c, a, o) => ctx.exec(c, a, o), (l) => ctx.log(l)) : {};
    // dracut writes its output and scratch under /var/tmp.
    await mkdirsLike(root, ov.upper, '/var/tmp');

    const runtime = await hostRuntimeFor(ctx.arch, root, ov.upper, (c, a, o) => ctx.exec(c, a, o));
    ctx.log(`host tools in the chroot: cp ${runtime.copies ? 'native' : 'emulated'}, bash ${runtime.shell ? 'native' : 'emulated'}${runtime.why.length ? ` (${runtime.why.join('; ')})` : ''}`);
    const runtimeEnv: Record<string, string> = {
      ...(runtime.copies ? { DRACUT_INSTALL: HOST_DRACUT_INSTALL } : {}),
      ...(runtime.shell ? { DRACUT_LDD: HOST_LDD } : {}),
    };
    // The host bash runs the target's dracut script by path: never via PATH, which stays the target's.
    const dracutCmd = runtime.shell ? [HOST_BASH, '/usr/bin/dracut'] : ['dracut'];

    await ctx.exec('unshare', chrootArgs(ov, [...dracutCmd, ...dracutArgs(p, kver)]), {
      env: {
        ...compressEnv,
        ...runtimeEnv,
        SOURCE_DATE_EPOCH: String(ctx.sourceDateEpoch),
        PATH: '/usr/sbin:/usr/bin:/sbin:/bin',
        LC_ALL: 'C',
        TMPDIR: '/var/tmp',
        HOME: '/root',
      },
    });

    const initrd = join(ov.upper, INITRD_IN_ROOT);
    if (!(await stat(initrd).catch(() => undefined))?.size) throw new StageError('dracut produced no initramfs');
    // dracut falls back to another compressor with only a log line; the format is part of what the key promises.
    const want = MAGIC[p.compress];
    const head = mainArchiveHead(await readFile(initrd));
    if (!want.bytes.every((x, i) => head[i] === x)) {
      throw new StageError(`dracut did not compress the initramfs with ${want.name} (main archive starts ${head.subarray(0, 6).toString('hex')}); see its "falling back" line in the log`);
    }
    if (runtime.copies || runtime.shell) {
      // Host binaries were in the tree: prove none reached the initramfs.
      const bad = foreignElfFiles(await unpackedInitramfs(initrd, p.compress, ctx.workDir, (c, a) => ctx.exec(c, a)), ctx.arch);
      if (bad.length) throw new StageError(`the initramfs holds ELF files for another machine than ${ctx.arch}: ${bad.slice(0, 10).join(', ')}`);
    }
    await copyOut(vmlinuz, join(ctx.outDir, 'vmlinuz'));
    await copyOut(initrd, join(ctx.outDir, 'initrd.img'));
    ctx.setMeta({
      kernel: kver,
      dracutVersion: dracutVersion ?? 'unknown',
      modules: p.modules,
      compress: p.compress,
      // Foreign arches: which host tools ran natively in the chroot, and why not.
      ...(hostArch() !== ctx.arch ? { hostTools: { cp: runtime.copies, bash: runtime.shell, why: runtime.why } } : {}),
    });
  },
});
