// The pipeline spec: one YAML file, validated here. Stage `with:` blocks are
// validated a second time against the schema each stage kind declares.
import { z } from 'zod';
import { ARCHES } from '../src/stage.js';

export const NAME_RE = /^[a-z0-9][a-z0-9._-]*$/;
const Name = z.string().regex(NAME_RE, { message: 'expected a name of lowercase letters, digits, ".", "_" or "-"' });
export const ArchName = z.enum(ARCHES);
const Scalar = z.union([z.string(), z.number(), z.boolean()]);
const VarName = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, { message: 'expected a variable name ([A-Za-z_][A-Za-z0-9_]*)' });

export const DEFAULT_FORBID = [
  'Kernel panic',
  'Call Trace',
  'emergency mode',
  'Entering emergency',
  'dracut-emergency',
  'You are in emergency mode',
  'Failed to start',
];

export const BootTestSchema = z
  .object({
    expect: z.array(z.string().min(1)).min(1).describe('Serial-console markers that must all appear'),
    forbid: z.array(z.string().min(1)).default(DEFAULT_FORBID).describe('Patterns that fail the boot at once'),
    timeout: z.number().int().positive().default(300).describe('Seconds before the boot counts as failed'),
    memory: z.string().regex(/^\d+[MG]$/, { message: 'expected a size like 1024M or 2G' }).default('1024M'),
  })
  .strict();

export const StageSchema = z
  .object({
    kind: z.string().describe('Stage kind: a module in stages/ or outputs/'),
    description: z.string().optional(),
    inputs: z.record(z.string(), Name).default({}).describe('Input name -> producing stage'),
    with: z.record(z.string(), z.unknown()).default({}).describe("Parameters, checked against the kind's schema"),
    arch: z
      .partialRecord(ArchName, z.object({ with: z.record(z.string(), z.unknown()).default({}) }).strict())
      .optional()
      .describe('Per-architecture overrides merged into `with`'),
  })
  .strict();

export const VariantSchema = z.union([
  z.array(Name).min(1),
  z
    .object({
      description: z.string().optional(),
      stages: z.array(Name).min(1).describe('Stages whose files are published to images/<variant>/<arch>/'),
      arches: z.array(ArchName).min(1).optional(),
      boot_test: BootTestSchema.optional(),
    })
    .strict(),
]);

export const SpecSchema = z
  .object({
    name: Name,
    description: z.string().optional(),
    arches: z.array(ArchName).min(1).describe('Architectures this pipeline builds for'),
    source_date_epoch: z.number().int().nonnegative().optional().describe('Fixed build time; env SOURCE_DATE_EPOCH overrides'),
    vars: z
      .record(VarName, z.union([Scalar, z.partialRecord(ArchName, Scalar)]))
      .default({})
      .describe('${name} substitutions; a map of arch -> value for per-arch values'),
    stages: z.record(Name, StageSchema),
    variants: z.record(Name, VariantSchema),
    boot_test: BootTestSchema.optional(),
    signing: z.object({ key: z.string().optional() }).strict().optional(),
  })
  .strict();

export type SpecInput = z.input<typeof SpecSchema>;
export type Spec = z.output<typeof SpecSchema>;
export type StageSpec = z.output<typeof StageSchema>;
export type BootTestSpec = z.output<typeof BootTestSchema>;

/** What the JSON Schema needs of a stage kind (a StageModule has it). */
export interface KindSchema {
  params: z.ZodType;
  summary?: string;
}

type Json = Record<string, unknown>;

/**
 * JSON Schema for editors (yaml-language-server: $schema=...). With the stage
 * kinds, each stage's `with:` (and its per-arch overrides) completes and checks
 * against the schema of the kind named by its `kind:` (if/then on kind).
 */
export function specJsonSchema(kinds?: ReadonlyMap<string, KindSchema>): unknown {
  const schema = z.toJSONSchema(SpecSchema, { io: 'input', unrepresentable: 'any' }) as Json;
  if (!kinds?.size) return schema;
  const stage = ((schema.properties as Json).stages as Json).additionalProperties as Json;
  const props = stage.properties as Json;
  const names = [...kinds.keys()].sort();
  props.kind = { ...(props.kind as Json), enum: names };
  stage.allOf = names.map((name) => {
    const k = kinds.get(name)!;
    const params = z.toJSONSchema(k.params, { io: 'input', unrepresentable: 'any' }) as Json;
    delete params.$schema;
    // An arch override is merged over `with`, so none of its keys is required.
    const partial: Json = { ...params };
    delete partial.required;
    delete partial.default;
    return {
      if: { properties: { kind: { const: name } }, required: ['kind'] },
      then: {
        properties: {
          with: { ...params, ...(k.summary ? { description: `${name}: ${k.summary}` } : {}) },
          arch: { type: 'object', additionalProperties: { type: 'object', properties: { with: partial } } },
        },
      },
    };
  });
  return schema;
}
