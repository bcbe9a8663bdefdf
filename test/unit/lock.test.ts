// The lock file (format, located parse errors, digests, diffs), the resolver's
// parsing of apt's output, and how a lock enters the compiled plan's cache keys.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { compile, diffParts, requirements, type Facts } from '../../src/engine/compile.js';
import { SpecError, UsageError } from '../../src/engine/errors.js';
import { loadKinds } from '../../src/engine/kinds.js';
import { parseSpec } from '../../src/engine/spec.js';
import { diffSections, formatLock, lockPathFor, parseLock, sectionDigest, type LockedDeb, type LockFile, type LockSection } from '../../src/lock/format.js';
import { inReleaseDate, lockedDebs, parseInstLines } from '../../src/lock/resolve.js';
import { packagesStanza, releaseFile } from '../../src/lock/repo.js';
import { lockProvider } from '../../src/lock/lock.js';

const sha = (c: string) => c.repeat(64);
const deb = (name: string, version: string, c = 'a', arch = 'amd64'): LockedDeb => ({ name, version, arch, priority: 'optional', sha256: sha(c), size: 1234, path: `pool/main/${name[0]}/${name}/${name}_${version}_${arch}.deb` });
const section = (debs: LockedDeb[], packages = ['hello']): LockSection => ({
  stage: 'rootfs',
  arch: 'amd64',
  mirror: 'http://deb.debian.org/debian',
  suite: 'bookworm',
  components: ['main'],
  variant: 'minbase',
  packages,
  inRelease: { sha256: sha('f'), date: 'Sat, 11 Jul 2026 10:16:37 UTC' },
  debs,
});

test('a lock round-trips, is sorted one package per line, and its digest ignores input order', () => {
  const lock: LockFile = { spec: 'demo', sections: [section([deb('zlib1g', '1:1.2.13', 'b'), deb('hello', '2.10-3', 'c'), deb('base-files', '12.4', 'd', 'all')])] };
  const text = formatLock(lock);
  const debLines = text.split('\n').filter((l) => l.startsWith('deb '));
  assert.deepEqual(debLines.map((l) => l.split(' ')[1]), ['base-files', 'hello', 'zlib1g']);
  assert.match(text, /^inrelease f{64} Sat, 11 Jul 2026 10:16:37 UTC$/m);
  const back = parseLock(text, 'x.lock');
  assert.equal(back.spec, 'demo');
  assert.equal(formatLock(back), text);
  const shuffled = { ...lock.sections[0]!, debs: [...lock.sections[0]!.debs].reverse() };
  assert.equal(sectionDigest(shuffled), sectionDigest(back.sections[0]!));
  // Any pinned byte moves the digest.
  const moved = { ...shuffled, debs: shuffled.debs.map((d) => (d.name === 'hello' ? { ...d, sha256: sha('e') } : d)) };
  assert.notEqual(sectionDigest(moved), sectionDigest(shuffled));
});

test('the lock lives next to the spec, named after it', () => {
  assert.equal(lockPathFor('/w/pipeline.yaml'), '/w/pipeline.lock');
  assert.equal(lockPathFor('/w/fixtures/minimal.yml'), '/w/fixtures/minimal.lock');
});

function parseIssues(text: string): { line: number; col: number; message: string; frame: string }[] {
  try {
    parseLock(text, 'p.lock');
  } catch (e) {
    assert.ok(e instanceof SpecError, String(e));
    assert.equal(e.exitCode, 2);
    return e.issues.map((i) => ({ line: i.loc.line, col: i.loc.col, message: i.message, frame: e.message }));
  }
  assert.fail('expected the lock to be rejected');
}

