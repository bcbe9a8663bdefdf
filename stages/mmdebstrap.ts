// Debian root filesystem as an uncompressed tarball, built by mmdebstrap.
// Everything variable (paths) reaches the hook scripts through env vars; the
// hook texts themselves are constants so no spec value is ever parsed by a shell.
import { mkdir, readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { z } from 'zod';
import { ARCH, defineStage, emulatorTools, hostArch, specPath, StageError, type Arch, type SpecPathRule, type ToolSpec } from '../src/stage.js';
import { sanitizePath } from '../src/engine/process.js';
import { resolveSpecPath } from '../src/engine/assets.js';
import type { DebPackage } from '../src/engine/manifest-types.js';
import { Cache } from '../src/engine/cache.js';
import { LOCKED_RUN, sectionDigest, type LockedRun } from '../src/lock/format.js';
import { makeFlatRepo } from '../src/lock/repo.js';
import { parseDeb822 } from '../src/lib/deb822.js';

const PKG_RE = /^[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?$/;
const NAME_RE = /^[a-z0-9][a-z0-9.+-]*$/;

// The overlay hook copies symlinks as symlinks (find -P, [ -L ] first): they point into the image.
const OVERLAY_PATH: SpecPathRule = { type: 'dir', symlinks: 'copy' };

export const Params = z
  .object({
    suite: z.string().regex(NAME_RE).default('bookworm'),
    mirror: z
      .string()
      .regex(/^(https?|file):\/\/[^\s]+$/, 'mirror must be an http(s):// or file:// URL')
      .default('http://deb.debian.org/debian'),
    variant: z
      .enum(['extract', 'custom', 'essential', 'apt', 'required', 'minbase', 'buildd', 'important', 'debootstrap', 'standard'])
      .default('minbase'),
    components: z.array(z.string().regex(NAME_RE)).min(1).default(['main']),
    /** Extra packages; `name` or `name=version`. */
    packages: z.array(z.string().regex(PKG_RE, 'invalid Debian package name')).default([]),
    /** A directory (relative to the spec) copied over the tree last, e.g. systemd units. */
    overlay: specPath(OVERLAY_PATH).optional(),
    /**
     * Accept a Release file past its Valid-Until date. Rolling suites (sid, forky) carry
     * one; a mirror copy that lags behind by a few weeks needs this to be usable.
     */
    ignore_valid_until: z.boolean().default(false),
    /** Content of /etc/hostname in the image (the host's would leak in otherwise). */
    hostname: z
      .string()
      .regex(/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/)
      .default('localhost'),
  })
  .strict();
export type MmdebstrapParams = z.infer<typeof Params>;


// Why a divert rather than path-exclude of /etc/kernel/postinst.d: update-initramfs is
// reached three ways (the kernel postinst.d hook, initramfs-tools' own postinst on
// configure, and its dpkg trigger). Diverting the one binary they all call catches
// every path, needs no knowledge of hook file names, and is fully undone afterwards,
// so the final rootfs is an ordinary Debian install (just without /boot/initrd.img-*).
// The essential hook runs after the Essential:yes set is installed and before the
// --include packages (which bring linux-image-* and initramfs-tools).
// The same goes for /usr/bin/dracut: the full `dracut` package's kernel hook calls it
// directly. Both binaries stay diverted to /bin/true only while packages install.
const DIVERTED = ['/usr/sbin/update-initramfs', '/usr/bin/dracut'];

export const ESSENTIAL_HOOK = [
  'set -e',
  ...DIVERTED.flatMap((f) => [
    `dpkg-divert --root "$1" --quiet --local --rename --divert ${f}.pipeline-real --add ${f}`,
    `ln -s /bin/true "$1${f}"`,
  ]),
].join('\n');

export const UNDIVERT_HOOK = [
  'set -e',
  ...DIVERTED.flatMap((f) => [`rm -f "$1${f}"`, `dpkg-divert --root "$1" --quiet --local --rename --divert ${f}.pipeline-real --remove ${f}`]),
].join('\n');

// mmdebstrap copies the host's /etc/hostname and /etc/resolv.conf into the chroot;
// both (content and mode) would make the tarball depend on the build machine.
export const HOST_FILES_HOOK = [
  'set -e',
  'rm -f "$1/etc/hostname"',
  'printf "%s\\n" "$PIPELINE_HOSTNAME" > "$1/etc/hostname"',
  'chmod 0644 "$1/etc/hostname"',
  'rm -f "$1/etc/resolv.conf"',
].join('\n');

// Copies the spec's overlay directory into the tree. Owners, modes and times are
// normalised (root:root, 0755 for dirs and executables, 0644 otherwise; mtimes are
// clamped by mmdebstrap's tar) so the result does not depend on the checkout's
// umask or clock. Existing directories in the tree keep their mode.
export const OVERLAY_HOOK = [
  'set -e',
  '[ -n "$PIPELINE_OVERLAY" ] || exit 0',
  'cd "$PIPELINE_OVERLAY"',
  'find . -mindepth 1 | LC_ALL=C sort | while IFS= read -r p; do',
  '  if [ -L "$p" ]; then ln -sfn "$(readlink "$p")" "$1/$p"',
  '  elif [ -d "$p" ]; then [ -d "$1/$p" ] || install -d -m 0755 "$1/$p"',
  '  elif [ -x "$p" ]; then install -m 0755 "$p" "$1/$p"',
  '  else install -m 0644 "$p" "$1/$p"; fi',
  '  chown -h 0:0 "$1/$p"',
  'done',
].join('\n');

// A locked build installs from a local flat repository, which mmdebstrap would
// write into the image's sources.list: put back the line an unlocked build writes.
export const SOURCES_HOOK = 'set -e\nprintf "%s\\n" "$PIPELINE_SOURCES_LINE" > "$1/etc/apt/sources.list"';

// (issue 10, speed) dpkg without fsync while the throwaway chroot is built; see mmdebstrapArgs.
const UNSAFE_IO_CFG = '/etc/dpkg/dpkg.cfg.d/zz-pipeline-unsafe-io';
export const UNSAFE_IO_ON = `set -e\nif [ -d "$1/etc/dpkg/dpkg.cfg.d" ]; then printf "force-unsafe-io\\n" > "$1${UNSAFE_IO_CFG}"; fi`;
export const UNSAFE_IO_OFF = `rm -f "$1${UNSAFE_IO_CFG}"`;

// (issue 11, speed) For a foreign arch, dpkg runs emulated in the chroot and forks
// dpkg-deb for every .deb, whose decompression then runs emulated too (the arm64
// kernel's .deb: 14 s of CPU emulated, 3 s native). The host's dpkg-deb, with its own
// loader and libraries, goes into the tree for the time packages install, and a
// wrapper named dpkg-deb comes first on the PATH dpkg searches (mmdebstrap keeps the
// caller's PATH for the chroot): dpkg, apt and the maintainer scripts run it natively.
// Its output (the data.tar stream dpkg unpacks) does not depend on the CPU; the host's
// dpkg version is in the key already (dpkg-divert's). Unlike dracut's host tools, the
// loader cannot go to its own path: /lib64 in the tree would fail usr-is-merged's
// preinst check, so the wrapper runs it through the loader (an emulated sh per call).
// Everything is removed before the first customize step: the tarball is byte-identical
// (checked on the arm64 fixture). The paths are constants; the host paths come from ldd.
export const HOST_DPKG_DIR = '/var/tmp/pipeline-host-dpkg';
export const HOST_DPKG_IN = [
  'set -e',
  `d="$1${HOST_DPKG_DIR}"`,
  'mkdir -p "$d/path"',
  'b=$(command -v dpkg-deb)',
  // ldd lines: "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" and the loader "/lib64/ld-linux-x86-64.so.2 (0x...)".
  'ldd "$b" | sed -n "s/^.* => \\(\\/[^ ]*\\) (0x[0-9a-f]*)$/\\1/p" | while IFS= read -r l; do cp -L "$l" "$d/"; done',
  'loader=$(ldd "$b" | sed -n "s/^[[:space:]]*\\(\\/[^ ]*\\) (0x[0-9a-f]*)$/\\1/p")',
  '[ -n "$loader" ]',
  'cp -L "$loader" "$d/ld.so"',
  'cp -L "$b" "$d/dpkg-deb.bin"',
  `printf '#!/bin/sh\\nexec ${HOST_DPKG_DIR}/ld.so --library-path ${HOST_DPKG_DIR} ${HOST_DPKG_DIR}/dpkg-deb.bin "$@"\\n' > "$d/path/dpkg-deb"`,
  'chmod 0755 "$d"/* "$d/path/dpkg-deb"',
  // Check it runs in the tree before dpkg relies on it.
  `chroot "$1" ${HOST_DPKG_DIR}/path/dpkg-deb --version >/dev/null`,
].join('\n');
export const HOST_DPKG_OUT = `rm -rf "$1${HOST_DPKG_DIR}"`;

// Runs before mmdebstrap's cleanup removes the apt lists: copy out what metadata needs.
export const META_HOOK = [
  'set -e',
  'cp "$1/var/lib/dpkg/status" "$PIPELINE_META_DIR/status"',
  'mkdir -p "$PIPELINE_META_DIR/lists"',
  'for f in "$1"/var/lib/apt/lists/*_Packages; do if [ -f "$f" ]; then cp "$f" "$PIPELINE_META_DIR/lists/"; fi; done',
  'if [ -d "$1/usr/lib/modules" ]; then ls -1 "$1/usr/lib/modules"; fi > "$PIPELINE_META_DIR/kernels"',
].join('\n');

/**
 * `repo`: for a locked build, the sources line of the flat repository holding
 * exactly the locked .debs; it replaces the mirror (and sources.list is restored).
 */
export function mmdebstrapArgs(p: MmdebstrapParams, arch: Arch, target: string, repo?: string): string[] {
  // extract/custom only unpack (no dpkg in the tree, maybe no /bin/sh): nothing to speed up.
  const foreign = hostArch() !== arch && p.variant !== 'extract' && p.variant !== 'custom';
  const args = [
    `--variant=${p.variant}`,
    `--arch=${ARCH[arch].debian}`,
    `--components=${p.components.join(',')}`,
    '--format=tar',
    `--essential-hook=${ESSENTIAL_HOOK}`,
    // First of the customize steps: nothing after sees the host dpkg-deb.
    ...(foreign ? [`--extract-hook=${HOST_DPKG_IN}`, `--customize-hook=${HOST_DPKG_OUT}`] : []),
    `--customize-hook=${UNDIVERT_HOOK}`,
    `--customize-hook=${HOST_FILES_HOOK}`,
    `--customize-hook=${OVERLAY_HOOK}`,
    ...(repo ? [`--customize-hook=${SOURCES_HOOK}`] : []),
    `--customize-hook=${META_HOOK}`,
  ];
  // (issue 10, speed) dpkg skips its fsyncs: the chroot is a throwaway tarred at the
  // end, so durability buys nothing. Not --dpkgopt, which stays in the image: the
  // file lives from extraction to the first customize step (mtimes are clamped to
  // SOURCE_DATE_EPOCH), so the tarball's content does not change (nor does the key).
  args.push(`--extract-hook=${UNSAFE_IO_ON}`, `--customize-hook=${UNSAFE_IO_OFF}`);
  if (p.ignore_valid_until) args.push('--aptopt=Acquire::Check-Valid-Until "false"');
  if (p.packages.length) args.push(`--include=${p.packages.join(',')}`);
  args.push('--', p.suite, target, repo ?? p.mirror);
  return args;
}


/**
 * Installed packages from dpkg's status file, with the .deb sha256 from the apt
 * Packages indices where the same name/version/arch is listed. Sorted by name, arch.
 */
export function installedPackages(status: string, packagesIndices: string[]): DebPackage[] {
  const sums = new Map<string, string>();
  for (const idx of packagesIndices) {
    for (const r of parseDeb822(idx)) {
      if (r.Package && r.Version && r.Architecture && r.SHA256) {
        sums.set(`${r.Package} ${r.Version} ${r.Architecture}`, r.SHA256);
      }
    }
  }
  const pkgs: DebPackage[] = [];
  for (const r of parseDeb822(status)) {
    if (!r.Package || !r.Version || r.Status !== 'install ok installed') continue;
    const arch = r.Architecture ?? 'unknown';
    const p: DebPackage = { name: r.Package, version: r.Version, arch };
    const sha = sums.get(`${r.Package} ${r.Version} ${arch}`);
    if (sha) p.sha256 = sha;
    pkgs.push(p);
  }
  pkgs.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : a.arch < b.arch ? -1 : a.arch > b.arch ? 1 : 0));
  return pkgs;
}

