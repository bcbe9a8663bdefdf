// Webhook delivery following Standard Webhooks 1.0: headers webhook-id,
// webhook-timestamp and webhook-signature "v1,<base64 HMAC-SHA256 of id.timestamp.body>"
// keyed with the base64-decoded part of a whsec_ secret. Optionally GitHub's
// X-Hub-Signature-256 as well.
//
// Delivery retries 5xx, timeouts and connection failures with bounded exponential
// backoff and the same id (receivers de-duplicate on it); a 4xx is final. The secret
// is held in a closure-free Buffer and never formatted into any message.
import { createHmac } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { BuildError, UsageError } from '../engine/errors.js';

export const WEBHOOK_SECRET_ENV = 'PIPELINE_WEBHOOK_SECRET';

/** A parsed whsec_ secret. toString/JSON never reveal it. */
export class WebhookSecret {
  readonly #key: Buffer;
  readonly #raw: string;
  constructor(raw: string) {
    const s = raw.trim();
    if (!s.startsWith('whsec_')) throw new UsageError('webhook secret must be in Standard Webhooks form whsec_<base64>');
    const b64 = s.slice('whsec_'.length);
    if (!/^[A-Za-z0-9+/]+={0,2}$/.test(b64)) throw new UsageError('webhook secret: the part after whsec_ is not base64');
    const key = Buffer.from(b64, 'base64');
    if (key.length < 16) throw new UsageError(`webhook secret is too short (${key.length} bytes after decoding; at least 16)`);
    this.#key = key;
    this.#raw = s;
  }
  /** Standard Webhooks v1 signature (base64). */
  sign(id: string, timestamp: number, body: Buffer): string {
    return createHmac('sha256', this.#key).update(`${id}.${timestamp}.`).update(body).digest('base64');
  }
  /** GitHub form: hex HMAC of the body, keyed with the secret string as configured on the receiver. */
  signGithub(body: Buffer): string {
    return createHmac('sha256', this.#raw).update(body).digest('hex');
  }
  /** For scrubbing: every textual form of the secret that could leak. */
  forms(): string[] {
    return [this.#raw, this.#raw.slice('whsec_'.length)];
  }
  toString(): string {
    return 'whsec_[redacted]';
  }
  toJSON(): string {
    return 'whsec_[redacted]';
  }
}

/** --webhook-secret-file beats $PIPELINE_WEBHOOK_SECRET; undefined when neither is set. */
export async function loadWebhookSecret(file: string | undefined, env: NodeJS.ProcessEnv = process.env): Promise<WebhookSecret | undefined> {
  if (file) {
    let text: string;
    try {
      text = await readFile(file, 'utf8');
    } catch (e) {
      throw new UsageError(`cannot read --webhook-secret-file ${file}: ${(e as NodeJS.ErrnoException).code ?? 'error'}`);
    }
    return new WebhookSecret(text);
  }
  const v = env[WEBHOOK_SECRET_ENV];
  return v ? new WebhookSecret(v) : undefined;
}

export type HeaderStyle = 'standard' | 'github';

/** The headers of one delivery attempt (pure). */
export function webhookHeaders(secret: WebhookSecret, id: string, timestamp: number, body: Buffer, style: HeaderStyle = 'standard'): Record<string, string> {
  const h: Record<string, string> = {
    'content-type': 'application/json',
    'user-agent': 'pipeline-release',
    'webhook-id': id,
    'webhook-timestamp': String(timestamp),
    'webhook-signature': `v1,${secret.sign(id, timestamp, body)}`,
  };
  if (style === 'github') {
    h['x-hub-signature-256'] = `sha256=${secret.signGithub(body)}`;
    h['x-github-delivery'] = id;
  }
  return h;
}

export interface DeliveryOptions {
  style?: HeaderStyle;
  /** Attempts in all (first + retries). Default 5. */
  attempts?: number;
  /** First backoff (ms), doubled each retry up to maxBackoffMs. Default 1000 ($PIPELINE_WEBHOOK_BACKOFF_MS). */
  backoffMs?: number;
  maxBackoffMs?: number;
  /** Per-attempt bound (ms). Default 10000 ($PIPELINE_WEBHOOK_TIMEOUT_MS). */
  timeoutMs?: number;
  log?: (line: string) => void;
  signal?: AbortSignal;
  /** Seconds since the epoch (injectable for tests). */
  now?: () => number;
}

export interface DeliveryResult {
  id: string;
  status: number;
  attempts: number;
}

/** Backoff before retry n (1-based), pure. */
export function backoff(n: number, base: number, max: number): number {
  return Math.min(max, base * 2 ** (n - 1));
}

export class WebhookError extends BuildError {
  constructor(
    message: string,
    readonly status: number | undefined,
    readonly attempts: number,
  ) {
    super(message);
    this.name = 'WebhookError';
  }
}

function envInt(name: string, dflt: number): number {
  const v = process.env[name];
  const n = v === undefined ? NaN : Number(v);
  return Number.isFinite(n) && n >= 0 ? n : dflt;
}

/** Remove any form of the secret from text that came from elsewhere (a receiver's reply). */
export function scrub(text: string, secret: WebhookSecret): string {
  let t = text;
  for (const f of secret.forms()) if (f) t = t.split(f).join('[redacted]');
  return t;
}

/** Describe a URL without credentials or query (a query can hold a token). */
export function safeUrl(url: string): string {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    return '(invalid URL)';
  }
}

export async function deliverWebhook(url: string, body: Buffer, id: string, secret: WebhookSecret, opts: DeliveryOptions = {}): Promise<DeliveryResult> {
  const attempts = opts.attempts ?? 5;
  const base = opts.backoffMs ?? envInt('PIPELINE_WEBHOOK_BACKOFF_MS', 1000);
  const max = opts.maxBackoffMs ?? 30_000;
  const timeout = opts.timeoutMs ?? envInt('PIPELINE_WEBHOOK_TIMEOUT_MS', 10_000);
  const now = opts.now ?? (() => Math.floor(Date.now() / 1000));
  const log = opts.log ?? (() => {});
  const where = safeUrl(url);
  let last = '';
  for (let n = 1; n <= attempts; n++) {
    if (n > 1) {
      const wait = backoff(n - 1, base, max);
      log(`webhook ${where}: retry ${n - 1}/${attempts - 1} in ${wait} ms (${last})`);
      await new Promise((r) => setTimeout(r, wait));
    }
    if (opts.signal?.aborted) throw new WebhookError(`webhook ${where} interrupted after ${n - 1} attempt(s)`, undefined, n - 1);
    const ts = now();
    let res: Response;
    try {
      const signal = opts.signal ? AbortSignal.any([opts.signal, AbortSignal.timeout(timeout)]) : AbortSignal.timeout(timeout);
      res = await fetch(url, { method: 'POST', headers: webhookHeaders(secret, id, ts, body, opts.style), body: body as Uint8Array<ArrayBuffer>, redirect: 'manual', signal });
    } catch (e) {
      if (opts.signal?.aborted) throw new WebhookError(`webhook ${where} interrupted`, undefined, n);
      const err = e as Error & { cause?: { code?: string } };
      last = err.name === 'TimeoutError' ? `no answer within ${timeout} ms` : (err.cause?.code ?? err.message);
      continue;
    }
    const text = scrub((await res.text().catch(() => '')).slice(0, 500).trim(), secret);
    if (res.status >= 200 && res.status < 300) return { id, status: res.status, attempts: n };
    if (res.status >= 500) {
      last = `HTTP ${res.status}${text ? `: ${text}` : ''}`;
      continue;
    }
    // 3xx (not followed: a redirect could send the signed body elsewhere) and 4xx are final.
    throw new WebhookError(`webhook ${where} rejected the delivery ${id}: HTTP ${res.status}${text ? ` — ${text}` : ''} (not retried)`, res.status, n);
  }
  throw new WebhookError(`webhook ${where} undeliverable after ${attempts} attempts (id ${id}): ${last}`, undefined, attempts);
}
