// Parse time of a large spec (parseSpec: YAML, duplicate-key check, zod, semantic
// checks) at 10k, 20k and 40k keys. Target: 40,000 keys in ≤ 2 s, and linear growth.
// Usage: node --import tsx bench/spec-parse.ts
import { performance } from 'node:perf_hooks';
import { SpecError } from '../src/engine/errors.js';
import { parseSpec } from '../src/engine/spec.js';
import { testKinds } from '../test/helpers/test-kinds.js';

const TARGET_S = 2;
const kinds = testKinds();

/** A spec with `keys` map keys in all: a big vars map plus text stages (3 keys each). */
export function bigSpec(keys: number): string {
  const lines = ['name: big', 'arches: [amd64]', 'vars:'];
  const nStages = Math.floor(keys / 8);
  for (let i = 0; i < keys - nStages * 3; i++) lines.push(`  v${i}: value${i}`);
  lines.push('stages:');
  for (let i = 0; i < nStages; i++) lines.push(`  s${i}:`, '    kind: text', `    with: { content: "\${v${i}}" }`);
  lines.push('variants:', '  v: [s0]', '');
  return lines.join('\n');
}

let last = 0;
for (const keys of [10_000, 20_000, 40_000]) {
  const text = bigSpec(keys);
  const t0 = performance.now();
  parseSpec(text, 'big.yaml', kinds);
  last = (performance.now() - t0) / 1000;
  console.log(`${keys} keys: ${last.toFixed(3)} s`);
}
console.log(`parse of 40000 keys: ${last.toFixed(3)} s; target ${TARGET_S} s; ratio to target ${(last / TARGET_S).toFixed(2)}`);

// The located path (yaml library, positions, linear duplicate-key check) runs for
// any spec with an error: the same 40,000 keys with one duplicate at the end.
const dup = bigSpec(40_000).replace(/\n {2}v1: value1\n/, '\n  v1: value1\n  v1: again\n');
const t0 = performance.now();
try {
  parseSpec(dup, 'big.yaml', kinds);
  throw new Error('the duplicate was not found');
} catch (e) {
  if (!(e instanceof SpecError)) throw e;
}
const located = (performance.now() - t0) / 1000;
console.log(`rejected 40000-key spec (duplicate key, located path): ${located.toFixed(3)} s; ratio to target ${(located / TARGET_S).toFixed(2)}`);
