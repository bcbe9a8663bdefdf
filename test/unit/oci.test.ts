// Pure pieces of the oci/composefs path: the tar codec (raw PAX values, long and
// non-UTF-8 names), tree semantics (hard links, replacement, parents), the bootc
// rules, the layer order, the composefs dump format and the OCI documents.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { gzipSync } from 'node:zlib';
import { Readable } from 'node:stream';
import tarStream from 'tar-stream';
import { dumpLines, escapeBytes, makedev, optionalField } from '../../src/lib/composefs-dump.js';
import { applyBootcLayout, imageConfig, PREPARE_ROOT_CONF, writeLayerTar, writeLayerTarGz } from '../../src/lib/oci-layout.js';
import { elfInterpreter } from '../../stages/composefs.js';
import {
  encodeHeader,
  END_OF_ARCHIVE,
  FsTree,
  normalizePath,
  padding,
  parsePax,
  paxRecord,
  readTarEntries,
  TarError,
  type TarEntry,
  type WriteHeader,
} from '../../src/lib/tarfs.js';

// cap_setuid,cap_net_raw+ep (v2): byte 4 is 0x80, which a UTF-8 round trip destroys.
const CAP = Buffer.from('0100000280200000000000000000000000000000', 'hex');
const T = 1704067200;

async function withTmp<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'oci-unit-'));
  try {
    return await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** A tar made of our own headers; content given per file member. */
function tarOf(members: Array<WriteHeader & { data?: Buffer }>): Buffer {
  const parts: Buffer[] = [];
  for (const m of members) {
    parts.push(encodeHeader(m));
    if (m.data) parts.push(m.data, Buffer.alloc(padding(m.data.length)));
  }
  parts.push(END_OF_ARCHIVE);
  return Buffer.concat(parts);
}

const base = { mode: 0o644, uid: 0, gid: 0, size: 0, mtime: T };

test('paxRecord: the length prefix counts itself across digit boundaries', () => {
  for (let n = 0; n < 1200; n++) {
    const rec = paxRecord('k', Buffer.alloc(n, 0x61));
    assert.equal(Number(rec.toString('latin1').split(' ')[0]), rec.length);
  }
  const recs = Buffer.concat([paxRecord('SCHILY.xattr.security.capability', CAP), paxRecord('path', Buffer.from([0xff, 0x2f, 0x61]))]);
  const parsed = parsePax(recs);
  assert.ok(parsed.get('SCHILY.xattr.security.capability')!.equals(CAP));
  assert.ok(parsed.get('path')!.equals(Buffer.from([0xff, 0x2f, 0x61])));
});

test('tar codec round trip: binary xattrs, long and non-UTF-8 names, mode 0, big ids, devices', async () => {
  const longDir = 'd'.repeat(120);
  const nonUtf8 = Buffer.from([0x66, 0xff, 0xfe]).toString('latin1');
  const members: Array<WriteHeader & { data?: Buffer }> = [
    { ...base, path: 'usr', type: 'dir', mode: 0o755 },
    { ...base, path: 'usr/bin', type: 'dir', mode: 0o755 },
    { ...base, path: 'usr/bin/ping', type: 'file', mode: 0o755, size: 5, data: Buffer.from('hello'), xattrs: new Map([['security.capability', CAP], ['user.x', Buffer.from([0, 0x3d, 0x0a, 0xff])]]) },
    { ...base, path: 'usr/bin/zero', type: 'file', mode: 0 },
    { ...base, path: 'usr/bin/suid', type: 'file', mode: 0o4755 },
    { ...base, path: `usr/${longDir}`, type: 'dir', mode: 0o700 },
    { ...base, path: `usr/${longDir}/${'f'.repeat(200)}`, type: 'file', size: 3, data: Buffer.from('abc'), uid: 3_000_000, gid: 4_000_000 },
    { ...base, path: `usr/${nonUtf8}`, type: 'symlink', mode: 0o777, linkname: '../' + 'x'.repeat(300) },
    { ...base, path: 'usr/hard', type: 'hardlink', linkname: 'usr/bin/ping' },
    { ...base, path: 'usr/null', type: 'char', devmajor: 1, devminor: 3 },
    { ...base, path: 'usr/loop', type: 'block', devmajor: 7, devminor: 0 },
    { ...base, path: 'usr/fifo', type: 'fifo' },
  ];
  await withTmp(async (dir) => {
    const f = join(dir, 't.tar');
    await writeFile(f, tarOf(members));
    const got = await readTarEntries(f);
    assert.equal(got.length, members.length);
    members.forEach((m, i) => {
      const g = got[i]!;
      assert.equal(g.path, m.path);
      assert.equal(g.type, m.type);
      assert.equal(g.mode, m.mode, m.path);
      assert.equal(g.uid, m.uid);
      assert.equal(g.gid, m.gid);
      assert.equal(g.size, m.type === 'file' ? m.size : 0);
      if (m.linkname) assert.equal(g.linkname, m.linkname);
      assert.equal(g.devmajor, m.devmajor ?? 0);
      assert.equal(g.devminor, m.devminor ?? 0);
      assert.deepEqual([...g.xattrs.keys()], [...(m.xattrs?.keys() ?? [])].sort());
      for (const [k, v] of m.xattrs ?? []) assert.ok(g.xattrs.get(k)!.equals(v), k);
    });
  });
});

test('why not tar-stream: its extractor mangles the binary capability our writer stores', async () => {
  const tar = tarOf([{ ...base, path: 'ping', type: 'file', xattrs: new Map([['security.capability', CAP]]) }]);
  const ex = tarStream.extract();
  let seen: string | undefined;
  ex.on('entry', (h, stream, next) => {
    seen = (h.pax as Record<string, string> | undefined)?.['SCHILY.xattr.security.capability'];
    stream.resume();
    stream.on('end', next);
  });
  await new Promise<void>((resolve, reject) => {
    ex.on('finish', resolve);
    ex.on('error', reject);
    Readable.from([tar]).pipe(ex);
  });
  assert.ok(seen !== undefined);
  assert.ok(!Buffer.from(seen!, 'latin1').equals(CAP), 'tar-stream would have kept the bytes');
});

test('unsupported member types and sparse files are refused by path', async () => {
  await withTmp(async (dir) => {
    const hdr = encodeHeader({ ...base, path: 'etc/label', type: 'file' });
    hdr.write('V', 156, 'latin1');
    // Fix the checksum after changing the type flag.
    hdr.fill(0x20, 148, 156);
    let sum = 0;
    for (const b of hdr) sum += b;
    hdr.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'latin1');
    const f = join(dir, 'v.tar');
    await writeFile(f, Buffer.concat([hdr, END_OF_ARCHIVE]));
    await assert.rejects(readTarEntries(f), (e: unknown) => e instanceof TarError && e.message.startsWith('/etc/label: tar member is a volume label'));
    await writeFile(f, Buffer.from([0x1f, 0x8b, ...Buffer.alloc(1100)]));
    await assert.rejects(readTarEntries(f), /gzip-compressed/);
  });
});

