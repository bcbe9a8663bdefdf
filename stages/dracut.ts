// Kernel + initramfs from a rootfs tarball: dracut runs inside the target rootfs
// with that rootfs's own kernel, modules and dracut, so the result does not depend
// on what the build host has installed.
import { chmod, copyFile, cp, mkdir, readFile, readdir, realpath, stat, writeFile } from 'node:fs/promises';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { basename, delimiter, join } from 'node:path';
import { z } from 'zod';
import { packageAsset, resolveSpecPath } from '../src/engine/assets.js';
import { PACKAGE_ROOT } from '../src/engine/kinds.js';
import { defineStage, emulatorTools, hostArch, specPath, StageError, type Arch, type SpecPathRule, type ToolSpec } from '../src/stage.js';

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
    // gzip is the default: always present in a Debian rootfs and deterministic (dracut runs gzip -n).
    compress: z.enum(['gzip', 'zstd', 'xz', 'none']).default('gzip'),
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
  args.push(p.compress === 'none' ? '--no-compress' : `--${p.compress}`);
  args.push(INITRD_IN_ROOT);
  return args;
}

// Runs under `unshare --mount --propagation private`: these mounts live only in a
// private namespace and vanish with it, even if everything is SIGKILLed. The root
// path and the command come in as arguments, never inside the script text.
const CHROOT_SCRIPT = [
  'set -e',
  'root=$1',
  'shift',
  'mount -t proc proc "$root/proc"',
  'mount -t sysfs sysfs "$root/sys"',
  'mount --rbind /dev "$root/dev"',
  // dracut creates the initramfs tree with the caller's umask: pin it.
  'umask 022',
  'exec chroot "$root" "$@"',
].join('\n');

export function chrootArgs(root: string, cmd: string[]): string[] {
  return ['--mount', '--propagation', 'private', '--fork', '--', 'sh', '-c', CHROOT_SCRIPT, 'sh', root, ...cmd];
}

// Foreign arches: dracut and everything it runs go through qemu-user, and gzip -9 of
// the ~120 MB cpio was 79 s of a 135 s arm64 run (the host's gzip does it in 24 s).
// dracut takes its gzip from $DRACUT_COMPRESS_GZIP, so we point that at the host's
// gzip copied into the tree with its own dynamic loader and libraries: an x86-64
// program exec'd from an emulated shell runs natively. The command line (and so the
// build-parameter.txt in the image) stays `--gzip`, and gzip's output depends only on
// its version, not the CPU it runs on (checked: identical bytes for gzip 1.12 arm64
// emulated vs amd64 native), so the host gzip's version is in the stage's tools.
const HOST_GZIP_DIR = '/var/tmp/pipeline-host-gzip';
export const HOST_GZIP_WRAPPER = [
  '#!/bin/sh',
  `exec ${HOST_GZIP_DIR}/ld.so --library-path ${HOST_GZIP_DIR} ${HOST_GZIP_DIR}/gzip "$@"`,
  '',
].join('\n');

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

/** Whether the gzip of a foreign-arch build runs natively (see HOST_GZIP_WRAPPER). */
function hostGzip(p: DracutParams, arch: Arch): boolean {
  return p.compress === 'gzip' && hostArch() !== arch;
}

