// The oci emitter against real consumers: skopeo reads the layout, umoci unpacks
// it, and the unpacked tree is compared with GNU tar's extraction of the source
// rootfs (modes, owners, symlinks, hard links, device numbers, binary xattrs).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import oci from '../../outputs/oci.js';
import { runProcess } from '../../src/engine/process.js';
import { PREPARE_ROOT_CONF } from '../../src/lib/oci-layout.js';
import { StageError } from '../../src/stage.js';
import { readTarEntries } from '../../src/lib/tarfs.js';
import { bytes, CAP_HEX, CRAFTED_KVER, extractWithGnuTar, makeCraftedRootfs, type Crafted } from '../helpers/crafted-rootfs.js';
import { fixtureRootfs } from '../helpers/fixture-rootfs.js';
import { inputFrom, listFiles, runStage } from '../helpers/run-stage.js';
import { diffSnapshots, snapshotTree, type NodeSnap, type TreeSnap } from '../helpers/tree-snapshot.js';

const isRoot = process.getuid?.() === 0;
const EPOCH = 1704067200;
let crafted: Crafted;
let tmp: string;
let bootDir: string;
let reference: TreeSnap;

const run = (cmd: string, args: string[]) => runProcess(cmd, args, { capture: true });

async function bootInput(dir: string, kver: string, vmlinuz?: Buffer) {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'vmlinuz'), vmlinuz ?? bytes(6000, 11));
  await writeFile(join(dir, 'initrd.img'), bytes(3000, 12));
  return inputFrom(dir, { kernel: kver }, 'dracut');
}

async function build(rootfsDir: string, boot: string, kver: string, params: Record<string, unknown> = {}, outDir?: string) {
  return runStage(oci, {
    params,
    inputs: { rootfs: await inputFrom(rootfsDir, {}, 'mmdebstrap'), boot: await inputFrom(boot, { kernel: kver }, 'dracut') },
    outDir: outDir ?? (await mkdtemp(join(tmp, 'out-'))),
    sourceDateEpoch: EPOCH,
  });
}

