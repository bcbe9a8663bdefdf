// Real-tool test of verified boot from composefs (issue 15): fixtures/verified.yaml
// builds a Debian 13 (trixie) rootfs, its composefs image + object store with two
// layers (priorities 20 and 10), and a raw GPT disk whose ext4 `verity` root
// partition holds them; grub.cfg carries composefs=<digest> powernode.layers=….
// The disk boots under qemu TCG through GRUB, the initramfs (90powernode measures
// the images, checks every object they need is in the store, enables fs-verity on
// first boot, mounts the overlay root) and systemd, where fixtures/verified-overlay's
// unit prints `findmnt /`, two object-backed files and the marker.
//
// Wall time: the disk is built once into the shared test cache and published to
// the shared images dir (later runs link it). Nothing copies it: every boot gets a
// qcow2 overlay backed by it, and bad disks are such overlays with bytes written
// by qemu-io (one sparse raw copy only where debugfs must edit the filesystem).
// Boots, in two lanes (two qemus at a time):
//  - SeaBIOS, first boot, writable overlay (enables fs-verity); then OVMF boots
//    that same overlay (snapshot): a later boot, nothing left to enable;
//  - SeaBIOS only, the negatives (one firmware proves them: the module runs after
//    the bootloader, the same way under both):
//    - one byte of probe.txt's object changed (at the block debugfs reports):
//      overlayfs verity=require must refuse the read;
//    - the composefs= digest inside grub.cfg changed: the module refuses;
//    - probe.txt's object deleted (debugfs on a copy): the module refuses before
//      switch-root, naming the object and the file that needs it.
// Needs root, the tools of raw and composefs, qemu-system-x86, qemu-utils, ovmf, the mirror.
import assert from 'node:assert/strict';
import { mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { bootTest, type BootTestResult } from '../../src/boot/boot.js';
import { runProcess } from '../../src/engine/process.js';
import { objectPath } from '../../src/lib/composefs-dump.js';
import { hashFile } from '../../src/lib/digest.js';
import { SECTOR } from '../../src/lib/diskimage.js';
import { diskBootPlans, firmwarePlans } from '../../outputs/_disk.js';
import type { BootPlan } from '../../src/stage.js';
import { cli, ROOT, TEST_CACHE } from '../helpers/cli.js';

const FIXTURE = join(ROOT, 'fixtures', 'verified.yaml');
const PROBE = join(ROOT, 'fixtures', 'verified-overlay', 'usr', 'share', 'pipeline', 'probe.txt');
/** Shared with other runs: publishing an unchanged disk again only links it. */
const IMAGES = join(TEST_CACHE, '..', 'pipeline-test-images', 'verified-fixture');
const TIMEOUT = 900_000;
const REFUSED = 'powernode: verified root refused';
/** The kernel's last line when the refusal hook powers the machine off. */
const POWER_DOWN = 'reboot: Power down';

interface Part {
  name: string;
  start: number;
  size: number;
}
let base = '';
let disk = '';
let meta: { cmdline: string; partitions: Part[] };

const part = (name: string): Part => meta.partitions.find((p) => p.name === name)!;

type Boot = BootTestResult & { lines: string[] };

async function boot(plan: BootPlan, name: string, expect: string[], forbid: string[] = []): Promise<Boot> {
  const lines: string[] = [];
  const r = await bootTest(plan, { expect, forbid, timeoutMs: TIMEOUT, onLine: (l) => lines.push(l), logFile: join(base, `${name}.log`) });
  return { ...r, lines };
}

/** The standard disk plan (snapshot=on) for a file in base. */
const snapshotPlan = (file: string, format: 'raw' | 'qcow2', firmware: 'bios' | 'uefi'): BootPlan =>
  diskBootPlans({ arch: 'amd64', dir: base, workDir: base, firmware }, file, format, 'verified')[0]!;

/** A qcow2 overlay in base backed by the published disk (read-only for qemu and us). */
async function overlay(name: string): Promise<string> {
  await runProcess('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', disk, join(base, name)]);
  return name;
}

