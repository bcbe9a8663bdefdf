// The pure half of `pipeline repro`: stage-by-stage comparison in DAG order, tar
// member diffs (on real tar streams made with tar-stream), image dir diffs, report text.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import { test } from 'node:test';
import tar from 'tar-stream';
import type { KeyParts } from '../../src/engine/compile.js';
import {
  compareStages,
  diffFiles,
  diffImageFiles,
  diffTarMembers,
  formatReport,
  listTarMembers,
  type FileSummary,
  type ReproReport,
  type SideStage,
  type TarMember,
} from '../../src/repro/compare.js';

function parts(kind: string, inputs: Record<string, string> = {}, over: Partial<KeyParts> = {}): KeyParts {
  return { engine: 'pipeline-cache/1', kind, version: '1', arch: 'amd64', sourceDateEpoch: 1704067200, params: {}, tools: {}, assets: {}, inputs, ...over };
}

const f = (p: string, sha: string, size = 10, executable = false): FileSummary => ({ path: p, size, sha256: sha, executable });

/** rootfs -> initramfs -> {ipxe, kernel-initrd}: a diamond-free chain with two sinks. */
function chain(over: { rootfs?: FileSummary[]; initramfs?: FileSummary[]; ipxe?: FileSummary[]; ipxeParts?: Partial<KeyParts> } = {}): SideStage[] {
  return [
    { name: 'rootfs', kind: 'mmdebstrap', key: 'k-rootfs', parts: parts('mmdebstrap'), files: over.rootfs ?? [f('rootfs.tar', 'r1', 100)] },
    { name: 'initramfs', kind: 'dracut', key: 'k-initramfs', parts: parts('dracut', { rootfs: 'k-rootfs' }), files: over.initramfs ?? [f('initrd.img', 'i1'), f('vmlinuz', 'v1')] },
    {
      name: 'ipxe',
      kind: 'ipxe',
      key: over.ipxeParts ? 'k-ipxe-2' : 'k-ipxe',
      parts: parts('ipxe', { boot: 'k-initramfs' }, over.ipxeParts),
      files: over.ipxe ?? [f('boot.ipxe', 'b1'), f('initrd.img', 'i1'), f('vmlinuz', 'v1')],
    },
    { name: 'kernel-initrd', kind: 'kernel-initrd', key: 'k-ki', parts: parts('kernel-initrd', { boot: 'k-initramfs' }), files: [f('initrd.img', 'i1'), f('vmlinuz', 'v1')] },
  ];
}

test('identical builds: every stage identical, no first divergent stage', () => {
  const c = compareStages(chain(), chain());
  assert.equal(c.identical, true);
  assert.equal(c.keysIdentical, true);
  assert.equal(c.firstDivergent, undefined);
  assert.deepEqual(c.sources, []);
  assert.deepEqual(
    c.stages.map((s) => [s.name, s.identical, s.fileCount]),
    [
      ['rootfs', true, 1],
      ['initramfs', true, 2],
      ['ipxe', true, 3],
      ['kernel-initrd', true, 2],
    ],
  );
});

test('the first divergent stage is the earliest in DAG order; downstream stages name it', () => {
  const b = chain({ initramfs: [f('initrd.img', 'i2', 11), f('vmlinuz', 'v1')], ipxe: [f('boot.ipxe', 'b1'), f('initrd.img', 'i2', 11), f('vmlinuz', 'v1')] });
  const c = compareStages(chain(), b);
  assert.equal(c.identical, false);
  assert.equal(c.keysIdentical, true);
  assert.equal(c.firstDivergent, 'initramfs');
  assert.deepEqual(c.sources, ['initramfs']);
  const init = c.stages.find((s) => s.name === 'initramfs')!;
  assert.deepEqual(init.files.map((x) => [x.path, x.changes]), [['initrd.img', ['content', 'size']]]);
  assert.deepEqual(init.divergentUpstream, []);
  const ipxe = c.stages.find((s) => s.name === 'ipxe')!;
  assert.equal(ipxe.identical, false);
  assert.deepEqual(ipxe.divergentUpstream, ['initramfs']);
  // kernel-initrd copied the same input but happened to match: still identical.
  assert.equal(c.stages.find((s) => s.name === 'kernel-initrd')!.identical, true);
  assert.equal(c.stages.find((s) => s.name === 'rootfs')!.identical, true);
});

