// `pipeline matrix` (pure part) and the shipped GitHub workflow: one entry per
// (arch, variant) of the shipped spec, the GitHub/GitLab forms, --affected
// dropping exactly the cached entries, and the workflow validated by GitHub's
// own parser (@actions/workflow-parser), so a typo in it fails the suite.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { parse } from 'yaml';
import { convertWorkflowTemplate, NoOperationTraceWriter, parseWorkflow } from '@actions/workflow-parser';
import { allVariants, DEFAULT_SPEC } from '../../src/engine/build.js';
import { compile, requirements, type Plan } from '../../src/engine/compile.js';
import { UsageError } from '../../src/engine/errors.js';
import { loadKinds } from '../../src/engine/kinds.js';
import { loadSpecFile } from '../../src/engine/spec.js';
import { dropCached, githubMatrix, gitlabPipeline, GITHUB_MATRIX_LIMIT, matrixEntries, type MatrixEntry } from '../../src/matrix/matrix.js';
import { ROOT } from '../helpers/paths.js';

/** Plans of the shipped spec for every arch and variant, with stand-in tool versions and asset digests (keys are not compared with real ones). */
async function shippedPlans(): Promise<Plan[]> {
  const kinds = await loadKinds();
  const loaded = loadSpecFile(DEFAULT_SPEC, kinds);
  return loaded.spec.arches.map((arch) => {
    const variants = allVariants(loaded, arch);
    const req = requirements(loaded, arch, variants, kinds);
    const toolVersions = Object.fromEntries(req.tools.map((t) => [t.name, `${t.name} 1.0`]));
    const assetDigests = Object.fromEntries(req.assets.map((a) => [a, 'sha256:' + '0'.repeat(64)]));
    return compile(loaded, arch, variants, kinds, { toolVersions, assetDigests, sourceDateEpoch: 1767225600 });
  });
}

test('matrix of the shipped spec: one entry per (arch, variant) it allows, final keys and shared heavy stages', async () => {
  const plans = await shippedPlans();
  const entries = matrixEntries(plans);
  const expected = plans.flatMap((p) => p.variants.map((v) => `${v}-${p.arch}`));
  assert.deepEqual(entries.map((e) => e.id), expected);
  assert.equal(new Set(entries.map((e) => e.id)).size, entries.length, 'job ids are unique');
  for (const e of entries) {
    const plan = plans.find((p) => p.arch === e.arch)!;
    assert.deepEqual(Object.keys(e.keys), plan.sinks[e.variant]);
    for (const [stage, key] of Object.entries(e.keys)) assert.equal(key, plan.stages.find((s) => s.name === stage)!.key);
    for (const s of e.shares) assert.ok(plan.stages.find((x) => x.name === s)!.heavy, `${s} is a heavy stage`);
  }
  // Every amd64 variant is built on the amd64 rootfs: the hint says so.
  const amd = entries.filter((e) => e.arch === 'amd64');
  assert.ok(amd.length > 1);
  assert.ok(amd.every((e) => e.shares.length > 0), JSON.stringify(amd.map((e) => [e.id, e.shares])));

  // GitHub: fromJSON semantics = plain JSON with an include list of objects.
  const gh = githubMatrix(entries);
  assert.ok(!gh.includes('\n'), 'one line, as $GITHUB_OUTPUT needs');
  const parsed = JSON.parse(gh) as { include: MatrixEntry[] };
  assert.deepEqual(Object.keys(parsed), ['include']);
  assert.deepEqual(parsed.include, entries);

  // GitLab: a child pipeline with one build job per entry.
  const gl = parse(gitlabPipeline(entries)) as Record<string, { stage?: string; variables?: Record<string, string>; artifacts?: { paths: string[] } }>;
  const jobs = Object.entries(gl).filter(([k]) => k !== 'stages');
  assert.equal(jobs.length, entries.length);
  for (const e of entries) {
    const j = gl[`build-${e.id}`]!;
    assert.deepEqual(j.variables, { PIPELINE_ARCH: e.arch, PIPELINE_VARIANT: e.variant });
    assert.deepEqual(j.artifacts!.paths, [`images/${e.variant}/${e.arch}/`]);
  }
  assert.ok(Object.keys(parse(gitlabPipeline([]))).includes('nothing-to-build'), 'an empty child pipeline still has a job');
});

test('--affected drops exactly the entries whose final keys are all cached', () => {
  const e = (id: string, keys: Record<string, string>): MatrixEntry => ({ id, arch: 'amd64', variant: id, keys, shares: [] });
  const entries = [e('a', { x: 'k1' }), e('b', { y: 'k2', z: 'k3' }), e('c', { w: 'k4' })];
  const r = dropCached(entries, new Set(['k1', 'k2', 'k9']));
  assert.deepEqual(r.dropped.map((x) => x.id), ['a']);
  assert.deepEqual(r.kept.map((x) => x.id), ['b', 'c'], 'b has one of two keys cached: it stays');
  assert.deepEqual(dropCached(entries, new Set()).dropped, []);
});

test('github matrix: more than 256 entries fails clearly', () => {
  const many = Array.from({ length: GITHUB_MATRIX_LIMIT + 1 }, (_, i): MatrixEntry => ({ id: `v${i}-amd64`, arch: 'amd64', variant: `v${i}`, keys: {}, shares: [] }));
  assert.doesNotThrow(() => githubMatrix(many.slice(0, GITHUB_MATRIX_LIMIT)));
  assert.throws(() => githubMatrix(many), (err: unknown) => err instanceof UsageError && /257 entries.*at most 256/.test(err.message));
});

async function workflowErrors(name: string, content: string): Promise<string[]> {
  const r = parseWorkflow({ name, content }, new NoOperationTraceWriter());
  const errs = r.context.errors.getErrors().map((x) => x.message);
  if (r.value) {
    const t = await convertWorkflowTemplate(r.context, r.value);
    errs.push(...(t.errors ?? []).map((x) => x.Message));
  }
  return errs;
}

test('the shipped workflow is valid for GitHub Actions and plans, builds and collects', async () => {
  const file = path.join(ROOT, '.github', 'workflows', 'images.yml');
  const text = readFileSync(file, 'utf8');
  assert.deepEqual(await workflowErrors('images.yml', text), []);
  // The parser catches typos: the same file with one key misspelt fails.
  assert.notDeepEqual(await workflowErrors('images.yml', text.replace('runs-on: ubuntu-24.04\n    container: debian', 'runs_on: ubuntu-24.04\n    container: debian')), []);
  const wf = parse(text) as { jobs: Record<string, { needs?: string | string[]; strategy?: { matrix?: unknown }; steps: { run?: string }[] }> };
  assert.deepEqual(Object.keys(wf.jobs), ['plan', 'build', 'collect']);
  assert.match(wf.jobs.plan!.steps.map((s) => s.run ?? '').join('\n'), /pipeline matrix --format github --affected/);
  assert.equal(wf.jobs.build!.strategy!.matrix, '${{ fromJSON(needs.plan.outputs.matrix) }}');
  assert.match(wf.jobs.build!.steps.map((s) => s.run ?? '').join('\n'), /pipeline build "\$@"/);
  assert.deepEqual(wf.jobs.collect!.needs, ['plan', 'build']);
  // Every job reads the remote cache from the environment the workflow sets.
  assert.match(text, /PIPELINE_REMOTE_CACHE: \$\{\{ vars\.PIPELINE_REMOTE_CACHE \}\}/);
  assert.match(text, /PIPELINE_REMOTE_CACHE_MODE: \$\{\{ github\.event_name == 'pull_request' && 'read' \|\| 'readwrite' \}\}/);
});
