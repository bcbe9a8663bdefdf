// Real probes on this machine: qemu boots of the probe sector under TCG and KVM, real
// unshare/losetup, real tool version reads. Needs root and qemu-system-x86.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { chmod, mkdtemp, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { aptPackages, assessHost, chooseAccel, formatDoctor, shippedSpecTools } from '../../src/doctor/doctor.js';
import { PROBE_BLOCKS, probeAccel, probeHost, type BootProbe } from '../../src/doctor/probe.js';
import { loadKinds } from '../../src/engine/kinds.js';
import { preflight, probePreflight } from '../../src/engine/preflight.js';
import { probeTools } from '../../src/engine/tools.js';
import { cli } from '../helpers/cli.js';
import { processesWith } from '../helpers/processes.js';

function assertGone(p: BootProbe): void {
  assert.ok(p.payload.includes('pipeline-accel-probe-'), p.payload);
  assert.deepEqual(processesWith(p.payload), [], `qemu for ${p.payload} is still running`);
  if (p.pid !== undefined) assert.throws(() => process.kill(p.pid!, 0), /ESRCH/);
  assert.equal(existsSync(path.dirname(p.payload)), false, 'probe temp dir was not removed');
}

const FAKE = [
  { name: 'pipeline-fake-tool-b', apt: 'pipeline-fake-pkg-b' },
  { name: 'pipeline-fake-tool-a', apt: 'pipeline-fake-pkg-a' },
  { name: 'pipeline-fake-tool-c', apt: 'pipeline-fake-pkg-a' },
];

test('probeHost on this machine: root, TCG boots, KVM probe finished and qemu is gone', { timeout: 120_000 }, async () => {
  const cacheDir = await mkdtemp(path.join(tmpdir(), 'doctor-cache-'));
  try {
    const facts = await probeHost({ tools: [{ name: 'mmdebstrap', apt: 'mmdebstrap' }, ...FAKE], arches: ['amd64', 'arm64'], cacheDir });
    assert.equal(facts.root, true);
    assert.deepEqual(facts.mmdebstrap.modes, ['root']);
    assert.equal(facts.hostArch, 'amd64');
    assert.ok(facts.binfmt.entries.arm64, 'arm64 binfmt entry was looked at');

    const k = facts.kvm!;
    assert.ok(k, 'qemu probes ran');
    assert.equal(k.cached, false);
    assert.ok(k.qemu && /QEMU emulator version/.test(k.qemu), k.qemu);

    // Software emulation must work here: the marker came out of COM1 after all test blocks.
    const tcg = k.tcg!;
    assert.equal(tcg.ok, true, tcg.detail);
    assert.equal(tcg.reachedRealMode, true);
    assert.equal(tcg.reachedLongMode, true);
    assert.equal(tcg.blocks, PROBE_BLOCKS);
    assert.equal(tcg.timedOut, false);
    assertGone(tcg);

    // KVM: whatever it really is here; it must have ended (marker, exit, or our timeout) and qemu must be gone.
    if (k.device && k.accessible) {
      const kvm = k.probe!;
      assert.ok(kvm, 'KVM probe ran');
      assert.ok(kvm.ok || kvm.timedOut || kvm.exitCode !== null || kvm.signal !== null, kvm.detail);
      if (!kvm.ok) assert.equal(kvm.timedOut || kvm.exitCode !== null, true);
      assertGone(kvm);
      process.stderr.write(`kvm probe: ok=${kvm.ok} realMode=${kvm.reachedRealMode} longMode=${kvm.reachedLongMode} blocks=${kvm.blocks} timedOut=${kvm.timedOut}: ${kvm.detail}\n`);
    }

    // The fake tools: one error each, one apt-get line, packages deduped and sorted.
    const findings = assessHost(facts, { tools: [{ name: 'mmdebstrap', apt: 'mmdebstrap' }, ...FAKE], arches: ['amd64'] });
    const fakes = findings.filter((f) => f.what.startsWith('pipeline-fake-tool-'));
    assert.deepEqual(fakes.map((f) => [f.level, f.what, f.detail]), [
      ['error', 'pipeline-fake-tool-a', 'not found'],
      ['error', 'pipeline-fake-tool-b', 'not found'],
      ['error', 'pipeline-fake-tool-c', 'not found'],
    ]);
    for (const f of fakes) assert.equal(f.fix, 'apt-get install -y pipeline-fake-pkg-a pipeline-fake-pkg-b');
    const text = formatDoctor(findings);
    assert.match(text, /^ {2}fix: apt-get install -y pipeline-fake-pkg-a pipeline-fake-pkg-b$/m);
    assert.match(text, /^✓ root: running as root \(mmdebstrap mode=root\)$/m);
    assert.match(text, /^✓ mmdebstrap: mmdebstrap \d/m);
    process.stderr.write(text);

    // Second look comes from the cache (no qemu), and chooseAccel follows it.
    const again = await probeAccel(cacheDir);
    assert.equal(again.cached, true);
    assert.equal(again.probe?.ok, k.probe?.ok);
    assert.equal(again.tcg?.ok, true);
    assert.equal(await chooseAccel(cacheDir), k.device && k.accessible && k.probe?.ok ? 'kvm' : 'tcg');
  } finally {
    await rm(cacheDir, { recursive: true, force: true });
  }
});

