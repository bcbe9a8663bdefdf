// Small, real stage kinds for engine tests: they write files and run real
// processes (sh, sleep) through ctx.exec, so scheduling, caching and
// cancellation are exercised without needing a Debian mirror.
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { defineStage, type StageModule } from '../../src/stage.js';
import type { Kinds } from '../../src/engine/spec.js';

export const text = defineStage({
  kind: 'text',
  version: '1',
  summary: 'writes a file',
  params: z.object({ name: z.string().default('out.txt'), content: z.string(), sleep: z.number().default(0) }).strict(),
  inputs: [],
  tools: () => [{ name: 'sh', apt: 'dash' }],
  async run(ctx) {
    if (ctx.params.sleep) await ctx.exec('sleep', [String(ctx.params.sleep)]);
    await fs.writeFile(path.join(ctx.outDir, ctx.params.name), ctx.params.content);
  },
});

export const concat = defineStage({
  kind: 'concat',
  version: '1',
  summary: 'concatenates its inputs',
  params: z.object({ sleep: z.number().default(0), name: z.string().default('joined.txt') }).strict(),
  inputs: ['a', 'b'],
  tools: () => [],
  async run(ctx) {
    if (ctx.params.sleep) await ctx.exec('sleep', [String(ctx.params.sleep)]);
    const parts: string[] = [];
    for (const k of ['a', 'b']) for (const f of ctx.inputs[k]!.files) parts.push(await fs.readFile(path.join(ctx.inputs[k]!.dir, f), 'utf8'));
    await fs.writeFile(path.join(ctx.outDir, ctx.params.name), parts.join('+'));
  },
});

export const shell = defineStage({
  kind: 'shell',
  version: '1',
  summary: 'runs sh -c with a fixed script (test only)',
  params: z.object({ script: z.string(), heavy: z.boolean().default(false) }).strict(),
  inputs: [],
  tools: () => [{ name: 'sh', apt: 'dash' }],
  async run(ctx) {
    await ctx.exec('sh', ['-c', ctx.params.script, 'sh', ctx.outDir]);
  },
});

export const heavySleep = defineStage({
  kind: 'heavy-sleep',
  version: '1',
  summary: 'a heavy stage that sleeps',
  params: z.object({ seconds: z.number() }).strict(),
  inputs: [],
  heavy: true,
  tools: () => [],
  async run(ctx) {
    await ctx.exec('sleep', [String(ctx.params.seconds)]);
    await fs.writeFile(path.join(ctx.outDir, 'done'), String(ctx.params.seconds));
  },
});

export const amd64Only = defineStage({
  kind: 'amd64-only',
  version: '1',
  summary: 'only for amd64',
  params: z.object({}).strict(),
  inputs: [],
  arches: ['amd64'],
  tools: () => [],
  async run(ctx) {
    await fs.writeFile(path.join(ctx.outDir, 'x'), 'x');
  },
});

export function testKinds(): Kinds {
  const m = new Map<string, StageModule>();
  for (const k of [text, concat, shell, heavySleep, amd64Only] as StageModule[]) m.set(k.kind, k);
  return m;
}
