// The repository root, for tests that read shipped files. Pure: importing it pulls
// in no CLI runner, no dist/ and no shared cache, so unit tests may use it.
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
