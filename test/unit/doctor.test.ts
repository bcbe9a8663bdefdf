import { test } from 'node:test';
import assert from 'node:assert/strict';
import { z } from 'zod';
import { aptInstallLine, assessHost, formatDoctor, knownTools, type Finding, type Needs } from '../../src/doctor/doctor.js';
import {
  bootSector,
  firstMeaningfulLine,
  parseBinfmtEntry,
  PROBE_MARKER,
  PROBE_REAL_MARKER,
  type BootProbe,
  type HostFacts,
} from '../../src/doctor/probe.js';
import { defineStage } from '../../src/stage.js';

function probe(accel: 'kvm' | 'tcg', ok: boolean, extra: Partial<BootProbe> = {}): BootProbe {
  return {
    accel,
    ok,
    reachedRealMode: true,
    reachedLongMode: true,
    blocks: ok ? 16 : 0,
    timedOut: !ok,
    timeoutMs: 8000,
    exitCode: ok ? 1 : null,
    signal: ok ? null : 'SIGTERM',
    stderr: '',
    payload: '/tmp/x/boot.img',
    detail: ok ? 'boots' : 'got through the BIOS but did not get through 64-bit setup in 8 s; qemu killed',
    ...extra,
  };
}

/** A healthy amd64 root host; tests break one thing at a time. */
function facts(over: Partial<HostFacts> = {}): HostFacts {
  return {
    uid: 0,
    root: true,
    user: 'root',
    hostArch: 'amd64',
    machine: 'x86_64',
    kernel: '6.1.0',
    userns: { usable: true, detail: 'unshare --user --map-root-user works', maxUserNamespaces: 1000 },
    mmdebstrap: { modes: ['root'], detail: 'mode=root' },
    binfmt: {
      mounted: true,
      enabled: true,
      updateBinfmts: true,
      entries: { arm64: { name: 'qemu-aarch64', registered: true, enabled: true, interpreter: '/usr/libexec/qemu-binfmt/aarch64-binfmt-P', flags: 'POCF', installed: true } },
    },
    loop: { control: true, free: '/dev/loop0', detail: 'free loop device /dev/loop0' },
    tools: [{ name: 'mmdebstrap', apt: 'mmdebstrap', path: '/usr/bin/mmdebstrap', version: 'mmdebstrap 1.3.5', versionKnown: true }],
    ...over,
  };
}

const MMDEB = { name: 'mmdebstrap', apt: 'mmdebstrap' };
const needs = (over: Partial<Needs> = {}): Needs => ({ tools: [MMDEB], arches: ['amd64'], ...over });
const errors = (fs: Finding[]) => fs.filter((f) => f.level === 'error');
const find = (fs: Finding[], what: string) => fs.find((f) => f.what === what);

test('boot sector: 512 bytes, 55 AA signature, both markers, deterministic', () => {
  const b = bootSector();
  assert.equal(b.length, 512);
  assert.equal(b[510], 0x55);
  assert.equal(b[511], 0xaa);
  assert.ok(b.includes(Buffer.from(PROBE_MARKER)));
  assert.ok(b.includes(Buffer.from(PROBE_REAL_MARKER)));
  assert.deepEqual(bootSector(), b);
  // Starts with cli; cld and ends its code with hlt; jmp $-1 before the data.
  assert.deepEqual([...b.subarray(0, 2)], [0xfa, 0xfc]);
  assert.ok(b.includes(Buffer.from([0xf4, 0xeb, 0xfd])));
});

test('firstMeaningfulLine picks the version line', () => {
  assert.equal(firstMeaningfulLine('\n\nmmdebstrap 1.3.5\n'), 'mmdebstrap 1.3.5');
  assert.equal(firstMeaningfulLine('Usage: foo\nfoo version 2.1\n'), 'foo version 2.1');
  assert.equal(firstMeaningfulLine('no digits here\n'), 'no digits here');
  assert.equal(firstMeaningfulLine('\x1b[1mtool 3\x1b[0m'), 'tool 3');
  assert.equal(firstMeaningfulLine('  \n\t\n'), undefined);
});

test('parseBinfmtEntry reads state, interpreter and flags', () => {
  const e = parseBinfmtEntry('enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POCF\noffset 0\nmagic 7f454c46\n');
  assert.deepEqual(e, { enabled: true, interpreter: '/usr/libexec/qemu-binfmt/aarch64-binfmt-P', flags: 'POCF' });
  assert.equal(parseBinfmtEntry('disabled\ninterpreter /x\nflags: \n').enabled, false);
});

test('aptInstallLine dedupes and sorts packages', () => {
  assert.equal(aptInstallLine([{ apt: 'zstd' }, { apt: 'composefs' }, { apt: 'zstd' }]), 'apt-get install -y composefs zstd');
});

