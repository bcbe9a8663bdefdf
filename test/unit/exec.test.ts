import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runProcess } from '../../src/engine/process.js';
import { StageError } from '../../src/stage.js';

// A killed process may linger as a zombie until its new parent reaps it; that counts as gone.
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
}

async function waitFor(cond: () => Promise<boolean>, ms = 5000): Promise<void> {
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
  const r = await runProcess('sh', ['-c', 'cat; printf "%s" "$FOO"'], {
    capture: true,
    input: 'in-',
    env: { FOO: 'bar' },
  });
  assert.equal(r.stdout, 'in-bar');
});

test('non-zero exit throws StageError with the output tail', async () => {
  const lines: string[] = [];
  await assert.rejects(
    runProcess('sh', ['-c', 'for i in $(seq 1 100); do echo line$i; done; exit 3'], {
      onOutput: (c) => lines.push(c),
    }),
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

test('missing executable names the command', async () => {
  await assert.rejects(runProcess('no-such-program-xyz', []), (e: unknown) => {
    assert.ok(e instanceof StageError);
    assert.match(e.message, /no-such-program-xyz/);
    assert.match(e.message, /not (found|installed)/);
    return true;
  });
});

test('abort kills the whole process group, grandchildren included', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'exec-test-'));
  try {
    const pidFile = join(dir, 'pid');
    const ac = new AbortController();
    // The grandchild writes its own pid; the shell then waits on a second sleep.
    const p = runProcess('sh', ['-c', 'sleep 100 & echo $! > "$1"; sleep 100', 'sh', pidFile], {
      signal: ac.signal,
    });
    let grandchild = 0;
    await waitFor(async () => {
      const t = await readFile(pidFile, 'utf8').catch(() => '');
      grandchild = Number(t.trim());
      return grandchild > 0;
    });
    assert.ok(alive(grandchild));
    ac.abort();
    await assert.rejects(p, (e: unknown) => e instanceof StageError && /cancelled/.test(e.message));
    // Reaped by init once killed; allow a moment for that.
    await waitFor(async () => !alive(grandchild));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('timeout kills the process and rejects', async () => {
  await assert.rejects(
    runProcess('sleep', ['100'], { timeoutMs: 200 }),
    (e: unknown) => e instanceof StageError && /timed out/.test(e.message),
  );
});

test('SIGTERM-ignoring process is SIGKILLed after the grace period', { timeout: 20000 }, async () => {
  const ac = new AbortController();
  const p = runProcess('sh', ['-c', 'trap "" TERM; echo ready; while :; do sleep 1; done'], {
    signal: ac.signal,
    onOutput: (c) => {
      if (c.includes('ready')) ac.abort();
    },
  });
  await assert.rejects(p, (e: unknown) => e instanceof StageError && /cancelled/.test(e.message));
});
