// The JSON Schema for editors completes every kind's options: each stage's `with:`
// (and its arch overrides) is checked against the schema of the kind it names.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { z } from 'zod';
import { specJsonSchema } from '../../schema/spec.js';
import { loadKinds } from '../../src/engine/kinds.js';
import { ROOT } from '../helpers/paths.js';

type Json = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

test('every kind’s params are in the schema, selected by kind', async () => {
  const kinds = await loadKinds();
  const s = specJsonSchema(kinds) as Json;
  const stage = s.properties.stages.additionalProperties;
  assert.deepEqual(stage.properties.kind.enum, [...kinds.keys()].sort());
  assert.equal(stage.allOf.length, kinds.size);
  for (const [name, mod] of kinds) {
    const branch = stage.allOf.find((b: Json) => b.if.properties.kind.const === name);
    assert.ok(branch, name);
    assert.deepEqual(branch.if.required, ['kind']);
    const want = z.toJSONSchema(mod.params, { io: 'input', unrepresentable: 'any' }) as Json;
    const withSchema = branch.then.properties.with;
    assert.deepEqual(Object.keys(withSchema.properties ?? {}).sort(), Object.keys(want.properties ?? {}).sort(), name);
    assert.equal(withSchema.additionalProperties, false, `${name}: unknown params are flagged in the editor`);
    // Arch overrides complete the same keys, none of them required.
    const over = branch.then.properties.arch.additionalProperties.properties.with;
    assert.deepEqual(Object.keys(over.properties ?? {}).sort(), Object.keys(want.properties ?? {}).sort());
    assert.equal(over.required, undefined);
  }
  // Spot checks on real options.
  const mm = stage.allOf.find((b: Json) => b.if.properties.kind.const === 'mmdebstrap').then.properties.with;
  assert.deepEqual(mm.properties.variant.enum.includes('minbase'), true);
  const raw = stage.allOf.find((b: Json) => b.if.properties.kind.const === 'raw').then.properties.with;
  assert.ok(raw.properties.cmdline.pattern, 'the GRUB-safe cmdline pattern reaches the editor');
});

test('the committed schema/spec.schema.json is current (regenerate: node bin/pipeline.js schema > schema/spec.schema.json)', async (t) => {
  if (process.env.PIPELINE_KINDS_PATH) return t.skip('PIPELINE_KINDS_PATH adds kinds the committed schema does not list');
  const committed = readFileSync(path.join(ROOT, 'schema', 'spec.schema.json'), 'utf8');
  assert.equal(committed, JSON.stringify(specJsonSchema(await loadKinds()), null, 2) + '\n');
});
