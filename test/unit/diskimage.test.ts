import assert from 'node:assert/strict';
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import {
  autoEspBytes,
  autoExt4Bytes,
  debugfsTimeScript,
  deriveFatSerial,
  deriveUuid,
  expectedDump,
  fatUuid,
  firstDifference,
  GPT_TYPE,
  grubConfig,
  grubEarlyConfig,
  isoLabel,
  MiB,
  parseSfdiskDump,
  parseSize,
  patchGrubBios,
  planGptDisk,
  sfdiskScript,
} from '../../src/lib/diskimage.js';
import { convertArgs, Params as QcowParams } from '../../outputs/qcow2.js';
import { liveCmdline, xorrisoArgs } from '../../outputs/iso.js';
import { rawCmdline } from '../../outputs/raw.js';

test('derived identifiers are stable, distinct per purpose and well-formed', () => {
  const a = deriveUuid('seed', 'root');
  assert.equal(a, deriveUuid('seed', 'root'));
  assert.notEqual(a, deriveUuid('seed', 'esp'));
  assert.notEqual(a, deriveUuid('seed2', 'root'));
  assert.match(a, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  const s = deriveFatSerial('seed', 'esp');
  assert.match(s, /^[0-9A-F]{8}$/);
  assert.equal(fatUuid(s), `${s.slice(0, 4)}-${s.slice(4)}`);
});

test('parseSize', () => {
  assert.equal(parseSize('512M'), 512 * MiB);
  assert.equal(parseSize('2G'), 2048 * MiB);
  assert.equal(parseSize('4096'), 4096);
  assert.throws(() => parseSize('2 GB please'));
});

test('automatic sizes leave room and are MiB aligned', () => {
  const t = { dataBytes: 600 * MiB, inodes: 15000 };
  const b = autoExt4Bytes(t, 256 * MiB);
  assert.equal(b % MiB, 0);
  assert.ok(b > 600 * MiB + 256 * MiB + 64 * MiB);
  assert.equal(autoEspBytes(10 * MiB), 64 * MiB);
  assert.ok(autoEspBytes(100 * MiB) >= 110 * MiB);
});

test('GPT plan: 1 MiB aligned, contiguous, room for the backup GPT, derived GUIDs', () => {
  const plan = planGptDisk(
    [
      { name: 'bios-boot', type: GPT_TYPE.biosBoot, bytes: 150_000 },
      { name: 'esp', type: GPT_TYPE.esp, bytes: 64 * MiB },
      { name: 'root', type: GPT_TYPE.rootX86_64, bytes: 1000 * MiB + 1 },
    ],
    'seed',
  );
  const [b, e, r] = plan.partitions;
  assert.deepEqual([b!.startLba, b!.sizeLba], [2048, 2048]);
  assert.deepEqual([e!.startLba, e!.sizeLba], [4096, 131072]);
  assert.deepEqual([r!.startLba, r!.sizeLba], [135168, 1001 * 2048]);
  assert.equal(plan.totalBytes, (r!.startLba + r!.sizeLba + 2048) * 512);
  assert.equal(planGptDisk([{ name: "esp", type: GPT_TYPE.esp, bytes: MiB }], "seed").labelId, plan.labelId);
  assert.notEqual(b!.uuid, e!.uuid);
  const script = sfdiskScript(plan);
  assert.match(script, /^label: gpt\nlabel-id: [0-9A-F-]{36}\nunit: sectors\nfirst-lba: 2048\n/);
  assert.match(script, new RegExp(`start=135168, size=${1001 * 2048}, type=${GPT_TYPE.rootX86_64}, uuid=${r!.uuid}, name="root"`));
});

test('parseSfdiskDump reads what sfdisk --dump prints', () => {
  const plan = planGptDisk([{ name: 'esp', type: GPT_TYPE.esp, bytes: 64 * MiB }], 's');
  const p = plan.partitions[0]!;
  const dump = [
    'label: gpt',
    `label-id: ${plan.labelId}`,
    'device: /tmp/x/disk.raw',
    'unit: sectors',
    'first-lba: 2048',
    'last-lba: 133086',
    'sector-size: 512',
    '',
    `/tmp/x/disk.raw1 : start=        2048, size=      131072, type=${p.type}, uuid=${p.uuid}, name="esp"`,
    '',
  ].join('\n');
  assert.deepEqual(parseSfdiskDump(dump), expectedDump(plan));
});

test('patchGrubBios keeps the partition table and writes the blocklist', () => {
  const mbr = Buffer.alloc(512, 0xaa);
  const boot = Buffer.alloc(512, 0x11);
  const core = Buffer.alloc(512 * 3 + 100, 0x22);
  const { mbr: m, core: c } = patchGrubBios(mbr, boot, core, 2048);
  assert.equal(m.subarray(0x1b8).equals(mbr.subarray(0x1b8)), true);
  assert.equal(m.subarray(0x03, 0x5a).equals(mbr.subarray(0x03, 0x5a)), true);
  assert.equal(m[0], 0x11);
  assert.equal(m.readBigUInt64LE(0x5c), 2048n);
  assert.deepEqual([m[0x66], m[0x67]], [0x90, 0x90]);
  assert.equal(c.length, 512 * 4);
  assert.equal(c.readBigUInt64LE(500), 2049n);
  assert.equal(c.readUInt16LE(508), 3);
  assert.equal(c.readUInt16LE(510), 0x820);
  assert.ok(c.subarray(488, 500).every((x) => x === 0));
  assert.throws(() => patchGrubBios(Buffer.alloc(10), boot, core, 1));
});

test('GRUB config rejects script injection through the command line', () => {
  const e = { title: 'Linux', kernel: '/boot/vmlinuz', initrd: '/boot/initrd.img', cmdline: 'root=UUID=x rw quiet' };
  const cfg = grubConfig(e, 1);
  assert.match(cfg, /linux \/boot\/vmlinuz root=UUID=x rw quiet\n/);
  assert.match(cfg, /set timeout=1/);
  for (const bad of ['a; reboot', 'a\nreboot', "a' }", 'a $x', 'a {b}']) {
    assert.throws(() => grubConfig({ ...e, cmdline: bad }, 1), /not allowed/);
  }
  assert.equal(grubEarlyConfig({ fsUuid: 'ABCD-1234' }).split('\n')[0], 'search --no-floppy --fs-uuid ABCD-1234 --set=root');
  assert.equal(grubEarlyConfig({ label: 'LIVE_X' }).split('\n')[0], 'search --no-floppy --label LIVE_X --set=root');
});

test('debugfs time script pins atime/ctime, clamps mtime, refuses unquotable names', () => {
  const s = debugfsTimeScript(
    [
      { path: '/', mtimeSec: 5 },
      { path: '/a b', mtimeSec: 200 },
    ],
    100,
  );
  assert.equal(s, ['sif "/" atime @100', 'sif "/" ctime @100', 'sif "/a b" atime @100', 'sif "/a b" ctime @100', 'sif "/a b" mtime @100', ''].join('\n'));
  assert.throws(() => debugfsTimeScript([{ path: '/a"b', mtimeSec: 0 }], 1));
});

test('command lines and tool arguments', () => {
  // `cmdline` is the whole command line: the disk emitters add only what names their root.
  assert.equal(rawCmdline('u-1', ' console=ttyS0 quiet '), 'root=UUID=u-1 rw console=ttyS0 quiet');
  assert.equal(rawCmdline('u-1', ''), 'root=UUID=u-1 rw');
  assert.equal(liveCmdline('L', 'console=ttyS0'), 'root=live:CDLABEL=L rd.live.image rd.live.overlay.overlayfs=1 console=ttyS0');
  assert.equal(isoLabel('live-abc'), 'LIVE_ABC');
  const q = convertArgs(QcowParams.parse({}), 'in', 'out');
  assert.ok(q.includes('-c') && !q.includes('-W'));
  assert.deepEqual(q.slice(-2), ['in', 'out']);
  assert.ok(!convertArgs(QcowParams.parse({ compress: false }), 'i', 'o').includes('-c'));
  const x = xorrisoArgs({ out: 'o.iso', label: 'L', staging: 'st', efiImg: 'e.img' });
  assert.equal(x.at(-1), 'st');
  assert.ok(x.includes('--grub2-mbr') && x.includes('-appended_part_as_gpt'));
});

test('firstDifference on buffers and files', async () => {
  assert.equal(await firstDifference(Buffer.from('abc'), Buffer.from('abc')), null);
  assert.equal(await firstDifference(Buffer.from('abc'), Buffer.from('abd')), 2);
  assert.equal(await firstDifference(Buffer.from('ab'), Buffer.from('abc')), 2);
  const d = await mkdtemp(join(tmpdir(), 'fd-'));
  const big = Buffer.alloc(9 * MiB + 7, 1);
  const other = Buffer.from(big);
  other[5 * MiB + 3] = 2;
  await writeFile(join(d, 'a'), big);
  await writeFile(join(d, 'b'), other);
  await writeFile(join(d, 'c'), big.subarray(0, 4 * MiB));
  assert.equal(await firstDifference(join(d, 'a'), join(d, 'a')), null);
  assert.equal(await firstDifference(join(d, 'a'), join(d, 'b')), 5 * MiB + 3);
  assert.equal(await firstDifference(join(d, 'a'), join(d, 'c')), 4 * MiB);
  assert.equal(await firstDifference(join(d, 'b'), big), 5 * MiB + 3);
});

test('MBR plan for the Pi: first partition at 4 MiB, MiB aligned, back to back, derived disk id; sfdisk script', async () => {
  const { planMbrDisk, sfdiskMbrScript } = await import('../../src/lib/diskimage.js');
  const plan = planMbrDisk([{ type: 'c', bytes: 508 * MiB }, { type: '83', bytes: 1000 * MiB + 1 }], 'seed');
  assert.deepEqual(plan.partitions, [
    { number: 1, type: 'c', startLba: 8192, sizeLba: 508 * 2048 },
    { number: 2, type: '83', startLba: 512 * 2048, sizeLba: 1001 * 2048 },
  ]);
  assert.equal(plan.totalBytes, (512 + 1001) * MiB);
  assert.match(plan.labelId, /^0x[0-9a-f]{8}$/);
  assert.equal(plan.labelId, planMbrDisk([{ type: 'c', bytes: MiB }], 'seed').labelId);
  assert.notEqual(plan.labelId, planMbrDisk([{ type: 'c', bytes: MiB }], 'other').labelId);
  assert.equal(
    sfdiskMbrScript(plan),
    `label: dos\nlabel-id: ${plan.labelId}\nunit: sectors\nsector-size: 512\n\nstart=8192, size=1040384, type=c\nstart=1048576, size=2050048, type=83\n`,
  );
  assert.throws(() => planMbrDisk([{ type: 'zz', bytes: MiB }], 's'), /hex byte/);
  assert.throws(() => planMbrDisk(Array.from({ length: 5 }, () => ({ type: '83', bytes: MiB })), 's'), /at most 4/);
});

test('config.txt names a 64-bit upstream kernel and its initramfs; raspiConfigFiles reads them back', async () => {
  const { raspiConfigTxt, raspiConfigFiles } = await import('../../src/lib/diskimage.js');
  const txt = raspiConfigTxt({ kernel: 'vmlinuz-6.1.0-1-arm64', initramfs: 'initrd.img-6.1.0-1-arm64' });
  for (const l of ['arm_64bit=1', 'enable_uart=1', 'upstream_kernel=1', 'kernel=vmlinuz-6.1.0-1-arm64', 'initramfs initrd.img-6.1.0-1-arm64 followkernel']) {
    assert.ok(txt.split('\n').includes(l), l);
  }
  assert.deepEqual(raspiConfigFiles(txt), ['vmlinuz-6.1.0-1-arm64', 'initrd.img-6.1.0-1-arm64']);
  assert.deepEqual(raspiConfigFiles('# c\ndevice_tree=bcm2711-rpi-4-b.dtb\n'), ['bcm2711-rpi-4-b.dtb']);
  assert.throws(() => raspiConfigTxt({ kernel: 'a b', initramfs: 'x' }), /plain file name/);
});

test('systemd-boot loader.conf and entry: kernel, initrd and options verbatim; metacharacters refused', async () => {
  const { systemdBootConfig } = await import('../../src/lib/diskimage.js');
  const c = systemdBootConfig({ title: 'Linux', kernel: '/boot/vmlinuz', initrd: '/boot/initrd.img', cmdline: 'root=UUID=x rw console=ttyAMA0' }, 2);
  assert.equal(c.loader, 'timeout 2\ndefault linux.conf\neditor no\n');
  assert.equal(c.entry, 'title Linux\nlinux /boot/vmlinuz\ninitrd /boot/initrd.img\noptions root=UUID=x rw console=ttyAMA0\n');
  assert.throws(() => systemdBootConfig({ title: 'L', kernel: '/k', initrd: '/i', cmdline: 'a\nlinux /evil' }, 1), /not allowed/);
});

test('rpi4: cmdline.txt, the non-free-firmware check, the power-of-two SD size', async () => {
  const { rpi4Cmdline, checkFirmwareComponent, nextPowerOfTwo, withoutConsole } = await import('../../outputs/rpi4.js');
  assert.equal(rpi4Cmdline(''), 'console=ttyS1,115200 root=LABEL=RASPIROOT rw rootwait');
  assert.equal(rpi4Cmdline('quiet'), 'console=ttyS1,115200 root=LABEL=RASPIROOT rw rootwait quiet');
  assert.equal(withoutConsole(rpi4Cmdline('x')), 'root=LABEL=RASPIROOT rw rootwait x');
  const without = checkFirmwareComponent({ kind: 'mmdebstrap', params: { components: ['main'], packages: ['raspi-firmware'] } });
  assert.equal(without.length, 1);
  assert.match(without[0]!, /non-free-firmware/);
  assert.match(without[0]!, /components/);
  assert.deepEqual(checkFirmwareComponent({ kind: 'mmdebstrap', params: { components: ['main', 'non-free-firmware'], packages: ['raspi-firmware=1.2'] } }), []);
  assert.match(checkFirmwareComponent({ kind: 'mmdebstrap', params: { components: ['main', 'non-free-firmware'], packages: [] } }).join(), /raspi-firmware package/);
  assert.equal(nextPowerOfTwo(1), 1);
  assert.equal(nextPowerOfTwo(1536 * MiB), 2048 * MiB);
  assert.equal(nextPowerOfTwo(2048 * MiB), 2048 * MiB);
});
