// The foreign-arch dracut run's host tools (stages/dracut.ts): which ones are chosen
// from the versions, the wrapper that gives dracut-install the host cp while it still
// resolves names on the target's PATH, and the check that no host ELF file reaches
// the initramfs.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import {
  chooseHostRuntime,
  dpkgVersion,
  foreignElfFiles,
  HOST_RUNTIME_DIR,
  hostDracutInstallWrapper,
  mainArchiveHead,
  mainArchiveOffset,
  upstreamVersion,
} from '../../stages/dracut.js';

const base = { foreign: true, hostBash: '5.2.15(1)-release', targetBash: '5.2.15-2+b7', lddIsBashScript: true, dracutInstallHonoursPath: true };

test('upstreamVersion drops the epoch, the Debian revision and bash\'s (patch)-release tail', () => {
  assert.equal(upstreamVersion('5.2.15-2+b7'), '5.2.15');
  assert.equal(upstreamVersion('5.2.15(1)-release'), '5.2.15');
  assert.equal(upstreamVersion('1:2.38.1-5+deb12u1'), '2.38.1');
  assert.equal(upstreamVersion('059-4'), '059');
  assert.notEqual(upstreamVersion('5.2.37-2'), upstreamVersion('5.2.15(1)-release'));
});

test('dpkgVersion reads an installed package, not a removed one', () => {
  const status = [
    'Package: bash\nStatus: install ok installed\nArchitecture: arm64\nVersion: 5.2.15-2+b7\n',
    'Package: gone\nStatus: deinstall ok config-files\nVersion: 1.0-1\n',
  ].join('\n');
  assert.equal(dpkgVersion(status, 'bash'), '5.2.15-2+b7');
  assert.equal(dpkgVersion(status, 'gone'), undefined);
  assert.equal(dpkgVersion(status, 'zsh'), undefined);
});

test('chooseHostRuntime: same bash upstream -> host bash and cp; other bash -> cp only; nothing on the native arch', () => {
  assert.deepEqual(chooseHostRuntime(base), { copies: true, shell: true, why: [] });
  // trixie's bash on a bookworm host: the target's scripts keep their own (emulated) bash.
  const other = chooseHostRuntime({ ...base, targetBash: '5.2.37-2' });
  assert.equal(other.copies, true);
  assert.equal(other.shell, false);
  assert.match(other.why.join(), /5\.2\.37-2/);
  assert.equal(chooseHostRuntime({ ...base, targetBash: undefined }).shell, false);
  assert.equal(chooseHostRuntime({ ...base, lddIsBashScript: false }).shell, false);
  // A dracut-install that resolves names on PATH would pick the host cp itself: no host cp then.
  const old = chooseHostRuntime({ ...base, dracutInstallHonoursPath: false });
  assert.equal(old.copies, false);
  assert.equal(old.shell, true);
  assert.deepEqual(chooseHostRuntime({ ...base, runtimeError: 'no loader' }), { copies: false, shell: false, why: ['no loader'] });
  assert.deepEqual({ ...chooseHostRuntime({ ...base, foreign: false }), why: [] }, { copies: false, shell: false, why: [] });
});

test('the dracut-install wrapper puts the host cp first on PATH but resolves names on the PATH dracut gave it', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'dracut-wrapper-'));
  try {
    const target = path.join(dir, 'fake-dracut-install');
    await fs.writeFile(target, '#!/bin/sh\nprintf "%s\\n" "$DRACUT_INSTALL_PATH" "$PATH" "$@"\n', { mode: 0o755 });
    const wrapper = path.join(dir, 'wrapper');
    await fs.writeFile(wrapper, hostDracutInstallWrapper(target));
    // Run with the host bash (the shebang names the in-chroot copy).
    const out = execFileSync('bash', [wrapper, '-a', 'cp', 'a b'], { encoding: 'utf8', env: { PATH: '/usr/sbin:/usr/bin' } }).split('\n');
    assert.deepEqual(out.slice(0, 5), ['/usr/sbin:/usr/bin', `${HOST_RUNTIME_DIR}/path:/usr/sbin:/usr/bin`, '-a', 'cp', 'a b']);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

/** A newc cpio entry (names and sizes as dracut writes them). */
function newc(name: string, mode: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const hex = (n: number) => n.toString(16).padStart(8, '0');
  const fields = [1, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, name.length + 1, 0];
  const head = Buffer.from('070701' + fields.map(hex).join(''), 'latin1');
  const pad = (b: Buffer) => Buffer.concat([b, Buffer.alloc((4 - (b.length % 4)) % 4)]);
  return Buffer.concat([pad(Buffer.concat([head, Buffer.from(name + '\0', 'latin1')])), pad(data)]);
}
function elf(machine: number): Buffer {
  const b = Buffer.alloc(64);
  b.write('\x7fELF', 0, 'latin1');
  b[4] = 2; // 64-bit
  b[5] = 1; // little-endian
  b.writeUInt16LE(machine, 18);
  return b;
}

test('foreignElfFiles names only the ELF files built for another machine, across concatenated archives', () => {
  const early = Buffer.concat([newc('kernel', 0o40755), newc('TRAILER!!!', 0)]);
  const main = Buffer.concat([
    newc('usr', 0o40755),
    newc('usr/bin/bash', 0o100755, elf(183)),
    newc('usr/bin/leaked', 0o100755, elf(62)),
    newc('usr/bin/script', 0o100755, Buffer.from('#!/bin/sh\n')),
    newc('usr/lib/aarch64-linux-gnu/libc.so.6', 0o120777, Buffer.from('x')),
    newc('TRAILER!!!', 0),
  ]);
  const cpio = Buffer.concat([early, Buffer.alloc(512), main]);
  assert.deepEqual(foreignElfFiles(cpio, 'arm64'), ['usr/bin/leaked (e_machine 62)']);
  assert.deepEqual(foreignElfFiles(cpio, 'amd64'), ['usr/bin/bash (e_machine 183)']);
  assert.throws(() => foreignElfFiles(Buffer.concat([main, Buffer.from('garbage'.repeat(20))]), 'arm64'), /not a newc cpio/);
});

test('mainArchiveOffset skips the early cpio; mainArchiveHead is unchanged', () => {
  const early = Buffer.concat([newc('early_cpio', 0o100644, Buffer.from('1\n')), newc('TRAILER!!!', 0), Buffer.alloc(64)]);
  const zstd = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3]);
  assert.equal(mainArchiveOffset(Buffer.concat([early, zstd])), early.length);
  assert.deepEqual([...mainArchiveHead(Buffer.concat([early, zstd])).subarray(0, 4)], [0x28, 0xb5, 0x2f, 0xfd]);
  assert.equal(mainArchiveOffset(zstd), 0);
  assert.equal(mainArchiveOffset(early), undefined);
  assert.equal(mainArchiveHead(early).toString('latin1'), '070701');
});
