// Pure parts of the pkg repository format, signing and the poudriere remote
// protocol. The openssl/bsdtar cross-checks are in test/integration/pkgrepo.test.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, generateKeyPairSync } from 'node:crypto';
import {
  catalogueEntry,
  catalogueMembers,
  checkManifest,
  dataCatalogue,
  fingerprintFile,
  keyFingerprint,
  metaConf,
  packagesiteYaml,
  packPkg,
  packTar,
  parseFingerprintFile,
  parseMetaConf,
  parsePackagesite,
  parseSigningOutput,
  pkgManifest,
  signedMessage,
  sniffCompression,
  sortEntries,
  unpackTar,
} from '../../src/lib/pkgrepo/format.js';
import { checkSignature, commandSigner, keySigner } from '../../src/lib/pkgrepo/sign.js';
import { masterName, parseFailedPorts, parseJailList, parsePortsList, portsMethod, remoteCommand, shQuote } from '../../src/lib/pkgrepo/poudriere.js';

const sha = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');
const rsa = () => {
  const k = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { priv: Buffer.from(k.privateKey.export({ type: 'pkcs8', format: 'pem' }) as string), pub: Buffer.from(k.publicKey.export({ type: 'spki', format: 'pem' }) as string) };
};
const manifest = { name: 'tmux', origin: 'sysutils/tmux', version: '3.4_1', comment: 'Terminal multiplexer', prefix: '/usr/local', deps: { libevent: { origin: 'devel/libevent', version: '2.1.12' } } };

test('packPkg writes the pkg create layout and pkgManifest reads it back', () => {
  const tar = packPkg(checkManifest(manifest, 't'), [{ path: 'bin/tmux', content: '#!/bin/sh\n', mode: 0o755 }, { path: 'share/man/man1/tmux.1', content: 'x' }], 1704067200);
  const members = unpackTar(tar);
  assert.deepEqual(members.map((m) => m.name), ['+COMPACT_MANIFEST', '+MANIFEST', '/usr/local/bin/tmux', '/usr/local/share/man/man1/tmux.1']);
  const compact = JSON.parse(members[0]!.data.toString());
  assert.equal(compact.files, undefined, 'the compact manifest has no file list');
  assert.equal(compact.flatsize, 11);
  const full = JSON.parse(members[1]!.data.toString());
  assert.equal(full.files['/usr/local/bin/tmux'], `1$${sha('#!/bin/sh\n')}`);
  assert.equal(pkgManifest(tar, 't').name, 'tmux');
  assert.throws(() => pkgManifest(packTar([{ name: 'README', data: Buffer.from('x') }], 0), 'bad.pkg'), /bad\.pkg: no \+COMPACT_MANIFEST/);
});

test('manifests with unsafe identities are refused by name', () => {
  assert.throws(() => checkManifest({ ...manifest, version: '../x' }, 'p.pkg'), /p\.pkg: manifest name\/version/);
  assert.throws(() => checkManifest({ ...manifest, origin: 'tmux' }, 'p.pkg'), /origin "tmux" is not category\/port/);
  assert.throws(() => checkManifest({ name: 'a', version: '1' }, 'p.pkg'), /no "origin"/);
});

test('catalogue entries: pkg field order, sum/pkgsize/path added, file lists dropped, sorted by path', () => {
  const e = catalogueEntry(checkManifest({ ...manifest, files: { '/a': 'x' }, scripts: {} }, 't'), { sum: 'ab', pkgsize: 10 });
  assert.deepEqual(Object.keys(e), ['name', 'origin', 'version', 'comment', 'prefix', 'sum', 'path', 'repopath', 'pkgsize', 'deps']);
  assert.equal(e.repopath, 'All/tmux-3.4_1.pkg');
  const b = catalogueEntry(checkManifest({ ...manifest, name: 'bash', version: '5' }, 't'), { sum: 'cd', pkgsize: 1 });
  assert.deepEqual(sortEntries([e, b]).map((x) => x.name), ['bash', 'tmux']);
  assert.throws(() => sortEntries([e, e]), /two packages are both All\/tmux-3.4_1.pkg/);
  const yaml = packagesiteYaml([b, e]).toString();
  assert.equal(yaml.split('\n').length, 3, 'one line per package and a final newline');
  assert.deepEqual(parsePackagesite(yaml), [b, e]);
  assert.deepEqual(JSON.parse(dataCatalogue([b]).toString()), { groups: [], expired_packages: [], packages: [b] });
});

test('meta.conf declares version 2, the packing format and the catalogue names', () => {
  const m = parseMetaConf(metaConf('tgz'));
  assert.deepEqual(m, { version: 2, packing_format: 'tgz', manifests: 'packagesite.yaml', data: 'data', manifests_archive: 'packagesite', data_archive: 'data' });
});

test('tar members: deterministic bytes, owner 0, fixed mtime; compression sniffed by magic', () => {
  const a = packTar([{ name: 'signature', data: Buffer.from([0, 1, 2]) }, { name: 'data', data: Buffer.from('{}') }], 42);
  assert.deepEqual(a, packTar([{ name: 'signature', data: Buffer.from([0, 1, 2]) }, { name: 'data', data: Buffer.from('{}') }], 42));
  assert.equal(a.length % 512, 0);
  assert.equal(a.toString('latin1', 136, 147), (42).toString(8).padStart(11, '0'));
  assert.deepEqual(unpackTar(a).map((m) => m.name), ['signature', 'data']);
  const bad = Buffer.from(a);
  bad[10] = 0x41;
  assert.throws(() => unpackTar(bad), /bad tar header checksum/);
  assert.equal(sniffCompression(Buffer.from([0x28, 0xb5, 0x2f, 0xfd])), 'zstd');
  assert.equal(sniffCompression(Buffer.from([0x1f, 0x8b, 8])), 'gzip');
  assert.equal(sniffCompression(a), 'none');
});