const entry = (path: string, type: TarEntry['type'], extra: Partial<TarEntry> = {}): TarEntry => ({
  path,
  type,
  mode: type === 'dir' ? 0o755 : 0o644,
  uid: 0,
  gid: 0,
  size: 0,
  offset: 0,
  linkname: '',
  devmajor: 0,
  devminor: 0,
  xattrs: new Map(),
  ...extra,
});

test('FsTree: hard links share an inode, later members win, parents are made, bad links fail', () => {
  const t = FsTree.fromEntries([
    entry('z/orig', 'file', { size: 3 }),
    entry('a/link', 'hardlink', { linkname: 'z/orig' }),
    entry('x', 'file', { mode: 0o600 }),
    entry('x', 'file', { mode: 0o640 }),
  ]);
  assert.equal(t.get('a/link'), t.get('z/orig'));
  assert.equal(t.get('a')!.type, 'dir');
  assert.equal(t.get('x')!.mode, 0o640);
  assert.deepEqual(t.paths(), ['', 'a', 'a/link', 'x', 'z', 'z/orig']);
  assert.throws(() => FsTree.fromEntries([entry('l', 'hardlink', { linkname: 'nope' })]), /not earlier in the archive/);
  assert.throws(() => FsTree.fromEntries([entry('f', 'file'), entry('f/child', 'file')]), /is a file, but the archive has members below it/);
  assert.throws(() => normalizePath('./usr/../../etc/passwd'), TarError);
  assert.equal(normalizePath('./usr//bin/'), 'usr/bin');
  assert.equal(normalizePath('./'), '');
});

