// P7: arm64 rootfs + initramfs from a cold cache on an amd64 host (target ≤ 5 min).
// Builds fixtures/minimal-arm64.yaml's rootfs and initramfs (kernel-initrd needs
// them; --os also builds raw, hence initramfs-os) into a fresh, empty cache and
// prints each stage's time, the span from the rootfs's start to the last initramfs's
// end, the wall time and the CPU (user+sys) of the whole process tree. The figure is
// CPU-bound (qemu-user) on 2 cores: compare CPU seconds when the machine is shared.
// Usage: node --import tsx bench/arm64-cold.ts [--spec FILE] [--os] [--keep]
//
// 2026-11-30, this 2-core machine (shared: wall times depend on the load, CPU not):
//  - before, dracut and dpkg-deb emulated: rootfs 91 s, initramfs 288.5 s, wall 381 s
//    (load 2 at start, 15.7 at end); earlier, load ~10: rootfs 487 s, initramfs 325 s,
//    initramfs-os 471 s. CPU, each step alone: dracut 75 s (initramfs), 72 s
//    (initramfs-os); mmdebstrap 114 s.
//  - after (the host's bash and cp in dracut's chroot, the host's dpkg-deb in
//    mmdebstrap's): rootfs 112.3 s, initramfs 33.7 s, span and wall 147 s, 138 s CPU
//    for the whole tree (load 2.6 at start, 1.8 at end). --os, load 1.4-2.7: rootfs
//    92.7 s, initramfs 27.8 s, initramfs-os 44.1 s, span 164.6 s, wall 177 s (with the
//    raw emitter), 168 s CPU. Under load 11-13 (no --os): rootfs 423 s,
//    initramfs 194 s, wall 620 s, 142 s CPU. CPU, each step alone: dracut 33.5 s
//    (initramfs), 32.4 s (initramfs-os); mmdebstrap 104 s. Every output byte-identical
//    to the emulated build's (rootfs.tar, both initrd.img).
//
// What still runs under emulation (qemu-aarch64 via binfmt), and why:
//  - rootfs (mmdebstrap): dpkg and apt in the chroot (their own work: status
//    database, unpacking the tar stream, triggers) and the maintainer scripts
//    (ldconfig, systemd's postinst, update-alternatives, depmod from the kernel
//    postinst...): most of the stage. dpkg-deb (the decompression of every .deb; the
//    kernel's alone: 14 s CPU emulated, 3 s native) is the host's, as are the download
//    and mmdebstrap's first extraction of the Essential set (~15 s together).
//    mmdebstrap's chrootless mode (DPKG_ROOT) would run the maintainer scripts on the
//    host as root, which is only safe for packages whose scripts honour DPKG_ROOT:
//    not done.
//  - dracut: dracut-install (the target's: its kernel-module resolution with the
//    target's libkmod), the target's ld.so behind each ldd, and the sed/grep/mkdir
//    dracut's script forks run emulated: they resolve what goes into the image, in
//    the target's tree, and must stay the target's. Natively: the cp behind every
//    file dracut-install copies (when that dracut-install takes DRACUT_INSTALL_PATH),
//    the compressor, and bash for dracut's main script and ldd's when the host's bash
//    has the target's upstream version (bookworm on bookworm; a trixie target keeps
//    its own bash and gets only the host cp; not measured).
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { header, load, pipeline, ROOT, s as secs, type StageRow } from './lib.js';

const args = process.argv.slice(2);
const spec = args.includes('--spec') ? path.resolve(args[args.indexOf('--spec') + 1]!) : path.join(ROOT, 'fixtures', 'minimal-arm64.yaml');
// kernel-initrd needs rootfs + initramfs; --os adds raw, whose initramfs-os is the
// other dracut stage (the raw emitter itself is left out of the span below).
const variants = args.includes('--os') ? ['kernel-initrd', 'raw'] : ['kernel-initrd'];
const cache = await fs.mkdtemp(path.join(process.env.PIPELINE_TEST_TMP ?? '/var/tmp', 'pipeline-bench-arm64-'));
const out = path.join(cache, 'images');

try {
  header(`arm64 cold: ${variants.join(' + ')} from ${path.relative(ROOT, spec)}`);
  const r = pipeline(['build', 'arm64', ...variants, '-f', spec, '--out', out], { env: { ...process.env, PIPELINE_CACHE_DIR: cache } });
  for (const st of r.stages) console.log(`${st.name.padEnd(14)} ${st.kind.padEnd(14)} ${st.seconds.toFixed(1).padStart(7)} s`);
  // The P7 figure: from the first stage's start to the last rootfs/initramfs stage's end.
  const timed = r.stages.filter((st: StageRow) => ['mmdebstrap', 'dracut'].includes(st.kind) && st.startedAt !== undefined && st.endedAt !== undefined);
  const span = Math.max(...timed.map((st) => st.endedAt!)) - Math.min(...timed.map((st) => st.startedAt!));
  console.log(`${'rootfs+initramfs span'.padEnd(29)} ${span.toFixed(1).padStart(7)} s`);
  console.log(`${'wall'.padEnd(29)} ${r.wall.toFixed(1).padStart(7)} s  CPU (user+sys, whole process tree) ${secs(r.cpu)}`);
  console.log(`cores: ${os.availableParallelism()}, load average at end: ${load()}`);
} finally {
  if (!args.includes('--keep')) await fs.rm(cache, { recursive: true, force: true });
}
