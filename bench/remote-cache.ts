// Remote cache benchmark on the real fixture and a loopback registry (Debian's
// docker-registry), printed as figures and ratios:
//   - build vs pull of rootfs + initramfs: job 1 builds `amd64 ipxe` from scratch
//     and pushes; a fresh cache then pulls the same stages (`cache pull`), verified.
//     Target: pull <= 0.1 x build.
//   - a second job: `amd64 kernel-initrd oci` from a fresh cache with the remote:
//     bytes moved down and up against the bytes of its published outputs.
// Usage: node --import tsx bench/remote-cache.ts [--spec FILE]   (root; minutes: job 1 builds a rootfs)
import { spawnSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { hashImageDir } from '../src/signing/verify.js';
import { startRegistry } from '../test/helpers/registry-server.js';

const ROOT = path.resolve(import.meta.dirname, '..');
const args = process.argv.slice(2);
const spec = args.includes('--spec') ? path.resolve(args[args.indexOf('--spec') + 1]!) : path.join(ROOT, 'fixtures', 'minimal.yaml');

type Event = Record<string, unknown>;
function run(argv: string[], cache: string): Event[] {
  const r = spawnSync(process.execPath, [path.join(ROOT, 'bin', 'pipeline.js'), ...argv, '--json'], { env: { ...process.env, PIPELINE_CACHE_DIR: cache }, encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`pipeline ${argv.join(' ')} failed (${r.status}):\n${r.stderr}`);
  return r.stdout.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as Event);
}

const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-bench-remote-'));
const reg = await startRegistry();
const url = `oci://${reg.host}/bench/cache`;
try {
  const heavy = ['rootfs', 'initramfs'];
  const ev1 = run(['build', 'amd64', 'ipxe', '-f', spec, '--out', path.join(work, 'o1'), '--remote-cache', url], path.join(work, 'c1'));
  const s1 = ev1.find((e) => e.event === 'summary') as { stages: { name: string; status: string; seconds: number }[] };
  const buildS = heavy.reduce((a, n) => a + s1.stages.find((s) => s.name === n)!.seconds, 0);
  if (!heavy.every((n) => s1.stages.find((s) => s.name === n)!.status === 'built')) throw new Error('job 1 did not build rootfs and initramfs (not a fresh cache?)');

  const t0 = performance.now();
  const ev2 = run(['cache', 'pull', url, 'amd64', 'ipxe', '-f', spec], path.join(work, 'c2'));
  const wall = (performance.now() - t0) / 1000;
  const pull = (ev2.find((e) => e.event === 'cache-pull') as { stats: { pulled: { stage: string; seconds: number; bytes: number }[] } }).stats.pulled;
  const pullS = pull.filter((p) => heavy.includes(p.stage)).reduce((a, p) => a + p.seconds, 0);
  const pullBytes = pull.filter((p) => heavy.includes(p.stage)).reduce((a, p) => a + p.bytes, 0);

  const out3 = path.join(work, 'o3');
  const ev3 = run(['build', 'amd64', 'kernel-initrd', 'oci', '-f', spec, '--out', out3, '--remote-cache', url], path.join(work, 'c3'));
  const s3 = ev3.find((e) => e.event === 'summary') as { pulled: string[]; executed: string[]; remoteCache: { bytesDown: number; bytesUp: number } };
  let outBytes = 0;
  for (const v of ['kernel-initrd', 'oci']) {
    const dir = path.join(out3, v, 'amd64');
    for (const f of await hashImageDir(dir)) outBytes += (await fs.stat(path.join(dir, f.name))).size;
  }
  const mib = (n: number) => Math.round((n / 1048576) * 10) / 10;
  const result = {
    build_rootfs_initramfs_s: Math.round(buildS * 10) / 10,
    pull_rootfs_initramfs_s: Math.round(pullS * 10) / 10,
    pull_over_build: Math.round((pullS / buildS) * 1000) / 1000,
    pull_MiB: mib(pullBytes),
    cache_pull_wall_s: Math.round(wall * 10) / 10,
    job2: { pulled: s3.pulled, executed: s3.executed, down_MiB: mib(s3.remoteCache.bytesDown), up_MiB: mib(s3.remoteCache.bytesUp), outputs_MiB: mib(outBytes), down_over_outputs: Math.round((s3.remoteCache.bytesDown / outBytes) * 100) / 100 },
  };
  console.log(JSON.stringify(result, null, 2));
} finally {
  await reg.stop();
  await fs.rm(work, { recursive: true, force: true });
}
