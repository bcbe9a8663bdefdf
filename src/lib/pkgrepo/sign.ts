// Catalogue signing and signature checks as pkg does them (pkgsign_ossl.c):
// RSA PKCS#1 v1.5 with SHA-256 over the hex SHA-256 string of the catalogue.
// Pure crypto, no file or process I/O: the signing_command runner is injected.
import { constants, createHash, createPrivateKey, createPublicKey, publicDecrypt, sign as cryptoSign, verify as cryptoVerify, type KeyObject } from 'node:crypto';
import { parseSigningOutput, type CatalogueSignature } from './format.js';

export interface Signer {
  /** Sign pkg's message for one catalogue (its hex SHA-256). */
  sign(message: string): Promise<CatalogueSignature>;
  /** The public key (PEM) clients trust; known before signing for a key file. */
  readonly describe: string;
}

function rsaPublic(pem: Buffer | string, what: string): KeyObject {
  let k: KeyObject;
  try {
    k = createPublicKey(pem);
  } catch (e) {
    throw new Error(`${what} is not a public key (PEM): ${(e as Error).message}`);
  }
  if (k.asymmetricKeyType !== 'rsa') throw new Error(`${what} is a ${k.asymmetricKeyType} key; pkg signs with RSA`);
  return k;
}

/** The PEM (SPKI, as `openssl rsa -pubout` writes it) of a private key's public half. */
export function publicPemOf(privatePem: Buffer): Buffer {
  return Buffer.from(createPublicKey(createPrivateKey(privatePem)).export({ type: 'spki', format: 'pem' }) as string);
}

/** A signer holding an RSA private key (PEM). The key never leaves this object. */
export function keySigner(privatePem: Buffer): Signer {
  let key: KeyObject;
  try {
    key = createPrivateKey(privatePem);
  } catch (e) {
    throw new Error(`signing key is not a PEM private key: ${(e as Error).message}`);
  }
  if (key.asymmetricKeyType !== 'rsa') throw new Error(`signing key is ${key.asymmetricKeyType}; pkg repositories are signed with RSA`);
  const pub = Buffer.from(createPublicKey(key).export({ type: 'spki', format: 'pem' }) as string);
  return {
    describe: `RSA key (${key.asymmetricKeyDetails?.modulusLength ?? '?'} bits)`,
    sign: async (message) => ({ signature: cryptoSign('sha256', Buffer.from(message, 'latin1'), key), pub }),
  };
}

/**
 * A signer speaking pkg's signing_command protocol: the command reads the hex
 * SHA-256 and a newline on stdin and prints SIGNATURE/CERT/END sections. `run`
 * runs it and returns its raw stdout. The result is checked against the CERT it
 * printed, so a broken command fails here, not on every client.
 */
export function commandSigner(run: (stdin: Buffer) => Promise<Buffer>): Signer {
  return {
    describe: 'signing_command',
    sign: async (message) => {
      const out = parseSigningOutput(await run(Buffer.from(message + '\n', 'latin1')));
      if (out.type !== 'rsa') throw new Error(`signing command signed with "${out.type}"; only rsa is supported`);
      const check = checkSignature(message, out.signature, out.cert);
      if (check !== 'ok') throw new Error(`signing command's signature does not verify under the CERT it printed (${check})`);
      return { signature: out.signature, pub: out.cert };
    },
  };
}

// DER DigestInfo prefix for SHA-256 (RFC 8017 §9.2 note 1).
const SHA256_DIGEST_INFO = Buffer.from('3031300d060960864801650304020105000420', 'hex');

/**
 * Check a catalogue signature and say why it fails: `wrong-key` when the
 * signature was not made with this key (the PKCS#1 padding does not open),
 * `tampered` when it was, but over a different catalogue.
 */
export function checkSignature(message: string, signature: Buffer, pubPem: Buffer | string): 'ok' | 'wrong-key' | 'tampered' {
  const key = rsaPublic(pubPem, 'public key');
  // Older pkg wrote the signature with its C string NUL; clients strip it.
  const modBytes = (key.asymmetricKeyDetails?.modulusLength ?? 0) / 8;
  const sig = signature.length === modBytes + 1 && signature[modBytes] === 0 ? signature.subarray(0, -1) : signature;
  if (cryptoVerify('sha256', Buffer.from(message, 'latin1'), key, sig)) return 'ok';
  let info: Buffer;
  try {
    info = publicDecrypt({ key, padding: constants.RSA_PKCS1_PADDING }, sig);
  } catch {
    return 'wrong-key';
  }
  const expected = Buffer.concat([SHA256_DIGEST_INFO, createHash('sha256').update(message, 'latin1').digest()]);
  // A well-formed SHA-256 DigestInfo over another message: the key signed, the data changed.
  return info.length === expected.length && info.subarray(0, SHA256_DIGEST_INFO.length).equals(SHA256_DIGEST_INFO) ? 'tampered' : 'wrong-key';
}
