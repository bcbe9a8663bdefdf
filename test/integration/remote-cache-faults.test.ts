// The remote cache against a real registry (Debian's docker-registry on
// 127.0.0.1), with small test-only kinds (fixtures/remote-cache) so every fault
// case is seconds: CI "jobs" are separate CLI processes with their own local
// caches and output dirs. Covers sharing, poisoned and mislabelled entries, a
// push killed half-way, an unreachable and a silent registry, read-only mode,
// signed entries, and `pipeline matrix --affected`.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { hashImageDir } from '../../src/signing/verify.js';
import { BIN, cli, ROOT, type CliResult } from '../helpers/cli.js';
import { freePort, startRegistry, type RegistryServer } from '../helpers/registry-server.js';

const SPEC = path.join(ROOT, 'fixtures', 'remote-cache', 'spec.yaml');
const KINDS = path.join(ROOT, 'fixtures', 'remote-cache', 'kinds');
const REPO = 'pipeline/cache';
const work = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-remote-cache-'));
const registries: RegistryServer[] = [];
after(async () => {
  await Promise.all(registries.map((r) => r.stop()));
  await fs.rm(work, { recursive: true, force: true });
});

async function registry(): Promise<{ reg: RegistryServer; url: string }> {
  const reg = await startRegistry();
  registries.push(reg);
  return { reg, url: `oci://${reg.host}/${REPO}` };
}

interface Summary {
  ok: boolean;
  executed: string[];
  cached: string[];
  pulled: string[];
  stages: { name: string; status: string }[];
  remoteCache?: { bytesDown: number; bytesUp: number; pushed: { stage: string }[]; rejected: { stage: string; reason: string }[]; pushFailed: unknown[]; unavailable?: string };
}

interface Job {
  r: CliResult;
  s: Summary;
  out: string;
  cache: string;
  warnings: string[];
}

let jobs = 0;
/** One CI job: a fresh local cache and output dir (unless `cache` reuses one), the CLI in its own process. */
async function job(args: string[], o: { remote?: string; cache?: string; env?: Record<string, string>; extra?: string[] } = {}): Promise<Job> {
  const dir = path.join(work, `job${++jobs}`);
  const cache = o.cache ?? path.join(dir, 'cache');
  const out = path.join(dir, 'images');
  const r = await cli(['build', ...args, '-f', SPEC, '--out', out, '--json', ...(o.remote ? ['--remote-cache', o.remote] : []), ...(o.extra ?? [])], {
    env: { PIPELINE_CACHE_DIR: cache, PIPELINE_KINDS_PATH: KINDS, ...o.env },
    timeoutMs: 5 * 60 * 1000,
  });
  const s = r.events.find((e) => e.event === 'summary') as unknown as Summary | undefined;
  assert.ok(s, `no summary; exit ${r.code}\n${r.stderr}`);
  return { r, s, out, cache, warnings: r.stderr.split('\n').filter((l) => l.startsWith('warning:')) };
}

const published = async (j: Job, variant: string) => hashImageDir(path.join(j.out, variant, 'amd64'));

async function tags(reg: RegistryServer): Promise<string[]> {
  const res = await fetch(`${reg.url}/v2/${REPO}/tags/list`);
  if (res.status === 404) return [];
  return ((await res.json()) as { tags: string[] | null }).tags ?? [];
}

const keyOf = (j: Job, stage: string) => (j.r.events.find((e) => e.event === 'stage-done' && e.stage === stage) as { key: string }).key;

/** A purely local build of a variant (no remote cache), the reference bytes. */
const reference = new Map<string, Promise<Job>>();
function localBuild(variant: string): Promise<Job> {
  if (!reference.has(variant)) reference.set(variant, job(['amd64', variant]));
  return reference.get(variant)!;
}

