import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomInt } from 'node:crypto';
import { isolation, resolveCommand, runProcess, sanitizePath, spawnProcess, stageEnv, KILL_GRACE_MS } from '../../src/engine/process.js';
import { StageError } from '../../src/stage.js';
import { processesWith } from '../helpers/processes.js';

/** A `sleep` duration nobody else uses: its argument marks our processes in /proc. */
const marker = () => `300.${randomInt(100000, 999999)}`;

async function waitFor(cond: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error('condition not met in time');
}

test('capture returns stdout', async () => {
  const r = await runProcess('sh', ['-c', 'printf "a b\\n"; echo err >&2'], { capture: true });
  assert.equal(r.stdout, 'a b\n');
  assert.equal(r.stderr, 'err\n');
  assert.equal(r.exitCode, 0);
});

test('arguments are passed verbatim, not through a shell', async () => {
  const r = await runProcess('printf', ['%s|', '$(echo no)', 'a;b'], { capture: true });
  assert.equal(r.stdout, '$(echo no)|a;b|');
});

test('stdin input and env', async () => {
  const r = await runProcess('sh', ['-c', 'cat; printf "%s" "$FOO"'], { capture: true, input: 'in-', env: { FOO: 'bar' } });
  assert.equal(r.stdout, 'in-bar');
});

test('baseEnv replaces the inherited environment; env entries apply on top', async () => {
  process.env.PROCESS_TEST_INHERITED = 'leak';
  try {
    const r = await runProcess('env', [], { capture: true, baseEnv: { PATH: '/usr/bin:/bin', A: '1', B: '2' }, env: { B: undefined, C: '3' } });
    assert.deepEqual(r.stdout.trim().split('\n').sort(), ['A=1', 'C=3', 'PATH=/usr/bin:/bin']);
  } finally {
    delete process.env.PROCESS_TEST_INHERITED;
  }
});

test('non-zero exit throws StageError with the output tail', async () => {
  const lines: string[] = [];
  await assert.rejects(
    runProcess('sh', ['-c', 'for i in $(seq 1 100); do echo line$i; done; exit 3'], { onOutput: (c) => lines.push(c) }),
    (e: unknown) => {
      assert.ok(e instanceof StageError);
      assert.match(e.message, /^sh exited with code 3$/);
      assert.match(e.logTail, /line100/);
      assert.doesNotMatch(e.logTail, /line50\n/);
      return true;
    },
  );
  assert.match(lines.join(''), /line1\n/);
});

test('exit codes and signal deaths come through the namespace wrapper unchanged', async () => {
  const r = await spawnProcess('sh', ['-c', 'echo out; exit 42'], { capture: true });
  assert.equal(r.exitCode, 42);
  assert.equal(r.stdout, 'out\n', 'the wrapper adds nothing to stdout');
  assert.equal(r.stderr, '', 'the wrapper adds nothing to stderr');
  // A grandchild kills its parent (the command) from outside: a real signal death.
  const k = await spawnProcess('sh', ['-c', 'sh -c "kill -USR1 $PPID"; sleep 5']);
  assert.equal(k.exitCode, null);
  assert.equal(k.signal, 'SIGUSR1');
  await assert.rejects(runProcess('sh', ['-c', 'sh -c "kill -USR1 $PPID"; sleep 5']), /sh was killed by SIGUSR1/);
});

test('missing or non-executable programs are named', async () => {
  await assert.rejects(runProcess('no-such-program-xyz', []), (e: unknown) => {
    assert.ok(e instanceof StageError);
    assert.match(e.message, /no-such-program-xyz: command not found/);
    return true;
  });
  const r = await spawnProcess('no-such-program-xyz', []);
  assert.equal(r.notFound, true);
  assert.equal(r.spawnError, 'no-such-program-xyz: not found');
  assert.deepEqual(resolveCommand('passwd', '/etc'), { error: 'not executable' });
  assert.deepEqual(resolveCommand('sh', '/nonexistent:/bin'), { path: '/bin/sh' });
});

test('abort kills the whole tree, grandchildren included, without waiting for the grace', async () => {
  const m = marker();
  const ac = new AbortController();
  const t0 = Date.now();
  const p = runProcess('sh', ['-c', 'sleep "$1" & sleep "$1" & sleep "$1"', 'sh', m], { signal: ac.signal });
  await waitFor(() => processesWith(`sleep ${m}`).length === 3);
  ac.abort();
  await assert.rejects(p, (e: unknown) => e instanceof StageError && /cancelled/.test(e.message));
  assert.deepEqual(processesWith(m), []);
  assert.ok(Date.now() - t0 < KILL_GRACE_MS, 'processes without a SIGTERM handler die on SIGTERM, as outside a namespace');
});

test('a process that setsid()s away from the group still dies with the command', async (t) => {
  if (!(await isolation())) return t.skip('no PID namespace here (not root, or unshare/setpriv missing)');
  const m = marker();
  // setsid leaves our process group, so only the namespace can take it down.
  const r = await spawnProcess('sh', ['-c', 'setsid sleep "$1" & sleep 0.3; exit 0', 'sh', m]);
  assert.equal(r.exitCode, 0);
  await waitFor(() => processesWith(m).length === 0, 2000);
});