test('a healthy root host has no errors', () => {
  const fs = assessHost(facts(), needs({ needsRoot: true, needsLoop: true, arches: ['amd64', 'arm64'] }));
  assert.deepEqual(errors(fs), []);
  assert.equal(find(fs, 'root')?.detail, 'running as root (mmdebstrap mode=root)');
  assert.equal(find(fs, 'mmdebstrap')?.detail, 'mmdebstrap 1.3.5');
});

test('missing tools: one error each, one shared sorted apt-get line', () => {
  const tools = [MMDEB, { name: 'mkcomposefs', apt: 'composefs' }, { name: 'composefs-info', apt: 'composefs' }, { name: 'fsverity', apt: 'fsverity' }];
  const fs = assessHost(facts({ tools: [...facts().tools, ...tools.slice(1)] }), needs({ tools }));
  const errs = errors(fs);
  assert.deepEqual(errs.map((f) => f.what), ['composefs-info', 'fsverity', 'mkcomposefs']);
  for (const e of errs) {
    assert.equal(e.detail, 'not found');
    assert.equal(e.fix, 'apt-get install -y composefs fsverity');
  }
  const text = formatDoctor(fs);
  assert.equal(text.split('\n').filter((l) => l.includes('apt-get install')).length, 1);
  assert.match(text, /^✗ mkcomposefs: not found$/m);
  assert.match(text, /^ {2}fix: apt-get install -y composefs fsverity$/m);
});

test('a single missing tool prints its fix inline', () => {
  const mk = { name: 'mkcomposefs', apt: 'composefs' };
  const fs = assessHost(facts({ tools: [...facts().tools, mk] }), needs({ tools: [MMDEB, mk] }));
  // A tool that probeHost was not asked about is not claimed missing.
  assert.equal(find(assessHost(facts(), needs({ tools: [MMDEB, mk] })), 'mkcomposefs')!.detail, 'was not checked');
  assert.match(formatDoctor(fs), /^✗ mkcomposefs: not found — apt-get install -y composefs$/m);
});

test('optional tools that are missing are warnings with their own apt line', () => {
  const q = { name: 'qemu-system-aarch64', apt: 'qemu-system-arm' };
  const fs = assessHost(facts({ tools: [...facts().tools, q] }), needs({ optionalTools: [q] }));
  assert.deepEqual(errors(fs), []);
  const f = find(fs, 'qemu-system-aarch64')!;
  assert.equal(f.level, 'warn');
  assert.equal(f.fix, 'apt-get install -y qemu-system-arm');
});

test('a tool that prints no version is a warning; one whose version probe failed is an error', () => {
  const fs = assessHost(
    facts({
      tools: [
        { name: 'mmdebstrap', apt: 'mmdebstrap', path: '/usr/bin/mmdebstrap', version: 'unknown (sha256:ab)', versionKnown: false },
        { name: 'slow', apt: 'slow', path: '/usr/bin/slow', error: '`slow --version` timed out' },
      ],
    }),
    needs({ tools: [MMDEB, { name: 'slow', apt: 'slow' }] }),
  );
  assert.equal(find(fs, 'mmdebstrap')?.level, 'warn');
  assert.equal(find(fs, 'slow')?.level, 'error');
});

test('not root: unshare mode is fine, no mode at all is an error, needsRoot is an error', () => {
  const user = { uid: 1000, root: false, user: 'builder' };
  const unshare = assessHost(facts({ ...user, mmdebstrap: { modes: ['unshare'], detail: 'mode=unshare' } }), needs());
  assert.deepEqual(errors(unshare), []);
  assert.match(find(unshare, 'root')!.detail, /mode=unshare/);

  const none = assessHost(
    facts({ ...user, userns: { usable: false, detail: 'unshare failed', unprivilegedClone: 0 }, mmdebstrap: { modes: [], detail: 'mode=unshare needs usable user namespaces' } }),
    needs(),
  );
  assert.deepEqual(errors(none).map((f) => f.what), ['root']);
  assert.equal(find(none, 'user namespaces')?.fix, 'sysctl -w kernel.unprivileged_userns_clone=1');

  const needsRoot = assessHost(facts({ ...user, mmdebstrap: { modes: ['unshare'], detail: 'mode=unshare' } }), needs({ needsRoot: true }));
  assert.deepEqual(errors(needsRoot).map((f) => f.what), ['root']);
});