test('job 2 pulls the shared stage job 1 pushed, builds only its own, and publishes the bytes of a local build', async () => {
  const { reg, url } = await registry();
  const j1 = await job(['amd64', 'one'], { remote: url });
  assert.equal(j1.r.code, 0, j1.r.stderr);
  assert.deepEqual(j1.s.executed.sort(), ['base', 'one']);
  assert.deepEqual(j1.warnings, []);
  assert.deepEqual(j1.s.remoteCache!.pushed.map((p) => p.stage).sort(), ['base', 'one']);
  assert.deepEqual((await tags(reg)).sort(), [`cache-${keyOf(j1, 'base')}`, `cache-${keyOf(j1, 'one')}`].sort());

  const j2 = await job(['amd64', 'two'], { remote: url });
  assert.equal(j2.r.code, 0, j2.r.stderr);
  assert.deepEqual(j2.s.pulled, ['base'], 'the shared stage comes from the registry');
  assert.deepEqual(j2.s.executed, ['two'], 'only its own stage runs');
  assert.equal(j2.s.stages.find((x) => x.name === 'base')!.status, 'pulled');
  assert.deepEqual(j2.warnings, []);
  const local = await localBuild('two');
  assert.deepEqual(await published(j2, 'two'), await published(local, 'two'));
  // Bytes moved: the pulled blob (24 MiB) and its record; pushed: only `two`'s small files.
  assert.ok(j2.s.remoteCache!.bytesDown >= 24 * 1024 * 1024 && j2.s.remoteCache!.bytesDown < 25 * 1024 * 1024, String(j2.s.remoteCache!.bytesDown));
  assert.ok(j2.s.remoteCache!.bytesUp < 64 * 1024, String(j2.s.remoteCache!.bytesUp));

  // A job whose final stage is in the registry pulls only that: nothing upstream is pulled or run.
  const j3 = await job(['amd64', 'one'], { remote: url });
  assert.deepEqual(j3.s.pulled, ['one']);
  assert.deepEqual(j3.s.executed, []);
  assert.equal(j3.s.stages.find((x) => x.name === 'base')!.status, 'unused');
  assert.deepEqual(await published(j3, 'one'), await published(j1, 'one'));
  const mode = (await fs.stat(path.join(j3.out, 'one', 'amd64', 'run.sh'))).mode & 0o777;
  assert.equal(mode & 0o111, 0o111, 'the executable bit travels with the entry');

  // `matrix --affected` drops exactly the entries whose outputs are all in the registry (one and two on amd64).
  const m = await cli(['matrix', '-f', SPEC, '--affected', '--remote-cache', url], { env: { PIPELINE_KINDS_PATH: KINDS } });
  assert.equal(m.code, 0, m.stderr);
  const include = (JSON.parse(m.stdout) as { include: { id: string; shares: string[] }[] }).include;
  assert.deepEqual(include.map((e) => e.id).sort(), ['one-arm64', 'two-arm64']);
  assert.deepEqual(include[0]!.shares, ['base']);
  assert.match(m.stderr, /dropped: one-amd64, two-amd64/);
  const all = await cli(['matrix', '-f', SPEC], { env: { PIPELINE_KINDS_PATH: KINDS } });
  assert.equal((JSON.parse(all.stdout) as { include: unknown[] }).include.length, 4);
});

test('a poisoned blob in the registry is rejected with one warning, rebuilt, and never published', async () => {
  const { reg, url } = await registry();
  const j1 = await job(['amd64', 'one'], { remote: url });
  assert.equal(j1.r.code, 0, j1.r.stderr);
  // Overwrite the stored base blob with other bytes of the same length.
  const cacheDir = j1.cache;
  const rec = JSON.parse(await fs.readFile(path.join(cacheDir, 'entries', `${keyOf(j1, 'base')}.json`), 'utf8')) as { files: { sha256: string; size: number }[] };
  const sha = rec.files[0]!.sha256;
  const data = path.join(reg.storage, 'docker', 'registry', 'v2', 'blobs', 'sha256', sha.slice(0, 2), sha, 'data');
  const st = await fs.stat(data);
  assert.equal(st.size, rec.files[0]!.size);
  await fs.writeFile(data, Buffer.alloc(st.size, 0x5a));

  const j2 = await job(['amd64', 'two'], { remote: url });
  assert.equal(j2.r.code, 0, j2.r.stderr);
  assert.equal(j2.warnings.length, 1, j2.r.stderr);
  assert.match(j2.warnings[0]!, /stage base .*rejected: .*arrived as sha256:/);
  assert.deepEqual(j2.s.pulled, []);
  assert.deepEqual(j2.s.executed.sort(), ['base', 'two']);
  assert.deepEqual(j2.s.remoteCache!.rejected.map((x) => x.stage), ['base']);
  assert.deepEqual(await published(j2, 'two'), await published(await localBuild('two'), 'two'));
  // Nothing of the bad bytes stayed in the job's local cache either.
  const verify = await cli(['cache', 'verify'], { env: { PIPELINE_CACHE_DIR: j2.cache } });
  assert.equal(verify.code, 0, verify.stdout);
});

