// Real-tool test of the disk emitters: a bookworm rootfs carrying the
// fixtures/os-overlay boot probe (mmdebstrap stage) and a dracut initramfs with
// dmsquash-live (dracut stage) feed raw, qcow2 and iso. Each image boots the full
// OS under qemu (TCG): firmware -> GRUB -> kernel -> initramfs -> switch to the
// real root -> systemd -> pipeline-boot-ok.service prints PIPELINE-OS-OK.
// Every format is built twice into different directories and must be
// byte-identical. Needs root, mmdebstrap, e2fsprogs, mtools, fdisk, grub-pc-bin,
// grub-efi-amd64-bin, squashfs-tools, xorriso, qemu-utils, qemu-system-x86, ovmf
// and the Debian mirror.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, promises as fs } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { expectedDump, firstDifference, parseSfdiskDump, SECTOR, type DiskPlan } from '../../src/lib/diskimage.js';
import { runProcess } from '../../src/engine/process.js';
import { cli, ROOT, summary, TEST_CACHE } from '../helpers/cli.js';
import { FIXTURE } from '../helpers/fixture-rootfs.js';

interface Built {
  dir: string;
  files: string[];
  meta: Record<string, unknown>;
}
interface StageRes {
  name: string;
  status: string;
  startedAt?: number;
  endedAt?: number;
}

const FORMATS = { raw: 'disk.raw', qcow2: 'disk.qcow2', iso: 'live.iso' } as const;
let base = '';
const built: Record<string, Built[]> = {};
let firstRun: StageRes[] = [];

async function run(cmd: string, args: string[]): Promise<string> {
  return (await runProcess(cmd, args, { capture: true })).stdout;
}

/** Drop the emitters' cache records so the next build really runs them again. */
async function forgetEmitters(): Promise<void> {
  const p = await cli(['plan', 'amd64', ...Object.keys(FORMATS), '--json', '-f', FIXTURE]);
  for (const s of JSON.parse(p.stdout).stages as { name: string; key: string }[]) {
    if (s.name in FORMATS) await rm(join(TEST_CACHE, 'entries', `${s.key}.json`), { force: true });
  }
}

