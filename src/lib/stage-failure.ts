// A kind's failure in words the user can act on: a tarball entry the format
// cannot carry (named by path), or the usual reasons a write to the output
// directory fails. Shared by the kinds that read a rootfs tarball (oci, composefs).
import { TarError } from './tarfs.js';
import { StageError } from '../stage.js';

const IO_HINT: Record<string, string> = {
  ENOSPC: 'no space left on the output device',
  EDQUOT: 'disk quota exceeded',
  EROFS: 'the output directory is on a read-only filesystem',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
};

/** The error to throw for `e`: a StageError when we can say what went wrong, else `e` itself. */
export function stageFailure(kind: string, e: unknown, outDir: string): unknown {
  if (e instanceof TarError) return new StageError(`${kind}: ${e.message}`);
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (code && IO_HINT[code]) return new StageError(`${kind}: cannot write to ${outDir}: ${IO_HINT[code]} (${(e as Error).message})`);
  return e;
}