export default defineStage({
  kind: 'mmdebstrap',
  version: '2',
  summary: 'Debian root filesystem (rootfs.tar) from a mirror with mmdebstrap',
  params: Params,
  inputs: [],
  heavy: true,
  // The chroot (~700 MB for the default spec) plus the downloaded .debs: in RAM when
  // there is room, it skips the disk's journal and dpkg's syncs (src/engine/scratch.ts).
  memoryWorkDir: 1.5 * 1024 ** 3,
  // Only root mode is tested; foreign arches run maintainer scripts via binfmt + qemu-user.
  requires: ['root', 'foreign-exec'],
  tools(_p, arch): ToolSpec[] {
    const emulator = emulatorTools(arch);
    const tools: ToolSpec[] = [
      // For a foreign --arch mmdebstrap first checks emulation with arch-test (only Recommended).
      { name: 'mmdebstrap', apt: 'mmdebstrap', ...(emulator.length ? { packages: ['arch-test'] } : {}) },
      { name: 'dpkg-divert', apt: 'dpkg' },
    ];
    // Foreign-arch maintainer scripts run through binfmt_misc + qemu-user.
    tools.push(...emulator);
    return tools;
  },
  assets: (p) => (p.overlay ? [p.overlay] : []),
  async run(ctx) {
    const p = ctx.params;
    const overlay = p.overlay ? resolveSpecPath(ctx.specDir, p.overlay, OVERLAY_PATH) : '';
    const metaDir = join(ctx.workDir, 'meta');
    await mkdir(metaDir, { recursive: true });
    // A locked stage installs exactly the locked .debs, verified, from a local flat repository.
    const locked = (p as { [LOCKED_RUN]?: LockedRun })[LOCKED_RUN];
    const repo = locked ? await makeFlatRepo(ctx, new Cache(locked.cacheRoot), locked.section, join(ctx.workDir, 'repo')) : undefined;
    await ctx.exec('mmdebstrap', mmdebstrapArgs(p, ctx.arch, join(ctx.outDir, 'rootfs.tar'), repo), {
      env: {
        SOURCE_DATE_EPOCH: String(ctx.sourceDateEpoch),
        // mmdebstrap stages the tree under TMPDIR before packing; keep it in our scratch.
        TMPDIR: ctx.workDir,
        PIPELINE_META_DIR: metaDir,
        PIPELINE_HOSTNAME: p.hostname,
        PIPELINE_OVERLAY: overlay,
        PIPELINE_SOURCES_LINE: `deb ${p.mirror} ${p.suite} ${p.components.join(' ')}`,
        LC_ALL: 'C.UTF-8',
        // Foreign arch: the host dpkg-deb's wrapper first on the chroot's PATH (absent on the host).
        ...(hostArch() !== ctx.arch ? { PATH: `${HOST_DPKG_DIR}/path:${sanitizePath(process.env.PATH)}` } : {}),
      },
    });

    // The extract and custom variants only unpack: no dpkg database, and mmdebstrap
    // runs no hooks for them, so there is no package list to record.
    const unpackOnly = p.variant === 'extract' || p.variant === 'custom';
    const status = await readFile(join(metaDir, 'status'), 'utf8').catch(() => {
      if (unpackOnly) return '';
      throw new StageError('mmdebstrap finished but the metadata hook did not run (no dpkg status copied)');
    });
    const listDir = join(metaDir, 'lists');
    const lists = await Promise.all(
      (await readdir(listDir).catch(() => [] as string[])).sort().map((f) => readFile(join(listDir, f), 'utf8')),
    );
    const kernels = (await readFile(join(metaDir, 'kernels'), 'utf8').catch(() => ''))
      .split('\n')
      .map((s) => s.trim())
      .filter(Boolean)
      .sort();
    const packages = installedPackages(status, lists);
    if (locked && !unpackOnly) {
      // The lock is the contract: anything else installed (or missing) is a failure, not a drift.
      const want = new Set(locked.section.debs.map((d) => `${d.name} ${d.version} ${d.arch}`));
      const got = new Set(packages.map((d) => `${d.name} ${d.version} ${d.arch}`));
      const extra = [...got].filter((x) => !want.has(x));
      const lacking = [...want].filter((x) => !got.has(x));
      if (extra.length || lacking.length) {
        throw new StageError(`the locked install differs from the lock: installed but not locked: ${extra.join(', ') || 'none'}; locked but not installed: ${lacking.join(', ') || 'none'}`);
      }
    }
    ctx.log(`rootfs: ${packages.length} packages, kernels: ${kernels.join(', ') || 'none'}`);
    ctx.setMeta({
      suite: p.suite,
      mirror: p.mirror,
      variant: p.variant,
      components: p.components,
      arch: ctx.arch,
      kernels,
      packages,
      ...(locked ? { lock: sectionDigest(locked.section), inRelease: locked.section.inRelease } : {}),
    });
  },
});
