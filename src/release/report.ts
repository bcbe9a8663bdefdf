// Human-readable summary of a release (pure).
import type { ReleaseResult } from './publish.js';

export function formatRelease(r: ReleaseResult): string {
  const lines = [`${r.dryRun ? 'would publish' : 'released'} ${r.version} to ${r.registry} (release manifest ${r.manifestDigest})`];
  for (const s of r.steps) {
    const status = r.dryRun ? 'plan' : s.status === 'unchanged' ? 'already there' : s.status;
    lines.push(`  ${s.what.padEnd(28)} ${s.ref}${s.digest ? `@${s.digest}` : ''}  [${status}${s.uploaded ? `, ${s.uploaded} blob(s) uploaded` : ''}]`);
  }
  if (r.webhook) lines.push(`  webhook delivered: id ${r.webhook.id}, HTTP ${r.webhook.status} after ${r.webhook.attempts} attempt(s)`);
  lines.push(`  release manifest: ${r.manifestPath}`);
  return lines.join('\n') + '\n';
}
