// Locked builds (issue 14), measured:
//   - `pipeline lock` for the default spec (pipelines/powernode.yaml, every arch),
//     written to a temp file (--lock-file) so the shipped tree gets no lock;
//   - a cold rootfs build from the mirror (unlocked, empty cache) against a cold
//     locked build whose .debs are already in the local store (empty cache
//     otherwise), for the same rootfs: the ratio is what the store saves.
// The rootfs is the test fixture's (bookworm minbase, kernel, systemd, dracut),
// in a temp spec dir. Builds run one after another; load from other work on the
// machine shows in both, so run it on a quiet machine for stable numbers.
// Usage: node --import tsx bench/lock.ts [--skip-default-lock]
import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';

const ROOT = path.resolve(import.meta.dirname, '..');
const BIN = path.join(ROOT, 'bin', 'pipeline.js');
const args = process.argv.slice(2);
const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-bench-lock-'));

const SPEC = `name: benchlock
arches: [amd64]
source_date_epoch: 1704067200
stages:
  rootfs:
    kind: mmdebstrap
    with: { suite: bookworm, variant: minbase, packages: [linux-image-amd64, systemd-sysv, dracut-core, dracut-live] }
variants:
  rootfs: [rootfs]
`;

function run(argv: string[], cache: string): number {
  const t0 = performance.now();
  const r = spawnSync(process.execPath, [BIN, ...argv], { cwd: work, env: { ...process.env, PIPELINE_CACHE_DIR: cache }, encoding: 'utf8', maxBuffer: 64 << 20 });
  const s = (performance.now() - t0) / 1000;
  if (r.status !== 0) throw new Error(`pipeline ${argv.join(' ')} failed (${r.status}):\n${r.stderr}`);
  return s;
}

const f = (s: number) => `${s.toFixed(1)} s`;
try {
  if (!args.includes('--skip-default-lock')) {
    const lockFile = path.join(work, 'powernode.lock');
    const s = run(['lock', '-f', path.join(ROOT, 'pipelines', 'powernode.yaml'), '--lock-file', lockFile], path.join(work, 'cache-lock'));
    const text = await fs.readFile(lockFile, 'utf8');
    const sections = text.split('\n').filter((l) => l.startsWith('stage ')).length;
    const debs = text.split('\n').filter((l) => l.startsWith('deb ')).length;
    console.log(`pipeline lock (default spec, every arch): ${f(s)} for ${sections} stage sections, ${debs} packages`);
  }

  // Two spec dirs with the same spec: one unlocked, one locked.
  const plainDir = path.join(work, 'plain');
  const lockedDir = path.join(work, 'locked');
  for (const d of [plainDir, lockedDir]) {
    await fs.mkdir(d);
    await fs.writeFile(path.join(d, 'benchlock.yaml'), SPEC);
  }
  const store = path.join(work, 'cache-store');
  const lockS = run(['lock', '-f', path.join(lockedDir, 'benchlock.yaml')], store);
  const fetchS = run(['fetch', '-f', path.join(lockedDir, 'benchlock.yaml')], store);

  // Cold from the mirror: empty cache, no lock.
  const mirror = run(['build', 'amd64', 'rootfs', '-f', path.join(plainDir, 'benchlock.yaml'), '-o', path.join(work, 'out-plain')], path.join(work, 'cache-plain'));
  // Cold locked: empty cache except the .deb store (hardlinked from the fetched one), offline.
  const cold = path.join(work, 'cache-locked');
  const debs = path.join(cold, 'debs', 'sha256');
  await fs.mkdir(debs, { recursive: true });
  const src = path.join(store, 'debs', 'sha256');
  for (const n of await fs.readdir(src)) await fs.link(path.join(src, n), path.join(debs, n));
  const locked = run(['build', 'amd64', 'rootfs', '--offline', '-f', path.join(lockedDir, 'benchlock.yaml'), '-o', path.join(work, 'out-locked')], cold);

  console.log(`rootfs lock: ${f(lockS)}; fetch into the store: ${f(fetchS)} (${(await fs.readdir(src)).length} .debs)`);
  console.log(`cold rootfs from the mirror:        ${f(mirror)}`);
  console.log(`cold locked rootfs from the store:  ${f(locked)} (offline)`);
  console.log(`ratio mirror / store: ${(mirror / locked).toFixed(2)}× (load average ${os.loadavg()[0]!.toFixed(1)} on ${os.availableParallelism()} cores)`);
} finally {
  await fs.rm(work, { recursive: true, force: true });
}
