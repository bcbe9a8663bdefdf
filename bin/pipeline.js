#!/usr/bin/env node
// Thin launcher: the CLI is compiled to dist/ by `npm ci` (prepare) so a cached
// no-op build does not pay for a TypeScript loader on every start.
import { existsSync } from 'node:fs';
const cli = new URL('../dist/src/cli/cli.js', import.meta.url);
if (!existsSync(cli)) {
  process.stderr.write('pipeline: dist/ is missing; run `npm ci` (or `npm run build`) first\n');
  process.exit(2);
}
await import(cli.href);
