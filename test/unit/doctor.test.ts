import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { z } from 'zod';
import { aptPackages, assessHost, doctorNeeds, formatDoctor, knownTools, shippedSpecTools } from '../../src/doctor/doctor.js';
import { bootSector, PROBE_MARKER, PROBE_REAL_MARKER, type BootProbe, type HostFacts } from '../../src/doctor/probe.js';
import { loadKinds } from '../../src/engine/kinds.js';
import { parseBinfmtEntry, parseDpkgQuery, type Finding, type Needs } from '../../src/engine/preflight.js';
import { aptInstallLine, firstMeaningfulLine, runtimePackages } from '../../src/engine/tools.js';
import { ARCHES, defineStage, hostArch, type ToolSpec } from '../../src/stage.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

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

test('knownTools merges a tool\'s runtime packages over arches', () => {
  const k = defineStage({
    kind: 'c',
    version: '1',
    summary: '',
    params: z.object({}),
    inputs: [],
    tools: (_p, arch) => [{ name: 'mmdebstrap', apt: 'mmdebstrap', ...(arch === 'arm64' ? { packages: ['arch-test'] } : {}) }],
    run: async () => {},
  });
  assert.deepEqual(knownTools([k], ['arm64', 'amd64']).find((t) => t.name === 'mmdebstrap')?.packages, ['arch-test']);
  assert.deepEqual(knownTools([k], ['amd64', 'arm64']).find((t) => t.name === 'mmdebstrap')?.packages, ['arch-test']);
  assert.equal(knownTools([k], ['amd64']).find((t) => t.name === 'mmdebstrap')?.packages, undefined);
  assert.deepEqual(aptPackages([k]), ['arch-test', 'mmdebstrap']);
});

test('parseDpkgQuery keeps only installed packages', () => {
  const out = parseDpkgQuery('arch-test\tdeinstall ok config-files\ntar\tinstall ok installed\nmmdebstrap\tinstall ok installed\n\nbroken\n');
  assert.deepEqual([...out].sort(), ['mmdebstrap', 'tar']);
});

test('a missing runtime package is an error with the exact apt-get line, shared with missing tools', () => {
  const need = { apt: 'arch-test', by: 'mmdebstrap' };
  const fs = assessHost(facts({ packages: { 'arch-test': false } }), needs({ packages: [need] }));
  const e = find(fs, 'arch-test')!;
  assert.equal(e.level, 'error');
  assert.equal(e.detail, 'not installed; mmdebstrap needs it');
  assert.equal(e.fix, 'apt-get install -y arch-test');
  assert.match(formatDoctor(fs), /^✗ arch-test: not installed; mmdebstrap needs it — apt-get install -y arch-test$/m);
  assert.equal(find(assessHost(facts({ packages: { 'arch-test': true } }), needs({ packages: [need] })), 'arch-test')!.level, 'ok');

  // A missing tool and a missing package: one line for both.
  const mk = { name: 'mkcomposefs', apt: 'composefs' };
  const both = assessHost(facts({ tools: [...facts().tools, mk], packages: { 'arch-test': false } }), needs({ tools: [MMDEB, mk], packages: [need] }));
  assert.deepEqual(errors(both).map((f) => [f.what, f.fix]), [
    ['mkcomposefs', 'apt-get install -y arch-test composefs'],
    ['arch-test', 'apt-get install -y arch-test composefs'],
  ]);
  // Without dpkg-query nothing is claimed missing.
  assert.equal(find(assessHost(facts(), needs({ packages: [need] })), 'arch-test')!.level, 'warn');
});

test('doctor: arch-test is required once this host runs arm64 binaries, a warning before', async (t) => {
  if (hostArch() !== 'amd64') return t.skip('the facts below describe an amd64 host');
  const kinds = (await loadKinds()).values();
  const all = [...kinds];
  const pkgs = Object.fromEntries(runtimePackages(knownTools(all)).map((p) => [p.apt, p.apt !== 'arch-test']));
  const f = facts({ packages: pkgs });
  const fs = assessHost(f, doctorNeeds(all, f));
  const a = find(fs, 'arch-test')!;
  assert.equal(a.level, 'error', 'the fresh-machine bug: doctor said all green, the arm64 build died on arch-test');
  assert.equal(a.fix, 'apt-get install -y arch-test');
  assert.equal(find(fs, 'binfmt-support')!.level, 'ok');

  // No arm64 emulation yet: arm64 is not buildable here, so its package is only a warning.
  const off = facts({
    packages: pkgs,
    binfmt: { mounted: true, enabled: true, updateBinfmts: true, entries: { arm64: { name: 'qemu-aarch64', registered: false, enabled: false, installed: false } } },
  });
  assert.equal(find(assessHost(off, doctorNeeds(all, off)), 'arch-test')!.level, 'warn');
});

