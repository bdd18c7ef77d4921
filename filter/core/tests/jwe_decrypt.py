#!/usr/bin/env python3
"""Independent decryptor for the ocicrypt annotations the gateway writes.

Written from RFC 7516/7518 and containers/ocicrypt's format with the Python `cryptography`
package only (no code shared with the Rust crate), so crypto_keywrap.rs can check that what the
gateway emits is decryptable by someone else's implementation.

Usage:
  jwe_decrypt.py --jwe ANNOTATION_FILE --key PRIVATE_KEY_PEM
                 [--pubopts ANNOTATION_FILE --blob CIPHERTEXT_FILE --plain-out FILE]

ANNOTATION_FILE holds the value of org.opencontainers.image.enc.keys.jwe (comma-separated
std-base64 JWE JSON entries). Writes the decrypted private-options JSON bytes, unchanged, to
stdout. With --pubopts/--blob, also verifies HMAC-SHA256(symkey, blob) against the public
options and writes the AES-256-CTR decryption of the blob to --plain-out.
Exit status 1 with a message on stderr if nothing decrypts.
"""

import argparse
import base64
import hashlib
import hmac
import json
import struct
import sys

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
KW_BITS = {"ECDH-ES+A128KW": 128, "ECDH-ES+A192KW": 192, "ECDH-ES+A256KW": 256}


def b64url(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def length_prefixed(b):
    return struct.pack(">I", len(b)) + b


def unwrap_cek(header, encrypted_key, key):
    alg = header.get("alg")
    if alg in ("RSA-OAEP", "RSA-OAEP-256") and isinstance(key, rsa.RSAPrivateKey):
        h = hashes.SHA1() if alg == "RSA-OAEP" else hashes.SHA256()
        return key.decrypt(encrypted_key, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None))
    if alg in KW_BITS and isinstance(key, ec.EllipticCurvePrivateKey):
        epk = header["epk"]
        if epk.get("kty") != "EC" or CURVES.get(epk.get("crv")) is None:
            raise ValueError("bad epk %r" % epk)
        curve = CURVES[epk["crv"]]
        if curve.name != key.curve.name:
            raise ValueError("epk curve %s does not match key curve %s" % (epk["crv"], key.curve.name))
        pub = ec.EllipticCurvePublicNumbers(
            int.from_bytes(b64url(epk["x"]), "big"), int.from_bytes(b64url(epk["y"]), "big"), curve
        ).public_key()
        z = key.exchange(ec.ECDH(), pub)
        bits = KW_BITS[alg]
        other_info = (
            length_prefixed(alg.encode())
            + length_prefixed(b64url(header.get("apu", "")))
            + length_prefixed(b64url(header.get("apv", "")))
            + struct.pack(">I", bits)
        )
        kek = ConcatKDFHash(algorithm=hashes.SHA256(), length=bits // 8, otherinfo=other_info).derive(z)
        return aes_key_unwrap(kek, encrypted_key)
    raise ValueError("alg %r does not fit a %s" % (alg, type(key).__name__))


def decrypt_jwe(jwe, key):
    protected_b64 = jwe.get("protected", "")
    protected = json.loads(b64url(protected_b64)) if protected_b64 else {}
    shared = dict(jwe.get("unprotected", {}))
    shared.update(protected)
    if shared.get("enc") != "A256GCM":
        raise ValueError("enc %r" % shared.get("enc"))
    if "recipients" in jwe:
        entries = [(r.get("header", {}), r["encrypted_key"]) for r in jwe["recipients"]]
    else:
        entries = [(jwe.get("header", {}), jwe["encrypted_key"])]
    aad = protected_b64.encode("ascii")
    if "aad" in jwe:
        aad += b"." + jwe["aad"].encode("ascii")
    iv, ct, tag = b64url(jwe["iv"]), b64url(jwe["ciphertext"]), b64url(jwe["tag"])
    errors = []
    for header, ek in entries:
        merged = dict(shared)
        merged.update(header)
        try:
            cek = unwrap_cek(merged, b64url(ek), key)
            return AESGCM(cek).decrypt(iv, ct + tag, aad)
        except Exception as e:  # try the next recipient, as ocicrypt does
            errors.append("%s: %s" % (merged.get("alg"), e or type(e).__name__))
    raise ValueError("no recipient decrypts: " + "; ".join(errors))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jwe", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--pubopts")
    ap.add_argument("--blob")
    ap.add_argument("--plain-out")
    args = ap.parse_args()

    with open(args.key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    with open(args.jwe) as f:
        annotation = f.read().strip()

    plaintext, errors = None, []
    for entry in annotation.split(","):
        try:
            plaintext = decrypt_jwe(json.loads(base64.b64decode(entry, validate=True)), key)
            break
        except Exception as e:
            errors.append(str(e))
    if plaintext is None:
        print("cannot decrypt: " + " | ".join(errors), file=sys.stderr)
        return 1

    if args.blob:
        opts = json.loads(plaintext)
        symkey = base64.b64decode(opts["symkey"], validate=True)
        nonce = base64.b64decode(opts["cipheroptions"]["nonce"], validate=True)
        with open(args.pubopts) as f:
            pub = json.loads(base64.b64decode(f.read().strip(), validate=True))
        if pub["cipher"] != "AES_256_CTR_HMAC_SHA256":
            print("cipher %r" % pub["cipher"], file=sys.stderr)
            return 1
        with open(args.blob, "rb") as f:
            blob = f.read()
        expected = base64.b64decode(pub["hmac"], validate=True)
        if not hmac.compare_digest(hmac.new(symkey, blob, hashlib.sha256).digest(), expected):
            print("HMAC mismatch", file=sys.stderr)
            return 1
        dec = Cipher(algorithms.AES(symkey), modes.CTR(nonce)).decryptor()
        with open(args.plain_out, "wb") as f:
            f.write(dec.update(blob) + dec.finalize())

    sys.stdout.buffer.write(plaintext)
    return 0


if __name__ == "__main__":
    sys.exit(main())