test('a manifest re-tagged under another key is rejected: the record must name the key', async () => {
  const { reg, url } = await registry();
  const j1 = await job(['amd64', 'one'], { remote: url });
  const local = await localBuild('two');
  const keyTwo = keyOf(local, 'two');
  // Put `one`'s manifest under `two`'s tag (a registry mix-up, or an attacker with push rights).
  const res = await fetch(`${reg.url}/v2/${REPO}/manifests/cache-${keyOf(j1, 'one')}`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } });
  const body = Buffer.from(await res.arrayBuffer());
  const put = await fetch(`${reg.url}/v2/${REPO}/manifests/cache-${keyTwo}`, { method: 'PUT', headers: { 'content-type': 'application/vnd.oci.image.manifest.v1+json' }, body });
  assert.equal(put.status, 201);
  const j2 = await job(['amd64', 'two'], { remote: url });
  assert.equal(j2.r.code, 0, j2.r.stderr);
  assert.equal(j2.warnings.length, 1, j2.r.stderr);
  assert.match(j2.warnings[0]!, /stage two .*rejected: record: its key field does not match/);
  assert.deepEqual(j2.s.pulled, ['base'], 'the good entry upstream is still used');
  assert.deepEqual(j2.s.executed, ['two']);
  assert.deepEqual(await published(j2, 'two'), await published(local, 'two'));
});

test('killed mid-push: no tag names the partial entry; the next push completes it', async () => {
  const { reg, url } = await registry();
  const dir = path.join(work, 'killed');
  const cache = path.join(dir, 'cache');
  const spec = path.join(dir, 'spec.yaml');
  await fs.mkdir(dir, { recursive: true });
  // A bigger base (many 1 MiB chunks), so the kill lands while its blob is uploading.
  await fs.writeFile(spec, (await fs.readFile(SPEC, 'utf8')).replace('size_mib: 24', 'size_mib: 96'));
  const child = spawn(process.execPath, [BIN, 'build', 'amd64', 'one', '-f', spec, '--out', path.join(dir, 'images'), '--json', '--remote-cache', url], {
    env: { ...process.env, PIPELINE_CACHE_DIR: cache, PIPELINE_KINDS_PATH: KINDS, PIPELINE_REMOTE_CACHE_CHUNK_SIZE: String(1024 * 1024) },
    stdio: 'ignore',
  });
  const exited = new Promise((r) => child.once('exit', r));
  const uploads = path.join(reg.storage, 'docker', 'registry', 'v2', 'repositories', REPO, '_uploads');
  const deadline = Date.now() + 120_000;
  // Wait until an upload has bytes in it (a chunk was accepted), then kill -9.
  for (;;) {
    const ups = await fs.readdir(uploads).catch(() => [] as string[]);
    const sizes = await Promise.all(ups.map((u) => fs.stat(path.join(uploads, u, 'data')).then((s) => s.size, () => 0)));
    if (sizes.some((s) => s >= 2 * 1024 * 1024)) break;
    assert.ok(Date.now() < deadline, 'the push never started');
    await new Promise((r) => setTimeout(r, 20));
  }
  child.kill('SIGKILL');
  await exited;
  const t = await tags(reg);
  const baseKey = JSON.parse((await cli(['plan', 'amd64', 'one', '-f', spec, '--json'], { env: { PIPELINE_KINDS_PATH: KINDS } })).stdout).stages.find((s: { name: string }) => s.name === 'base').key as string;
  assert.ok(!t.includes(`cache-${baseKey}`), `a tag for the partial entry: ${t.join(', ')}`);

  // The local cache kept the committed stage; an explicit push completes the entry.
  const p = await cli(['cache', 'push', url, 'amd64', 'one', '-f', spec, '--json'], { env: { PIPELINE_CACHE_DIR: cache, PIPELINE_KINDS_PATH: KINDS } });
  assert.equal(p.code, 0, p.stderr);
  assert.ok((await tags(reg)).includes(`cache-${baseKey}`), p.stdout + p.stderr);
  const pull = await cli(['cache', 'pull', url, 'amd64', 'one', '-f', spec, '--json'], { env: { PIPELINE_CACHE_DIR: path.join(dir, 'fresh'), PIPELINE_KINDS_PATH: KINDS } });
  assert.equal(pull.code, 0, pull.stderr);
  assert.ok((JSON.parse(pull.stdout) as { stages: string[] }).stages.includes('base'), pull.stdout + pull.stderr);
});