test('a hand-edited lock that does not parse is reported at its line and column', () => {
  const good = formatLock({ spec: 'demo', sections: [section([deb('hello', '2.10-3')])] });
  const lines = good.split('\n');
  const n = lines.findIndex((l) => l.startsWith('deb hello'));
  // A truncated sha256 (a typical bad hand edit): the column of the sha field.
  const bad = [...lines];
  bad[n] = bad[n]!.replace(sha('a'), 'abc123');
  const [i] = parseIssues(bad.join('\n'));
  assert.equal(i!.line, n + 1);
  assert.equal(i!.col, bad[n]!.indexOf('abc123') + 1);
  assert.match(i!.message, /sha256/);
  assert.match(i!.frame, /^p\.lock:\d+:\d+: error: /);
  assert.match(i!.frame, /\^{6}/);

  const missingField = [...lines];
  missingField[n] = 'deb hello 2.10-3 amd64';
  assert.match(parseIssues(missingField.join('\n'))[0]!.message, /expected deb <name> <version>/);
  assert.deepEqual(parseIssues('lock 1\nspec x\nfrobnicate yes\n').map((i) => [i.line, i.col]), [[3, 1]]);
  assert.match(parseIssues('lock 1\nspec x\ndeb a 1 amd64 - ' + sha('a') + ' 1 pool/a.deb\n')[0]!.message, /outside a stage section/);
  assert.match(parseIssues('lock 2\nspec x\n')[0]!.message, /unsupported lock format 2/);
  assert.match(parseIssues('{"not":"a lock"}\n')[0]!.message, /unknown line/);
  assert.match(parseIssues('# empty\n')[0]!.message, /no "lock 1" line/);
  const twice = [...lines, lines[n]!].join('\n');
  assert.match(parseIssues(twice)[0]!.message, /locked twice/);
  const noInRelease = lines.filter((l) => !l.startsWith('inrelease')).join('\n');
  assert.match(parseIssues(noInRelease)[0]!.message, /lacks: inrelease/);
});

test('the update diff names added, removed and changed packages and nothing else', () => {
  const a = section([deb('hello', '2.10-3'), deb('libc6', '2.36-9'), deb('tar', '1.34')]);
  const b = section([deb('tree', '2.1.0-1'), deb('libc6', '2.36-9+deb12u1', 'b'), deb('tar', '1.34')], ['tree']);
  assert.deepEqual(diffSections(a, b), ['hello: 2.10-3 → (removed)', 'libc6: 2.36-9 → 2.36-9+deb12u1', 'tree: (added) → 2.1.0-1']);
  assert.deepEqual(diffSections(a, a), []);
  // "libpam-modules" sorts before "libpam-modules-bin" (by name, not by name:arch).
  const c = section([deb('libpam-modules-bin', '1'), deb('libpam-modules', '1')]);
  assert.deepEqual(diffSections(undefined, c), ['libpam-modules: (added) → 1', 'libpam-modules-bin: (added) → 1']);
});

test("apt's simulation output: Inst lines, repeated across mmdebstrap's phases, become one set", () => {
  const out = [
    'I: simulate downloading packages with apt...',
    'Inst gcc-12-base (12.2.0-14+deb12u1 Debian:12.15/oldstable [amd64])',
    'Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64]) []',
    'Inst base-files (12.4+deb12u15 Debian:12.15/oldstable [amd64])',
    'Conf libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64])',
    'Inst tzdata (2026b-0+deb12u1 Debian:12.15/oldstable-updates [all])',
    'Inst libc6 (2.36-9+deb12u14 Debian:12.15/oldstable [amd64])',
  ].join('\n');
  assert.deepEqual(parseInstLines(out), [
    { name: 'gcc-12-base', version: '12.2.0-14+deb12u1', arch: 'amd64' },
    { name: 'libc6', version: '2.36-9+deb12u14', arch: 'amd64' },
    { name: 'base-files', version: '12.4+deb12u15', arch: 'amd64' },
    { name: 'tzdata', version: '2026b-0+deb12u1', arch: 'all' },
  ]);
  const idx = `Package: libc6\nVersion: 2.36-9+deb12u14\nArchitecture: amd64\nPriority: optional\nFilename: pool/main/g/glibc/libc6_2.36-9+deb12u14_amd64.deb\nSize: 2757936\nSHA256: ${sha('1')}\n\nPackage: libc6\nVersion: 2.36-9+deb12u13\nArchitecture: amd64\nFilename: old.deb\nSize: 1\nSHA256: ${sha('2')}\n`;
  assert.deepEqual(lockedDebs([{ name: 'libc6', version: '2.36-9+deb12u14', arch: 'amd64' }], [idx]), [
    { name: 'libc6', version: '2.36-9+deb12u14', arch: 'amd64', priority: 'optional', sha256: sha('1'), size: 2757936, path: 'pool/main/g/glibc/libc6_2.36-9+deb12u14_amd64.deb' },
  ]);
  assert.throws(() => lockedDebs([{ name: 'ghost', version: '1', arch: 'amd64' }], [idx]), /ghost 1 amd64/);
  assert.equal(inReleaseDate('-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nOrigin: Debian\nDate: Sat, 11 Jul 2026 10:16:37 UTC\n'), 'Sat, 11 Jul 2026 10:16:37 UTC');
});

