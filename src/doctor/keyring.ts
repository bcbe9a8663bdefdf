// Debian archive keys on the host, for suites the shipped spec builds. mmdebstrap
// verifies a suite's Release with the host's apt keyrings, so a Debian 12 host can
// build the `verified` variant's Debian 13 (trixie) rootfs only if its
// debian-archive-keyring carries the trixie keys (2023.3+deb12u1 and later do).
// suiteKeyFindings is pure; hostKeyringFiles reads the two directories apt uses.
import { readdirSync } from 'node:fs';
import type { Finding } from '../engine/preflight.js';

export const KEYRING_DIRS = ['/etc/apt/trusted.gpg.d', '/usr/share/keyrings'];

/** Release suites whose archive keys the shipped spec needs (sid is signed with the newest stable's automatic key). */
export const SPEC_SUITES = ['bookworm', 'trixie'] as const;

/** Key file names (no directory) in the host's apt keyring directories. */
export function hostKeyringFiles(dirs: readonly string[] = KEYRING_DIRS): string[] {
  return dirs.flatMap((d) => {
    try {
      return readdirSync(d);
    } catch {
      return [];
    }
  });
}

/** One finding per suite: ok if its automatic archive key is there (stable key too is noted). Pure. */
export function suiteKeyFindings(files: readonly string[], suites: readonly string[] = SPEC_SUITES): Finding[] {
  const has = (n: string) => files.some((f) => f === `${n}.asc` || f === `${n}.gpg`);
  return suites.map((s) => {
    const auto = has(`debian-archive-${s}-automatic`);
    const stable = has(`debian-archive-${s}-stable`);
    if (auto) return { level: 'ok' as const, what: `keyring ${s}`, detail: `host apt keyrings hold the Debian ${s} archive key${stable ? 's' : ''}; mmdebstrap can verify ${s}` };
    return {
      level: 'warn' as const,
      what: `keyring ${s}`,
      detail: `no Debian ${s} archive key in ${KEYRING_DIRS.join(' or ')}; mmdebstrap cannot verify ${s} (the verified variant needs trixie)`,
      fix: 'apt-get install -y debian-archive-keyring (from bookworm-updates or a newer point release)',
    } satisfies Finding;
  });
}
