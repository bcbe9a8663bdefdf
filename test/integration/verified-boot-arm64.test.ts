// Verified boot from composefs on arm64: the same fixture (fixtures/verified.yaml)
// built for arm64 — a trixie arm64 rootfs under qemu-user, its composefs image +
// object store with the two layers on an ext4 `verity` root partition, and a
// UEFI-only GPT disk whose systemd-boot (from the rootfs: raw's `loader` input)
// passes composefs=<digest> powernode.layers=… to the kernel. One boot under
// qemu-system-aarch64 virt + AAVMF (TCG): the first boot checks the store and
// enables fs-verity, mounts overlay verity=require, and the fixture's unit prints
// `findmnt /`, the layered files and the marker. The refusals (tampered object,
// wrong digest, missing object) are the same module code and are booted on amd64
// (verified-boot.test.ts); here the arm64 path itself is what is proven.
// Needs root, binfmt for arm64, qemu-system-arm, qemu-efi-aarch64, the mirror.
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { bootTest, type BootTestResult } from '../../src/boot/boot.js';
import { diskBootPlans } from '../../outputs/_disk.js';
import { cli, ROOT, TEST_CACHE } from '../helpers/cli.js';

const FIXTURE = join(ROOT, 'fixtures', 'verified.yaml');
/** Shared with other runs: publishing an unchanged disk again only links it. */
const IMAGES = join(TEST_CACHE, '..', 'pipeline-test-images', 'verified-fixture');
const REFUSED = 'powernode: verified root refused';

let base = '';
let cmdline = '';
let r: BootTestResult & { lines: string[] };

before(async () => {
  base = await mkdtemp(join(process.env.PIPELINE_TEST_TMP ?? '/var/tmp', 'pipeline-verified-arm64-'));
  const b = await cli(['build', 'arm64', 'verified', '-f', FIXTURE, '--out', IMAGES], { timeoutMs: 5_400_000 });
  assert.equal(b.code, 0, b.stderr);
  const dir = join(IMAGES, 'verified', 'arm64');
  cmdline = JSON.parse(await readFile(join(dir, 'build-manifest.json'), 'utf8')).resolved.meta.verified.cmdline;
  // snapshot=on: the published disk is never written.
  const [plan] = diskBootPlans({ arch: 'arm64', dir, workDir: base, firmware: 'uefi' }, 'disk.raw', 'raw', 'verified arm64');
  const lines: string[] = [];
  const res = await bootTest(plan!, { expect: ['PIPELINE-OS-OK'], forbid: [REFUSED], timeoutMs: 1_800_000, onLine: (l) => lines.push(l), logFile: join(base, 'boot.log') });
  r = { ...res, lines };
});

after(async () => {
  if (base && !process.env.PIPELINE_KEEP_TEST_TMP) await rm(base, { recursive: true, force: true });
});

test('arm64: systemd-boot passes the verified root on the command line', () => {
  assert.match(cmdline, /(^| )composefs=[0-9a-f]{64} powernode\.layers=[0-9a-f]{64},[0-9a-f]{64} /);
  assert.match(cmdline, /console=ttyAMA0/);
});

test('arm64 (AAVMF): first boot checks and verity-enables the store, mounts overlay verity=require, the top layer wins', (t) => {
  const console = r.lines.join('\n');
  assert.ok(r.ok, `${r.reason}\n${r.logTail}`);
  const root = r.lines.find((l) => l.includes('PIPELINE-ROOT '));
  assert.ok(root, `no findmnt line:\n${r.logTail}`);
  assert.match(root, /PIPELINE-ROOT overlay .*verity=require/);
  assert.match(root, /lowerdir=\/run\/powernode\/composefs\/layer0:\/run\/powernode\/composefs\/layer1:\/run\/powernode\/composefs\/base::\/run\/powernode\/store\/objects/);
  const m = /powernode: object store: (\d+) files, (\d+) objects checked, (\d+) fs-verity enabled/.exec(console);
  assert.ok(m && Number(m[2]) > 1000 && Number(m[3]) === Number(m[2]), `first boot enables every referenced object: ${m?.[0]}`);
  assert.match(console, /powernode: verified composefs root mounted \(image [0-9a-f]{64}, 2 layer\(s\)\)/);
  assert.match(console, /PIPELINE-PROBE this file/);
  assert.match(console, /PIPELINE-LAYER high:/);
  assert.doesNotMatch(console, /PIPELINE-LAYER (base|low):/);
  t.diagnostic(`boot ${r.seconds} s`);
});
