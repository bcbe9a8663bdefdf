// Sign/verify an image dir with real keys, real @sigstore code and the real cosign binary.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { cp, mkdir, mkdtemp, readFile, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { createHash } from 'node:crypto';
import { DSSEBundleBuilder, type Signer } from '@sigstore/sign';
import { bundleToJSON } from '@sigstore/bundle';
import { buildStatement, statementBytes, DSSE_PAYLOAD_TYPE } from '../../src/engine/provenance.js';
import {
  keygen,
  resolveSigningKey,
  signImageDir,
  signOptionsFromRef,
  signStatement,
  sshFingerprint,
  SigningError,
} from '../../src/signing/signing.js';
import { hashImageDir, verifyImageDir, VerifyError, type VerifyErrorCode } from '../../src/signing/verify.js';
import { BUNDLE_NAME, MANIFEST_NAME, STATEMENT_NAME, SUMS_NAME, type BuildManifest } from '../../src/engine/manifest-types.js';
import { findOrFetchCosign } from '../helpers/cosign.js';

const run = promisify(execFile);
const sha = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

let root: string;
let keyDir: string;
let pub: string;
let signed: string; // a signed image dir; each case works on its own copy

/** A small but complete image dir: artifacts, manifest, sums, statement. */
async function makeImageDir(dir: string): Promise<void> {
  await mkdir(path.join(dir, 'oci'), { recursive: true });
  const artifacts: Record<string, Buffer> = {
    vmlinuz: Buffer.from('not really a kernel\n'),
    'initrd.img': Buffer.alloc(10000, 7),
    'oci/index.json': Buffer.from('{"schemaVersion":2}\n'),
  };
  for (const [n, b] of Object.entries(artifacts)) await writeFile(path.join(dir, n), b);
  const names = Object.keys(artifacts).sort();
  const manifest: BuildManifest = {
    schema: 'pipeline.build-manifest/v1',
    builder: { id: 'https://pipeline.dev/builder/test', version: '0.1.0' },
    spec: { name: 'test', path: 'pipelines/test.yaml', sha256: sha('spec') },
    variant: 'ipxe',
    arch: 'amd64',
    sourceDateEpoch: 1704067200,
    stages: [{ name: 'ipxe', kind: 'ipxe', version: '1', key: sha('key'), inputs: {}, tools: {}, params: {} }],
    resolved: {
      meta: { rootfs: { suite: 'bookworm', mirror: 'http://deb.debian.org/debian' } },
      packages: [{ name: 'ipxe', version: '1.21.1+git20220113.fbbdc3926-0.1', arch: 'all' }],
      tools: { node: process.version },
    },
    outputs: names.map((n) => ({ path: n, size: artifacts[n]!.length, sha256: sha(artifacts[n]!), fsverity: sha('x'), stage: 'ipxe' })),
    attestation: { statement: STATEMENT_NAME, bundle: BUNDLE_NAME },
  };
  await writeFile(path.join(dir, MANIFEST_NAME), JSON.stringify(manifest, null, 2) + '\n');
  await writeFile(path.join(dir, SUMS_NAME), names.map((n) => `${sha(artifacts[n]!)}  ${n}\n`).join(''));
  const st = buildStatement(manifest, await hashImageDir(dir));
  await writeFile(path.join(dir, STATEMENT_NAME), statementBytes(st));
}

async function copyOf(name: string): Promise<string> {
  const d = path.join(root, name);
  await cp(signed, d, { recursive: true });
  return d;
}

