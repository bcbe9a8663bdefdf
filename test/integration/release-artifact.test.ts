// src/registry/artifact.ts against Debian's docker-registry (with a bearer token
// service, as real registries have): chunked uploads, blobs the registry has are
// skipped, the tag is written last, and a pull checks every blob; oras reads what
// was pushed.
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { after, before, test } from 'node:test';
import { pullArtifact, pushArtifact, resolveTag } from '../../src/registry/artifact.js';
import { RegistryAuthError } from '../../src/registry/registry.js';
import { findOrFetchOras } from '../helpers/oras.js';
import { startRegistry, type RegistryServer } from '../helpers/registry-server.js';

const run = promisify(execFile);
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const creds = { username: 'ci', password: randomBytes(12).toString('hex') };
const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-artifact-'));
let registry: RegistryServer;
const big = randomBytes(300 * 1024 + 17);
const small = Buffer.from('hello\n');

before(async () => {
  registry = await startRegistry({ auth: { ...creds, mode: 'token' } });
  await fs.mkdir(path.join(work, 'src', 'sub'), { recursive: true });
  await fs.writeFile(path.join(work, 'src', 'big.bin'), big);
  await fs.writeFile(path.join(work, 'src', 'sub', 'small.txt'), small);
});
after(async () => {
  await registry?.stop();
  await fs.rm(work, { recursive: true, force: true });
});

const files = () => [
  { path: path.join(work, 'src', 'big.bin'), name: 'big.bin' },
  { path: path.join(work, 'src', 'sub', 'small.txt'), name: 'sub/small.txt', mediaType: 'text/plain', sha256: sha(small), size: small.length },
];

test('push in chunks, re-push skips every blob and leaves the tag, pull verifies, oras reads it', async (t) => {
  const ref = `${registry.host}/cache/entry:k1`;
  const env = { PIPELINE_REGISTRY_USER: creds.username, PIPELINE_REGISTRY_PASSWORD: creds.password };
  Object.assign(process.env, env);
  try {
    const logs: string[] = [];
    const r1 = await pushArtifact(ref, files(), { artifactType: 'application/vnd.pipeline.test.v1', chunkSize: 64 * 1024, annotations: { k: 'v' }, log: (l) => logs.push(l) });
    assert.equal(r1.tagged, true);
    assert.equal(r1.pushed.length, 3); // empty config + two files
    assert.ok(logs.some((l) => l.includes(`${big.length}/${big.length} bytes`)), 'big blob went up in chunks');
    const r2 = await pushArtifact(ref, files(), { artifactType: 'application/vnd.pipeline.test.v1', chunkSize: 64 * 1024, annotations: { k: 'v' } });
    assert.deepEqual({ pushed: r2.pushed, tagged: r2.tagged, digest: r2.digest }, { pushed: [], tagged: false, digest: r1.digest });
    assert.equal((await resolveTag(ref))?.digest, r1.digest);
    assert.equal(await resolveTag(`${registry.host}/cache/entry:absent`), undefined);

    const dest = path.join(work, 'pulled');
    const p = await pullArtifact(ref, dest, { expectDigest: r1.digest });
    assert.deepEqual(p.files.map((f) => f.name), ['big.bin', 'sub/small.txt']);
    assert.ok((await fs.readFile(path.join(dest, 'big.bin'))).equals(big));
    assert.equal(p.manifest.json.artifactType, 'application/vnd.pipeline.test.v1');

    const oras = await findOrFetchOras();
    const od = path.join(work, 'oras');
    await run(oras.path, ['pull', '--plain-http', '-u', creds.username, '-p', creds.password, '-o', od, ref], { env: { ...process.env, HOME: work } });
    assert.equal(sha(await fs.readFile(path.join(od, 'big.bin'))), sha(big));
    assert.equal(sha(await fs.readFile(path.join(od, 'sub', 'small.txt'))), sha(small));
    t.diagnostic(`oras ${oras.origin}`);

    // A file whose bytes do not match the sha256 given for it is refused before the tag moves.
    const lying = [{ ...files()[1]!, sha256: sha(Buffer.from('other')) }];
    await assert.rejects(pushArtifact(`${registry.host}/cache/entry:k2`, lying, { artifactType: 'application/x' }), /hashes to/);
    assert.equal(await resolveTag(`${registry.host}/cache/entry:k2`), undefined);
  } finally {
    for (const k of Object.keys(env)) delete process.env[k];
  }
});

test('without credentials the registry refuses, with a clear error and no secret in it', async () => {
  const saved = process.env.DOCKER_CONFIG;
  process.env.DOCKER_CONFIG = path.join(work, 'no-docker-config'); // no config.json there
  try {
    await assert.rejects(
      pushArtifact(`${registry.host}/cache/entry:k3`, files(), { artifactType: 'application/x', timeoutMs: 5000 }),
      (e: Error) => e instanceof RegistryAuthError && /requires credentials/.test(e.message) && !e.message.includes(creds.password),
    );
  } finally {
    if (saved === undefined) delete process.env.DOCKER_CONFIG;
    else process.env.DOCKER_CONFIG = saved;
  }
});

test('a registry that does not answer fails within the bound', async () => {
  // A listening socket that never replies.
  const net = await import('node:net');
  const server = net.createServer(() => {});
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  const t0 = Date.now();
  try {
    await assert.rejects(pushArtifact(`127.0.0.1:${port}/x/y:z`, files(), { artifactType: 'application/x', timeoutMs: 500 }), /unreachable \(no answer within 500 ms\)/);
    assert.ok(Date.now() - t0 < 5000);
  } finally {
    server.close();
  }
});