test('a second, independent source is reported as a source too', () => {
  const b = chain({ rootfs: [f('rootfs.tar', 'r2', 100)], ipxe: [f('boot.ipxe', 'b2'), f('initrd.img', 'i1'), f('vmlinuz', 'v1')] });
  const c = compareStages(chain(), b);
  assert.equal(c.firstDivergent, 'rootfs');
  // initramfs came out identical from a different rootfs, so ipxe's difference is its own.
  assert.deepEqual(c.sources, ['rootfs', 'ipxe']);
  assert.deepEqual(c.stages.find((s) => s.name === 'ipxe')!.divergentUpstream, []);
});

test('differing keys are a finding in themselves, with the key parts that differ', () => {
  const b = chain({ ipxeParts: { tools: { mmdebstrap: '1.3.5' } } });
  const a = chain();
  a[2]!.parts = parts('ipxe', { boot: 'k-initramfs' }, { tools: { mmdebstrap: '1.3.4' } });
  const c = compareStages(a, b);
  assert.equal(c.keysIdentical, false);
  assert.equal(c.firstDivergent, 'ipxe');
  const ipxe = c.stages.find((s) => s.name === 'ipxe')!;
  assert.equal(ipxe.identical, false);
  assert.deepEqual(ipxe.files, []);
  assert.deepEqual(ipxe.keyDiffs, ['tool mmdebstrap: 1.3.4 -> 1.3.5']);
});

test('a stage missing on one side diverges', () => {
  const b = chain();
  delete b[1]!.files;
  const c = compareStages(chain(), b);
  assert.equal(c.firstDivergent, 'initramfs');
  assert.equal(c.stages[1]!.missing, 'b');
});

test('diffFiles: added, removed, executable bit', () => {
  const d = diffFiles([f('a', '1'), f('b', '2'), f('x', '3', 10, false)], [f('b', '2'), f('c', '4'), f('x', '3', 10, true)]);
  assert.deepEqual(
    d.map((x) => [x.path, x.changes]),
    [
      ['a', ['only-in-a']],
      ['c', ['only-in-b']],
      ['x', ['executable']],
    ],
  );
});

