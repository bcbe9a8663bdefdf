// assembleDisk builds the ext4 root in place (mke2fs -E offset, debugfs name?offset=)
// instead of as its own image copied in with dd: the disk must be byte-identical to
// the old way (sfdisk, dd of a FAT image and of a separate ext4 image). Real tools
// (e2fsprogs, fdisk, mtools, coreutils), small tree, a few seconds.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { assembleDisk, buildExt4, buildFat, ddInto, walkTree } from '../../src/lib/diskbuild.js';
import { GPT_TYPE, MiB, planGptDisk, SECTOR, sfdiskScript } from '../../src/lib/diskimage.js';
import { runProcess } from '../../src/engine/process.js';

const ctx = {
  sourceDateEpoch: 1704067200,
  log: () => {},
  exec: (cmd: string, args: string[], o: Parameters<typeof runProcess>[2] = {}) => runProcess(cmd, args, { ...o, capture: true }),
};

const sha = async (f: string) => createHash('sha256').update(await fs.readFile(f)).digest('hex');

test('an ext4 built in place in the disk is byte-identical to one built apart and copied in with dd', async () => {
  const dir = await fs.mkdtemp('/var/tmp/pipeline-diskbuild-');
  try {
    const tree = join(dir, 'tree');
    await fs.mkdir(join(tree, 'etc/sub'), { recursive: true });
    await fs.writeFile(join(tree, 'etc/hostname'), 'box\n');
    await fs.writeFile(join(tree, 'etc/sub/big'), Buffer.alloc(3 * MiB, 'x'));
    await fs.symlink('hostname', join(tree, 'etc/name'));
    const { stats, entries } = await walkTree(tree);
    const seed = 'a'.repeat(64);
    const plan = planGptDisk([{ name: 'esp', type: GPT_TYPE.esp, bytes: 8 * MiB }, { name: 'root', type: GPT_TYPE.rootX86_64, bytes: 32 * MiB }], seed);
    const [pEsp, pRoot] = plan.partitions as [(typeof plan.partitions)[0], (typeof plan.partitions)[0]];
    const espImg = join(dir, 'esp.img');
    await fs.writeFile(join(dir, 'f.txt'), 'hello\n');
    await buildFat(ctx, { image: espImg, bytes: pEsp.sizeLba * SECTOR, serial: '1234ABCD', label: 'ESP', hiddenSectors: pEsp.startLba, fat32: false, files: [{ src: join(dir, 'f.txt'), dest: '/f.txt' }], staging: join(dir, 'st') });
    const ext4 = { bytes: pRoot.sizeLba * SECTOR, tree, stats, entries, label: 'root', uuid: '11111111-2222-4333-8444-555555555555', hashSeed: '11111111-2222-4333-8444-666666666666', edits: ['mkdir /new'] };

    // The old way: a separate image, dd'ed in.
    const oldDisk = join(dir, 'old.raw');
    const rootImg = join(dir, 'root.img');
    await fs.mkdir(join(dir, 's1'));
    await buildExt4(ctx, { ...ext4, image: rootImg, scratch: join(dir, 's1') });
    await fs.writeFile(oldDisk, '');
    await fs.truncate(oldDisk, plan.totalBytes);
    await ctx.exec('sfdisk', ['--quiet', '--no-reread', '--no-tell-kernel', oldDisk], { input: sfdiskScript(plan) });
    await ddInto(ctx, espImg, oldDisk, pEsp.startLba * SECTOR);
    await ddInto(ctx, rootImg, oldDisk, pRoot.startLba * SECTOR);

    const newDisk = join(dir, 'new.raw');
    await fs.mkdir(join(dir, 's2'));
    await assembleDisk(ctx, {
      disk: newDisk, bytes: plan.totalBytes, sfdisk: sfdiskScript(plan),
      parts: [{ offset: pEsp.startLba * SECTOR, image: espImg }, { offset: pRoot.startLba * SECTOR, ext4: { ...ext4, scratch: join(dir, 's2') } }],
    });
    assert.equal((await fs.stat(newDisk)).size, plan.totalBytes);
    assert.equal(await sha(newDisk), await sha(oldDisk));
    // And the filesystem is there, with the debugfs edit.
    const ls = await ctx.exec('debugfs', ['-R', 'ls -l /', `${newDisk}?offset=${pRoot.startLba * SECTOR}`]);
    assert.match(ls.stdout, /\bnew\b/);
    assert.match(ls.stdout, /\betc\b/);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});