test('binfmt_misc not mounted: error for an arm64 build with the exact fix, warning otherwise', () => {
  const f = facts({
    binfmt: { mounted: false, enabled: false, updateBinfmts: true, entries: { arm64: { name: 'qemu-aarch64', registered: false, enabled: false, installed: true } } },
  });
  const arm = find(assessHost(f, needs({ arches: ['amd64', 'arm64'] })), 'arm64 emulation')!;
  assert.equal(arm.level, 'error');
  assert.equal(arm.fix, 'mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc && update-binfmts --enable qemu-aarch64');
  assert.equal(find(assessHost(f, needs()), 'arm64 emulation')!.level, 'warn');

  const noPkgs = facts({
    binfmt: { mounted: true, enabled: true, updateBinfmts: false, entries: { arm64: { name: 'qemu-aarch64', registered: false, enabled: false, installed: false } } },
  });
  assert.equal(
    find(assessHost(noPkgs, needs({ arches: ['arm64'] })), 'arm64 emulation')!.fix,
    'apt-get install -y binfmt-support qemu-user-static && update-binfmts --enable qemu-aarch64',
  );
  const disabled = facts({
    binfmt: { mounted: true, enabled: true, updateBinfmts: true, entries: { arm64: { name: 'qemu-aarch64', registered: true, enabled: false, installed: true } } },
  });
  const d = find(assessHost(disabled, needs({ arches: ['arm64'] })), 'arm64 emulation')!;
  assert.match(d.detail, /registered but disabled/);
  assert.equal(d.fix, 'update-binfmts --enable qemu-aarch64');
});

test('loop devices: error only when the build needs them', () => {
  const f = facts({ loop: { control: false, detail: 'no /dev/loop-control' } });
  assert.equal(find(assessHost(f, needs()), 'loop devices')!.level, 'warn');
  const e = find(assessHost(f, needs({ needsLoop: true })), 'loop devices')!;
  assert.equal(e.level, 'error');
  assert.equal(e.fix, 'modprobe loop');
});

test('KVM that does not boot is reported in plain words; TCG that boots is ok', () => {
  const f = facts({ kvm: { device: true, accessible: true, qemu: 'QEMU 7.2', probe: probe('kvm', false), tcg: probe('tcg', true), cached: false } });
  const fs = assessHost(f, needs());
  const kvm = find(fs, 'kvm')!;
  assert.equal(kvm.level, 'warn');
  assert.match(kvm.detail, /^KVM present but does not boot; using software emulation \(TCG\)/);
  assert.equal(find(fs, 'tcg')!.level, 'ok');

  const good = assessHost(facts({ kvm: { device: true, accessible: true, qemu: 'QEMU 7.2', probe: probe('kvm', true), tcg: probe('tcg', true), cached: true } }), needs());
  assert.equal(find(good, 'kvm')!.level, 'ok');
  assert.match(find(good, 'kvm')!.detail, /cached/);

  const none = assessHost(facts({ kvm: { device: false, accessible: false, qemu: 'QEMU 7.2', tcg: probe('tcg', true), cached: false } }), needs());
  assert.match(find(none, 'kvm')!.detail, /no \/dev\/kvm/);
  // Without the qemu probes (preflight) there is no kvm finding at all.
  assert.equal(find(assessHost(facts(), needs()), 'kvm'), undefined);
});

test('formatDoctor: one line per finding, symbols, colour only when asked', () => {
  const fs: Finding[] = [
    { level: 'ok', what: 'root', detail: 'running as root (mmdebstrap mode=root)' },
    { level: 'warn', what: 'kvm', detail: 'KVM present but does not boot; using software emulation (TCG)' },
    { level: 'error', what: 'mkcomposefs', detail: 'not found', fix: 'apt-get install -y composefs' },
  ];
  assert.equal(
    formatDoctor(fs),
    '✓ root: running as root (mmdebstrap mode=root)\n' +
      '! kvm: KVM present but does not boot; using software emulation (TCG)\n' +
      '✗ mkcomposefs: not found — apt-get install -y composefs\n',
  );
  assert.doesNotMatch(formatDoctor(fs), /\x1b/);
  assert.match(formatDoctor(fs, { color: true }), /\x1b\[31m✗\x1b\[0m mkcomposefs/);
  assert.equal(formatDoctor([]), '');
});

test('knownTools collects tools from kinds whose params have defaults, plus qemu', () => {
  const withDefaults = defineStage({
    kind: 'a',
    version: '1',
    summary: '',
    params: z.object({ x: z.string().default('y') }),
    inputs: [],
    tools: (_p, arch) => [{ name: arch === 'arm64' ? 'qemu-aarch64-static' : 'tar', apt: arch === 'arm64' ? 'qemu-user-static' : 'tar' }],
    run: async () => {},
  });
  const required = defineStage({
    kind: 'b',
    version: '1',
    summary: '',
    params: z.object({ must: z.string() }),
    inputs: [],
    tools: () => [{ name: 'never', apt: 'never' }],
    run: async () => {},
  });
  const names = (arches: ('amd64' | 'arm64')[]) => knownTools([withDefaults, required], arches).map((t) => t.name);
  assert.deepEqual(names(['amd64']), ['qemu-system-x86_64', 'tar']);
  assert.deepEqual(names(['arm64']), ['qemu-aarch64-static', 'qemu-system-aarch64']);
});