/** Write bytes into an overlay at a disk offset (qemu-io writes a repeated byte pattern, so one byte at a time). */
async function poke(name: string, offset: number, bytes: Buffer): Promise<void> {
  const cmds = [...bytes].flatMap((b, i) => ['-c', `write -q -P ${b} ${offset + i} 1`]);
  await runProcess('qemu-io', ['-f', 'qcow2', ...cmds, join(base, name)]);
}

async function readDisk(offset: number, length: number): Promise<Buffer> {
  const h = await open(disk, 'r');
  try {
    const b = Buffer.alloc(length);
    await h.read(b, 0, length, offset);
    return b;
  } finally {
    await h.close();
  }
}

/** `DEVICE?offset=` opens the partition inside the disk image (e2fsprogs unix_io option). */
const rootFs = (file: string) => `${file}?offset=${part('root').start * SECTOR}`;

/** Overlay with one byte of probe.txt's object changed (at the block debugfs's block map names). */
async function tamperedDisk(probeObject: string): Promise<string> {
  const bmap = await runProcess('debugfs', ['-R', `bmap /objects/${probeObject} 0`, rootFs(disk)], { capture: true });
  const block = Number(bmap.stdout.trim());
  assert.ok(Number.isInteger(block) && block > 0, `no block for the probe object: ${bmap.stdout} ${bmap.stderr}`);
  const off = part('root').start * SECTOR + block * 4096;
  assert.equal((await readDisk(off, 1)).toString(), 'P', 'the block debugfs named holds probe.txt');
  const name = await overlay('tampered.qcow2');
  await poke(name, off, Buffer.from('Q'));
  return name;
}

/** Overlay whose grub.cfg (plain text in the FAT ESP) names a wrong composefs= digest. */
async function wrongDigestDisk(digest: string, wrong: string): Promise<string> {
  const esp = part('esp');
  const buf = await readDisk(esp.start * SECTOR, esp.size * SECTOR);
  const needle = Buffer.from(`composefs=${digest}`);
  const name = await overlay('wrong-digest.qcow2');
  let patched = 0;
  for (let i = buf.indexOf(needle); i >= 0; i = buf.indexOf(needle, i + 1)) {
    await poke(name, esp.start * SECTOR + i, Buffer.from(`composefs=${wrong}`));
    patched++;
  }
  assert.ok(patched >= 1, 'grub.cfg with the digest found on the ESP');
  return name;
}

/** Sparse raw copy with probe.txt's object unlinked from the store (debugfs writes the filesystem). */
async function missingObjectDisk(probeObject: string): Promise<string> {
  const name = 'missing-object.raw';
  await runProcess('cp', ['--sparse=always', disk, join(base, name)]);
  await runProcess('debugfs', ['-w', '-R', `rm /objects/${probeObject}`, rootFs(join(base, name))]);
  const ls = await runProcess('debugfs', ['-R', `ls -p /objects/${probeObject.slice(0, 2)}`, rootFs(join(base, name))], { capture: true });
  assert.ok(ls.stdout.length > 0 && !ls.stdout.includes(probeObject.slice(3)), `object still listed:\n${ls.stdout}`);
  return name;
}

/** Seconds between the module's "checking the object store" and "object store:" kmsg lines (the walk). */
function walkSeconds(lines: string[]): number | undefined {
  const t = (re: RegExp) => lines.map((l) => re.exec(l)).find(Boolean)?.[1];
  const a = t(/\[\s*(\d+\.\d+)\] powernode: checking the object store/);
  const b = t(/\[\s*(\d+\.\d+)\] powernode: object store: /);
  return a && b ? Number(b) - Number(a) : undefined;
}

let boots: { bios: Promise<Boot>; uefi: Promise<Boot>; tampered: Promise<Boot>; wrongDigest: Promise<Boot>; missing: Promise<Boot> };
let digest = '';
let wrong = '';
let probeObject = '';