test('key signing: the message is the hex SHA-256 string; checkSignature tells a wrong key from a tampered catalogue', async () => {
  const k = rsa();
  const other = rsa();
  const cat = Buffer.from('{"name":"tmux"}\n');
  const msg = signedMessage(cat);
  assert.equal(msg, sha(cat));
  const s = await keySigner(k.priv).sign(msg);
  assert.deepEqual(s.pub, k.pub);
  assert.equal(checkSignature(msg, s.signature, k.pub), 'ok');
  assert.equal(checkSignature(msg, Buffer.concat([s.signature, Buffer.from([0])]), k.pub), 'ok', 'the old trailing NUL is tolerated');
  assert.equal(checkSignature(signedMessage(Buffer.from('{"name":"evil"}\n')), s.signature, k.pub), 'tampered');
  assert.equal(checkSignature(msg, s.signature, other.pub), 'wrong-key');
  assert.throws(() => keySigner(Buffer.from(generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ type: 'pkcs8', format: 'pem' }) as string)), /pkg repositories are signed with RSA/);
});

test('catalogue members: signature first, .sig/.pub for fingerprint clients, catalogue last', () => {
  const m = catalogueMembers('packagesite.yaml', Buffer.from('x'), { signature: Buffer.from('S'), pub: Buffer.from('P') });
  assert.deepEqual(m.map((x) => x.name), ['signature', 'packagesite.yaml.sig', 'packagesite.yaml.pub', 'packagesite.yaml']);
});

test('signing_command protocol: parsed as pkg does, binary signatures kept whole', async () => {
  const k = rsa();
  const msg = sha('catalogue');
  const real = (await keySigner(k.priv).sign(msg)).signature;
  // A signature holding newline bytes and the word CERT must survive.
  const tricky = Buffer.concat([Buffer.from('ab\nCERT x\n'), Buffer.from([0, 0x0a, 0xff])]);
  const out = (sig: Buffer) => Buffer.concat([Buffer.from('SIGNATURE\n'), sig, Buffer.from('\nCERT\n'), k.pub, Buffer.from('END\n')]);
  assert.deepEqual(parseSigningOutput(out(tricky)).signature, tricky);
  assert.deepEqual(parseSigningOutput(out(real)).cert, k.pub);
  assert.throws(() => parseSigningOutput(Buffer.from('SIGNATURE\nxx\nCERT\nyy\n')), /no END line/);
  assert.throws(() => parseSigningOutput(Buffer.from('SIGNATURE\nxx\nEND\n')), /no CERT/);
  let stdin = '';
  const signer = commandSigner(async (i) => {
    stdin = i.toString();
    return out(real);
  });
  assert.deepEqual((await signer.sign(msg)).signature, real);
  assert.equal(stdin, msg + '\n', 'the command reads the hex digest and a newline');
  await assert.rejects(commandSigner(async () => out(Buffer.alloc(256, 7))).sign(msg), /does not verify under the CERT it printed/);
});

test('fingerprints: sha256 of the PEM bytes, in the trusted/ file format', () => {
  const k = rsa();
  const fp = keyFingerprint(k.pub);
  assert.equal(fp, sha(k.pub));
  assert.equal(fingerprintFile(fp), `function: "sha256"\nfingerprint: "${fp}"\n`);
  assert.equal(parseFingerprintFile(fingerprintFile(fp)), fp);
  assert.equal(parseFingerprintFile('function = "sha256";\nfingerprint = "' + fp.toUpperCase() + '";'), fp);
  assert.equal(parseFingerprintFile('function: "md5"\nfingerprint: "' + fp + '"'), undefined);
});

test('remote commands: every word quoted for the remote shell', () => {
  assert.equal(shQuote('www/nginx'), 'www/nginx');
  assert.equal(shQuote("a'b; rm -rf /"), `'a'\\''b; rm -rf /'`);
  assert.equal(remoteCommand(['sh', '-c', 'cat -- "$1"', 'sh', '/x y']), `sh -c 'cat -- "$1"' sh '/x y'`);
  assert.equal(shQuote('$(id)'), `'$(id)'`);
});

test('poudriere list outputs and the failed-ports file', () => {
  assert.deepEqual(parseJailList('14_2-amd64 14.2-RELEASE-p1 amd64 http 2026-01-01 10:00:00 /usr/local/poudriere/jails/14_2-amd64\n'), [
    { name: '14_2-amd64', version: '14.2-RELEASE-p1', arch: 'amd64' },
  ]);
  assert.deepEqual(parsePortsList('default git+https 2026-01-01 10:00:00 /usr/local/poudriere/ports/default\n\n'), [
    { name: 'default', method: 'git+https', path: '/usr/local/poudriere/ports/default' },
  ]);
  assert.deepEqual(parseFailedPorts('www/nginx nginx-1.26.2 build build 00:01:02\n'), [{ origin: 'www/nginx', pkgname: 'nginx-1.26.2', phase: 'build' }]);
  assert.deepEqual(parseFailedPorts(''), []);
  assert.equal(masterName('14_2-amd64', 'default'), '14_2-amd64-default');
  assert.equal(masterName('j', 'p', 'server'), 'j-p-server');
  assert.equal(portsMethod('https://git.freebsd.org/ports.git'), 'git+https');
  assert.equal(portsMethod('git@github.com:freebsd/freebsd-ports.git'), 'git+ssh');
});
