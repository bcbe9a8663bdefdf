import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  BUILD_TYPE,
  SLSA_PROVENANCE_V1,
  STATEMENT_TYPE,
  buildStatement,
  debPurl,
  statementBytes,
  type Subject,
} from '../../src/engine/provenance.js';
import type { BuildManifest } from '../../src/engine/manifest-types.js';

const H = (c: string) => c.repeat(64);

function manifest(): BuildManifest {
  return {
    schema: 'pipeline.build-manifest/v1',
    builder: { id: 'https://pipeline.dev/builder/local', version: '0.1.0' },
    spec: { name: 'minimal', path: 'pipelines/minimal.yaml', sha256: H('a') },
    variant: 'ipxe',
    arch: 'amd64',
    sourceDateEpoch: 1704067200,
    stages: [
      { name: 'rootfs', kind: 'mmdebstrap', version: '1', key: H('c'), inputs: {}, tools: { mmdebstrap: '1.3.5' }, params: {} },
      { name: 'initramfs', kind: 'dracut', version: '2', key: H('d'), inputs: { rootfs: H('c') }, tools: {}, params: {} },
    ],
    resolved: {
      meta: {
        rootfs: { suite: 'bookworm', mirror: 'http://deb.debian.org/debian/' },
        tools: { suite: 'bookworm', mirror: 'http://deb.debian.org/debian/' },
        initramfs: { kernel: '6.1.0-30-amd64' },
      },
      packages: [
        { name: 'systemd-sysv', version: '252.33-1~deb12u1', arch: 'amd64', sha256: H('e') },
        { name: 'libstdc++6', version: '12.2.0-14+deb12u1', arch: 'amd64' },
        { name: 'adduser', version: '1:3.134', arch: 'all', sha256: H('f') },
        { name: 'adduser', version: '1:3.134', arch: 'all' }, // duplicate from another stage
      ],
      tools: { mmdebstrap: '1.3.5', dracut: '059-4' },
    },
    outputs: [
      { path: 'vmlinuz', size: 6, sha256: H('1'), fsverity: H('2'), stage: 'ipxe' },
      { path: 'initrd.img', size: 6, sha256: H('3'), fsverity: H('4'), stage: 'ipxe' },
    ],
    attestation: { statement: 'provenance.intoto.json', bundle: 'provenance.sigstore.json' },
  };
}

const subjects: Subject[] = [
  { name: 'vmlinuz', sha256: H('1') },
  { name: 'SHA256SUMS', sha256: H('5') },
  { name: 'initrd.img', sha256: H('3') },
  { name: 'build-manifest.json', sha256: H('6') },
  { name: 'provenance.intoto.json', sha256: H('7') }, // dropped: cannot attest to itself
  { name: 'provenance.sigstore.json', sha256: H('8') }, // dropped
];

test('statement header and sorted subjects include the manifest and sums', () => {
  const st = buildStatement(manifest(), subjects);
  assert.equal(st._type, STATEMENT_TYPE);
  assert.equal(st.predicateType, SLSA_PROVENANCE_V1);
  assert.deepEqual(
    st.subject.map((s) => s.name),
    ['SHA256SUMS', 'build-manifest.json', 'initrd.img', 'vmlinuz'], // byte order: uppercase first
  );
  assert.deepEqual(st.subject[1], { name: 'build-manifest.json', digest: { sha256: H('6') } });
});

test('build definition: type, external and internal parameters', () => {
  const bd = buildStatement(manifest(), subjects).predicate.buildDefinition;
  assert.equal(bd.buildType, BUILD_TYPE);
  assert.deepEqual(bd.externalParameters, {
    arch: 'amd64',
    spec: { name: 'minimal', path: 'pipelines/minimal.yaml', sha256: H('a') },
    variant: 'ipxe',
  });
  assert.deepEqual(bd.internalParameters, { sourceDateEpoch: 1704067200 });
});