before(async () => {
  base = await mkdtemp(join(process.env.PIPELINE_TEST_TMP ?? '/var/tmp', 'pipeline-verified-'));
  const r = await cli(['build', 'amd64', 'verified', '-f', FIXTURE, '--out', IMAGES], { timeoutMs: 3_600_000 });
  assert.equal(r.code, 0, r.stderr);
  const dir = join(IMAGES, 'verified', 'amd64');
  meta = JSON.parse(await readFile(join(dir, 'build-manifest.json'), 'utf8')).resolved.meta.verified;
  disk = join(dir, 'disk.raw');
  digest = /composefs=([0-9a-f]{64})/.exec(meta.cmdline)![1]!;
  wrong = digest.slice(0, 63) + (digest[63] === '0' ? '1' : '0');
  probeObject = objectPath((await hashFile(PROBE, { fsverity: true })).fsverity!);
  const [first, tamperedFile, wrongDisk, missing] = await Promise.all([
    overlay('booted.qcow2'),
    tamperedDisk(probeObject),
    wrongDigestDisk(digest, wrong),
    missingObjectDisk(probeObject),
  ]);
  // Two lanes, two qemus at a time (a 2-core host): the first boot and the later
  // boot that needs its disk, then the short wrong-digest boot; the tampered boot
  // (a full first boot), then the short missing-object boot.
  // The first boot writes fs-verity and the marker file to its overlay; the
  // initramfs remounts the store read-only (a sync) before the pivot, and qemu
  // writes the qcow2 out when it stops (SIGTERM), so the OVMF boot can reuse it.
  // cache=unsafe: no host fsync per guest flush, as snapshot=on does.
  const writable = firmwarePlans({ arch: 'amd64', dir: base, workDir: base, firmware: 'bios' }, [
    {
      firmware: 'bios',
      args: ['-drive', `if=none,id=disk0,file=${join(base, first)},format=qcow2,cache=unsafe`, '-device', 'virtio-blk-pci,drive=disk0,bootindex=0'],
      label: 'verified, first boot (SeaBIOS)',
    },
  ])[0]!;
  /** Run next after prev, whatever prev's outcome (its own test reports it). */
  const then = <T>(prev: Promise<unknown>, next: () => Promise<T>): Promise<T> => prev.then(next, next);
  // Refusals run to the power-off, so "never the marker" is checked to the end.
  const refused = (expect: string) => [expect, POWER_DOWN];
  const neverRoot = ['PIPELINE-OS-OK', 'PIPELINE-ROOT', 'PIPELINE-PROBE'];
  const bios = boot(writable, 'first-bios', ['PIPELINE-OS-OK'], [REFUSED]);
  const uefi = then(bios, () => boot(snapshotPlan(first, 'qcow2', 'uefi'), 'later-uefi', ['PIPELINE-OS-OK'], [REFUSED]));
  // The probe read must fail with EIO; the marker or the probe's text (changed or not) fails the test at once.
  const tampered = boot(snapshotPlan(tamperedFile, 'qcow2', 'bios'), 'tampered', ['probe.txt: Input/output error'], ['PIPELINE-OS-OK', 'PIPELINE-PROBE', 'QIPELINE-PROBE']);
  boots = {
    bios,
    uefi,
    tampered,
    wrongDigest: then(uefi, () => boot(snapshotPlan(wrongDisk, 'qcow2', 'bios'), 'wrong-digest', refused(`${REFUSED}: image.cfs digest ${digest} does not match ${wrong}`), neverRoot)),
    // Without the module's walk this boot would reach the root and fail on the read:
    // PIPELINE-ROOT or the EIO fails it at once.
    missing: then(tampered, () =>
      boot(
        snapshotPlan(missing, 'raw', 'bios'),
        'missing-object',
        refused(`${REFUSED}: object ${probeObject} is missing from the store (needed by /usr/share/pipeline/probe.txt in image.cfs)`),
        [...neverRoot, 'probe.txt: Input/output error'],
      ),
    ),
  };
  // Tests await their own boot; keep an early failure from being an unhandled rejection.
  for (const p of Object.values(boots)) p.catch(() => {});
});

after(async () => {
  if (base && !process.env.PIPELINE_KEEP_TEST_TMP) await rm(base, { recursive: true, force: true });
});