test('the apt list covers every ToolSpec.apt and ToolSpec.packages of every kind for both arches', async () => {
  const kinds = await loadKinds();
  const list = new Set(aptPackages(kinds.values()));
  let checked = 0;
  for (const mod of kinds.values()) {
    // A kind with required params is asked with none: what it runs whatever the spec says.
    const parsed = mod.params.safeParse({});
    for (const arch of ARCHES) {
      if (mod.arches && !mod.arches.includes(arch)) continue;
      let tools: ToolSpec[];
      try {
        tools = mod.tools((parsed.success ? parsed.data : {}) as never, arch);
      } catch (e) {
        assert.fail(`${mod.kind}: tools() throws without params (${(e as Error).message}); the apt list cannot see what it runs`);
      }
      for (const tool of tools) {
        for (const p of [tool.apt, ...(tool.packages ?? [])]) {
          assert.ok(list.has(p), `${mod.kind} (${arch}) needs ${p} for ${tool.name}, missing from the apt list`);
          checked++;
        }
      }
    }
  }
  assert.ok(checked > 20, `only ${checked} packages checked`);
  // What the fresh Debian 12 machine lacked, and the GRUB platform files the disk emitters read.
  const foreign = hostArch() === 'amd64' ? ['arch-test', 'binfmt-support', 'qemu-user-static'] : [];
  for (const p of [...foreign, 'mmdebstrap', 'grub-pc-bin', 'grub-efi-amd64-bin']) assert.ok(list.has(p), p);
  // Tools only some params bring in come from the shipped specs' own stages.
  const withSpecs = new Set(aptPackages(kinds.values(), shippedSpecTools(kinds)));
  for (const p of list) assert.ok(withSpecs.has(p), p);
  for (const t of shippedSpecTools(kinds)) assert.ok(withSpecs.has(t.apt), `${t.name} (${t.apt}) from a shipped spec`);
});

test('scripts/setup installs the derived list plus a separate test list', () => {
  const setup = readFileSync(path.join(ROOT, 'scripts/setup'), 'utf8');
  assert.match(setup, /doctor --apt-packages/);
  assert.match(setup, /scripts\/apt-packages-test\.txt/);
  // npm ci must come first: the derived list comes from the compiled CLI.
  assert.ok(setup.indexOf('npm ci') < setup.indexOf('doctor --apt-packages'));
  const testList = readFileSync(path.join(ROOT, 'scripts/apt-packages-test.txt'), 'utf8')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith('#'));
  for (const p of testList) assert.match(p, /^[a-z0-9][a-z0-9+.-]+$/);
  assert.equal(new Set(testList).size, testList.length, 'duplicate in the test list');
  for (const p of ['qemu-system-x86', 'qemu-system-arm', 'ovmf', 'skopeo', 'umoci', 'docker-registry']) assert.ok(testList.includes(p), p);
});

test('doctor says where build roots go: RAM with room, else disk and why', async () => {
  const { scratchFinding } = await import('../../src/doctor/doctor.js');
  const kinds = [{ memoryWorkDir: 1.5 * 1024 ** 3 }, { memoryWorkDir: 512 * 1024 ** 2 }, {}] as unknown as Parameters<typeof scratchFinding>[0];
  assert.match(scratchFinding(kinds, { memAvailable: 20 * 1024 ** 3, root: true }).detail, /^chroots build in RAM \(tmpfs, up to 19456 MiB/);
  assert.match(scratchFinding(kinds, { memAvailable: 3 * 1024 ** 3, root: true }).detail, /^chroots build on disk: 3072 MiB available/);
  assert.match(scratchFinding(kinds, { memAvailable: 20 * 1024 ** 3, root: true, mode: 'disk' }).detail, /on disk: PIPELINE_SCRATCH=disk/);
});