/** Apply the bootc rules to a reference snapshot: what the image should contain. */
async function expectBootc(src: TreeSnap, kver: string, boot: string): Promise<TreeSnap> {
  const out: TreeSnap = new Map();
  const gone = (p: string) => /^(boot|dev|proc|sys|run|tmp)\//.test(p) || /^(vmlinuz|initrd\.img)(\.old)?$/.test(p);
  for (const [p, n] of src) {
    if (gone(p)) continue;
    const { 'security.selinux': _drop, ...xattrs } = n.xattrs;
    const links = n.links?.filter((l) => !gone(l));
    const copy: NodeSnap = { ...n, xattrs };
    if (links) copy.links = links;
    out.set(p, copy);
  }
  const dir = (mode: string): NodeSnap => ({ type: 'dir', mode, uid: 0, gid: 0, xattrs: {} });
  for (const [d, mode] of [['boot', '755'], ['dev', '755'], ['proc', '555'], ['sys', '555'], ['run', '755'], ['tmp', '1777'], ['var', '755']] as const) {
    if (!out.has(d)) out.set(d, dir(mode));
  }
  out.set('sysroot', dir('755'));
  out.set('ostree', { type: 'symlink', mode: '777', uid: 0, gid: 0, target: 'sysroot/ostree', xattrs: {} });
  if (!out.has('usr/lib/ostree')) out.set('usr/lib/ostree', dir('755'));
  const file = (data: Buffer): NodeSnap => ({ type: 'file', mode: '644', uid: 0, gid: 0, size: data.length, sha256: sha(data), xattrs: {} });
  out.set('usr/lib/ostree/prepare-root.conf', file(Buffer.from(PREPARE_ROOT_CONF)));
  out.set(`usr/lib/modules/${kver}/vmlinuz`, file(await readFile(join(boot, 'vmlinuz'))));
  out.set(`usr/lib/modules/${kver}/initramfs.img`, file(await readFile(join(boot, 'initrd.img'))));
  return new Map([...out].sort(([a], [b]) => (a < b ? -1 : 1)));
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

async function unpack(layout: string, tag = 'latest'): Promise<string> {
  const bundle = await mkdtemp(join(tmp, 'bundle-'));
  await rm(bundle, { recursive: true });
  await run('umoci', ['unpack', '--image', `${layout}:${tag}`, bundle]);
  return join(bundle, 'rootfs');
}

async function assertSameFiles(a: string, b: string): Promise<void> {
  const fa = await listFiles(a);
  assert.deepEqual(fa, await listFiles(b));
  for (const f of fa) assert.ok((await readFile(join(a, f))).equals(await readFile(join(b, f))), `${f} differs between builds`);
}

before(async () => {
  if (!isRoot) return;
  tmp = await mkdtemp(join(tmpdir(), 'oci-it-'));
  crafted = await makeCraftedRootfs();
  bootDir = join(tmp, 'boot');
  await bootInput(bootDir, CRAFTED_KVER);
  const ref = join(tmp, 'ref');
  await extractWithGnuTar(crafted.tar, ref);
  reference = await snapshotTree(ref);
});

after(async () => {
  if (tmp) await rm(tmp, { recursive: true, force: true });
  if (crafted) await rm(join(crafted.dir, '..'), { recursive: true, force: true });
});

test('crafted rootfs: skopeo inspects, umoci unpacks the exact tree, two builds are byte-identical', { skip: !isRoot && 'needs root (mknod, setcap, umoci)' }, async () => {
  // The reference really has the awkward cases.
  assert.equal(reference.get('usr/bin/capbin')!.xattrs['security.capability'], CAP_HEX);
  assert.deepEqual(reference.get('usr/share/data/a')!.links, ['usr/bin/a-link', 'usr/share/data/a', 'usr/share/data/b']);
  assert.equal(reference.get('usr/bin/suid')!.mode, '4755');

  const r1 = await build(crafted.tarDir, bootDir, CRAFTED_KVER);
  const r2 = await build(crafted.tarDir, bootDir, CRAFTED_KVER);
  await assertSameFiles(r1.outDir, r2.outDir);
  assert.deepEqual(r1.meta, r2.meta);

  const info = JSON.parse((await run('skopeo', ['inspect', `oci:${r1.outDir}:latest`])).stdout);
  assert.equal(info.Labels['containers.bootc'], '1');
  assert.equal(info.Architecture, 'amd64');
  assert.equal(info.Digest, r1.meta.manifest);
  assert.equal(info.Layers.length, 1);

  // No wall-clock time anywhere in the documents.
  const index = JSON.parse(await readFile(join(r1.outDir, 'index.json'), 'utf8'));
  assert.equal(index.manifests[0].annotations['org.opencontainers.image.ref.name'], 'latest');
  const manifest = JSON.parse(await readFile(join(r1.outDir, 'blobs/sha256', index.manifests[0].digest.slice(7)), 'utf8'));
  const config = JSON.parse(await readFile(join(r1.outDir, 'blobs/sha256', manifest.config.digest.slice(7)), 'utf8'));
  assert.equal(config.created, undefined);
  assert.equal(config.history, undefined);
  assert.equal(JSON.parse(await readFile(join(r1.outDir, 'oci-layout'), 'utf8')).imageLayoutVersion, '1.0.0');

  const rootfs = await unpack(r1.outDir);
  const got = await snapshotTree(rootfs);
  const want = await expectBootc(reference, CRAFTED_KVER, bootDir);
  assert.deepEqual(diffSnapshots(got, want), []);
  assert.equal(got.get('usr/bin/capbin')!.xattrs['security.capability'], CAP_HEX);
  assert.equal(got.get('var/lib/thing/owned')!.xattrs['user.bin'], '0x00ff10fe0a3d20');
  assert.equal(got.get('usr/bin/suid')!.xattrs['security.selinux'], undefined);
  assert.equal(got.get('etc/noaccess')!.mode, '0');
});

test('layer tar: sorted, parents first, no duplicates, fixed mtime, GNU tar reads the binary xattr', { skip: !isRoot && 'needs root' }, async () => {
  const r = await build(crafted.tarDir, bootDir, CRAFTED_KVER, { compression: 'none' });
  const layer = join(r.outDir, 'blobs/sha256', (r.meta.layers as Array<{ digest: string }>)[0]!.digest.slice(7));
  const entries = await readTarEntries(layer);
  const paths = entries.map((e) => e.path);
  assert.deepEqual(paths, [...paths].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)));
  assert.equal(new Set(paths).size, paths.length);
  const seen = new Set<string>();
  for (const p of paths) {
    if (p.includes('/')) assert.ok(seen.has(p.slice(0, p.lastIndexOf('/'))), `${p} before its parent`);
    seen.add(p);
  }
  const verbose = (await run('tar', ['--xattrs', '--xattrs-include=*', '--full-time', '-tvvf', layer])).stdout;
  for (const line of verbose.split('\n').filter((l) => /^[-dlcbph]/.test(l))) assert.match(line, / 2024-01-01 00:00:00 /);
  // The uncompressed layer is what the gzip build's diff_id names.
  const gz = await build(crafted.tarDir, bootDir, CRAFTED_KVER);
  assert.equal((gz.meta.layers as Array<{ diffId: string }>)[0]!.diffId, (r.meta.layers as Array<{ digest: string }>)[0]!.digest);
  const got = await snapshotTree(await unpack(r.outDir));
  assert.deepEqual(diffSnapshots(got, await expectBootc(reference, CRAFTED_KVER, bootDir)), []);
  // GNU tar extracts the same capability bytes from our layer.
  const x = join(tmp, 'gnu-x');
  await extractWithGnuTar(layer, x);
  assert.equal((await snapshotTree(x)).get('usr/bin/capbin')!.xattrs['security.capability'], CAP_HEX);
});

