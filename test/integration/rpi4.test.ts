// The Raspberry Pi 4 SD image from fixtures/minimal-arm64.yaml. No QEMU here runs
// the Pi 4 firmware stage (bookworm's QEMU has no raspi4b; backports' panics on
// Debian's kernel; the Pi machines boot with -kernel and never run start4.elf), so:
//  1. a static check without mounting: sfdisk --json, mtools on img@@offset,
//     raspi-firmware's files against the package's own md5sums (read from the
//     image's root with debugfs), every file config.txt names, cmdline.txt,
//     e2fsck -fn on the root;
//  2. a boot of the image's own kernel, initrd and Pi 3 DTB under qemu raspi3b with
//     the image as the SD card: the root must come from the ext4 RASPIROOT on
//     mmcblk0p2 and systemd there must print PIPELINE-OS-OK.
// The firmware stage itself is verified only on hardware.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { bootTest } from '../../src/boot/boot.js';
import { DEFAULT_FORBID } from '../../schema/spec.js';
import { raspiConfigFiles } from '../../src/lib/diskimage.js';
import { rpi4BootPlan } from '../../outputs/rpi4.js';
import { cli, ROOT, summary } from '../helpers/cli.js';

const FIXTURE = path.join(ROOT, 'fixtures', 'minimal-arm64.yaml');
let work = '';
let dir = '';
let img = '';

function sh(cmd: string, args: string[]): Buffer {
  return execFileSync(cmd, args, { env: { ...process.env, MTOOLS_SKIP_CHECK: '1' }, maxBuffer: 256 * 1024 * 1024 });
}