test('an unreachable registry: the build succeeds from scratch with one warning', async () => {
  const port = await freePort();
  const j = await job(['amd64', 'one'], { remote: `oci://127.0.0.1:${port}/${REPO}` });
  assert.equal(j.r.code, 0, j.r.stderr);
  assert.deepEqual(j.s.executed.sort(), ['base', 'one']);
  assert.equal(j.warnings.length, 1, j.r.stderr);
  assert.match(j.warnings[0]!, /remote cache 127\.0\.0\.1:\d+\/pipeline\/cache is not usable .*unreachable.*built locally/);
  assert.deepEqual(await published(j, 'one'), await published(await localBuild('one'), 'one'));
});

test('a registry that accepts connections and never answers: bounded wait, one warning, local build', async () => {
  const sockets = new Set<Socket>();
  const silent = createServer((s) => sockets.add(s));
  await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
  const port = (silent.address() as { port: number }).port;
  try {
    const t0 = Date.now();
    const j = await job(['amd64', 'one'], { remote: `oci://127.0.0.1:${port}/${REPO}`, env: { PIPELINE_REMOTE_CACHE_TIMEOUT: '1' } });
    assert.equal(j.r.code, 0, j.r.stderr);
    assert.equal(j.warnings.length, 1, j.r.stderr);
    assert.match(j.warnings[0]!, /no answer within 1000 ms/);
    assert.ok(Date.now() - t0 < 60_000);
  } finally {
    for (const s of sockets) s.destroy();
    silent.close();
  }
});

test('read-only mode pulls but never pushes', async () => {
  const { reg, url } = await registry();
  const j = await job(['amd64', 'one'], { remote: url, extra: ['--remote-cache-mode', 'read'] });
  assert.equal(j.r.code, 0, j.r.stderr);
  assert.deepEqual(await tags(reg), []);
  assert.deepEqual(j.warnings, []);
  await job(['amd64', 'one'], { remote: url });
  const r = await job(['amd64', 'two'], { remote: url, env: { PIPELINE_REMOTE_CACHE_MODE: 'read' } });
  assert.deepEqual(r.s.pulled, ['base']);
  assert.equal((await tags(reg)).length, 2, 'two was built but not pushed');
});

test('signed entries: with --remote-cache-verify-key only entries signed by that key are used', async () => {
  const { url } = await registry();
  const keys = path.join(work, 'keys');
  const other = path.join(work, 'other-keys');
  assert.equal((await cli(['keygen', '--out', keys])).code, 0);
  assert.equal((await cli(['keygen', '--out', other])).code, 0);
  const j1 = await job(['amd64', 'one'], { remote: url, extra: ['--sign', path.join(keys, 'signing.key')] });
  assert.equal(j1.r.code, 0, j1.r.stderr);
  const ok = await job(['amd64', 'two'], { remote: url, extra: ['--remote-cache-verify-key', path.join(keys, 'signing.pub')], env: { PIPELINE_REMOTE_CACHE_MODE: 'read' } });
  assert.equal(ok.r.code, 0, ok.r.stderr);
  assert.deepEqual(ok.s.pulled, ['base'], ok.r.stderr);
  assert.deepEqual(ok.warnings, []);
  const wrong = await job(['amd64', 'two'], { remote: url, extra: ['--remote-cache-verify-key', path.join(other, 'signing.pub')], env: { PIPELINE_REMOTE_CACHE_MODE: 'read' } });
  assert.equal(wrong.r.code, 0, wrong.r.stderr);
  assert.deepEqual(wrong.s.pulled, []);
  assert.deepEqual(wrong.s.executed.sort(), ['base', 'two']);
  assert.equal(wrong.warnings.length, 1, wrong.r.stderr);
  assert.match(wrong.warnings[0]!, /stage base .*rejected: .*does not verify/);
  // Unsigned entries are ignored under a verify key.
  const { url: url2 } = await registry();
  await job(['amd64', 'one'], { remote: url2 });
  const unsigned = await job(['amd64', 'two'], { remote: url2, extra: ['--remote-cache-verify-key', path.join(keys, 'signing.pub')], env: { PIPELINE_REMOTE_CACHE_MODE: 'read' } });
  assert.deepEqual(unsigned.s.pulled, []);
  assert.match(unsigned.warnings.join('\n'), /not signed/);
});