test('a rootfs entry type OCI cannot carry: clear error naming the path, no layout left', { skip: !isRoot && 'needs root' }, async () => {
  const src = join(tmp, 'sparse-src');
  await mkdir(src);
  await run('truncate', ['-s', '10M', join(src, 'holes.img')]);
  const inDir = join(tmp, 'sparse-in');
  await mkdir(inDir);
  await run('tar', ['--format=gnu', '--sparse', '-C', src, '-cf', join(inDir, 'rootfs.tar'), '.']);
  const out = await mkdtemp(join(tmp, 'out-'));
  await assert.rejects(build(inDir, bootDir, CRAFTED_KVER, {}, out), (e: unknown) => e instanceof StageError && /\/holes\.img.*sparse/.test(e.message));
  assert.deepEqual(await readdir(out), []);
});

test('full or read-only output dir: clear error, nothing left behind', { skip: !isRoot && 'needs root (mount)' }, async () => {
  for (const [opts, re] of [
    ['size=256k', /no space left/],
    ['size=1m,ro', /read-only/],
  ] as const) {
    const out = await mkdtemp(join(tmp, 'tiny-'));
    await run('mount', ['-t', 'tmpfs', '-o', opts, 'tiny', out]);
    try {
      await assert.rejects(build(crafted.tarDir, bootDir, CRAFTED_KVER, { compression: 'none' }, out), (e: unknown) => e instanceof StageError && re.test(e.message));
      assert.deepEqual(await readdir(out), []);
    } finally {
      await run('umount', [out]);
    }
  }
});

// A real Debian rootfs with a kernel: fixtures/minimal.yaml's rootfs stage, built
// through (or found in) the shared test cache.

test('real mmdebstrap rootfs: umoci unpacks the same tree as GNU tar extracts (bootc rules applied)', { skip: !isRoot && 'needs root' }, async () => {
  const inDir = join(tmp, 'real-in');
  await mkdir(inDir);
  const real = await fixtureRootfs();
  await run('ln', ['-f', real, join(inDir, 'rootfs.tar')]).catch(() => run('cp', [real, join(inDir, 'rootfs.tar')]));
  const ref = join(tmp, 'real-ref');
  await extractWithGnuTar(join(inDir, 'rootfs.tar'), ref);
  // The fixture installs linux-image-amd64: a rootfs without a kernel is a broken fixture, not a skip.
  const kvers = (await readdir(join(ref, 'usr/lib/modules'))).sort();
  assert.ok(kvers.length > 0, 'the fixture rootfs has no kernel in usr/lib/modules');
  const kver = kvers[kvers.length - 1]!;
  const boot = join(tmp, 'real-boot');
  await bootInput(boot, kver, await readFile(join(ref, 'boot', `vmlinuz-${kver}`)));
  const r = await build(inDir, boot, kver);
  const info = JSON.parse((await run('skopeo', ['inspect', `oci:${r.outDir}:latest`])).stdout);
  assert.equal(info.Labels['containers.bootc'], '1');
  const got = await snapshotTree(await unpack(r.outDir));
  const want = await expectBootc(await snapshotTree(ref), kver, boot);
  assert.deepEqual(diffSnapshots(got, want), []);
});