async function makeTar(entries: { name: string; body?: string; mode?: number; mtime?: number; uid?: number; type?: 'file' | 'symlink' | 'directory'; linkname?: string; pax?: Record<string, string> }[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const done = (async () => {
    for await (const c of pack as AsyncIterable<Buffer>) chunks.push(c);
  })();
  for (const e of entries) {
    const h = { name: e.name, mode: e.mode ?? 0o644, mtime: new Date((e.mtime ?? 1704067200) * 1000), uid: e.uid ?? 0, gid: 0, type: e.type ?? 'file', linkname: e.linkname, pax: e.pax };
    if ((e.type ?? 'file') === 'file') pack.entry(h, e.body ?? '');
    else pack.entry(h);
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

const members = async (b: Buffer): Promise<TarMember[]> => listTarMembers(Readable.from([b]));

test('listTarMembers reads names, modes, owners, times, links, pax records and data digests', async () => {
  const m = await members(
    await makeTar([
      { name: 'etc/', type: 'directory', mode: 0o755 },
      { name: 'etc/hostname', body: 'localhost\n', mode: 0o644, uid: 0 },
      { name: 'bin/ping', body: 'ELF', mode: 0o755, pax: { 'SCHILY.xattr.security.capability': 'cap' } },
      { name: 'usr/bin/sh', type: 'symlink', linkname: 'dash', mode: 0o777 },
    ]),
  );
  assert.deepEqual(
    m.map((x) => [x.name, x.type, x.mode.toString(8), x.mtime, x.linkname]),
    [
      ['etc/', 'directory', '755', 1704067200, ''],
      ['etc/hostname', 'file', '644', 1704067200, ''],
      ['bin/ping', 'file', '755', 1704067200, ''],
      ['usr/bin/sh', 'symlink', '777', 1704067200, 'dash'],
    ],
  );
  // sha256 of 'localhost\n'
  assert.equal(m[1]!.sha256, createHash('sha256').update('localhost\n').digest('hex'));
  assert.equal(m[0]!.sha256, '');
  assert.deepEqual(m[2]!.pax, { 'SCHILY.xattr.security.capability': 'cap' });
});

test('diffTarMembers names each differing member and which attribute differs', async () => {
  const a = await members(
    await makeTar([
      { name: 'etc/hostname', body: 'localhost\n' },
      { name: 'etc/shadow', body: 'root:*:19000:0:99999:7:::\n', mode: 0o640 },
      { name: 'var/log/dpkg.log', body: 'x' },
      { name: 'bin/ping', body: 'ELF', pax: { 'SCHILY.xattr.security.capability': 'cap' } },
      { name: 'same', body: 'same' },
    ]),
  );
  const b = await members(
    await makeTar([
      { name: 'etc/hostname', body: 'localhost\n', mtime: 1704067300 },
      { name: 'etc/shadow', body: 'root:*:19400:0:99999:7:::\n', mode: 0o600 },
      { name: 'bin/ping', body: 'ELF' },
      { name: 'same', body: 'same' },
      { name: 'var/cache/ldconfig/aux-cache', body: 'y' },
    ]),
  );
  const d = diffTarMembers(a, b);
  assert.equal(d.membersA, 5);
  assert.equal(d.membersB, 5);
  assert.equal(d.orderDiffers, false);
  assert.equal(d.differing, 5);
  const by = new Map(d.members.map((m) => [m.name, m]));
  assert.deepEqual(by.get('etc/hostname')!.attrs, ['mtime']);
  assert.deepEqual(by.get('etc/hostname')!.a, { mtime: 1704067200 });
  assert.deepEqual(by.get('etc/hostname')!.b, { mtime: 1704067300 });
  assert.deepEqual(by.get('etc/shadow')!.attrs, ['content', 'mode']);
  assert.equal(by.get('etc/shadow')!.a!.mode, '0640');
  assert.equal(by.get('etc/shadow')!.b!.mode, '0600');
  assert.deepEqual(by.get('var/log/dpkg.log')!.attrs, ['only-in-a']);
  assert.deepEqual(by.get('var/cache/ldconfig/aux-cache')!.attrs, ['only-in-b']);
  assert.deepEqual(by.get('bin/ping')!.attrs, ['pax.SCHILY.xattr.security.capability']);
  assert.equal(by.has('same'), false);
  assert.deepEqual(d.attrCounts, { mtime: 1, content: 1, mode: 1, 'only-in-a': 1, 'only-in-b': 1, 'pax.SCHILY.xattr.security.capability': 1 });
});

test('diffTarMembers: same members in another order is reported as an order difference', async () => {
  const a = await members(await makeTar([{ name: 'a', body: '1' }, { name: 'b', body: '2' }]));
  const b = await members(await makeTar([{ name: 'b', body: '2' }, { name: 'a', body: '1' }]));
  const d = diffTarMembers(a, b);
  assert.equal(d.differing, 0);
  assert.equal(d.orderDiffers, true);
});

test('diffTarMembers caps the listed members but counts them all', async () => {
  const list = (m: number) => Array.from({ length: 30 }, (_, i) => ({ name: `f${i}`, body: 'x', mtime: m }));
  const d = diffTarMembers(await members(await makeTar(list(1))), await members(await makeTar(list(2))), 5);
  assert.equal(d.differing, 30);
  assert.equal(d.members.length, 5);
  assert.deepEqual(d.attrCounts, { mtime: 30 });
});

test('diffImageFiles: content, mode, mtime, extra files; ignored paths are marked', () => {
  const im = (p: string, sha: string, mode = 0o100644, mtime = 1704067200) => ({ path: p, size: 1, mode, mtime, sha256: sha });
  const d = diffImageFiles(
    [im('vmlinuz', 'v'), im('SHA256SUMS', 's'), im('provenance.sigstore.json', 'sig1'), im('initrd.img', 'i')],
    [im('vmlinuz', 'v'), im('SHA256SUMS', 's', 0o100600), im('provenance.sigstore.json', 'sig2'), im('initrd.img', 'j', 0o100644, 1704067201), im('extra', 'e')],
    { 'provenance.sigstore.json': 'signatures are randomised' },
  );
  assert.deepEqual(
    d.map((x) => [x.path, x.changes, x.ignored ?? null]),
    [
      ['SHA256SUMS', ['mode'], null],
      ['extra', ['only-in-b'], null],
      ['initrd.img', ['content', 'mtime'], null],
      ['provenance.sigstore.json', ['content'], 'signatures are randomised'],
    ],
  );
});

test('formatReport names the first divergent stage, its files and tar members', () => {
  const b = chain({ rootfs: [f('rootfs.tar', 'r2', 100)] });
  const c = compareStages(chain(), b);
  c.stages[0]!.files[0]!.firstOffset = 1234;
  c.stages[0]!.files[0]!.tar = {
    membersA: 10,
    membersB: 10,
    orderDiffers: false,
    differing: 1,
    attrCounts: { mtime: 1 },
    members: [{ name: 'etc/machine-id', attrs: ['mtime'], a: { mtime: 1 }, b: { mtime: 2 } }],
  };
  const r: ReproReport = {
    schema: 'pipeline.repro-report/v1',
    spec: '/x/minimal.yaml',
    pipeline: 'minimal',
    arch: 'amd64',
    variants: ['ipxe'],
    identical: false,
    sourceDateEpoch: { value: 1704067200, source: 'git commit time of minimal.yaml' },
    clock: { mode: 'faketime', offset: '+400d', note: 'build b runs +400d ahead under faketime' },
    builds: [
      { label: 'a', umask: '0022', env: { TZ: 'UTC', LANGUAGE: null }, dir: '/tmp/a', seconds: 61.5 },
      { label: 'b', umask: '0077', env: { TZ: 'Pacific/Kiritimati' }, faketime: '+400d', dir: '/tmp/b', seconds: 185 },
    ],
    keysIdentical: true,
    firstDivergent: c.firstDivergent ?? null,
    sources: c.sources,
    stages: c.stages,
    images: [{ variant: 'ipxe', identical: true, files: [] }],
    diffoscope: { ran: false, note: 'not installed' },
    kept: null,
  };
  const text = formatReport(r);
  assert.match(text, /NOT reproducible/);
  assert.match(text, /build a: 61\.5s {2}umask 0022, TZ=UTC, LANGUAGE unset/);
  assert.match(text, /build b: 3m05s {2}umask 0077, TZ=Pacific\/Kiritimati, faketime \+400d/);
  assert.match(text, /✗ rootfs +mmdebstrap +1 of 1 file differ {2}← first divergent stage/);
  assert.match(text, /rootfs\.tar: content; first difference at byte 1234/);
  assert.match(text, /tar: 1 of 10 members differ \(mtime ×1\)/);
  assert.match(text, /etc\/machine-id: mtime 1 vs 2/);
  assert.match(text, /✓ initramfs/);
  assert.match(text, /images\/ipxe\/amd64\/: byte-identical/);
  assert.match(text, /diffoscope: not installed/);
});
