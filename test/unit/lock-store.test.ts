// The .deb store on a temp cache: downloads are checked against the lock before
// they are kept, stored files are re-checked, and `cache gc` keeps exactly the
// .debs a registered lock names. The "mirror" is a file:// directory.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync, appendFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { Cache } from '../../src/engine/cache.js';
import { BuildError } from '../../src/engine/errors.js';
import { formatLock, type LockedDeb, type LockSection } from '../../src/lock/format.js';
import { debsToKeep, fetchDebs, missingDebs, registerLock, verifyStored } from '../../src/lock/store.js';

const tmp = mkdtempSync(path.join(os.tmpdir(), 'lock-store-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

const mirror = path.join(tmp, 'mirror');
function publish(name: string, body: string): LockedDeb {
  const rel = `pool/main/${name[0]}/${name}/${name}_1_all.deb`;
  mkdirSync(path.dirname(path.join(mirror, rel)), { recursive: true });
  writeFileSync(path.join(mirror, rel), body);
  return { name, version: '1', arch: 'all', priority: 'optional', sha256: createHash('sha256').update(body).digest('hex'), size: body.length, path: rel };
}
const section = (debs: LockedDeb[]): LockSection => ({
  stage: 'rootfs',
  arch: 'amd64',
  mirror: `file://${mirror}`,
  suite: 'bookworm',
  components: ['main'],
  variant: 'minbase',
  packages: [],
  inRelease: { sha256: 'f'.repeat(64), date: 'Sat, 11 Jul 2026 10:16:37 UTC' },
  debs,
});

test('fetch keeps only bytes that match the lock, and names the package and both digests otherwise', async () => {
  const cache = new Cache(path.join(tmp, 'c1'));
  const a = publish('alpha', 'alpha-bytes');
  const b = publish('beta', 'beta-bytes');
  const r = await fetchDebs(cache, [section([a, b])]);
  assert.equal(r.fetched, 2);
  assert.deepEqual(await missingDebs(cache, [a, b]), []);
  await verifyStored(cache, [a, b]);
  // A second fetch downloads nothing.
  assert.equal((await fetchDebs(cache, [section([a, b])])).fetched, 0);

  // The mirror now serves other bytes under the locked name.
  const g = publish('gamma', 'gamma-v1');
  publish('gamma', 'gamma-v2-rebuilt');
  const served = createHash('sha256').update('gamma-v2-rebuilt').digest('hex');
  await assert.rejects(fetchDebs(cache, [section([g])]), (e: unknown) => {
    assert.ok(e instanceof BuildError && e.exitCode === 1);
    assert.match(e.message, /^gamma 1 \(all\): \.deb sha256 mismatch in the download from file:/);
    assert.ok(e.message.includes(`lock:  ${g.sha256}`) && e.message.includes(`found: ${served}`), e.message);
    return true;
  });
  assert.deepEqual(await missingDebs(cache, [g]), [g], 'a mismatching download is not kept');
  assert.deepEqual(readdirSync(path.join(cache.root, 'tmp')), [], 'and leaves no temp file');

  // A version the mirror no longer serves.
  const gone = { ...a, name: 'delta', path: 'pool/main/d/delta/delta_9_all.deb', sha256: 'e'.repeat(64) };
  await assert.rejects(fetchDebs(cache, [section([gone])]), /the mirror did not serve 1 locked \.deb:\n  delta 1 \(all\): GET file:/);
});

test('a stored .deb changed after the fact is reported with both digests', async () => {
  const cache = new Cache(path.join(tmp, 'c2'));
  const a = publish('alpha', 'alpha-bytes');
  await fetchDebs(cache, [section([a])]);
  appendFileSync(cache.debPath(a.sha256), 'evil');
  const found = createHash('sha256').update('alpha-bytesevil').digest('hex');
  await assert.rejects(verifyStored(cache, [a]), (e: unknown) => e instanceof BuildError && e.message.includes(`lock:  ${a.sha256}`) && e.message.includes(`found: ${found}`));
});

test('cache gc keeps every .deb a registered lock names and drops the rest', async () => {
  const cache = new Cache(path.join(tmp, 'c3'));
  await cache.init();
  const a = publish('alpha', 'alpha-bytes');
  const b = publish('beta', 'beta-bytes');
  await fetchDebs(cache, [section([a, b])]);
  const lockFile = path.join(tmp, 'spec.lock');
  writeFileSync(lockFile, formatLock({ spec: 'x', sections: [section([a])] }));
  await registerLock(cache, lockFile);
  const gc = async () => cache.gc(1 << 30, { keepDebs: await debsToKeep(cache) });
  await cache.gc(1 << 30);
  assert.ok(existsSync(cache.debPath(b.sha256)), 'gc without the locks\' view deletes no .deb');
  await gc();
  assert.ok(existsSync(cache.debPath(a.sha256)), 'a locked .deb survives gc');
  assert.ok(!existsSync(cache.debPath(b.sha256)), 'an unlocked .deb goes');
  // A lock that no longer parses: keep everything (never delete on a guess).
  writeFileSync(lockFile, 'lock 1\nspec x\nbogus\n');
  await gc();
  assert.ok(existsSync(cache.debPath(a.sha256)));
  // The lock file is gone: its root goes, and so do its .debs.
  rmSync(lockFile);
  await gc();
  assert.ok(!existsSync(cache.debPath(a.sha256)));
  assert.deepEqual(readdirSync(path.join(cache.root, 'debs', 'roots')), []);
});

test('repro: both throw-away caches get the locked .debs from the user store (so both builds run offline)', async () => {
  const { seedLockedStores } = await import('../../src/lock/lock.js');
  const dir = path.join(tmp, 'repro');
  mkdirSync(dir);
  const spec = path.join(dir, 'demo.yaml');
  writeFileSync(spec, 'name: demo\n');
  const sides = [path.join(tmp, 'side-a'), path.join(tmp, 'side-b')];
  assert.equal(await seedLockedStores(spec, 'amd64', path.join(tmp, 'user'), sides), false, 'no lock: nothing to do');
  const a = publish('alpha', 'alpha-bytes');
  const other = { ...section([publish('beta', 'beta-bytes')]), arch: 'arm64' };
  writeFileSync(path.join(dir, 'demo.lock'), formatLock({ spec: 'demo', sections: [section([a]), other] }));
  assert.equal(await seedLockedStores(spec, 'amd64', path.join(tmp, 'user'), sides), true);
  for (const s of sides) assert.deepEqual(readdirSync(path.join(s, 'debs', 'sha256')), [`${a.sha256}.deb`], 'only the arch being reproduced');
  assert.ok(existsSync(new Cache(path.join(tmp, 'user')).debPath(a.sha256)), 'fetched once into the user store');
});
