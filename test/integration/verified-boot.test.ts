// Real-tool test of verified boot from composefs (issue 15): fixtures/verified.yaml
// builds a Debian 13 (trixie) rootfs, its composefs image + object store with two
// layers (priorities 20 and 10), and a raw GPT disk whose ext4 `verity` root
// partition holds them; grub.cfg carries composefs=<digest> powernode.layers=….
// Each disk boots under qemu TCG through GRUB, the initramfs (90powernode enables
// fs-verity, measures the images, mounts the overlay root) and systemd, where
// fixtures/verified-overlay's unit prints `findmnt /`, two object-backed files and
// the marker. Bad disks are copies of the built one with one thing changed:
//  - one byte of probe.txt's object (written into the ext4 partition at the block
//    debugfs reports), so overlayfs verity=require must refuse the read;
//  - the composefs= digest inside grub.cfg on the ESP, so the module must refuse.
// One boot per firmware for the good disk, one SeaBIOS boot per bad disk.
// Needs root, the tools of raw and composefs, qemu-system-x86, ovmf, the mirror.
import assert from 'node:assert/strict';
import { copyFile, mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { bootTest, type BootTestResult } from '../../src/boot/boot.js';
import { runProcess } from '../../src/engine/process.js';
import { objectPath } from '../../src/lib/composefs-dump.js';
import { hashFile } from '../../src/lib/digest.js';
import { SECTOR } from '../../src/lib/diskimage.js';
import { diskBootPlans } from '../../outputs/_disk.js';
import pLimit from 'p-limit';
import { cli, ROOT } from '../helpers/cli.js';

const FIXTURE = join(ROOT, 'fixtures', 'verified.yaml');
const PROBE = join(ROOT, 'fixtures', 'verified-overlay', 'usr', 'share', 'pipeline', 'probe.txt');
const TIMEOUT = 900_000;

interface Part {
  name: string;
  start: number;
  size: number;
}
let base = '';
let disk = '';
let meta: { cmdline: string; partitions: Part[] };

const part = (name: string): Part => meta.partitions.find((p) => p.name === name)!;

async function boot(file: string, firmware: 'bios' | 'uefi', expect: string[], forbid: string[] = []): Promise<BootTestResult & { lines: string[] }> {
  const lines: string[] = [];
  const [plan] = diskBootPlans({ arch: 'amd64', dir: base, workDir: base, firmware }, file, 'raw', 'verified');
  const r = await bootTest(plan!, { expect, forbid, timeoutMs: TIMEOUT, onLine: (l) => lines.push(l), logFile: join(base, `${file}-${firmware}.log`) });
  return { ...r, lines };
}

/** Copy of the disk with one byte of probe.txt's object changed (in the ext4 partition, via debugfs's block map). */
async function tamperedDisk(): Promise<string> {
  const digest = (await hashFile(PROBE, { fsverity: true })).fsverity!;
  const root = part('root');
  const bad = join(base, 'tampered.raw');
  await copyFile(disk, bad);
  // debugfs opens the partition inside the disk image (unix_io offset= option).
  const bmap = await runProcess('debugfs', ['-R', `bmap /objects/${objectPath(digest)} 0`, `${bad}?offset=${root.start * SECTOR}`], { capture: true });
  const block = Number(bmap.stdout.trim());
  assert.ok(Number.isInteger(block) && block > 0, `no block for the probe object: ${bmap.stdout} ${bmap.stderr}`);
  const off = root.start * SECTOR + block * 4096;
  const h = await open(bad, 'r+');
  try {
    const b = Buffer.alloc(1);
    await h.read(b, 0, 1, off);
    assert.equal(b.toString(), 'P', 'the block debugfs named holds probe.txt');
    await h.write(Buffer.from('Q'), 0, 1, off);
  } finally {
    await h.close();
  }
  return 'tampered.raw';
}

/** Copy of the disk whose grub.cfg (plain text in the FAT ESP) names a wrong composefs= digest. */
async function wrongDigestDisk(digest: string, wrong: string): Promise<string> {
  const esp = part('esp');
  const bad = join(base, 'wrong-digest.raw');
  await copyFile(disk, bad);
  const h = await open(bad, 'r+');
  let patched = 0;
  try {
    const buf = Buffer.alloc(esp.size * SECTOR);
    await h.read(buf, 0, buf.length, esp.start * SECTOR);
    const needle = Buffer.from(`composefs=${digest}`);
    for (let i = buf.indexOf(needle); i >= 0; i = buf.indexOf(needle, i + 1)) {
      await h.write(Buffer.from(`composefs=${wrong}`), 0, needle.length, esp.start * SECTOR + i);
      patched++;
    }
  } finally {
    await h.close();
  }
  assert.ok(patched >= 1, 'grub.cfg with the digest found on the ESP');
  return 'wrong-digest.raw';
}

type Boot = BootTestResult & { lines: string[] };
let boots: { bios: Promise<Boot>; uefi: Promise<Boot>; tampered: Promise<Boot>; wrongDigest: Promise<Boot> };
let digest = '';
let wrong = '';

before(async () => {
  base = await mkdtemp(join(process.env.PIPELINE_TEST_TMP ?? '/var/tmp', 'pipeline-verified-'));
  const out = join(base, 'out');
  const r = await cli(['build', 'amd64', 'verified', '-f', FIXTURE, '--out', out], { timeoutMs: 3_600_000 });
  assert.equal(r.code, 0, r.stderr);
  const dir = join(out, 'verified', 'amd64');
  meta = JSON.parse(await readFile(join(dir, 'build-manifest.json'), 'utf8')).resolved.meta.verified;
  disk = join(dir, 'disk.raw');
  await copyFile(disk, join(base, 'disk.raw'));
  digest = /composefs=([0-9a-f]{64})/.exec(meta.cmdline)![1]!;
  wrong = digest.slice(0, 63) + (digest[63] === '0' ? '1' : '0');
  const tampered = await tamperedDisk();
  const wrongDisk = await wrongDigestDisk(digest, wrong);
  // Each boot's first-boot fs-verity walk (snapshot=on) costs a minute under TCG;
  // two qemus at a time keep the suite short without starving a 2-core host.
  const limit = pLimit(2);
  boots = {
    bios: limit(() => boot('disk.raw', 'bios', ['PIPELINE-OS-OK'])),
    uefi: limit(() => boot('disk.raw', 'uefi', ['PIPELINE-OS-OK'])),
    // The probe read must fail with EIO; the marker or the probe's text (changed or not) fails the test at once.
    tampered: limit(() => boot(tampered, 'bios', ['probe.txt: Input/output error'], ['PIPELINE-OS-OK', 'PIPELINE-PROBE', 'QIPELINE-PROBE'])),
    wrongDigest: limit(() => boot(wrongDisk, 'bios', [`powernode: verified root refused: image.cfs digest ${digest} does not match ${wrong}`], ['PIPELINE-OS-OK', 'PIPELINE-ROOT'])),
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
  const root = part('root');
  const img = join(base, 'root-part.img');
  await runProcess('dd', [`if=${disk}`, `of=${img}`, `bs=${SECTOR}`, `skip=${root.start}`, `count=${root.size}`, 'conv=sparse', 'status=none']);
  const features = (await runProcess('dumpe2fs', ['-h', img], { capture: true })).stdout;
  assert.match(features, /^Filesystem features:.*\bverity\b/m);
  const ls = (await runProcess('debugfs', ['-R', 'ls -p /', img], { capture: true })).stdout;
  for (const n of ['image.cfs', 'objects', 'layers']) assert.ok(ls.includes(`/${n}/`), `${n} on the root partition:\n${ls}`);
  await rm(img);
});

for (const firmware of ['bios', 'uefi'] as const) {
  test(`boots the verified composefs root (${firmware === 'bios' ? 'SeaBIOS' : 'OVMF'}): overlay verity=require over the object store, the top layer's file wins`, async () => {
    const r = await boots[firmware];
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
    assert.match(console, /powernode: fs-verity enabled on \d+ objects/);
    assert.match(console, /PIPELINE-PROBE this file/);
    assert.match(console, /PIPELINE-LAYER high:/);
    assert.doesNotMatch(console, /PIPELINE-LAYER (base|low):/);
  });
}

test('a changed byte in an object the boot reads fails the read (verity), never the marker', async () => {
  const r = await boots.tampered;
  assert.ok(r.ok, `expected the probe read to fail with EIO: ${r.reason}\n${r.logTail}`);
});

test('a wrong composefs= digest stops the boot with the module message, before any root is used', async () => {
  const r = await boots.wrongDigest;
  assert.ok(r.ok, `${r.reason}\n${r.logTail}`);
  // exactly one powernode refusal line
  assert.equal(r.lines.filter((l) => l.includes('powernode: verified root refused')).length, 1, r.logTail);
});
