// Verified boot from composefs (issue 15), measured on fixtures/verified.yaml:
//   - boot time to the OS marker (PIPELINE-OS-OK) under qemu TCG, SeaBIOS, of the
//     `verified` disk (composefs root) against `plain` (same trixie rootfs, kernel
//     and initramfs on an ext4 root). The verified disk boots twice from one
//     writable copy: the first boot checks every object the images need and
//     enables fs-verity on them, the second finds the marker, measures the images
//     and only checks the objects. The walk's own time (between the module's two
//     kmsg lines) is printed for both;
//   - build time of the composefs stage (object store + images) for the full
//     rootfs, forced to rerun by dropping its cache record.
// Both disks boot in the same run: on a shared 2-core machine only same-run
// ratios mean anything (the load average is printed).
// Usage: node --import tsx bench/verified-boot.ts
import { copyFile, mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { bootTest } from '../src/boot/boot.js';
import type { BootPlan } from '../src/stage.js';
import { CLI, header, load, pipeline, ROOT, run, s } from './lib.js';

const spec = path.join(ROOT, 'fixtures', 'verified.yaml');
const cache = process.env.PIPELINE_TEST_CACHE ?? '/var/tmp/pipeline-test-cache';
const env = { ...process.env, PIPELINE_CACHE_DIR: cache };
const out = await mkdtemp(path.join(process.env.PIPELINE_TEST_TMP ?? '/var/tmp', 'pipeline-bench-verified-'));

header('verified boot (composefs root) vs ext4 root, qemu TCG SeaBIOS');
try {
  pipeline(['build', 'amd64', 'plain', 'verified', '-f', spec, '--out', out], { env });

  // Object store build time: drop the composefs record, rebuild it alone.
  const plan = run(process.execPath, [CLI, 'plan', 'amd64', 'verified', '-f', spec, '--json'], { env });
  // Drop the disk's record too, or the engine would not need composefs at all.
  for (const st of JSON.parse(plan.stdout).stages as { name: string; key: string }[]) {
    if (st.name === 'composefs' || st.name === 'verified') await rm(path.join(cache, 'entries', `${st.key}.json`), { force: true });
  }
  const rebuilt = pipeline(['build', 'amd64', 'verified', '-f', spec, '--out', out], { env });
  const cfs = rebuilt.stages.find((x) => x.name === 'composefs')!;
  const meta = JSON.parse(await readFile(path.join(out, 'verified', 'amd64', 'build-manifest.json'), 'utf8')).resolved.meta.composefs;
  console.log(`composefs stage (object store + image + 2 layers): ${s(cfs.seconds)} (${cfs.status}) for ${meta.objects} objects, ${(meta.objectBytes / 2 ** 20).toFixed(0)} MiB`);

  // A writable copy per disk (no snapshot): the verified disk keeps its first-boot work.
  async function bootTime(file: string, label: string): Promise<number> {
    const plan: BootPlan = {
      qemu: 'qemu-system-x86_64',
      args: ['-drive', `if=none,id=disk0,file=${file.replace(/,/g, ',,')},format=raw`, '-device', 'virtio-blk-pci,drive=disk0,bootindex=0'],
      label,
    };
    const lines: string[] = [];
    const r = await bootTest(plan, { expect: ['PIPELINE-OS-OK'], forbid: [], timeoutMs: 1_800_000, onLine: (l) => lines.push(l) });
    if (!r.ok) throw new Error(`${label}: ${r.reason}\n${r.logTail}`);
    // printk timestamps of "checking the object store" and "object store: …"
    const stamp = (re: RegExp) => Number(lines.map((l) => re.exec(l)).find(Boolean)?.[1]);
    const walk = stamp(/\[\s*(\d+\.\d+)\] powernode: object store: /) - stamp(/\[\s*(\d+\.\d+)\] powernode: checking the object store/);
    console.log(`${label.padEnd(40)} ${s(r.seconds)}${Number.isFinite(walk) ? `  (object walk ${s(walk)})` : ''}  (load ${load()})`);
    return r.seconds;
  }
  const plain = path.join(out, 'plain.raw');
  const verified = path.join(out, 'verified.raw');
  await copyFile(path.join(out, 'plain', 'amd64', 'disk.raw'), plain);
  await copyFile(path.join(out, 'verified', 'amd64', 'disk.raw'), verified);
  const tPlain = await bootTime(plain, 'ext4 root');
  const tFirst = await bootTime(verified, 'composefs root, first boot');
  const tNext = await bootTime(verified, 'composefs root, later boot');
  console.log(`composefs/ext4: first boot ×${(tFirst / tPlain).toFixed(2)}, later boots ×${(tNext / tPlain).toFixed(2)} (${os.availableParallelism()} cores)`);
} finally {
  await rm(out, { recursive: true, force: true });
}
