// Throughput of hashFile (sha256 + fs-verity in one pass) against the C tools on a
// 1 GiB file. Run: node --import tsx bench/fsverity.ts [sizeMiB] [rounds]
// Rounds alternate between the contenders and the best time of each is kept, so a
// busy machine penalises them alike. The file is read once first so every run
// hits the page cache.
import { execFileSync } from 'node:child_process';
import { createCipheriv, createHash } from 'node:crypto';
import { open, mkdtemp, rm } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { FsVerityHasher, hashFile } from '../src/lib/digest.js';

const sizeMiB = Number(process.argv[2] ?? 1024);
const rounds = Number(process.argv[3] ?? 3);
const size = sizeMiB * 1024 * 1024;

async function makeFile(file: string): Promise<void> {
  const key = createHash('sha256').update('bench').digest().subarray(0, 16);
  const c = createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  const zero = Buffer.alloc(4 << 20);
  const fh = await open(file, 'w');
  try {
    for (let done = 0; done < size; ) {
      const n = Math.min(zero.length, size - done);
      await fh.write(c.update(zero.subarray(0, n)));
      done += n;
    }
  } finally {
    await fh.close();
  }
}

/** fs-verity alone on this thread: the like-for-like comparison with `fsverity digest`. */
async function fsverityOnly(file: string): Promise<string> {
  const fh = await open(file, 'r');
  try {
    const h = new FsVerityHasher();
    const buf = Buffer.allocUnsafe(4 << 20);
    for (let pos = 0; ; ) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
      if (bytesRead === 0) break;
      h.update(buf.subarray(0, bytesRead));
      pos += bytesRead;
    }
    return h.digestHex();
  } finally {
    await fh.close();
  }
}

async function time<T>(fn: () => Promise<T> | T): Promise<[number, T]> {
  const t0 = process.hrtime.bigint();
  const r = await fn();
  return [Number(process.hrtime.bigint() - t0) / 1e9, r];
}

const dir = await mkdtemp(join(tmpdir(), 'fsverity-bench-'));
try {
  const file = join(dir, 'data');
  await makeFile(file);
  execFileSync('cat', [file], { stdio: ['ignore', 'ignore', 'inherit'] }); // warm the page cache

  const tools: Record<string, () => string> = {
    'fsverity digest': () => /^sha256:([0-9a-f]{64})/.exec(execFileSync('fsverity', ['digest', file], { encoding: 'utf8' }))![1],
    sha256sum: () => execFileSync('sha256sum', [file], { encoding: 'utf8' }).slice(0, 64),
  };
  const best: Record<string, number> = {};
  let ours: { sha256: string; fsverity?: string } = { sha256: '' };
  const ref: Record<string, string> = {};
  let ourCpu = Infinity;
  const load0 = loadavg()[0];
  for (let r = 0; r < rounds; r++) {
    const c0 = process.cpuUsage();
    const [t, res] = await time(() => hashFile(file, { fsverity: true }));
    const cpu = process.cpuUsage(c0);
    ourCpu = Math.min(ourCpu, (cpu.user + cpu.system) / 1e6);
    ours = res;
    best['hashFile (sha256+fsverity)'] = Math.min(best['hashFile (sha256+fsverity)'] ?? Infinity, t);
    const [tf, fvOnly] = await time(() => fsverityOnly(file));
    if (fvOnly !== ours.fsverity) throw new Error('FsVerityHasher and hashFile disagree');
    best['FsVerityHasher only, 1 thr'] = Math.min(best['FsVerityHasher only, 1 thr'] ?? Infinity, tf);
    for (const [name, run] of Object.entries(tools)) {
      const [tt, out] = await time(run);
      ref[name] = out;
      best[name] = Math.min(best[name] ?? Infinity, tt);
    }
  }
  if (ours.fsverity !== ref['fsverity digest'] || ours.sha256 !== ref.sha256sum) {
    throw new Error(`digest mismatch: ours ${JSON.stringify(ours)} tools ${JSON.stringify(ref)}`);
  }
  const mbs = (t: number) => size / 1e6 / t;
  console.log(`file: ${sizeMiB} MiB, best of ${rounds} rounds, page cache warm; ${cpus().length} CPUs, 1-min load ${load0.toFixed(2)} -> ${loadavg()[0].toFixed(2)}`);
  for (const [name, t] of Object.entries(best)) console.log(`  ${name.padEnd(28)} ${t.toFixed(3)} s  ${mbs(t).toFixed(0).padStart(6)} MB/s`);
  console.log(`  hashFile CPU time (both threads, best round): ${ourCpu.toFixed(3)} s`);
  const h = best['hashFile (sha256+fsverity)'];
  const fv = best['fsverity digest'];
  const ss = best.sha256sum;
  console.log('ratios (hashFile throughput / tool throughput; hashFile computes both digests):');
  console.log(`  vs fsverity digest           ${(fv / h).toFixed(2)}x`);
  console.log(`  FsVerityHasher alone vs fsverity digest: ${(fv / best['FsVerityHasher only, 1 thr']).toFixed(2)}x`);
  console.log(`  vs sha256sum                 ${(ss / h).toFixed(2)}x`);
  console.log(`  vs both tools run in turn    ${((fv + ss) / h).toFixed(2)}x`);
} finally {
  await rm(dir, { recursive: true, force: true });
}