async function buildInto(out: string): Promise<StageRes[]> {
  const r = await cli(['build', 'amd64', ...Object.keys(FORMATS), '-f', FIXTURE, '--out', out, '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(summary(r).ok, true);
  for (const fmt of Object.keys(FORMATS)) {
    const dir = join(out, fmt, 'amd64');
    const m = JSON.parse(await fs.readFile(join(dir, 'build-manifest.json'), 'utf8'));
    (built[fmt] ??= []).push({ dir, files: m.outputs.map((o: { path: string }) => o.path), meta: m.resolved.meta[fmt] });
  }
  return (r.events.find((e) => e.event === 'summary') as { stages: StageRes[] }).stages;
}

before(async () => {
  base = await mkdtemp(join(process.env.PIPELINE_TEST_TMP ?? '/var/tmp', 'pipeline-disks-'));
  // Two builds of every format into different output dirs; the emitters rerun
  // for the second one (rootfs and initramfs come from the cache).
  await forgetEmitters();
  firstRun = await buildInto(join(base, 'out1'));
  await forgetEmitters();
  await buildInto(join(base, 'out2'));
});

after(async () => {
  if (base && !process.env.PIPELINE_KEEP_TEST_TMP) await rm(base, { recursive: true, force: true });
});

test('one build runs the emitters side by side from one shared rootfs', () => {
  const by = new Map(firstRun.map((s) => [s.name, s]));
  for (const n of ['raw', 'qcow2', 'iso']) assert.equal(by.get(n)?.status, 'built', `${n} ran`);
  assert.equal(firstRun.filter((s) => s.name === 'rootfs').length, 1);
  const raw = by.get('raw')!;
  const iso = by.get('iso')!;
  // raw and iso are independent: with 2 jobs they overlap in time (qcow2 waits for raw).
  assert.ok(raw.startedAt! < iso.endedAt! && iso.startedAt! < raw.endedAt!, `raw ${raw.startedAt}-${raw.endedAt}, iso ${iso.startedAt}-${iso.endedAt}`);
  assert.ok(by.get('qcow2')!.startedAt! >= raw.endedAt!);
});

test('every format is byte-identical across two builds, manifests and provenance included', async () => {
  for (const [fmt, file] of Object.entries(FORMATS)) {
    const [a, b] = built[fmt]!;
    assert.deepEqual(a!.files, [file]);
    for (const f of [file, 'SHA256SUMS', 'build-manifest.json', 'provenance.intoto.json']) {
      const off = await firstDifference(join(a!.dir, f), join(b!.dir, f));
      assert.equal(off, null, `${fmt}/${f} differs between two builds at byte offset ${off}`);
    }
  }
});

test('raw: partition table is the planned one and the root ext4 is clean', async () => {
  const r = built.raw![0]!;
  const disk = join(r.dir, 'disk.raw');
  const meta = r.meta as { disk_guid: string; partitions: { number: number; name: string; type: string; uuid: string; start: number; size: number }[] };
  const plan: DiskPlan = {
    labelId: meta.disk_guid,
    totalBytes: 0,
    firstLba: 2048,
    partitions: meta.partitions.map((p) => ({ number: p.number, name: p.name, type: p.type, uuid: p.uuid, startLba: p.start, sizeLba: p.size })),
  };
  assert.deepEqual(parseSfdiskDump(await run('sfdisk', ['--dump', disk])), expectedDump(plan));
  assert.deepEqual(meta.partitions.map((p) => p.name), ['bios-boot', 'esp', 'root']);
  const root = meta.partitions[2]!;
  const img = join(base, 'root-part.img');
  await run('dd', [`if=${disk}`, `of=${img}`, `bs=${SECTOR}`, `skip=${root.start}`, `count=${root.size}`, 'conv=sparse', 'status=none']);
  await run('e2fsck', ['-fn', img]);
  const uuid = (await run('blkid', ['-o', 'value', '-s', 'UUID', img])).trim();
  assert.equal(uuid, (r.meta as { root_uuid: string }).root_uuid);
  await rm(img);
});

test('qcow2: qemu-img check passes', async () => {
  const q = built.qcow2![0]!;
  const out = await run('qemu-img', ['check', '-f', 'qcow2', join(q.dir, 'disk.qcow2')]);
  assert.match(out, /No errors were found/);
});

test('iso: El Torito catalogue has a BIOS and a UEFI entry', async () => {
  const i = built.iso![0]!;
  const res = await runProcess('xorriso', ['-indev', join(i.dir, 'live.iso'), '-report_el_torito', 'plain'], { capture: true });
  const text = res.stdout + res.stderr;
  assert.match(text, /El Torito boot img :\s+1\s+BIOS\s+y\s+none/);
  assert.match(text, /El Torito boot img :\s+2\s+UEFI\s+y\s+none/);
  assert.match(text, new RegExp(`Volume id\\s+: '${(i.meta as { label: string }).label}'`));
});

test('pipeline test boots the full OS from raw and qcow2 (SeaBIOS, OVMF) and the ISO (CD under both, and as a disk)', async () => {
  const r = await cli(['test', 'amd64', 'raw', 'qcow2', 'iso', '-f', FIXTURE, '--out', join(base, 'out1'), '--json']);
  const boots = r.events.filter((e) => e.event === 'boot-test') as { variant: string; label: string; ok: boolean; reason?: string; logTail: string }[];
  for (const b of boots) assert.ok(b.ok, `${b.variant} ${b.label}: ${b.reason}\n${b.logTail}`);
  const labels = boots.map((b) => `${b.variant}: ${b.label}`).join('\n');
  for (const want of [/raw: .*SeaBIOS/, /raw: .*OVMF/, /qcow2: .*SeaBIOS/, /qcow2: .*OVMF/, /iso: .*CD.*SeaBIOS/, /iso: .*CD.*OVMF/, /iso: .*(USB|virtio)/]) {
    assert.match(labels, want);
  }
  assert.equal(r.code, 0, r.stderr);
});

test('the grub.cfg inside each image carries the spec\'s whole command line after what the emitter adds', async () => {
  // fixtures/minimal.yaml: cmdline "console=${console} panic=-1", shared by every boot path.
  const tail = 'console=ttyS0 panic=-1';
  const r = built.raw![0]!;
  const rm_ = r.meta as { root_uuid: string; partitions: { start: number }[] };
  const esp = `${join(r.dir, 'disk.raw')}@@${rm_.partitions[1]!.start * SECTOR}`;
  const rawCfg = (await runProcess('mtype', ['-i', esp, '::/boot/grub/grub.cfg'], { capture: true, env: { MTOOLS_SKIP_CHECK: '1' } })).stdout;
  assert.match(rawCfg, new RegExp(`^\\s*linux /boot/vmlinuz root=UUID=${rm_.root_uuid} rw ${tail}$`, 'm'));

  const i = built.iso![0]!;
  const label = (i.meta as { label: string }).label;
  const isoCfgFile = join(base, 'iso-grub.cfg');
  await run('xorriso', ['-osirrox', 'on', '-indev', join(i.dir, 'live.iso'), '-extract', '/boot/grub/grub.cfg', isoCfgFile]);
  const isoCfg = await fs.readFile(isoCfgFile, 'utf8');
  assert.match(isoCfg, new RegExp(`^\\s*linux /boot/vmlinuz root=live:CDLABEL=${label} rd.live.image rd.live.overlay.overlayfs=1 ${tail}$`, 'm'));
  // Said once: the emitters no longer add a console of their own.
  for (const cfg of [rawCfg, isoCfg]) assert.equal(cfg.match(/console=/g)?.length, 1, cfg);
});

test('every boot path of the fixture and the default pipeline gets the same cmdline', async () => {
  for (const spec of [FIXTURE, join(ROOT, 'pipelines', 'powernode.yaml')]) {
    const p = await cli(['plan', 'amd64', '--all', '--json', '-f', spec]);
    assert.equal(p.code, 0, p.stderr);
    const stages = (JSON.parse(p.stdout).stages as { kind: string; params: { cmdline?: string } }[]).filter((s) => ['ipxe', 'kernel-initrd', 'raw', 'iso'].includes(s.kind));
    // Every boot-path kind is there (raw may appear more than once: the verified disk is raw too).
    assert.deepEqual([...new Set(stages.map((s) => s.kind))].sort(), ['ipxe', 'iso', 'kernel-initrd', 'raw']);
    assert.equal(new Set(stages.map((s) => s.params.cmdline)).size, 1, JSON.stringify(stages.map((s) => [s.kind, s.params.cmdline])));
  }
});

const canDropRoot = process.getuid?.() === 0 && existsSync('/usr/bin/setpriv');

test('raw and iso declare that they need root: preflight refuses an unprivileged build before any stage runs', { skip: !canDropRoot && 'needs root and setpriv (util-linux) to run the CLI as nobody' }, async () => {
  // Inputs from a kind that needs nothing, so the only root-needing stage is the emitter.
  const dir = await mkdtemp(join(base, 'preflight-'));
  // nobody must reach the spec and the dirs it writes (base is a 0700 temp dir).
  await fs.chmod(base, 0o755);
  await fs.chmod(dir, 0o755);
  await fs.writeFile(
    join(dir, 'spec.yaml'),
    [
      'name: preflight',
      'arches: [amd64]',
      'source_date_epoch: 1704067200',
      'stages:',
      '  rootfs: { kind: fixed-text, with: { name: rootfs.tar, content: "not a tarball" } }',
      '  boot: { kind: fixed-text, with: { name: vmlinuz, content: "k" } }',
      '  raw: { kind: raw, inputs: { rootfs: rootfs, boot: boot } }',
      '  iso: { kind: iso, inputs: { rootfs: rootfs, boot: boot } }',
      'variants: { text: [rootfs], raw: [raw], iso: [iso] }',
      '',
    ].join('\n'),
    { mode: 0o644 },
  );
  for (const d of ['cache', 'out']) {
    await fs.mkdir(join(dir, d));
    await fs.chmod(join(dir, d), 0o777);
  }
  const asNobody = (variant: string) => {
    const r = spawnSync(
      'setpriv',
      ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, join(ROOT, 'bin', 'pipeline.js'), 'build', 'amd64', variant, '-f', join(dir, 'spec.yaml'), '--cache-dir', join(dir, 'cache'), '--out', join(dir, 'out')],
      { encoding: 'utf8', env: { ...process.env, PIPELINE_KINDS_PATH: join(ROOT, 'fixtures', 'kinds'), HOME: dir } },
    );
    return { code: r.status, stderr: r.stderr };
  };
  // The machine itself is fine for an unprivileged build of the inputs...
  const text = asNobody('text');
  assert.equal(text.code, 0, text.stderr);
  for (const v of ['raw', 'iso']) {
    const r = asNobody(v);
    // ...but not for the emitters: usage error (2) from preflight, naming root.
    assert.equal(r.code, 2, `${v}: ${r.stderr}`);
    assert.match(r.stderr, /root: .*needs root/, v);
  }
  // Nothing ran for them: only the text variant's stage has a cache entry.
  assert.equal((await fs.readdir(join(dir, 'cache', 'entries'))).filter((f) => f.endsWith('.json')).length, 1);
});
