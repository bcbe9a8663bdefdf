// `pipeline pkg-repo verify`: what a FreeBSD client checks before it trusts a
// repository, offline. Loaded lazily by the CLI.
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { runProcess } from '../../engine/process.js';
import { parseFingerprintFile } from './format.js';
import { loadFingerprints, RepoVerifyError, verifyRepo, zstdDecompressor, type Trust } from './repo.js';

/** Returns the process exit code; messages go to stderr. */
export async function pkgRepoVerifyCommand(dir: string, o: { pubkey?: string; fingerprint?: string }): Promise<number> {
  if (!o.pubkey === !o.fingerprint) {
    process.stderr.write('pkg-repo verify: give exactly one of --pubkey FILE or --fingerprint FILE|DIR\n');
    return 2;
  }
  const trust: Trust = o.pubkey ? { pubkey: await readFile(o.pubkey) } : { fingerprints: await loadFingerprints(o.fingerprint!, parseFingerprintFile) };
  const tmp = await mkdtemp(join(tmpdir(), 'pkg-repo-verify-'));
  try {
    const r = await verifyRepo(dir, trust, zstdDecompressor((cmd, args) => runProcess(cmd, args, { capture: true }), tmp));
    process.stderr.write(`verified ${dir}: ${r.packages} packages, catalogues signed (${r.signer}), every package matches its sum\n`);
    return 0;
  } catch (e) {
    if (e instanceof RepoVerifyError) {
      process.stderr.write(`pkg-repo verify failed (${e.code}): ${e.message}\n`);
      return 1;
    }
    throw e;
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}