test('timeout kills the process and rejects', async () => {
  const t0 = Date.now();
  await assert.rejects(runProcess('sleep', ['100'], { timeoutMs: 200 }), (e: unknown) => e instanceof StageError && /timed out/.test(e.message));
  assert.ok(Date.now() - t0 < 3000, `took ${Date.now() - t0} ms`);
});

test('until stops the process early and is not an error', async () => {
  const t0 = Date.now();
  const r = await spawnProcess('sh', ['-c', 'echo starting; echo READY; sleep 100'], { capture: true, until: (o) => o.includes('READY') });
  assert.equal(r.stoppedEarly, true);
  assert.equal(r.timedOut, false);
  assert.match(r.stdout, /READY/);
  assert.ok(Date.now() - t0 < 3000);
  const ok = await runProcess('sh', ['-c', 'echo READY; sleep 100'], { capture: true, until: (o) => o.includes('READY') });
  assert.match(ok.stdout, /READY/);
});

test('SIGTERM-ignoring process is SIGKILLed after the one grace period', { timeout: 20000 }, async () => {
  const ac = new AbortController();
  const t0 = Date.now();
  const p = runProcess('sh', ['-c', 'trap "" TERM; echo ready; while :; do sleep 1; done'], {
    signal: ac.signal,
    onOutput: (c) => {
      if (c.includes('ready')) ac.abort();
    },
  });
  await assert.rejects(p, (e: unknown) => e instanceof StageError && /cancelled/.test(e.message));
  const took = Date.now() - t0;
  assert.ok(took >= KILL_GRACE_MS - 100 && took < KILL_GRACE_MS + 3000, `took ${took} ms`);
});

test('the command line in the process table is the real one after the wrapper', async (t) => {
  const iso = await isolation();
  if (!iso) return t.skip('no PID namespace here');
  const m = marker();
  const p = spawnProcess('sleep', [m], { timeoutMs: 3000 });
  await waitFor(() => processesWith(m).length === 2);
  const lines = processesWith(m).map((l) => l.replace(/^\d+: /, '').trimEnd());
  // setpriv execs unshare, which forks the real command: two entries, the second exactly ours.
  const unshareArgs = iso.prefix.slice(iso.prefix.indexOf('--') + 1).join(' ');
  assert.deepEqual(lines.sort(), [`${unshareArgs} sleep ${m}`, `sleep ${m}`].sort());
  const r = await p;
  assert.equal(r.timedOut, true);
  assert.equal(r.signal, 'SIGKILL', 'stopped through the wrapper');
  assert.equal(r.stderr, '', 'and the wrapper said nothing');
  assert.deepEqual(processesWith(m), []);
});

// ---------------------------------------------------------------------------
// Stage environment (pure)

const HOST = {
  PATH: '/usr/local/bin:relative/bin::/usr/bin:/bin:/usr/bin',
  HOME: '/root',
  TMPDIR: '/tmp',
  LANG: 'fr_FR.UTF-8',
  PIPELINE_SIGNING_KEY: '-----BEGIN PRIVATE KEY-----',
  PIPELINE_REGISTRY_PASSWORD: 'hunter2',
  GITHUB_TOKEN: 'ghp_x',
  AWS_SECRET_ACCESS_KEY: 'aws',
  https_proxy: 'http://proxy:3128',
  NO_PROXY: 'localhost',
  EXTRA_SETTING: 'yes',
  SSH_AUTH_SOCK: '/run/ssh',
};

test('stageEnv: only the allow-list, a sanitised PATH and what the kind declares', () => {
  const env = stageEnv(HOST, { sourceDateEpoch: 1704067200, home: '/var/tmp/work-x', declared: ['EXTRA_SETTING', 'NOT_SET_ON_HOST'] });
  assert.deepEqual(env, {
    PATH: '/usr/local/bin:/usr/bin:/bin',
    LC_ALL: 'C.UTF-8',
    TZ: 'UTC',
    SOURCE_DATE_EPOCH: '1704067200',
    HOME: '/var/tmp/work-x',
    TMPDIR: '/tmp',
    https_proxy: 'http://proxy:3128',
    NO_PROXY: 'localhost',
    EXTRA_SETTING: 'yes',
  });
});

test('stageEnv: a declared secret or PIPELINE_* name is refused', () => {
  for (const name of ['PIPELINE_SIGNING_KEY', 'GITHUB_TOKEN', 'AWS_SECRET_ACCESS_KEY', 'my_password', 'GOOGLE_APPLICATION_CREDENTIALS', 'bad-name']) {
    assert.throws(() => stageEnv(HOST, { sourceDateEpoch: 0, home: '/h', declared: [name], kind: 'k' }), (e: unknown) => e instanceof StageError && e.message.includes(`"${name}"`), name);
  }
});

test('stageEnv: unsafe TMPDIR values are dropped', () => {
  for (const t of ['relative/tmp', '/tmp/../etc', '/no/such/dir', '/etc/passwd', '/tmp/with space']) {
    assert.equal(stageEnv({ ...HOST, TMPDIR: t }, { sourceDateEpoch: 0, home: '/h' }).TMPDIR, undefined, t);
  }
});

test('sanitizePath falls back to a fixed PATH when nothing absolute is left', () => {
  assert.equal(sanitizePath('bin::.'), '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin');
  assert.equal(sanitizePath(undefined), '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin');
});