async function expectVerifyError(dir: string, code: VerifyErrorCode, message: RegExp, key = pub): Promise<VerifyError> {
  let caught: unknown;
  try {
    await verifyImageDir(dir, { publicKeyPath: key });
  } catch (e) {
    caught = e;
  }
  assert.ok(caught instanceof VerifyError, `expected VerifyError ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  assert.match(caught.message, message);
  return caught;
}

before(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'pipeline-signing-'));
  keyDir = path.join(root, 'keys');
  await mkdir(keyDir);
  ({ publicKey: pub } = await keygen(keyDir));
  signed = path.join(root, 'signed');
  await mkdir(signed);
  await makeImageDir(signed);
  await signImageDir(signed, { keyPath: path.join(keyDir, 'signing.key') });
});

after(async () => {
  await rm(root, { recursive: true, force: true });
});

test('keygen writes a 0600 PKCS#8 key and an SPKI public key, and never overwrites', async () => {
  const keyPath = path.join(keyDir, 'signing.key');
  assert.equal((await stat(keyPath)).mode & 0o777, 0o600);
  assert.match(await readFile(keyPath, 'utf8'), /^-----BEGIN PRIVATE KEY-----\n/);
  assert.match(await readFile(pub, 'utf8'), /^-----BEGIN PUBLIC KEY-----\n/);
  const before = await readFile(keyPath);
  await assert.rejects(keygen(keyDir), (e: unknown) => e instanceof SigningError && e.code === 'KEY_EXISTS');
  assert.ok(before.equals(await readFile(keyPath)), 'existing key untouched');
});

test('sshFingerprint matches ssh-keygen', async () => {
  const sshPub = path.join(root, 'k.ssh');
  const { stdout } = await run('ssh-keygen', ['-i', '-m', 'PKCS8', '-f', pub]);
  await writeFile(sshPub, stdout);
  const { stdout: fp } = await run('ssh-keygen', ['-l', '-E', 'sha256', '-f', sshPub]);
  assert.equal(fp.split(' ')[1], sshFingerprint(await readFile(pub, 'utf8')));
});

test('signed bundle: DSSE in-toto envelope, keyid = fingerprint, no tlog/timestamps', async () => {
  const b = JSON.parse(await readFile(path.join(signed, BUNDLE_NAME), 'utf8'));
  assert.equal(b.mediaType, 'application/vnd.dev.sigstore.bundle.v0.3+json');
  assert.equal(b.dsseEnvelope.payloadType, DSSE_PAYLOAD_TYPE);
  const fp = sshFingerprint(await readFile(pub, 'utf8'));
  assert.equal(b.dsseEnvelope.signatures[0].keyid, fp);
  assert.equal(b.verificationMaterial.publicKey.hint, fp);
  assert.equal(b.verificationMaterial.tlogEntries, undefined);
  assert.ok(Buffer.from(b.dsseEnvelope.payload, 'base64').equals(await readFile(path.join(signed, STATEMENT_NAME))));
  // No temp files left next to it.
  assert.deepEqual((await hashImageDir(signed)).map((s) => s.name), [SUMS_NAME, MANIFEST_NAME, 'initrd.img', 'oci/index.json', 'vmlinuz']);
});

test('verify ok', async () => {
  const r = await verifyImageDir(signed, { publicKeyPath: pub });
  assert.equal(r.ok, true);
  assert.equal(r.files, 5); // 3 artifacts + manifest + sums
  assert.equal(r.signer, sshFingerprint(await readFile(pub, 'utf8')));
});

test('tampered artifact: names the file and both digests', async () => {
  const d = await copyOf('t-artifact');
  const orig = await readFile(path.join(d, 'vmlinuz'));
  await writeFile(path.join(d, 'vmlinuz'), 'evil kernel\n');
  const e = await expectVerifyError(d, 'TAMPERED_ARTIFACT', /vmlinuz/);
  assert.ok(e.message.includes(sha(orig)) && e.message.includes(sha('evil kernel\n')), e.message);
});

test('tampered artifact in a subdirectory', async () => {
  const d = await copyOf('t-artifact-sub');
  await writeFile(path.join(d, 'oci/index.json'), '{}');
  await expectVerifyError(d, 'TAMPERED_ARTIFACT', /oci\/index\.json/);
});

test('tampered manifest: build-manifest.json', async () => {
  const d = await copyOf('t-manifest');
  const m = JSON.parse(await readFile(path.join(d, MANIFEST_NAME), 'utf8'));
  m.spec.name = 'something-else';
  await writeFile(path.join(d, MANIFEST_NAME), JSON.stringify(m, null, 2) + '\n');
  await expectVerifyError(d, 'TAMPERED_MANIFEST', /build-manifest\.json: manifest modified: signed sha256 [0-9a-f]{64}, file has [0-9a-f]{64}/);
});

test('tampered manifest: SHA256SUMS', async () => {
  const d = await copyOf('t-sums');
  await writeFile(path.join(d, SUMS_NAME), `${sha('evil')}  vmlinuz\n`);
  await expectVerifyError(d, 'TAMPERED_MANIFEST', /SHA256SUMS/);
});

test('tampered statement: provenance.intoto.json differs from the signed payload', async () => {
  const d = await copyOf('t-statement');
  const st = JSON.parse(await readFile(path.join(d, STATEMENT_NAME), 'utf8'));
  st.subject[0].digest.sha256 = sha('whatever');
  await writeFile(path.join(d, STATEMENT_NAME), JSON.stringify(st, null, 2) + '\n');
  await expectVerifyError(d, 'TAMPERED_STATEMENT', /provenance\.intoto\.json differs from the signed statement/);
});

test('tampered payload inside the bundle: bad signature', async () => {
  const d = await copyOf('t-payload');
  const b = JSON.parse(await readFile(path.join(d, BUNDLE_NAME), 'utf8'));
  const st = JSON.parse(Buffer.from(b.dsseEnvelope.payload, 'base64').toString());
  st.predicate.buildDefinition.externalParameters.variant = 'evil';
  const evil = Buffer.from(JSON.stringify(st));
  b.dsseEnvelope.payload = evil.toString('base64');
  await writeFile(path.join(d, BUNDLE_NAME), JSON.stringify(b));
  await writeFile(path.join(d, STATEMENT_NAME), evil); // attacker rewrites both
  await expectVerifyError(d, 'BAD_SIGNATURE', /does not verify/);
});

test('wrong key', async () => {
  const other = path.join(root, 'other-keys');
  await mkdir(other);
  const { publicKey } = await keygen(other);
  const e = await expectVerifyError(signed, 'BAD_SIGNATURE', /wrong key/, publicKey);
  assert.ok(e.message.includes(sshFingerprint(await readFile(publicKey, 'utf8'))), e.message);
});

test('missing signature', async () => {
  const d = await copyOf('t-unsigned');
  await unlink(path.join(d, BUNDLE_NAME));
  await expectVerifyError(d, 'MISSING_SIGNATURE', /not signed: provenance\.sigstore\.json is missing/);
});

test('extra file', async () => {
  const d = await copyOf('t-extra');
  await writeFile(path.join(d, 'backdoor.sh'), '#!/bin/sh\n');
  await expectVerifyError(d, 'EXTRA_FILE', /backdoor\.sh: present .* but not a subject/);
});

test('missing file', async () => {
  const d = await copyOf('t-missing');
  await unlink(path.join(d, 'initrd.img'));
  await expectVerifyError(d, 'MISSING_FILE', /initrd\.img: listed in the signed statement but missing/);
});

test('several problems: the most serious leads, all are listed', async () => {
  const d = await copyOf('t-multi');
  await writeFile(path.join(d, 'extra'), 'x');
  await writeFile(path.join(d, 'vmlinuz'), 'y');
  const e = await expectVerifyError(d, 'TAMPERED_ARTIFACT', /vmlinuz/);
  assert.equal(e.problems.length, 2);
  assert.match(e.problems[1]!, /^extra:/);
});

test('key-signed bundle with a certificate-identity policy is rejected', async () => {
  await assert.rejects(
    verifyImageDir(signed, { publicKeyPath: pub, certificateIdentity: 'me@example.com', certificateIssuer: 'https://x' }),
    (e: unknown) => e instanceof VerifyError && e.code === 'POLICY_MISMATCH',
  );
});

test('resolveSigningKey: --sign > $PIPELINE_SIGNING_KEY > spec', () => {
  const env = { PIPELINE_SIGNING_KEY: '/env/key' };
  assert.deepEqual(resolveSigningKey('/flag/key', '/spec/key', env), { kind: 'file', path: '/flag/key', source: 'flag' });
  assert.deepEqual(resolveSigningKey(undefined, '/spec/key', env), { kind: 'file', path: '/env/key', source: 'env' });
  assert.deepEqual(resolveSigningKey(undefined, 'keys/k', {}, '/specdir'), { kind: 'file', path: '/specdir/keys/k', source: 'spec' });
  assert.deepEqual(resolveSigningKey('keyless', undefined, env), { kind: 'keyless', source: 'flag' });
  assert.equal(resolveSigningKey(undefined, undefined, { PIPELINE_SIGNING_KEY: '' }), undefined);
  const pem = resolveSigningKey(undefined, undefined, { PIPELINE_SIGNING_KEY: '-----BEGIN PRIVATE KEY-----\nabc\n' });
  assert.equal(pem?.kind, 'pem');
});

test('inline PEM from the env signs; a bad PEM is reported without echoing it', async () => {
  const keyPem = await readFile(path.join(keyDir, 'signing.key'), 'utf8');
  const ref = resolveSigningKey(undefined, undefined, { PIPELINE_SIGNING_KEY: keyPem })!;
  const stmt = await readFile(path.join(signed, STATEMENT_NAME));
  const bundle = await signStatement(stmt, signOptionsFromRef(ref));
  assert.equal((bundle as { dsseEnvelope?: unknown }).dsseEnvelope !== undefined, true);
  const secret = '-----BEGIN PRIVATE KEY-----\nSEKRETSEKRET\n-----END PRIVATE KEY-----\n';
  await assert.rejects(signStatement(stmt, { keyPem: secret }), (e: unknown) => {
    assert.ok(e instanceof SigningError && e.code === 'KEY_INVALID');
    assert.doesNotMatch(e.message, /SEKRET/);
    return true;
  });
});

test('signStatement refuses something that is not an in-toto statement', async () => {
  await assert.rejects(
    signStatement(Buffer.from('{"hello":1}'), { keyPath: path.join(keyDir, 'signing.key') }),
    (e: unknown) => e instanceof SigningError && e.code === 'INVALID_STATEMENT',
  );
});

// --- keyless ---------------------------------------------------------------------------
// Real keyless signing needs an OIDC token and network access to Fulcio and Rekor, neither of
// which exists here. These tests drive the real FulcioSigner up to its HTTP request, against a
// local stub on 127.0.0.1 that records the request and refuses it.

function fakeJwt(claims: Record<string, unknown>): string {
  const b64 = (o: unknown) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64({ alg: 'none' })}.${b64(claims)}.`;
}

async function withStubFulcio<T>(fn: (url: string, seen: { method: string; url: string; body: string }[]) => Promise<T>): Promise<T> {
  const seen: { method: string; url: string; body: string }[] = [];
  const server = createServer(async (req: IncomingMessage, res) => {
    let body = '';
    for await (const c of req) body += c;
    seen.push({ method: req.method!, url: req.url!, body });
    res.writeHead(400, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ code: 400, message: 'stub fulcio: no certificates here' }));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  try {
    return await fn(`http://127.0.0.1:${(server.address() as AddressInfo).port}`, seen);
  } finally {
    server.close();
  }
}

test('keyless without an OIDC token fails before any network access', async () => {
  const stmt = await readFile(path.join(signed, STATEMENT_NAME));
  await assert.rejects(
    signStatement(stmt, { keyless: true, env: {}, fulcioURL: 'http://127.0.0.1:9' }),
    (e: unknown) => e instanceof SigningError && e.code === 'NO_OIDC_TOKEN' && /SIGSTORE_ID_TOKEN/.test(e.message),
  );
});

test('keyless: injected identity provider is consulted and Fulcio is asked for a certificate', async () => {
  const stmt = await readFile(path.join(signed, STATEMENT_NAME));
  const token = fakeJwt({ sub: 'repo:example/pipeline:ref:refs/heads/main', iss: 'https://token.example' });
  let calls = 0;
  await withStubFulcio(async (url, seen) => {
    await assert.rejects(
      signStatement(stmt, {
        keyless: true,
        identityProvider: { getToken: async () => (calls++, token) },
        fulcioURL: url,
        rekorURL: 'http://127.0.0.1:9',
        retry: 0,
      }),
      (e: unknown) => {
        assert.ok(e instanceof SigningError, String(e));
        assert.equal(e.code, 'SIGN_FAILED');
        assert.match(e.message, /keyless signing failed \(Fulcio http:\/\/127\.0\.0\.1:\d+/);
        assert.match(e.message, /CA_CREATE_SIGNING_CERTIFICATE_ERROR/);
        return true;
      },
    );
    assert.equal(calls, 1);
    assert.equal(seen.length, 1);
    assert.equal(seen[0]!.method, 'POST');
    assert.equal(seen[0]!.url, '/api/v2/signingCert');
    const body = JSON.parse(seen[0]!.body);
    assert.equal(body.credentials.oidcIdentityToken, token);
    assert.match(body.publicKeyRequest.publicKey.content, /BEGIN PUBLIC KEY/);
    assert.ok(body.publicKeyRequest.proofOfPossession.length > 0);
  });
});

test('keyless: default CIContextProvider reads SIGSTORE_ID_TOKEN', async () => {
  const stmt = await readFile(path.join(signed, STATEMENT_NAME));
  const token = fakeJwt({ sub: 'ci@example.com', email: 'ci@example.com', email_verified: true });
  const saved = process.env.SIGSTORE_ID_TOKEN;
  process.env.SIGSTORE_ID_TOKEN = token;
  try {
    await withStubFulcio(async (url, seen) => {
      await assert.rejects(
        signStatement(stmt, { keyless: true, fulcioURL: url, rekorURL: 'http://127.0.0.1:9', retry: 0 }),
        (e: unknown) => e instanceof SigningError && e.code === 'SIGN_FAILED',
      );
      assert.equal(seen.length, 1);
      assert.equal(JSON.parse(seen[0]!.body).credentials.oidcIdentityToken, token);
    });
  } finally {
    if (saved === undefined) delete process.env.SIGSTORE_ID_TOKEN;
    else process.env.SIGSTORE_ID_TOKEN = saved;
  }
});

test('keyless bundle cannot be verified offline without a trusted root; says why', async () => {
  // A Fulcio-shaped certificate made with openssl, used through the same DSSE bundle builder.
  const d = await copyOf('t-keyless');
  const k = path.join(root, 'leaf.key');
  const c = path.join(root, 'leaf.pem');
  await run('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', k, '-out', c, '-days', '1', '-subj', '/O=sigstore.dev',
    '-addext', 'subjectAltName=URI:https://github.com/example/pipeline/.github/workflows/ci.yml@refs/heads/main',
    '-addext', '1.3.6.1.4.1.57264.1.8=ASN1:UTF8String:https://token.actions.githubusercontent.com',
  ]);
  const { createPrivateKey, sign } = await import('node:crypto');
  const priv = createPrivateKey(await readFile(k));
  const certPem = await readFile(c, 'utf8');
  const signer: Signer = {
    sign: async (data) => ({ signature: sign('sha256', data, priv), key: { $case: 'x509Certificate', certificate: certPem } }),
  };
  const bundle = await new DSSEBundleBuilder({ signer, witnesses: [] }).create({
    data: await readFile(path.join(d, STATEMENT_NAME)),
    type: DSSE_PAYLOAD_TYPE,
  });
  await writeFile(path.join(d, BUNDLE_NAME), JSON.stringify(bundleToJSON(bundle)));
  await assert.rejects(
    verifyImageDir(d, {
      certificateIdentity: 'https://github.com/example/pipeline/.github/workflows/ci.yml@refs/heads/main',
      certificateIssuer: 'https://token.actions.githubusercontent.com',
    }),
    (e: unknown) => {
      assert.ok(e instanceof VerifyError);
      assert.equal(e.code, 'KEYLESS_NEEDS_TRUSTED_ROOT');
      assert.match(e.message, /ci\.yml@refs\/heads\/main/);
      assert.match(e.message, /issuer https:\/\/token\.actions\.githubusercontent\.com/);
      return true;
    },
  );
});

// --- cosign ----------------------------------------------------------------------------

test('cosign verify-blob-attestation accepts the bundle (and rejects a wrong key / non-subject)', async (t) => {
  const cosign = await findOrFetchCosign();
  t.diagnostic(`cosign: ${cosign.path} (${cosign.origin})`);
  // cosign's bundle path wants a trusted root and otherwise tries a TUF refresh over the
  // network; an empty one is enough for key-based verification with --insecure-ignore-tlog.
  const trustedRoot = path.join(root, 'empty-trusted-root.json');
  await writeFile(trustedRoot, JSON.stringify({ mediaType: 'application/vnd.dev.sigstore.trustedroot+json;version=0.1' }));
  const home = path.join(root, 'cosign-home'); // cosign writes ~/.sigstore
  await mkdir(home);
  const verify = (key: string, blob: string) =>
    run(
      cosign.path,
      [
        'verify-blob-attestation',
        '--key', key,
        '--insecure-ignore-tlog',
        '--new-bundle-format',
        '--trusted-root', trustedRoot,
        '--bundle', path.join(signed, BUNDLE_NAME),
        '--type', 'slsaprovenance1',
        blob,
      ],
      { env: { PATH: process.env.PATH, HOME: home }, timeout: 120_000 },
    );
  for (const subject of ['vmlinuz', 'oci/index.json', MANIFEST_NAME]) {
    const { stderr } = await verify(pub, path.join(signed, subject));
    assert.match(stderr, /Verified OK/, `${subject}: ${stderr}`);
  }
  const other = path.join(root, 'cosign-other-key');
  await mkdir(other);
  const { publicKey: wrong } = await keygen(other);
  await assert.rejects(verify(wrong, path.join(signed, 'vmlinuz')), /accepted signatures do not match threshold/);
  const notSubject = path.join(root, 'not-a-subject');
  await writeFile(notSubject, 'x');
  await assert.rejects(verify(pub, notSubject), /does not match any digest in statement/);
});
