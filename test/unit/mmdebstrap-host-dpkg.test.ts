// The foreign-arch mmdebstrap hooks that give the chroot the host's dpkg-deb
// (stages/mmdebstrap.ts): installed in a real (minimal) tree, run through chroot
// the way dpkg runs it, its output compared with the host's, then removed without a
// trace. Needs root (chroot); the tree's /bin/sh is the host's, copied with its libraries.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { HOST_DPKG_DIR, HOST_DPKG_IN, HOST_DPKG_OUT, mmdebstrapArgs, Params } from '../../stages/mmdebstrap.js';
import { parseLdd } from '../../stages/dracut.js';

const sh = (script: string, ...args: string[]) => execFileSync('sh', ['-c', script, 'sh', ...args], { encoding: 'utf8' });

/** Every path under dir (relative), with type and mode, sorted. */
async function listing(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (rel: string) => {
    for (const e of (await fs.readdir(path.join(dir, rel))).sort()) {
      const r = path.join(rel, e);
      const st = await fs.lstat(path.join(dir, r));
      out.push(`${r} ${st.mode.toString(8)}`);
      if (st.isDirectory()) await walk(r);
    }
  };
  await walk('');
  return out;
}

test('the host dpkg-deb runs in the chroot by name, gives the host output, and leaves nothing behind', async (t) => {
  if (process.getuid?.() !== 0) return t.skip('needs root for chroot');
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'host-dpkg-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const tree = path.join(dir, 'tree');
  // A tree with only a /bin/sh (the host's dash, its loader and libraries at their own paths) and /var/tmp.
  const shell = await fs.realpath('/bin/sh');
  const l = parseLdd(execFileSync('ldd', [shell], { encoding: 'utf8' }));
  for (const f of [shell, l.loader!, ...l.libs]) {
    await fs.mkdir(path.join(tree, path.dirname(f)), { recursive: true });
    await fs.copyFile(await fs.realpath(f), path.join(tree, f));
    await fs.chmod(path.join(tree, f), 0o755);
  }
  await fs.mkdir(path.join(tree, 'bin'), { recursive: true });
  if (shell !== '/bin/sh') await fs.copyFile(shell, path.join(tree, 'bin/sh'));
  await fs.chmod(path.join(tree, 'bin/sh'), 0o755);
  await fs.mkdir(path.join(tree, 'var/tmp'), { recursive: true });
  const before = await listing(tree);

  sh(HOST_DPKG_IN, tree);
  // A small .deb, built by the host, unpacked by the wrapper in the chroot as dpkg does.
  const pkg = path.join(dir, 'pkg');
  await fs.mkdir(path.join(pkg, 'DEBIAN'), { recursive: true });
  await fs.mkdir(path.join(pkg, 'usr/share/x'), { recursive: true });
  await fs.writeFile(path.join(pkg, 'DEBIAN/control'), 'Package: x\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n');
  await fs.writeFile(path.join(pkg, 'usr/share/x/data'), 'x'.repeat(100000));
  execFileSync('dpkg-deb', ['--root-owner-group', '-Zxz', '--build', pkg, path.join(tree, 'var/tmp/x.deb')], { stdio: 'ignore' });
  const viaWrapper = execFileSync('chroot', [tree, `${HOST_DPKG_DIR}/path/dpkg-deb`, '--fsys-tarfile', '/var/tmp/x.deb']);
  const host = execFileSync('dpkg-deb', ['--fsys-tarfile', path.join(tree, 'var/tmp/x.deb')]);
  assert.ok(viaWrapper.length > 100000);
  assert.ok(viaWrapper.equals(host), 'the wrapper in the chroot gives the host dpkg-deb output');
  // dpkg finds it by name: first on the PATH the stage gives mmdebstrap.
  assert.match(execFileSync('chroot', [tree, '/bin/sh', '-c', 'PATH=$1/path:/usr/bin:/bin; command -v dpkg-deb', 'sh', HOST_DPKG_DIR], { encoding: 'utf8' }), new RegExp(`^${HOST_DPKG_DIR}/path/dpkg-deb$`, 'm'));

  await fs.rm(path.join(tree, 'var/tmp/x.deb'));
  sh(HOST_DPKG_OUT, tree);
  assert.deepEqual(await listing(tree), before);
});

test('mmdebstrapArgs adds the host dpkg-deb hooks only for a foreign arch, removal first among the customize steps', () => {
  const p = Params.parse({});
  const foreign = process.arch === 'x64' ? 'arm64' : 'amd64';
  const native = foreign === 'arm64' ? 'amd64' : 'arm64';
  const a = mmdebstrapArgs(p, foreign, '/out/rootfs.tar');
  assert.ok(a.includes(`--extract-hook=${HOST_DPKG_IN}`));
  assert.equal(a.find((x) => x.startsWith('--customize-hook=')), `--customize-hook=${HOST_DPKG_OUT}`);
  const b = mmdebstrapArgs(p, native, '/out/rootfs.tar');
  assert.ok(!b.some((x) => x.includes(HOST_DPKG_DIR)));
  // extract/custom run no dpkg in the tree (and may have no /bin/sh for the wrapper).
  for (const variant of ['extract', 'custom'] as const) {
    assert.ok(!mmdebstrapArgs(Params.parse({ variant }), foreign, '/out/rootfs.tar').some((x) => x.includes(HOST_DPKG_DIR)), variant);
  }
});