test('the disk names its verified root on the command line and the store partition is ext4 with verity', async () => {
  assert.match(meta.cmdline, /(^| )composefs=[0-9a-f]{64}( |$)/);
  // two layers, highest priority first
  assert.match(meta.cmdline, / powernode\.layers=[0-9a-f]{64},[0-9a-f]{64} /);
  const features = (await runProcess('dumpe2fs', ['-h', rootFs(disk)], { capture: true })).stdout;
  assert.match(features, /^Filesystem features:.*\bverity\b/m);
  const ls = (await runProcess('debugfs', ['-R', 'ls -p /', rootFs(disk)], { capture: true })).stdout;
  for (const n of ['image.cfs', 'objects', 'layers']) assert.ok(ls.includes(`/${n}/`), `${n} on the root partition:\n${ls}`);
});

function assertVerifiedRoot(r: Boot): void {
  const console = r.lines.join('\n');
  assert.ok(r.ok, `${r.reason}\n${r.logTail}`);
  const root = r.lines.find((l) => l.includes('PIPELINE-ROOT '));
  assert.ok(root, `no findmnt line:\n${r.logTail}`);
  assert.match(root, /PIPELINE-ROOT overlay /);
  assert.match(root, /verity=require/);
  assert.match(root, /metacopy=on/);
  // layers top first, then the base image, then the object store as a data-only lower ("::")
  assert.match(root, /lowerdir=\/run\/powernode\/composefs\/layer0:\/run\/powernode\/composefs\/layer1:\/run\/powernode\/composefs\/base::\/run\/powernode\/store\/objects/);
  assert.match(console, /powernode: verified composefs root mounted \(image [0-9a-f]{64}, 2 layer\(s\)\)/);
  assert.match(console, /PIPELINE-PROBE this file/);
  assert.match(console, /PIPELINE-LAYER high:/);
  assert.doesNotMatch(console, /PIPELINE-LAYER (base|low):/);
}

test('first boot (SeaBIOS): every object checked and fs-verity enabled, overlay verity=require over the object store, the top layer wins', async (t) => {
  const r = await boots.bios;
  assertVerifiedRoot(r);
  const m = /powernode: object store: (\d+) files, (\d+) objects checked, (\d+) fs-verity enabled/.exec(r.lines.join('\n'));
  assert.ok(m, r.logTail);
  assert.ok(Number(m[2]) > 1000 && Number(m[3]) === Number(m[2]), `first boot enables every referenced object: ${m[0]}`);
  t.diagnostic(`boot ${r.seconds} s; object walk with enabling: ${walkSeconds(r.lines)?.toFixed(1)} s`);
});

test('later boot (OVMF) of the same disk: objects checked again, nothing left to enable, same verified root', async (t) => {
  const r = await boots.uefi;
  assertVerifiedRoot(r);
  const m = /powernode: object store: (\d+) files, (\d+) objects checked, (\d+) fs-verity enabled/.exec(r.lines.join('\n'));
  assert.ok(m, r.logTail);
  assert.ok(Number(m[2]) > 1000 && Number(m[3]) === 0, `later boots only check: ${m[0]}`);
  t.diagnostic(`boot ${r.seconds} s; object walk (check only): ${walkSeconds(r.lines)?.toFixed(1)} s`);
});

test('a changed byte in an object the boot reads fails the read (verity), never the marker', async () => {
  const r = await boots.tampered;
  assert.ok(r.ok, `expected the probe read to fail with EIO: ${r.reason}\n${r.logTail}`);
});

test('a wrong composefs= digest stops the boot with the module message, before any root is used', async () => {
  const r = await boots.wrongDigest;
  assert.ok(r.ok, `${r.reason}\n${r.logTail}`);
  assert.equal(r.lines.filter((l) => l.includes(REFUSED)).length, 1, r.logTail);
});

test('a missing object stops the boot before switch-root with one line naming it and the file that needs it', async () => {
  const r = await boots.missing;
  assert.ok(r.ok, `${r.reason}\n${r.logTail}`);
  assert.equal(r.lines.filter((l) => l.includes(REFUSED)).length, 1, r.logTail);
  assert.ok(!r.lines.some((l) => l.includes('verified composefs root mounted')), 'no overlay root was mounted');
});