test('the flat repository index keeps the control paragraph, with the mirror priority and the locked digest', () => {
  const d = { ...deb('hello', '2.10-3'), priority: 'required' };
  const stanza = packagesStanza('Package: hello\nVersion: 2.10-3\nPriority: optional\nArchitecture: amd64\nDescription: x\n more\n', d, './h.deb');
  assert.equal(stanza, `Package: hello\nVersion: 2.10-3\nArchitecture: amd64\nDescription: x\n more\nPriority: required\nFilename: ./h.deb\nSize: 1234\nSHA256: ${sha('a')}\n`);
  const rel = releaseFile(section([d, deb('tzdata', '1', 'b', 'all')]), Buffer.from(stanza));
  assert.match(rel, /^Suite: bookworm$/m);
  assert.match(rel, /^Architectures: all amd64$/m);
  assert.match(rel, /^ [0-9a-f]{64} \d+ Packages$/m);
});

test('a lock names one exact tree in the key; unlocked keys are unchanged; a stale lock is exit 2', async () => {
  const kinds = await loadKinds();
  const text = (pkgs: string) => `name: demo
arches: [amd64]
stages:
  rootfs: { kind: mmdebstrap, with: { suite: bookworm, packages: [${pkgs}] } }
variants:
  rootfs: [rootfs]
`;
  const load = (t: string) => parseSpec(t, '/w/demo.yaml', kinds);
  const req = requirements(load(text('hello')), 'amd64', ['rootfs'], kinds);
  const facts: Facts = { toolVersions: Object.fromEntries(req.tools.map((t) => [t.name, '1.0'])), assetDigests: {}, sourceDateEpoch: 1704067200 };
  const unlocked = compile(load(text('hello')), 'amd64', ['rootfs'], kinds, facts).stages[0]!;
  assert.equal(unlocked.parts.lock, undefined);
  assert.ok(!('lock' in unlocked.parts), 'an unlocked key has no lock part at all');
  const sec = section([deb('hello', '2.10-3')]);
  const lockFacts = (s: LockSection): Facts => ({ ...facts, lock: lockProvider('/w/demo.lock', { spec: 'demo', sections: [s] }) });
  const locked = compile(load(text('hello')), 'amd64', ['rootfs'], kinds, lockFacts(sec)).stages[0]!;
  assert.equal(locked.parts.lock, sectionDigest(sec));
  assert.notEqual(locked.key, unlocked.key);
  assert.equal(locked.lock?.section, sec);
  const moved = { ...sec, debs: [deb('hello', '2.10-4', 'b')] };
  const locked2 = compile(load(text('hello')), 'amd64', ['rootfs'], kinds, lockFacts(moved)).stages[0]!;
  assert.notEqual(locked2.key, locked.key);
  assert.deepEqual(diffParts(locked.parts, locked2.parts), [`lock: ${sectionDigest(sec).slice(0, 12)} -> ${sectionDigest(moved).slice(0, 12)}`]);
  // The spec adds a package the lock lacks: exit 2, "run `pipeline lock`".
  assert.throws(
    () => compile(load(text('hello, tree')), 'amd64', ['rootfs'], kinds, lockFacts(sec)),
    (e: unknown) => e instanceof UsageError && e.exitCode === 2 && /package tree not in the lock/.test(e.message) && /run `pipeline lock`/.test(e.message),
  );
  // A lock without the stage at all.
  assert.throws(() => compile(load(text('hello')), 'amd64', ['rootfs'], kinds, lockFacts({ ...sec, stage: 'other' })), /stage rootfs \(amd64\) is not in \/w\/demo\.lock: run `pipeline lock amd64`/);
});
