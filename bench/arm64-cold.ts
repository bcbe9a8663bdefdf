// P7: arm64 rootfs + initramfs from a cold cache on an amd64 host (target ≤ 5 min).
// Builds fixtures/minimal-arm64.yaml's rootfs and both initramfs stages (the
// kernel-initrd and raw variants need them) into a fresh, empty cache and prints each
// stage's time and the wall time. Nothing else should run on the machine meanwhile:
// the figure is CPU-bound (qemu-user) on 2 cores.
// Usage: node --import tsx bench/arm64-cold.ts [--spec FILE] [--keep]
//
// Measured 2026-11-30 on this 2-core machine while five other builds ran (load
// average ~10), so an upper bound, not the figure: rootfs 487 s, initramfs 325 s,
// initramfs-os 471 s; 21.5 min wall. A later initramfs-os alone: 10 min 18 s.
//
// What still runs under emulation (qemu-aarch64 via binfmt), and why:
//  - rootfs (mmdebstrap): the arm64 packages' maintainer scripts (dpkg --configure
//    in the chroot: ldconfig, systemd's postinst, update-alternatives, depmod from
//    the kernel postinst...). mmdebstrap's chrootless mode (DPKG_ROOT) would run them
//    on the host, but only for packages whose maintainer scripts honour DPKG_ROOT;
//    whether systemd, the kernel, dracut and raspi-firmware do on bookworm was not
//    checked here (not tried). Downloads and unpacking (dpkg-deb) already run natively.
//  - dracut: runs inside the arm64 rootfs (its own kernel's modules, its own
//    dracut and shell), so its bash, ldd and module resolution run emulated; only
//    the cpio compression runs natively (the host's gzip copied in; see
//    stages/dracut.ts).
import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

const ROOT = path.resolve(import.meta.dirname, '..');
const args = process.argv.slice(2);
const spec = args.includes('--spec') ? path.resolve(args[args.indexOf('--spec') + 1]!) : path.join(ROOT, 'fixtures', 'minimal-arm64.yaml');
const cache = await fs.mkdtemp(path.join(process.env.PIPELINE_TEST_TMP ?? '/var/tmp', 'pipeline-bench-arm64-'));
const out = path.join(cache, 'images');

try {
  const t0 = performance.now();
  // kernel-initrd needs rootfs + initramfs; raw adds initramfs-os. Emitters are not timed here.
  const r = spawnSync(process.execPath, [path.join(ROOT, 'bin', 'pipeline.js'), 'build', 'arm64', 'kernel-initrd', '-f', spec, '--out', out, '--json'], {
    env: { ...process.env, PIPELINE_CACHE_DIR: cache },
    encoding: 'utf8',
    maxBuffer: 64 << 20,
  });
  const wall = (performance.now() - t0) / 1000;
  if (r.status !== 0) throw new Error(`build failed:\n${r.stderr}`);
  const summary = r.stdout.split('\n').filter((l) => l.startsWith('{"event"')).map((l) => JSON.parse(l)).find((e) => e.event === 'summary');
  for (const s of summary.stages as { name: string; kind: string; seconds: number }[]) console.log(`${s.name.padEnd(14)} ${s.kind.padEnd(14)} ${s.seconds.toFixed(1).padStart(7)} s`);
  console.log(`${'wall'.padEnd(29)} ${wall.toFixed(1).padStart(7)} s  (cores: ${os.availableParallelism()}, load at end: ${os.loadavg()[0]!.toFixed(1)})`);
} finally {
  if (!args.includes('--keep')) await fs.rm(cache, { recursive: true, force: true });
}
