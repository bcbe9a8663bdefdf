// The CLI's contract for bad input: exit code 2, a located message, nothing written.
// Runs bin/pipeline.js (needs dist/) against the shared test cache, so it is an integration test.
import assert from 'node:assert/strict';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { cli, ROOT } from '../helpers/cli.js';

const FIXTURE = path.join(ROOT, 'fixtures', 'minimal.yaml');

/** A scratch dir removed after the test, pass or fail. */
async function tmp(t: TestContext): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pipeline-cli-'));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  return dir;
}

test('validate accepts the shipped specs', async () => {
  for (const f of [FIXTURE, path.join(ROOT, 'pipelines', 'powernode.yaml')]) {
    const r = await cli(['validate', '-f', f]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /: ok \(/);
  }
});

test('a spec error exits 2 with file:line:col and writes nothing', async (t) => {
  const dir = await tmp(t);
  const bad = (await fs.readFile(FIXTURE, 'utf8')).replace('kind: dracut', 'kind: dracutt');
  await fs.writeFile(path.join(dir, 'bad.yaml'), bad);
  const cache = path.join(dir, 'cache');
  const r = await cli(['build', 'amd64', 'ipxe', '-f', 'bad.yaml'], { cwd: dir, env: { PIPELINE_CACHE_DIR: cache } });
  assert.equal(r.code, 2);
  assert.match(r.stderr, /^bad\.yaml:\d+:11: error: stages\.initramfs\.kind: unknown stage kind "dracutt"; expected one of: .*dracut/m);
  assert.equal(existsSync(path.join(dir, 'images')), false);
  assert.equal(existsSync(cache), false);
});

test('unknown arch and variant on the command line exit 2 with what exists', async () => {
  const a = await cli(['plan', 'riscv64', 'ipxe', '-f', FIXTURE]);
  assert.equal(a.code, 2);
  assert.match(a.stderr, /unknown arch "riscv64" for pipeline minimal; it builds: amd64/);
  const v = await cli(['plan', 'amd64', 'ipxee', '-f', FIXTURE]);
  assert.equal(v.code, 2);
  assert.match(v.stderr, /unknown variant "ipxee" in minimal; it has: ipxe, kernel-initrd/);
});

test('plan prints the DAG with keys; --json, --dot and --mermaid render it', async () => {
  const t = await cli(['plan', 'amd64', 'ipxe', '-f', FIXTURE]);
  assert.equal(t.code, 0, t.stderr);
  assert.match(t.stdout, /rootfs\s+[0-9a-f]{12}\s+mmdebstrap/);
  const j = JSON.parse((await cli(['plan', 'amd64', 'ipxe', '--json', '-f', FIXTURE])).stdout);
  assert.deepEqual(j.stages.map((s: { name: string }) => s.name), ['rootfs', 'initramfs', 'ipxe']);
  assert.match((await cli(['plan', 'amd64', 'ipxe', '--dot', '-f', FIXTURE])).stdout, /"rootfs" -> "initramfs"/);
  assert.match((await cli(['plan', 'amd64', 'ipxe', '--mermaid', '-f', FIXTURE])).stdout, /s_rootfs -->\|rootfs\| s_initramfs/);
});

test('schema exports JSON Schema for editors', async () => {
  const r = await cli(['schema']);
  const s = JSON.parse(r.stdout);
  assert.ok(s.properties.stages);
  assert.ok(s.properties.variants);
});

test('the committed schema/spec.schema.json is what `pipeline schema` prints', async () => {
  const r = await cli(['schema']);
  assert.equal(await fs.readFile(path.join(ROOT, 'schema', 'spec.schema.json'), 'utf8'), r.stdout, 'run: node bin/pipeline.js schema > schema/spec.schema.json');
});
