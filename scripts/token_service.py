#!/usr/bin/env python3
"""A small registry token service, the way Harbor's `/service/token` works, for the local stack.

The registry (CNCF distribution, ``auth: token``) answers an unauthenticated request ``401`` with
``WWW-Authenticate: Bearer realm="<gateway>/service/token",service="…",scope="repository:<name>:<actions>"``.
The client asks this service for a token (``GET /service/token?service=…&scope=…``, HTTP basic
credentials, or none for an anonymous token) and retries with ``Authorization: Bearer <token>``.

Tokens follow distribution's token specification (registry/auth/token in distribution 2.8):
a JWS compact serialization, ``RS256``, header ``kid`` = the libtrust fingerprint of the signing
key (the registry trusts the keys of the certificates in its ``rootcertbundle``), claims ``iss``,
``sub``, ``aud`` (the service, one string), ``exp``, ``nbf``, ``iat``, ``jti`` and ``access``:
``[{"type":"repository","name":…,"actions":[…]}]``. Each requested action is granted only if the
user holds it on the repository's project (the first path segment), as Harbor grants per project;
``*`` stands for every action the user holds there; ``registry:catalog:*`` (listing every
repository) only to a user with ``"catalog": true``, as Harbor gives it to system
administrators only. Unknown users or wrong passwords get ``401``.

Configuration (JSON, read again on every request, so a test may change a user's lifetime)::

    {"issuer": "...", "service": "...", "key": "<signing key PEM>", "ttl_seconds": 300,
     "users": [{"name": "...", "password": "...", "access": {"demo": ["pull", "push"]},
                "ttl_seconds": 300, "catalog": false}]}

A user's ``ttl_seconds`` may be negative: distribution accepts a token until 60 s after its
``exp`` (its leeway), so ``-57`` makes a token the registry takes for about 3 s.

    scripts/token_service.py --config FILE --listen HOST:PORT

Every token issued is logged on stdout as one JSON line (user, requested and granted scopes).
"""
from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

TOKEN_PATH = "/service/token"
ACTIONS = ("pull", "push", "delete")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key) -> str:
    """The key id distribution looks a `kid` up by (libtrust's fingerprint): SHA-256 of the
    PKIX DER public key, its first 240 bits in base32 without padding, in groups of four
    joined by ':'."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    s = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(s[i:i + 4] for i in range(0, len(s), 4))


def ensure_signing_key(directory: Path) -> Tuple[Path, Path]:
    """The token signing key (RSA-2048, PKCS#8) and a self-signed certificate of it, the
    registry's `rootcertbundle`; made once. Returns (key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / "token-signing.pem", directory / "token-signing.crt"
    if key_path.exists() and cert_path.exists():
        return key_path, cert_path
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ocicrypt-filter local token service")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def sign_token(key, issuer: str, audience: str, subject: str, access: List[Dict[str, Any]],
               ttl_seconds: int, now: Optional[float] = None) -> str:
    """A registry token (JWS compact, RS256) with these claims."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    now = int(time.time() if now is None else now)
    header = {"typ": "JWT", "alg": "RS256", "kid": libtrust_key_id(key.public_key())}
    claims = {"iss": issuer, "sub": subject, "aud": audience, "exp": now + ttl_seconds,
              "nbf": now - 1, "iat": now, "jti": b64url(os.urandom(16)), "access": access}
    signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + b64url(json.dumps(claims, separators=(",", ":")).encode()))
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(sig)


def parse_scope(scope: str) -> Optional[Tuple[str, str, List[str]]]:
    """`repository:demo/app:pull,push` -> ("repository", "demo/app", ["pull", "push"]). The name
    may hold ':' (a registry host with a port); the actions are after the last one."""
    typ, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not typ or not name:
        return None
    return typ, name, [a for a in actions.split(",") if a]


def grant(user: Optional[Dict[str, Any]], scopes: List[str]) -> List[Dict[str, Any]]:
    """The access claim for `user` (None: anonymous, nothing) asking for `scopes`: per
    repository, the requested actions the user holds on its project (`*`: all it holds)."""
    out: Dict[Tuple[str, str], List[str]] = {}
    for scope in scopes:
        parsed = parse_scope(scope)
        if parsed is None:
            continue
        typ, name, wanted = parsed
        held: List[str] = []
        if user is not None and typ == "repository":
            held = list(user.get("access", {}).get(name.split("/", 1)[0], []))
        elif user is not None and (typ, name) == ("registry", "catalog") and user.get("catalog"):
            held = ["*"]  # listing every repository: Harbor's system administrators only
        given = out.setdefault((typ, name), [])
        for action in wanted:
            for a in (held if action == "*" else [action]):
                if a in held and a not in given:
                    given.append(a)
    return [{"type": t, "name": n, "actions": a} for (t, n), a in out.items()]


class Handler(BaseHTTPRequestHandler):
    server_version = "ocicrypt-token-service"
    config_path: Path

    def log_message(self, fmt: str, *args) -> None:  # the token log is enough
        pass

    def _reply(self, status: int, body: Dict[str, Any], extra: Optional[Dict[str, str]] = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _user(self, cfg: Dict[str, Any]) -> Tuple[bool, Optional[Dict[str, Any]]]:
        """(credentials fine, the user or None for anonymous)."""
        header = self.headers.get("Authorization")
        if not header:
            return True, None
        kind, _, value = header.partition(" ")
        if kind.lower() != "basic":
            return False, None
        try:
            name, sep, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        for user in cfg["users"]:
            if sep and user["name"] == name and hmac.compare_digest(
                    user["password"].encode(), password.encode()):
                return True, user
        return False, None

    def do_POST(self) -> None:  # noqa: N802 - Harbor's token service has no OAuth2 POST
        self._reply(405, {"errors": [{"code": "UNSUPPORTED",
                                      "message": "POST is not supported; use GET"}]})

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if url.path != TOKEN_PATH:
            self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        cfg = json.loads(self.server.config_path.read_text())
        query = parse_qs(url.query)
        ok, user = self._user(cfg)
        if not ok:
            self._reply(401, {"errors": [{"code": "UNAUTHORIZED",
                                          "message": "invalid username or password"}]},
                        {"WWW-Authenticate": 'Basic realm="ocicrypt-token-service"'})
            return
        service = (query.get("service") or [cfg["service"]])[0]
        if service != cfg["service"]:
            self._reply(400, {"errors": [{"code": "UNSUPPORTED",
                                          "message": f"unknown service {service!r}"}]})
            return
        scopes = [s for v in query.get("scope", []) for s in v.split(" ") if s]
        access = grant(user, scopes)
        ttl = int((user or {}).get("ttl_seconds", cfg.get("ttl_seconds", 300)))
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(Path(cfg["key"]).read_bytes(), password=None)
        now = time.time()
        token = sign_token(key, cfg["issuer"], service, (user or {}).get("name", ""), access,
                           ttl, now)
        log_line({"time": round(now, 3), "user": (user or {}).get("name", ""),
                  "requested": scopes, "granted": access, "ttl_seconds": ttl})
        issued = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        self._reply(200, {"token": token, "access_token": token,
                          # What the client is told: at least 60 s (what clients assume anyway).
                          "expires_in": max(ttl, 60),
                          "issued_at": issued.isoformat().replace("+00:00", "Z")})


#: One log line at a time: the server answers on threads, and print() writes a line and its
#: newline separately (two tokens at once made one line of two JSON objects).
LOG_LOCK = threading.Lock()


def log_line(record: dict) -> None:
    with LOG_LOCK:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    server.config_path = args.config
    server.daemon_threads = True
    print(json.dumps({"listening": args.listen}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
