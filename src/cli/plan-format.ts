// Renderings of a plan (pure): text, JSON, Graphviz, Mermaid, and the mkosi-style summary.
import { stableJson } from '../engine/canonical.js';
import type { Plan } from '../engine/compile.js';
import type { EpochSource } from '../engine/epoch.js';

const short = (k: string) => k.slice(0, 12);

function sinkVariants(plan: Plan): Map<string, string[]> {
  const m = new Map<string, string[]>();
  for (const [v, ss] of Object.entries(plan.sinks)) for (const s of ss) m.set(s, [...(m.get(s) ?? []), v]);
  return m;
}

export function planText(plan: Plan): string {
  const sinks = sinkVariants(plan);
  const w = Math.max(...plan.stages.map((s) => s.name.length));
  const lines = [`${plan.spec.name} · ${plan.arch} · ${plan.variants.join(', ')} · SOURCE_DATE_EPOCH=${plan.sourceDateEpoch}`];
  for (const s of plan.stages) {
    const ins = Object.entries(s.inputs).map(([k, v]) => (k === v ? v : `${k}=${v}`));
    const tag = sinks.has(s.name) ? `  → images/{${sinks.get(s.name)!.join(',')}}/${plan.arch}` : '';
    lines.push(`  ${s.name.padEnd(w)}  ${short(s.key)}  ${s.kind}${s.heavy ? ' (heavy)' : ''}${ins.length ? `  ← ${ins.join(', ')}` : ''}${tag}`);
  }
  return lines.join('\n') + '\n';
}

export function planJson(plan: Plan): string {
  return stableJson({
    spec: plan.spec,
    arch: plan.arch,
    variants: plan.variants,
    sourceDateEpoch: plan.sourceDateEpoch,
    sinks: plan.sinks,
    stages: plan.stages.map((s) => ({ name: s.name, kind: s.kind, key: s.key, heavy: s.heavy, inputs: s.inputs, params: s.params, parts: s.parts })),
  });
}

const q = (s: string) => JSON.stringify(s);

export function planDot(plan: Plan): string {
  const sinks = sinkVariants(plan);
  const lines = [`digraph ${q(`${plan.spec.name}-${plan.arch}`)} {`, '  rankdir=LR;', '  node [shape=box, fontname="monospace"];'];
  for (const s of plan.stages) lines.push(`  ${q(s.name)} [label=${q(`${s.name}\n${s.kind}\n${short(s.key)}`)}${sinks.has(s.name) ? ', peripheries=2' : ''}];`);
  for (const s of plan.stages) for (const [k, ref] of Object.entries(s.inputs)) lines.push(`  ${q(ref)} -> ${q(s.name)} [label=${q(k)}];`);
  lines.push('}');
  return lines.join('\n') + '\n';
}

export function planMermaid(plan: Plan): string {
  const id = (n: string) => 's_' + n.replace(/[^A-Za-z0-9_]/g, '_');
  const lines = ['flowchart LR'];
  for (const s of plan.stages) lines.push(`  ${id(s.name)}["${s.name}<br/>${s.kind}<br/>${short(s.key)}"]`);
  for (const s of plan.stages) for (const [k, ref] of Object.entries(s.inputs)) lines.push(`  ${id(ref)} -->|${k}| ${id(s.name)}`);
  return lines.join('\n') + '\n';
}

/** Everything resolved, in one screen, like `mkosi summary`. */
export function specSummary(plan: Plan, epochSource: EpochSource, cacheRoot: string): string {
  const out: string[] = [];
  out.push(`PIPELINE: ${plan.spec.name}`);
  out.push(`  spec:               ${plan.spec.file}`);
  out.push(`  spec sha256:        ${plan.spec.sha256}`);
  out.push(`  arch:               ${plan.arch}`);
  out.push(`  variants:           ${plan.variants.join(', ')}`);
  out.push(`  SOURCE_DATE_EPOCH:  ${plan.sourceDateEpoch} (from ${epochSource})`);
  out.push(`  cache:              ${cacheRoot}`);
  for (const [v, ss] of Object.entries(plan.sinks)) out.push(`  images/${v}/${plan.arch}/ ← ${ss.join(', ')}`);
  for (const s of plan.stages) {
    out.push('');
    out.push(`STAGE ${s.name} (${s.kind} v${s.mod.version})${s.heavy ? ' heavy' : ''}`);
    out.push(`  ${s.mod.summary}`);
    out.push(`  key:     ${s.key}`);
    if (Object.keys(s.inputs).length) out.push(`  inputs:  ${Object.entries(s.inputs).map(([k, v]) => `${k} ← ${v}`).join(', ')}`);
    for (const [t, v] of Object.entries(s.parts.tools)) out.push(`  tool:    ${t}: ${v}`);
    for (const [a, d] of Object.entries(s.parts.assets)) out.push(`  asset:   ${a} (${short(d)})`);
    for (const line of yamlish(s.params, 2)) out.push(line);
  }
  return out.join('\n') + '\n';
}

function yamlish(v: unknown, indent: number): string[] {
  const pad = ' '.repeat(indent);
  if (v === null || typeof v !== 'object') return [`${pad}${JSON.stringify(v)}`];
  const out: string[] = [];
  for (const [k, val] of Object.entries(v as Record<string, unknown>)) {
    if (Array.isArray(val)) out.push(`${pad}${k}: ${val.length ? val.map((x) => (typeof x === 'string' ? x : JSON.stringify(x))).join(' ') : '[]'}`);
    else if (val && typeof val === 'object') out.push(`${pad}${k}:`, ...yamlish(val, indent + 2));
    else out.push(`${pad}${k}: ${typeof val === 'string' ? val : JSON.stringify(val)}`);
  }
  return out;
}