test('layer: bytewise order, and the first path of a hard-link group carries the data', async () => {
  await withTmp(async (dir) => {
    const src = join(dir, 'src.tar');
    // Archive order puts the data under z/orig; sorted order reaches a/link first.
    await writeFile(
      src,
      tarOf([
        { ...base, path: 'z', type: 'dir', mode: 0o755 },
        { ...base, path: 'z/orig', type: 'file', size: 3, data: Buffer.from('abc') },
        { ...base, path: 'a', type: 'dir', mode: 0o755 },
        { ...base, path: 'a/link', type: 'hardlink', linkname: 'z/orig' },
        { ...base, path: 'a-b', type: 'file', mode: 0 },
      ]),
    );
    const tree = FsTree.fromEntries(await readTarEntries(src));
    const out = join(dir, 'layer.tar');
    const r = await writeLayerTar(tree, src, T, out);
    assert.equal(r.hardlinks, 1);
    const got = await readTarEntries(out);
    assert.deepEqual(got.map((e) => [e.path, e.type, e.linkname]), [
      ['a', 'dir', ''],
      ['a-b', 'file', ''],
      ['a/link', 'file', ''],
      ['z', 'dir', ''],
      ['z/orig', 'hardlink', 'a/link'],
    ]);
    assert.equal(got[1]!.mode, 0);
    const bytes = await readFile(out);
    assert.equal(bytes.subarray(got[2]!.offset, got[2]!.offset + 3).toString(), 'abc');
    const wh = FsTree.fromEntries([entry('etc/.wh.passwd', 'file')]);
    await assert.rejects(writeLayerTar(wh, src, T, join(dir, 'wh.tar')), /\/etc\/\.wh\.passwd: .*whiteout/);
    // Same input, same bytes.
    const again = join(dir, 'again.tar');
    assert.equal((await writeLayerTar(FsTree.fromEntries(await readTarEntries(src)), src, T, again)).sha256, r.sha256);
    // Gzipped as it is made: the tar it hashes is the same tar, and the gzip is what
    // gzipping that tar in one go gives (its chunking does not matter).
    for (const level of [1, 6]) {
      const gzOut = join(dir, `layer-${level}.tar.gz`);
      const z = await writeLayerTarGz(FsTree.fromEntries(await readTarEntries(src)), src, T, gzOut, level);
      assert.deepEqual([z.tar.sha256, z.tar.size, z.tar.entries, z.tar.hardlinks], [r.sha256, r.size, r.entries, r.hardlinks]);
      const want = gzipSync(bytes, { level, memLevel: 8, windowBits: 15 });
      const gotGz = await readFile(gzOut);
      assert.ok(gotGz.equals(want), `level ${level}: streamed gzip differs from gzip of the whole tar`);
      assert.equal(z.gz.size, gotGz.length);
      assert.equal(z.gz.sha256, createHash('sha256').update(gotGz).digest('hex'));
    }
  });
});

test('bootc layout: kernel under /usr/lib/modules, /boot emptied, ostree link, no SELinux labels', () => {
  const t = FsTree.fromEntries([
    entry('boot', 'dir'),
    entry('boot/vmlinuz-6.1', 'file', { size: 1 }),
    entry('vmlinuz', 'symlink', { linkname: 'boot/vmlinuz-6.1' }),
    entry('dev', 'dir'),
    entry('dev/null', 'char', { devmajor: 1, devminor: 3 }),
    entry('usr/lib/modules/6.1', 'dir'),
    entry('usr/bin/x', 'file', { xattrs: new Map([['security.selinux', Buffer.from('l')], ['user.a', Buffer.from('b')]]) }),
  ]);
  const boot = { kver: '6.1', vmlinuz: '/k', initramfs: '/i', vmlinuzSize: 10, initramfsSize: 20 };
  applyBootcLayout(t, boot);
  assert.equal(t.get('boot/vmlinuz-6.1'), undefined);
  assert.equal(t.get('vmlinuz'), undefined);
  assert.equal(t.get('dev/null'), undefined);
  assert.equal(t.get('boot')!.type, 'dir');
  for (const d of ['proc', 'sys', 'run', 'tmp', 'var', 'sysroot']) assert.equal(t.get(d)?.type, 'dir', d);
  assert.equal(t.get('tmp')!.mode, 0o1777);
  assert.equal(t.get('ostree')!.target, 'sysroot/ostree');
  assert.deepEqual(t.get('usr/lib/modules/6.1/vmlinuz')!.content, { kind: 'path', path: '/k' });
  assert.equal(t.get('usr/lib/modules/6.1/initramfs.img')!.size, 20);
  const conf = t.get('usr/lib/ostree/prepare-root.conf')!;
  assert.equal(conf.content?.kind === 'bytes' && conf.content.data.toString(), PREPARE_ROOT_CONF);
  assert.deepEqual([...t.get('usr/bin/x')!.xattrs.keys()], ['user.a']);
  assert.throws(() => applyBootcLayout(FsTree.fromEntries([]), boot), /no \/usr\/lib\/modules\/6\.1 in the rootfs/);
  assert.throws(() => applyBootcLayout(FsTree.fromEntries([]), { ...boot, kver: '../x' }), /not a plain directory name/);
});

