// Canonical JSON: sorted keys, no whitespace. Cache keys and manifests hash this
// form so that key order in a spec or in code never changes a digest.
import { createHash } from 'node:crypto';

export function canonicalize(value: unknown): string {
  return JSON.stringify(sortDeep(value));
}

export function sortDeep(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(sortDeep);
  if (value && typeof value === 'object' && !(value instanceof Buffer)) {
    const out: Record<string, unknown> = {};
    for (const k of Object.keys(value).sort()) {
      const v = (value as Record<string, unknown>)[k];
      if (v !== undefined) out[k] = sortDeep(v);
    }
    return out;
  }
  return value;
}

export function sha256(data: string | Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** Pretty, stable JSON for files people read (manifests); always ends in a newline. */
export function stableJson(value: unknown): string {
  return JSON.stringify(sortDeep(value), null, 2) + '\n';
}
