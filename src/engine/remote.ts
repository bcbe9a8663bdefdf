// The engine's view of a shared cache elsewhere (an OCI registry, in practice).
// Only this interface lives in the engine; the registry-backed implementation is
// wired in by the CLI (src/remote-cache/), so the engine imports no network code.
import type { Cache, Entry } from './cache.js';

export interface RemoteStore {
  /**
   * On a local miss: bring `key` into `cache` and return its entry, or undefined
   * when the remote does not have it, has a bad copy, or cannot be reached. It
   * must never throw and never commit anything it has not verified: the engine
   * treats what it returns like a local hit.
   */
  fetch(key: string, stage: string, cache: Cache): Promise<Entry | undefined>;
  /** After a stage is built: share it. Never throws; failures are the store's to report. */
  store(entry: Entry, cache: Cache): Promise<void>;
  /** Read-only stores are never asked to store. */
  readonly readOnly: boolean;
}