test('OCI config: no created/history, platform per arch', () => {
  const c = imageConfig({ arch: 'arm64', labels: { 'containers.bootc': '1' }, diffIds: ['sha256:00'] });
  assert.equal(c.created, undefined);
  assert.equal(c.history, undefined);
  assert.equal(c.variant, 'v8');
  assert.deepEqual(c.rootfs, { type: 'layers', diff_ids: ['sha256:00'] });
});

test('composefs dump: escaping, inline vs object, hard links, devices, nlink', () => {
  assert.equal(escapeBytes(Buffer.from('a b\\c=d')), 'a\\x20b\\x5cc=d');
  assert.equal(escapeBytes(Buffer.from('k=v'), true), 'k\\x3dv');
  assert.equal(optionalField(Buffer.from('-')), '\\x2d');
  assert.equal(optionalField(Buffer.alloc(0)), '-');
  assert.equal(makedev(1, 3), 259n);
  assert.equal(makedev(300, 70000), 286338160n); // what composefs-info shows for c 300:70000
  const t = FsTree.fromEntries([
    entry('bin', 'dir'),
    entry('bin/big', 'file', { size: 100, mode: 0o4755, xattrs: new Map([['security.capability', CAP]]) }),
    entry('bin/small', 'file', { size: 2 }),
    entry('bin/again', 'hardlink', { linkname: 'bin/big' }),
    entry('dev', 'dir'),
    entry('dev/null', 'char', { devmajor: 1, devminor: 3, mode: 0o666 }),
    entry('lnk', 'symlink', { linkname: 'bin/big', mode: 0o777 }),
  ]);
  const big = t.get('bin/big')!;
  const small = t.get('bin/small')!;
  const dg = 'ab'.repeat(32);
  const lines = [...dumpLines(t, { digests: new Map([[big, dg]]), inline: new Map([[small, Buffer.from('-\n')]]), mtime: T })];
  assert.deepEqual(lines, [
    `/ 0 40755 4 0 0 0 ${T}.0 - - -\n`,
    `/bin 0 40755 2 0 0 0 ${T}.0 - - -\n`,
    `/bin/again 100 104755 2 0 0 0 ${T}.0 ab/${dg.slice(2)} - ${dg} security.capability=\\x01\\x00\\x00\\x02\\x80\\x20\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\n`,
    `/bin/big 100 @104755 2 0 0 0 ${T}.0 /bin/again - ${dg} security.capability=\\x01\\x00\\x00\\x02\\x80\\x20\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\n`,
    `/bin/small 2 100644 1 0 0 0 ${T}.0 - -\\x0a -\n`,
    `/dev 0 40755 2 0 0 0 ${T}.0 - - -\n`,
    `/dev/null 0 20666 1 0 0 259 ${T}.0 - - -\n`,
    `/lnk 7 120777 1 0 0 0 ${T}.0 bin/big - -\n`,
  ]);
});

test('elfInterpreter finds the dynamic loader of a host binary', async () => {
  const elf = await readFile(process.execPath);
  assert.match(elfInterpreter(elf) ?? '', /^\/lib.*\/ld-linux-[a-z0-9_-]+\.so\.\d$/);
  assert.equal(elfInterpreter(Buffer.from('#!/bin/sh\n')), undefined);
});