test('resolved dependencies: mirror+suite once, packages as deb purls, tools', () => {
  const deps = buildStatement(manifest(), subjects).predicate.buildDefinition.resolvedDependencies;
  const mirrors = deps.filter((d) => d.name?.startsWith('debian-archive:'));
  assert.deepEqual(mirrors, [
    {
      annotations: { mirror: 'http://deb.debian.org/debian/', stages: ['rootfs', 'tools'], suite: 'bookworm' },
      name: 'debian-archive:bookworm',
      uri: 'http://deb.debian.org/debian/dists/bookworm',
    },
  ]);
  const pkgs = deps.filter((d) => d.uri?.startsWith('pkg:deb/'));
  assert.deepEqual(
    pkgs.map((p) => p.uri),
    [
      'pkg:deb/debian/adduser@1:3.134?arch=all',
      'pkg:deb/debian/libstdc%2B%2B6@12.2.0-14%2Bdeb12u1?arch=amd64',
      'pkg:deb/debian/systemd-sysv@252.33-1~deb12u1?arch=amd64',
    ],
  );
  assert.deepEqual(pkgs[0]!.digest, { sha256: H('f') }, 'the duplicate with a digest wins');
  assert.equal(pkgs[1]!.digest, undefined, 'no digest when unknown');
  const tools = deps.filter((d) => d.uri?.startsWith('pkg:generic/'));
  assert.deepEqual(
    tools.map((t) => [t.name, t.uri]),
    [
      ['dracut', 'pkg:generic/dracut@059-4'],
      ['mmdebstrap', 'pkg:generic/mmdebstrap@1.3.5'],
    ],
  );
});

test('run details: builder, stage cache keys as byproducts, nothing time-based', () => {
  const rd = buildStatement(manifest(), subjects).predicate.runDetails;
  assert.deepEqual(rd.builder, { id: 'https://pipeline.dev/builder/local', version: { pipeline: '0.1.0' } });
  assert.deepEqual(
    rd.byproducts.map((b) => [b.name, b.digest?.sha256]),
    [
      ['stage:initramfs', H('d')],
      ['stage:rootfs', H('c')],
    ],
  );
  assert.equal('metadata' in rd, false);
  assert.doesNotMatch(JSON.stringify(rd), /startedOn|finishedOn/);
});

test('deterministic: same bytes whatever the input order', () => {
  const a = statementBytes(buildStatement(manifest(), subjects));
  const m2 = manifest();
  m2.stages.reverse();
  m2.resolved.packages.reverse();
  m2.resolved.tools = { dracut: '059-4', mmdebstrap: '1.3.5' };
  const b = statementBytes(buildStatement(m2, [...subjects].reverse()));
  assert.ok(a.equals(b));
  assert.ok(a.toString().endsWith('}\n'));
  // Key order in the serialized JSON is sorted at every level.
  const keys = Object.keys(JSON.parse(a.toString()));
  assert.deepEqual(keys, ['_type', 'predicate', 'predicateType', 'subject']);
});

test('rejects subjects that disagree with manifest outputs', () => {
  assert.throws(
    () => buildStatement(manifest(), subjects.filter((s) => s.name !== 'vmlinuz')),
    /output vmlinuz .*not among the subjects/,
  );
  assert.throws(
    () => buildStatement(manifest(), subjects.map((s) => (s.name === 'vmlinuz' ? { ...s, sha256: H('9') } : s))),
    /vmlinuz: manifest says sha256 1{64}, file has 9{64}/,
  );
});

test('rejects unsafe, malformed and duplicate subjects', () => {
  const m = manifest();
  m.outputs = [];
  assert.throws(() => buildStatement(m, [{ name: '../etc/passwd', sha256: H('1') }]), /unsafe subject name/);
  assert.throws(() => buildStatement(m, [{ name: '/abs', sha256: H('1') }]), /unsafe subject name/);
  assert.throws(() => buildStatement(m, [{ name: 'a', sha256: 'XYZ' }]), /64 lowercase hex/);
  assert.throws(
    () => buildStatement(m, [{ name: 'a', sha256: H('1') }, { name: 'a', sha256: H('1') }]),
    /duplicate subject a/,
  );
  // Subdirectories are fine.
  assert.equal(buildStatement(m, [{ name: 'oci/index.json', sha256: H('1') }]).subject[0]!.name, 'oci/index.json');
});

test('debPurl encodes + but keeps the epoch colon', () => {
  assert.equal(debPurl({ name: 'g++', version: '4:12.2.0-3', arch: 'arm64' }), 'pkg:deb/debian/g%2B%2B@4:12.2.0-3?arch=arm64');
});