test('preflight runs no qemu and returns only the errors', async () => {
  const cacheDir = await mkdtemp(path.join(tmpdir(), 'doctor-cache-'));
  try {
    const errs = await preflight({ tools: [{ name: 'tar', apt: 'tar' }, FAKE[0]!], arches: ['amd64'], needsRoot: true, needsLoop: true, cacheDir });
    assert.deepEqual(errs, [{ level: 'error', what: 'pipeline-fake-tool-b', detail: 'not found', fix: 'apt-get install -y pipeline-fake-pkg-b' }]);
    assert.equal(existsSync(path.join(cacheDir, 'host', 'accel-probe.json')), false, 'preflight must not run the qemu probes');
  } finally {
    await rm(cacheDir, { recursive: true, force: true });
  }
});

test('tool version memo: warm runs do not spawn the tool, a changed binary is read again', async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'doctor-tool-'));
  try {
    const cacheDir = path.join(dir, 'cache');
    const bin = path.join(dir, 'bin');
    const counter = path.join(dir, 'runs');
    const tool = path.join(bin, 'faketool');
    const script = (v: string) => `#!/bin/sh\necho x >> '${counter}'\necho "faketool ${v}"\n`;
    await (await import('node:fs/promises')).mkdir(bin);
    await writeFile(tool, script('1.0'));
    await chmod(tool, 0o755);
    const runs = () => (existsSync(counter) ? readFileSync(counter, 'utf8').split('\n').filter(Boolean).length : 0);
    const spec = [{ name: 'faketool', apt: 'faketool-pkg' }];

    const [cold] = await probeTools(spec, cacheDir, bin);
    assert.equal(cold!.version, 'faketool 1.0');
    assert.equal(cold!.memo, false);
    assert.equal(runs(), 1);

    const [warm] = await probeTools(spec, cacheDir, bin);
    assert.equal(warm!.version, 'faketool 1.0');
    assert.equal(warm!.memo, true);
    assert.equal(runs(), 1, 'warm run spawned the tool');

    // Same size, same mtime, new content: only ctime (and the content) changed.
    const before = await stat(tool);
    await writeFile(tool, script('2.0'));
    await utimes(tool, before.atime, before.mtime);
    assert.equal((await stat(tool)).size, before.size);
    const [changed] = await probeTools(spec, cacheDir, bin);
    assert.equal(changed!.version, 'faketool 2.0');
    assert.equal(changed!.memo, false);
    assert.equal(runs(), 2);

    // A banner on stderr from a tool that exits non-zero on --version still counts.
    await writeFile(tool, '#!/bin/sh\necho "faketool 3.0" >&2\nexit 1\n');
    const [grumpy] = await probeTools(spec, cacheDir, bin);
    assert.equal(grumpy!.version, 'faketool 3.0');
    assert.equal(grumpy!.error, undefined);

    // A tool that prints nothing gets its content hash, not a shared "unknown".
    await writeFile(tool, '#!/bin/sh\nexit 0\n');
    const [silent] = await probeTools(spec, cacheDir, bin);
    assert.equal(silent!.versionKnown, false);
    assert.match(silent!.version!, /^unknown \(sha256:[0-9a-f]{64}\)$/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('runtime packages: dpkg-query finds what is installed, preflight names what is not with the exact apt-get line', async () => {
  const facts = await probePreflight({ packages: ['dpkg', 'pipeline-fake-pkg-z'], arches: [] });
  assert.deepEqual(facts.packages, { dpkg: true, 'pipeline-fake-pkg-z': false });
  const errs = await preflight({
    tools: [],
    arches: [],
    packages: [
      { apt: 'dpkg', by: 'dpkg-divert' },
      { apt: 'pipeline-fake-pkg-z', by: 'mmdebstrap' },
    ],
  });
  assert.deepEqual(errs, [{ level: 'error', what: 'pipeline-fake-pkg-z', detail: 'not installed; mmdebstrap needs it', fix: 'apt-get install -y pipeline-fake-pkg-z' }]);
});

test('`pipeline doctor --apt-packages` prints the derived list, and it is installed here (scripts/setup ran)', async () => {
  const r = await cli(['doctor', '--apt-packages'], { timeoutMs: 60_000 });
  assert.equal(r.code, 0, r.stderr);
  const printed = r.stdout.split('\n').filter(Boolean);
  const kinds = await loadKinds();
  assert.deepEqual(printed, aptPackages(kinds.values(), shippedSpecTools(kinds)));
  const facts = await probePreflight({ packages: printed, arches: [] });
  assert.deepEqual(Object.entries(facts.packages!).filter(([, ok]) => !ok).map(([p]) => p), [], 'run scripts/setup');
});