before(async () => {
  work = await fs.mkdtemp(path.join(process.env.PIPELINE_TEST_TMP ?? os.tmpdir(), 'pipeline-rpi4-'));
  const r = await cli(['build', 'arm64', 'rpi4', '-f', FIXTURE, '--out', path.join(work, 'images'), '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(summary(r).ok, true);
  dir = path.join(work, 'images', 'rpi4', 'arm64');
  img = path.join(dir, 'rpi4.img');
});
after(async () => {
  if (work && !process.env.PIPELINE_KEEP_TEST_TMP) await fs.rm(work, { recursive: true, force: true });
});

test('rpi4.img: MBR, FAT32 RASPIFIRM at 4 MiB with raspi-firmware (package hashes), DTBs, kernel, initrd, config.txt, cmdline.txt; ext4 RASPIROOT passes e2fsck', async () => {
  execFileSync('sha256sum', ['--check', '--strict', 'SHA256SUMS'], { cwd: dir });
  const pt = JSON.parse(sh('sfdisk', ['--json', img]).toString()).partitiontable;
  assert.equal(pt.label, 'dos');
  assert.deepEqual(pt.partitions.map((p: { type: string }) => p.type), ['c', '83']);
  assert.equal(pt.partitions[0].start, 8192, 'RASPIFIRM starts at 4 MiB');
  assert.equal(pt.partitions[1].start, 512 * 2048, 'RASPIROOT starts at 512 MiB');
  const fat = `${img}@@${pt.partitions[0].start * 512}`;
  const info = sh('minfo', ['-i', fat, '::']).toString();
  assert.match(info, /disk label="RASPIFIRM\s*"/);
  assert.match(info, /hidden sectors: 8192/);
  const names = sh('mdir', ['-b', '-i', fat, '::/']).toString().split('\n').filter(Boolean).map((l) => l.replace(/^::\//, ''));

  // The root: extract it (no mount), fsck it, and read the package's md5sums from it.
  const root = path.join(work, 'root.img');
  sh('dd', [`if=${img}`, `of=${root}`, 'bs=1M', `skip=${pt.partitions[1].start / 2048}`, `count=${pt.partitions[1].size / 2048}`, 'status=none']);
  sh('e2fsck', ['-fn', root]);
  assert.match(sh('e2label', [root]).toString(), /^RASPIROOT$/m);
  const md5sums = sh('debugfs', ['-R', 'cat /var/lib/dpkg/info/raspi-firmware.md5sums', root]).toString();
  const fw = md5sums
    .split('\n')
    .map((l) => /^([0-9a-f]{32})\s+usr\/lib\/raspi-firmware\/([^/]+)$/.exec(l))
    .filter((m): m is RegExpExecArray => !!m);
  assert.ok(fw.length >= 10, `raspi-firmware's file list: ${md5sums.slice(0, 500)}`);
  assert.ok(fw.some((m) => m[2] === 'start4.elf') && fw.some((m) => m[2] === 'fixup4.dat'));
  for (const [, md5, name] of fw) {
    assert.ok(names.includes(name!), `${name} on RASPIFIRM`);
    assert.equal(createHash('md5').update(sh('mtype', ['-i', fat, `::/${name}`])).digest('hex'), md5, `${name} is the package's file`);
  }
  assert.ok(names.includes('bcm2711-rpi-4-b.dtb'), 'the Pi 4 DTB from the kernel package');

  const config = sh('mtype', ['-i', fat, '::/config.txt']).toString();
  for (const l of ['arm_64bit=1', 'enable_uart=1', 'upstream_kernel=1']) assert.ok(config.split('\n').includes(l), l);
  const named = raspiConfigFiles(config);
  assert.equal(named.length, 2, config);
  for (const f of named) assert.ok(names.includes(f), `config.txt names ${f}, which is on RASPIFIRM`);
  const cmdline = sh('mtype', ['-i', fat, '::/cmdline.txt']).toString();
  assert.match(cmdline, /^console=ttyS1,115200 root=LABEL=RASPIROOT rw rootwait\n$/);

  // The initramfs carries the Pi's SD drivers.
  const initrd = path.join(work, 'initrd');
  sh('mcopy', ['-n', '-i', fat, `::/${named[1]}`, initrd]);
  // dracut's compressor is the dracut stage's choice (gzip or zstd): pick by magic.
  const magic = (await fs.readFile(initrd)).subarray(0, 4).toString('hex');
  const decompress = magic.startsWith('1f8b') ? 'gzip' : magic === '28b52ffd' ? 'zstd' : assert.fail(`unknown initrd compression (magic ${magic})`);
  const list = execFileSync('sh', ['-c', '"$2" -dc < "$1" | cpio -t --quiet', 'sh', initrd, decompress], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  assert.match(list, /\/sdhci-iproc\.ko/);
  assert.match(list, /\/mmc\/host\/bcm2835\.ko/);
});

test('RASPIROOT: the inodes of files the emitter removed (/boot/firmware/*, the old fstab) carry the epoch, not the time the rootfs was unpacked', () => {
  const pt = JSON.parse(sh('sfdisk', ['--json', img]).toString()).partitiontable;
  const fs2 = `${img}?offset=${pt.partitions[1].start * 512}`;
  const deleted = sh('debugfs', ['-R', 'lsdel', fs2]).toString().split('\n').map((l) => /^\s*(\d+)\s/.exec(l)?.[1]).filter((x): x is string => !!x);
  assert.ok(deleted.length > 0, 'the emitter removed files (raspi-firmware\'s copies in /boot/firmware)');
  const epoch = `0x${(1704067200).toString(16)}`; // fixtures/minimal-arm64.yaml source_date_epoch
  for (const ino of deleted) {
    const st = sh('debugfs', ['-R', `stat <${ino}>`, fs2]).toString();
    for (const field of ['ctime', 'atime']) assert.equal(new RegExp(`\\b${field}: (0x[0-9a-f]+)`).exec(st)?.[1], epoch, `inode ${ino} ${field}: an image that depends on the unpack time is not reproducible`);
  }
});

test("the image's own kernel, initrd and Pi 3 DTB boot on qemu raspi3b from the SD card to PIPELINE-OS-OK on mmcblk0p2", async () => {
  const bootDir = await fs.mkdtemp(path.join(work, 'boot-'));
  const logFile = path.join(work, 'raspi3b.log');
  const r = await bootTest(await rpi4BootPlan(dir, bootDir), {
    expect: ['PIPELINE-OS-OK root=ext2/ext3'],
    forbid: DEFAULT_FORBID,
    // Under TCG on 2 shared cores this boot took 5-12 min with the machine loaded (load 10-20).
    timeoutMs: 900_000,
    logFile,
  });
  assert.equal(r.ok, true, `${r.reason}\n${r.logTail}`);
  const log = await fs.readFile(logFile, 'utf8');
  assert.match(log, /mmcblk0: p1 p2/);
  // The root filesystem mounted is RASPIROOT's ext4 on the SD card's second partition.
  assert.match(log, /EXT4-fs \(mmcblk0p2\): mounted filesystem/);
  console.log(`raspi3b boot: ${r.seconds} s`);
});

test('rpi4 from a spec whose rootfs lacks non-free-firmware exits 2 and names the component to add', async () => {
  const spec = (await fs.readFile(FIXTURE, 'utf8')).replace('components: [main, non-free-firmware]', 'components: [main]').replace('overlay: os-overlay', '');
  assert.ok(!/components:.*non-free-firmware/.test(spec));
  const file = path.join(work, 'no-firmware.yaml');
  await fs.writeFile(file, spec);
  const r = await cli(['plan', 'arm64', 'rpi4', '-f', file]);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /non-free-firmware/);
  assert.match(r.stderr, /add "non-free-firmware" to the rootfs stage's components/);
});
