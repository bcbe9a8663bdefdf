// The real CLI (bin/pipeline.js -> dist/, run `npx tsc -p tsconfig.json` first) with
// the fixture kinds: kill -9 of pipeline leaves no stage process behind
// (fixtures/kinds/sleep-tree.mjs), and stages see a minimal environment, never the
// secrets in ours (fixtures/kinds/env-dump.mjs). Fast: no Debian build.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { generateKeyPairSync, randomInt } from 'node:crypto';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { BIN, cli, ROOT } from '../helpers/cli.js';
import { isolation } from '../../src/engine/process.js';
import { processesWith } from '../helpers/processes.js';

const KINDS = path.join(ROOT, 'fixtures', 'kinds');

async function waitFor(cond: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`condition not met within ${ms} ms`);
}

test('kill -9 of pipeline kills every process of a running stage', { timeout: 60_000 }, async (t) => {
  if (!(await isolation())) return t.skip('no PID namespaces here (needs root, setpriv and unshare)');
  const dir = await mkdtemp(path.join(tmpdir(), 'pipeline-kill9-'));
  const seconds = `300.${randomInt(100000, 999999)}`;
  try {
    const spec = path.join(dir, 'spec.yaml');
    await writeFile(spec, ['name: kill9', 'arches: [amd64, arm64]', 'source_date_epoch: 1704067200', 'stages:', '  hold:', '    kind: sleep-tree', `    with: { seconds: "${seconds}" }`, 'variants:', '  hold: [hold]', ''].join('\n'));
    const child = spawn(process.execPath, [BIN, 'build', 'amd64', 'hold', '-f', spec, '--out', path.join(dir, 'images'), '--cache-dir', path.join(dir, 'cache'), '--json'], {
      cwd: ROOT,
      env: { ...process.env, PIPELINE_KINDS_PATH: KINDS },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    const exited = new Promise<NodeJS.Signals | null>((r) => child.on('exit', (_c, sig) => r(sig)));
    // The shell, its three sleeps (one in its own session) and the namespace wrapper.
    await waitFor(() => processesWith(`sleep ${seconds}`).length === 3, 30_000).catch((e) => {
      throw new Error(`${e.message}; CLI output:\n${out}`);
    });
    const before = processesWith(seconds);
    assert.equal(before.length, 5, before.join('\n'));
    const t0 = Date.now();
    child.kill('SIGKILL');
    assert.equal(await exited, 'SIGKILL');
    await waitFor(() => processesWith(seconds).length === 0, 3000).catch(() => {
      assert.fail(`still running ${Date.now() - t0} ms after kill -9 of pipeline:\n${processesWith(seconds).join('\n')}`);
    });
    t.diagnostic(`before kill -9: ${before.length} processes of the stage; ${Date.now() - t0} ms later: none`);
  } finally {
    // Never leave sleeps behind, whatever the assertions said.
    for (const l of processesWith(seconds)) {
      try {
        process.kill(Number(l.split(':')[0]), 'SIGKILL');
      } catch {
        // gone
      }
    }
    await rm(dir, { recursive: true, force: true });
  }
});

test('stages get a minimal environment: no secrets in the artifact, the stage log or the output', { timeout: 120_000 }, async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'pipeline-envdump-'));
  try {
    const spec = path.join(dir, 'spec.yaml');
    await writeFile(spec, ['name: envdump', 'arches: [amd64, arm64]', 'source_date_epoch: 1704067200', 'stages:', '  dump:', '    kind: env-dump', 'variants:', '  dump: [dump]', ''].join('\n'));
    // A real signing key (the build signs with it), plus secrets of every common shape.
    const pem = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();
    const secrets: Record<string, string> = {
      PIPELINE_SIGNING_KEY: pem,
      PIPELINE_REGISTRY_PASSWORD: 'registry-password-0f3a9c',
      GITHUB_TOKEN: 'ghp_token_7d1e22b4',
      AWS_SECRET_ACCESS_KEY: 'aws-secret-5c8e19aa',
    };
    const tmp = await mkdtemp(path.join(tmpdir(), 'pipeline-envdump-tmp-'));
    const allowed = { http_proxy: 'http://proxy.invalid:3128', ENV_DUMP_EXTRA: 'declared-by-the-kind', TMPDIR: tmp };
    const cache = path.join(dir, 'cache');
    const r = await cli(['build', 'amd64', 'dump', '-f', spec, '--out', path.join(dir, 'images'), '--cache-dir', cache, '--json'], {
      env: { PIPELINE_KINDS_PATH: KINDS, ...secrets, ...allowed, UNRELATED_HOST_VAR: 'x', HOME: '/root' },
    });
    await rm(tmp, { recursive: true, force: true });
    assert.equal(r.code, 0, r.stderr);

    const dumped = await readFile(path.join(dir, 'images', 'dump', 'amd64', 'env.txt'), 'utf8');
    const env = Object.fromEntries(
      dumped
        .split('\0')
        .filter(Boolean)
        .map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]),
    );
    // Exactly the allow-list: nothing else from our environment got through.
    assert.deepEqual(Object.keys(env).sort(), ['ENV_DUMP_EXTRA', 'HOME', 'LC_ALL', 'PATH', 'SOURCE_DATE_EPOCH', 'TMPDIR', 'TZ', 'http_proxy'].sort());
    assert.equal(env.LC_ALL, 'C.UTF-8');
    assert.equal(env.TZ, 'UTC');
    assert.equal(env.SOURCE_DATE_EPOCH, '1704067200');
    assert.equal(env.http_proxy, allowed.http_proxy);
    assert.equal(env.ENV_DUMP_EXTRA, allowed.ENV_DUMP_EXTRA);
    assert.equal(env.TMPDIR, tmp);
    assert.notEqual(env.HOME, '/root', "HOME is the stage's scratch dir, not ours");
    assert.ok(!env.PATH!.split(':').some((d) => !d.startsWith('/')), env.PATH);

    const log = await readFile(path.join(cache, 'logs', 'envdump', 'amd64', 'dump.log'), 'utf8');
    assert.match(log, /^\$ env -0$/m);
    assert.match(log, /^ENV_DUMP_EXTRA=declared-by-the-kind$/m, 'the streamed `env` reached the log');
    assert.match(log, /^TZ=UTC$/m);

    const pemBody = pem.split('\n')[1]!;
    for (const [where, text] of [['env.txt', dumped], ['stage log', log], ['stdout', r.stdout], ['stderr', r.stderr]] as const) {
      for (const [name, value] of Object.entries(secrets)) {
        assert.ok(!text.includes(name), `${name} appears in ${where}`);
        assert.ok(!text.includes(name === 'PIPELINE_SIGNING_KEY' ? pemBody : value), `the value of ${name} appears in ${where}`);
      }
      assert.ok(!text.includes('UNRELATED_HOST_VAR'), `UNRELATED_HOST_VAR appears in ${where}`);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
