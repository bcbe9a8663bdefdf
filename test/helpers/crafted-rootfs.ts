// A small rootfs with every awkward case a layer or composefs image must carry,
// made on disk with the real tools (setcap, setfattr, mknod) and packed by GNU tar
// the way mmdebstrap does (pax format, xattrs, numeric owners). Needs root.
import { chmod, chown, link, mkdir, mkdtemp, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runProcess } from '../../src/engine/process.js';

export const CRAFTED_KVER = '6.1.0-test-amd64';
export const CAP_HEX = '0x0100000280200000000000000000000000000000'; // cap_setuid,cap_net_raw+ep, v2 (0x80: not valid UTF-8)
export const LONG_DIR = 'd'.repeat(120);
export const LONG_TARGET = '../' + 't'.repeat(150);

const run = (cmd: string, args: string[]) => runProcess(cmd, args, { capture: true });

/** Deterministic filler bytes. */
export const bytes = (n: number, seed = 1) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 31 + seed * 7) & 0xff));

export interface Crafted {
  /** The source tree. */
  dir: string;
  /** Directory holding rootfs.tar (usable as a stage input dir). */
  tarDir: string;
  tar: string;
}

export async function makeCraftedRootfs(): Promise<Crafted> {
  const base = await mkdtemp(join(tmpdir(), 'crafted-'));
  const d = join(base, 'root');
  const f = (p: string) => join(d, p);
  for (const p of ['usr/bin', 'usr/share/data', `usr/share/${LONG_DIR}`, 'usr/share/nodes', `usr/lib/modules/${CRAFTED_KVER}`, 'etc', 'var/lib/thing', 'boot', 'dev', 'tmp', 'run/lock']) {
    await mkdir(f(p), { recursive: true });
  }
  await writeFile(f(`usr/lib/modules/${CRAFTED_KVER}/modules.dep`), 'kernel/x.ko:\n');
  await writeFile(f('usr/bin/capbin'), bytes(5000, 2));
  await chmod(f('usr/bin/capbin'), 0o755);
  await run('setcap', ['cap_setuid,cap_net_raw+ep', f('usr/bin/capbin')]);
  await writeFile(f('usr/bin/suid'), bytes(300, 3));
  await chmod(f('usr/bin/suid'), 0o4755);
  await mkdir(f('usr/share/sgid'));
  await chown(f('usr/share/sgid'), 0, 50);
  await chmod(f('usr/share/sgid'), 0o2775);
  await writeFile(f('etc/noaccess'), 'secret\n');
  await chmod(f('etc/noaccess'), 0o000);
  await writeFile(f('etc/hostname'), 'crafted\n');
  // Hard links (three names), a small inlined file, an empty file.
  await writeFile(f('usr/share/data/a'), bytes(100_000, 4));
  await link(f('usr/share/data/a'), f('usr/share/data/b'));
  await link(f('usr/share/data/a'), f('usr/bin/a-link'));
  await writeFile(f('usr/share/data/small'), 'tiny\x00\xff-bytes');
  await writeFile(f('usr/share/data/empty'), '');
  await writeFile(f('usr/share/data/dash'), '-');
  await writeFile(f('usr/share/data/exactly64'), bytes(64, 5));
  await writeFile(f('usr/share/data/exactly65'), bytes(65, 6));
  await writeFile(f('usr/share/data/dup-of-a'), bytes(100_000, 4)); // same content, separate inode
  await symlink('a', f('usr/share/data/rel-link'));
  await symlink('/etc/hostname', f('usr/share/data/abs-link'));
  await symlink(LONG_TARGET, f('usr/share/data/long-link'));
  await writeFile(f(`usr/share/${LONG_DIR}/${'f'.repeat(150)}.txt`), bytes(2000, 7));
  await writeFile(f('usr/share/data/ünïcødé ✓ name'), 'utf-8 name\n');
  await writeFile(f('usr/share/data/with space=eq\\bs'), 'odd chars\n');
  await run('mkfifo', [f('usr/share/nodes/fifo')]);
  await run('mknod', [f('usr/share/nodes/null'), 'c', '1', '3']);
  await run('mknod', [f('usr/share/nodes/loop9'), 'b', '7', '9']);
  await run('mknod', [f('usr/share/nodes/bigdev'), 'c', '300', '70000']);
  await writeFile(f('var/lib/thing/owned'), bytes(80, 8));
  await chown(f('var/lib/thing/owned'), 1234, 5678);
  await writeFile(f('var/lib/thing/bigid'), bytes(10, 9));
  await chown(f('var/lib/thing/bigid'), 3_000_000, 3_000_001);
  // Binary and text user xattrs, and an SELinux label (bootc images must not carry one).
  await run('setfattr', ['-n', 'user.bin', '-v', '0x00ff10fe0a3d20', f('var/lib/thing/owned')]);
  await run('setfattr', ['-n', 'user.text', '-v', 'hello world', f('var/lib/thing/owned')]);
  await run('setfattr', ['-n', 'user.dir', '-v', 'on a dir', f('var/lib/thing')]);
  await run('setfattr', ['-n', 'security.selinux', '-v', 'system_u:object_r:bin_t:s0', f('usr/bin/suid')]);
  // bootc drops these.
  await writeFile(f('boot/vmlinuz-old'), bytes(200, 10));
  await run('mknod', [f('dev/null'), 'c', '1', '3']);
  await writeFile(f('tmp/junk'), 'junk\n');
  await symlink('boot/vmlinuz-old', f('vmlinuz'));
  const tarDir = join(base, 'in');
  await mkdir(tarDir);
  const tar = join(tarDir, 'rootfs.tar');
  await run('tar', ['--format=pax', '--xattrs', '--xattrs-include=*', '--numeric-owner', '--sort=name', '--mtime=@1704067200', '-C', d, '-cf', tar, '.']);
  return { dir: d, tarDir, tar };
}

/** GNU tar's own extraction of a rootfs tar: the reference a consumer's tree is compared with. */
export async function extractWithGnuTar(tar: string, into: string): Promise<void> {
  await mkdir(into, { recursive: true });
  await run('tar', ['--xattrs', '--xattrs-include=*', '--numeric-owner', '-xpf', tar, '-C', into]);
}
