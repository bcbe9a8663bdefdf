// P3 — the cold build: `pipeline build amd64 raw` from an empty cache against mkosi
// 24.3 building the equivalent bootable disk (bench/peers/mkosi: same package set,
// systemd-boot, its own initrd, Incremental=yes) from an empty cache, alternated in
// one run (pipeline, mkosi, pipeline, mkosi, …). Target: pipeline ≤ 0.7× mkosi.
// Each pair also times pipeline with PIPELINE_SCRATCH=disk (build roots on disk, as
// mkosi's workspace is), for information: it shows what the RAM build roots bring.
// Every run starts after a `sync`, so none pays for the previous one's writeback.
// Usage (root): node --import tsx bench/cold-vs-mkosi.ts [--pairs N] [--work DIR] [--spec FILE] [--no-disk]
// mkosi comes from bookworm-backports, installed here when missing (with
// systemd-boot and kmod; bookworm's own mkosi is 14).
import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { arg, header, load, median, pipeline, ROOT, run, s, type StageRow } from './lib.js';

const pairs = Number(arg('--pairs', '2'));
const spec = arg('--spec', '');
const work = path.resolve(arg('--work', '/var/tmp/pipeline-bench/cold'));
const PEER = path.join(ROOT, 'bench', 'peers', 'mkosi');
const BACKPORTS = '/etc/apt/sources.list.d/bookworm-backports.sources';

function mkosiVersion(): string | undefined {
  const r = run('mkosi', ['--version'], { check: false });
  return r.status === 0 ? r.stdout.trim() : undefined;
}

async function ensureMkosi(): Promise<string> {
  const v = mkosiVersion();
  if (v && !/^mkosi 1\d\b/.test(v)) return v;
  if (!existsSync(BACKPORTS)) {
    await fs.writeFile(
      BACKPORTS,
      '# Added by pipeline bench/cold-vs-mkosi.ts: mkosi 24.x is only in bookworm-backports.\nTypes: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n',
    );
  }
  console.log('  installing mkosi from bookworm-backports …');
  run('apt-get', ['update', '-q']);
  run('apt-get', ['install', '-y', '-q', '-t', 'bookworm-backports', 'mkosi', 'systemd-boot', 'kmod'], { env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  return mkosiVersion() ?? 'unknown';
}

async function fresh(dir: string): Promise<string> {
  await fs.rm(dir, { recursive: true, force: true });
  await fs.mkdir(dir, { recursive: true });
  return dir;
}

interface Side {
  wall: number[];
  cpu: number[];
}
const pipe: Side = { wall: [], cpu: [] };
const pipeDisk: Side = { wall: [], cpu: [] };
const withDisk = !process.argv.includes('--no-disk');
const mk: Side = { wall: [], cpu: [] };
const stageTimes = new Map<string, number[]>();

header(`P3 cold build amd64 raw vs mkosi (${pairs} pair(s), alternating)`);
const version = await ensureMkosi();
console.log(`  ${version}; pipeline spec ${spec || 'pipelines/powernode.yaml'}, peer ${path.relative(ROOT, PEER)}`);
function coldPipeline(env?: NodeJS.ProcessEnv) {
  run('sync', []);
  return (async () => {
    const cache = await fresh(path.join(work, 'pipeline-cache'));
    const out = await fresh(path.join(work, 'pipeline-images'));
    run('sync', []);
    return pipeline(['build', 'amd64', 'raw', '--cache-dir', cache, '--out', out, ...(spec ? ['-f', path.resolve(spec)] : [])], { env });
  })();
}

for (let i = 0; i < pairs; i++) {
  // pipeline: empty cache, empty output dir.
  const p = await coldPipeline();
  pipe.wall.push(p.wall);
  pipe.cpu.push(p.cpu);
  for (const r of p.stages as StageRow[]) if (r.status === 'built') stageTimes.set(r.name, [...(stageTimes.get(r.name) ?? []), r.seconds]);
  console.log(`  pair ${i + 1}: pipeline ${s(p.wall)} wall, ${s(p.cpu)} CPU (${p.stages.filter((r) => r.status === 'built').map((r) => `${r.name} ${s(r.seconds)}`).join(', ')}); load ${load()}`);
  if (withDisk) {
    const d = await coldPipeline({ ...process.env, PIPELINE_SCRATCH: 'disk' });
    pipeDisk.wall.push(d.wall);
    pipeDisk.cpu.push(d.cpu);
    console.log(`  pair ${i + 1}: (pipeline, build roots on disk: ${s(d.wall)} wall, ${s(d.cpu)} CPU (${d.stages.filter((r) => r.status === 'built').map((r) => `${r.name} ${s(r.seconds)}`).join(', ')}); load ${load()})`);
  }

  // mkosi: empty incremental cache, package cache, workspace and output.
  const base = await fresh(path.join(work, 'mkosi'));
  const dirs = ['out', 'cache', 'pkg', 'ws'].map((d) => path.join(base, d));
  for (const d of dirs) await fs.mkdir(d);
  const [mout, mcache, mpkg, mws] = dirs as [string, string, string, string];
  run('sync', []);
  const m = run('mkosi', ['--force', '--output-dir', mout, '--cache-dir', mcache, '--package-cache-dir', mpkg, '--workspace-dir', mws, 'build'], { cwd: PEER });
  mk.wall.push(m.wall);
  mk.cpu.push(m.cpu);
  console.log(`  pair ${i + 1}: mkosi    ${s(m.wall)} wall, ${s(m.cpu)} CPU; load ${load()}`);
}
const ratio = median(pipe.wall) / median(mk.wall);
console.log(`  per stage (median): ${[...stageTimes].map(([n, t]) => `${n} ${s(median(t))}`).join(', ')}`);
console.log(`  pipeline median ${s(median(pipe.wall))} wall / ${s(median(pipe.cpu))} CPU; mkosi median ${s(median(mk.wall))} wall / ${s(median(mk.cpu))} CPU`);
if (withDisk) console.log(`  (for information: pipeline with build roots on disk, median ${s(median(pipeDisk.wall))} wall = ${(median(pipeDisk.wall) / median(mk.wall)).toFixed(2)}× mkosi)`);
console.log(`P3 pipeline/mkosi = ${ratio.toFixed(2)}× wall, ${(median(pipe.cpu) / median(mk.cpu)).toFixed(2)}× CPU (target ≤ 0.7× wall) ${ratio <= 0.7 ? 'MET' : 'NOT MET'}; load average at end ${load()}`);