function onPath(name: string): string | undefined {
  for (const d of (process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(delimiter)) {
    if (d && existsSync(join(d, name))) return join(d, name);
  }
  return undefined;
}

/**
 * Copy the host's gzip (plus loader and libraries) into the tree and return the env
 * that makes dracut use it; empty when this dracut has no $DRACUT_COMPRESS_GZIP.
 */
async function installHostGzip(
  root: string,
  exec: (cmd: string, args: string[], o?: { capture?: boolean }) => Promise<{ stdout: string }>,
  log: (l: string) => void,
): Promise<Record<string, string>> {
  const dracutScript = await readFile(join(root, 'usr/bin/dracut'), 'utf8').catch(() => '');
  const gzip = onPath('gzip');
  if (!dracutScript.includes('DRACUT_COMPRESS_GZIP') || !gzip) {
    log('compressing with the rootfs gzip under emulation (this dracut cannot take the host gzip)');
    return {};
  }
  const { loader, libs } = parseLdd((await exec('ldd', [gzip], { capture: true }).catch(() => ({ stdout: '' }))).stdout);
  if (!loader) {
    log(`compressing with the rootfs gzip under emulation (no dynamic loader found for ${gzip})`);
    return {};
  }
  const dir = join(root, HOST_GZIP_DIR);
  await mkdir(dir, { recursive: true });
  for (const f of libs) await copyFile(await realpath(f), join(dir, basename(f)));
  await copyFile(await realpath(loader), join(dir, 'ld.so'));
  await copyFile(await realpath(gzip), join(dir, 'gzip'));
  for (const f of await readdir(dir)) await chmod(join(dir, f), 0o755);
  await writeFile(join(dir, 'gzip-wrapper'), HOST_GZIP_WRAPPER, { mode: 0o755 });
  log(`compressing with the host gzip (${gzip}) natively`);
  return { DRACUT_COMPRESS_GZIP: `${HOST_GZIP_DIR}/gzip-wrapper` };
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
  version: '2',
  summary: 'kernel (vmlinuz) + initramfs (initrd.img) built by dracut inside the rootfs',
  params: Params,
  inputs: ['rootfs'],
  heavy: true,
  // Extraction keeps owners, unshare/mount/chroot need root; dracut runs the target's binaries.
  requires: ['root', 'foreign-exec'],
  tools(p, arch): ToolSpec[] {
    const tools: ToolSpec[] = [
      { name: 'tar', apt: 'tar' },
      { name: 'unshare', apt: 'util-linux' },
      { name: 'chroot', apt: 'coreutils' },
    ];
    tools.push(...emulatorTools(arch));
    if (hostGzip(p, arch)) tools.push({ name: 'gzip', apt: 'gzip' });
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
    if (p.compress === 'zstd' && !existsSync(join(root, 'usr/bin/zstd'))) {
      throw new StageError('compress: zstd needs the zstd package in the rootfs');
    }
    if (p.compress === 'xz' && !existsSync(join(root, 'usr/bin/xz'))) {
      throw new StageError('compress: xz needs the xz-utils package in the rootfs');
    }
    for (const src of moduleSources(p, ctx.specDir)) {
      const dst = join(dracutDir, 'modules.d', src.split('/').pop()!);
      ctx.log(`installing dracut module ${src} -> ${dst.slice(root.length)}`);
      await cp(src, dst, { recursive: true, force: true });
      // Modes from the checkout follow the umask it was made with; normalise them.
      await normaliseModes(dst);
    }
    const dracutVersion = (await readFile(join(dracutDir, 'dracut-version.sh'), 'utf8').catch(() => ''))
      .match(/DRACUT_VERSION=["']?([^"'\s]+)/)?.[1];

    const gzipEnv = hostGzip(p, ctx.arch) ? await installHostGzip(root, (c, a, o) => ctx.exec(c, a, o), (l) => ctx.log(l)) : {};

    await ctx.exec('unshare', chrootArgs(root, ['dracut', ...dracutArgs(p, kver)]), {
      env: {
        ...gzipEnv,
        SOURCE_DATE_EPOCH: String(ctx.sourceDateEpoch),
        PATH: '/usr/sbin:/usr/bin:/sbin:/bin',
        LC_ALL: 'C',
        TMPDIR: '/var/tmp',
        HOME: '/root',
      },
    });

    const initrd = join(root, INITRD_IN_ROOT);
    if (!(await stat(initrd).catch(() => undefined))?.size) throw new StageError('dracut produced no initramfs');
    await copyOut(vmlinuz, join(ctx.outDir, 'vmlinuz'));
    await copyOut(initrd, join(ctx.outDir, 'initrd.img'));
    ctx.setMeta({
      kernel: kver,
      dracutVersion: dracutVersion ?? 'unknown',
      modules: p.modules,
      compress: p.compress,
    });
  },
});
