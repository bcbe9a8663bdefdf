// The remote cache's pure checks: tags, URLs, and which pulled manifests and
// records may enter the local cache (only one that names the key it was looked
// up under, hashes to it, is sealed, and whose layers are exactly its files).
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { recordSeal, type Entry } from '../../src/engine/cache.js';
import { keyOf, type KeyParts } from '../../src/engine/compile.js';
import { UsageError } from '../../src/engine/errors.js';
import { CACHE_ARTIFACT_TYPE, cacheTag, checkRemoteEntry, parseRemoteCacheUrl, RECORD_MEDIA_TYPE, RECORD_TITLE, recordBytes, recordLayer, TITLE, type CacheManifest } from '../../src/remote-cache/entry.js';
import { entryStatement } from '../../src/remote-cache/sign.js';

const parts = (salt: string): KeyParts => ({ engine: 'pipeline-cache/1', kind: 'text', version: '1', arch: 'amd64', sourceDateEpoch: 1, params: { salt }, tools: {}, assets: {}, inputs: {} });
const hex = (c: string) => c.repeat(64);

function entry(salt = 'a'): Entry {
  const p = parts(salt);
  return {
    key: keyOf(p),
    kind: 'text',
    stage: 'rootfs',
    parts: p,
    files: [
      { path: 'a/rootfs.tar', size: 10, sha256: hex('1'), fsverity: hex('2'), executable: false },
      { path: 'run.sh', size: 3, sha256: hex('3'), fsverity: hex('4'), executable: true },
    ],
    meta: { note: 'x' },
  };
}

function manifest(e: Entry, rec = recordBytes(e)): CacheManifest {
  return {
    artifactType: CACHE_ARTIFACT_TYPE,
    layers: [
      { mediaType: RECORD_MEDIA_TYPE, digest: 'sha256:' + hex('9'), size: rec.length, annotations: { [TITLE]: RECORD_TITLE } },
      ...e.files.map((f) => ({ mediaType: 'application/octet-stream', digest: `sha256:${f.sha256}`, size: f.size, annotations: { [TITLE]: f.path } })),
    ],
  };
}

test('tags are cache-<key>, within the 128 characters registries allow', () => {
  const t = cacheTag(entry().key);
  assert.match(t, /^cache-[0-9a-f]{64}$/);
  assert.ok(t.length <= 128);
  assert.throws(() => cacheTag('../x'));
});

test('remote cache URLs: oci://HOST[:PORT]/REPO, no tag', () => {
  assert.deepEqual(parseRemoteCacheUrl('oci://127.0.0.1:5000/powernode/cache'), { repo: '127.0.0.1:5000/powernode/cache', host: '127.0.0.1:5000', repository: 'powernode/cache' });
  assert.equal(parseRemoteCacheUrl('registry.example/c/').repo, 'registry.example/c');
  for (const bad of ['oci://host', 'https://host/repo', 'oci://host/repo:tag', 'oci://host/repo@sha256:00']) {
    assert.throws(() => parseRemoteCacheUrl(bad), UsageError, bad);
  }
});

test('a good entry passes; the record is the sealed form the local cache stores', () => {
  const e = entry();
  const rec = recordBytes(e);
  assert.equal(JSON.parse(rec.toString()).recordSha256, recordSeal(e));
  const r = checkRemoteEntry(e.key, manifest(e), rec);
  assert.ok('entry' in r, JSON.stringify(r));
  assert.deepEqual(r.entry, e);
  assert.ok(!('problem' in recordLayer(manifest(e))));
});

test('rejected: a record filed under another key, parts that do not hash to the key, a broken seal, no seal', () => {
  const e = entry('a');
  const other = entry('b');
  // The manifest of one key re-tagged as another (a registry mix-up or an attack).
  assert.match((checkRemoteEntry(other.key, manifest(e), recordBytes(e)) as { problem: string }).problem, /key field does not match/);
  // A record whose key field is right but whose parts were changed (and resealed).
  const forged = { ...e, parts: parts('zzz') };
  assert.match((checkRemoteEntry(e.key, manifest(e), Buffer.from(JSON.stringify({ ...forged, recordSha256: recordSeal(forged) }))) as { problem: string }).problem, /parts do not hash to its key/);
  // A file digest changed in the record without resealing.
  const j = JSON.parse(recordBytes(e).toString());
  j.files[0].sha256 = hex('7');
  assert.match((checkRemoteEntry(e.key, manifest(e), Buffer.from(JSON.stringify(j))) as { problem: string }).problem, /seal does not match/);
  delete j.recordSha256;
  assert.match((checkRemoteEntry(e.key, manifest(e), Buffer.from(JSON.stringify(j))) as { problem: string }).problem, /no seal/);
  assert.match((checkRemoteEntry(e.key, manifest(e), Buffer.from('not json')) as { problem: string }).problem, /not valid JSON/);
});

test('rejected: layers that are not exactly the record files', () => {
  const e = entry();
  const rec = recordBytes(e);
  const m = manifest(e);
  const swap = structuredClone(m);
  swap.layers![1]!.digest = 'sha256:' + hex('8');
  assert.match((checkRemoteEntry(e.key, swap, rec) as { problem: string }).problem, /layer for a\/rootfs.tar is sha256:8+/);
  const size = structuredClone(m);
  size.layers![2]!.size = 4;
  assert.match((checkRemoteEntry(e.key, size, rec) as { problem: string }).problem, /run.sh/);
  const extra = structuredClone(m);
  extra.layers!.push({ mediaType: 'application/octet-stream', digest: 'sha256:' + hex('5'), size: 1, annotations: { [TITLE]: 'extra' } });
  assert.match((checkRemoteEntry(e.key, extra, rec) as { problem: string }).problem, /3 file layers for 2 files/);
  const renamed = structuredClone(m);
  renamed.layers![2]!.annotations![TITLE] = 'other.sh';
  assert.match((checkRemoteEntry(e.key, renamed, rec) as { problem: string }).problem, /no layer for run.sh/);
  assert.match((recordLayer({ ...m, artifactType: 'application/vnd.oci.image.config.v1+json' }) as { problem: string }).problem, /artifactType/);
  assert.match((recordLayer({ ...m, layers: m.layers!.slice(1) }) as { problem: string }).problem, /0 record layers/);
});

test('the signed statement names the tag and the record digest, nothing else', () => {
  const e = entry();
  const s = JSON.parse(entryStatement(cacheTag(e.key), recordBytes(e)).toString());
  assert.equal(s._type, 'https://in-toto.io/Statement/v1');
  assert.equal(s.subject.length, 1);
  assert.equal(s.subject[0].name, cacheTag(e.key));
  assert.match(s.subject[0].digest.sha256, /^[0-9a-f]{64}$/);
  assert.notDeepEqual(entryStatement(cacheTag(e.key), recordBytes(entry('b'))), entryStatement(cacheTag(e.key), recordBytes(e)));
});
