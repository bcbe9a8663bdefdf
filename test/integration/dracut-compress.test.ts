// The dracut stage compresses with the host's zstd (`--compress "<wrapper> -q -T0
// -10"`) and checks what dracut wrote. Checked with the real zstd: the bytes do not
// depend on the thread count (so a build on a 2-core and a 64-core machine, or
// under qemu-user, gives the same initramfs); and the archive check tells zstd from
// dracut's silent gzip fallback behind an early microcode cpio.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { runProcess } from '../../src/engine/process.js';
import { dracutArgs, hostCompressor, hostToolWrapper, mainArchiveHead, Params, ZSTD_LEVEL } from '../../stages/dracut.js';

const zstd = ['/usr/bin/zstd', '/bin/zstd'].find((p) => existsSync(p));

test('dracut gets the wrapper as its zstd command; the wrapper runs the copied host binary with its own loader', () => {
  const w = hostToolWrapper('zstd');
  assert.equal(w, '#!/bin/sh\nexec /var/tmp/pipeline-host-zstd/ld.so --library-path /var/tmp/pipeline-host-zstd /var/tmp/pipeline-host-zstd/zstd.bin "$@"\n');
  assert.equal(ZSTD_LEVEL, 10);
  const a = dracutArgs(Params.parse({}), 'K');
  assert.deepEqual(a.slice(-3), ['--compress', '/var/tmp/pipeline-host-zstd/zstd -q -T0 -10', '/var/tmp/pipeline-initrd.img']);
  assert.ok(dracutArgs(Params.parse({ compress: 'gzip' }), 'K').includes('--gzip'));
  assert.equal(hostCompressor({ compress: 'zstd' }, 'amd64'), 'zstd');
  assert.equal(hostCompressor({ compress: 'xz' }, 'arm64'), undefined);
});

test('zstd: dracut\'s arguments plus the appended level give the same bytes for any thread count', { skip: !zstd && 'needs zstd' }, async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-zstd-'));
  try {
    // ~24 MB of compressible, non-trivial data (several zstd jobs' worth).
    const chunks: Buffer[] = [];
    let h = Buffer.from('seed');
    for (let i = 0; i < 24 * 1024; i++) {
      h = createHash('sha256').update(h).digest();
      chunks.push(Buffer.from(`${i % 97} ${h.toString('hex').slice(0, (i % 13) * 4)} ${'x'.repeat(i % 700)}\n`.repeat(3)));
    }
    const input = path.join(dir, 'in.cpio');
    await fs.writeFile(input, Buffer.concat(chunks));
    const digest = async (args: string[]) => {
      const out = path.join(dir, `out-${args.join('')}`);
      await runProcess(zstd!, [...args, '-o', out, input]);
      return createHash('sha256').update(await fs.readFile(out)).digest('hex');
    };
    const asDracut = await digest(['-q', '-T0', `-${ZSTD_LEVEL}`]);
    assert.equal(await digest(['-q', '-T1', `-${ZSTD_LEVEL}`]), asDracut);
    assert.equal(await digest(['-q', '-T2', `-${ZSTD_LEVEL}`]), asDracut);
    assert.equal(await digest(['-q', '-T8', `-${ZSTD_LEVEL}`]), asDracut);
    assert.notEqual(await digest(['-q', '-T0', '-15']), asDracut);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

/** One newc member (header fields in hex, name NUL-terminated, both padded to 4). */
function newc(name: string, data: Buffer): Buffer {
  const f = (n: number) => n.toString(16).padStart(8, '0');
  const hdr = '070701' + [1, 0o100644, 0, 0, 1, 0, data.length, 0, 0, 0, 0, name.length + 1, 0].map(f).join('');
  const pad = (b: Buffer) => Buffer.concat([b, Buffer.alloc((4 - (b.length % 4)) % 4)]);
  return Buffer.concat([pad(Buffer.concat([Buffer.from(hdr + name, 'latin1'), Buffer.alloc(1)])), pad(data)]);
}

test('the main archive is found past an early microcode cpio and its padding', () => {
  const early = Buffer.concat([newc('early_cpio', Buffer.from('1\n')), newc('kernel/x86/microcode/GenuineIntel.bin', Buffer.alloc(1001, 7)), newc('TRAILER!!!', Buffer.alloc(0)), Buffer.alloc(300)]);
  const zstdMagic = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 1, 2]);
  assert.deepEqual([...mainArchiveHead(Buffer.concat([early, zstdMagic])).subarray(0, 4)], [0x28, 0xb5, 0x2f, 0xfd]);
  assert.deepEqual([...mainArchiveHead(Buffer.concat([early, Buffer.from([0x1f, 0x8b, 8, 0])])).subarray(0, 2)], [0x1f, 0x8b]);
  // No early part: the file is the compressed archive; one plain cpio: "070701".
  assert.deepEqual([...mainArchiveHead(zstdMagic).subarray(0, 4)], [0x28, 0xb5, 0x2f, 0xfd]);
  assert.equal(mainArchiveHead(early).toString('latin1', 0, 6), '070701');
});
