"""The key service: a TUF 1.0 repository of per-project recipient public keys.

Used by ``scripts/keyservice`` (the CLI) and importable by tests. Built on python-tuf's
Metadata API (``tuf.api.metadata``) and securesystemslib's ``CryptoSigner``; the recipient
keys are validated with ``cryptography``. See ``docs/keyservice.md`` for the layout, the
roles, key custody and the commands.

Repository directory (``--repo DIR``)::

    keyservice.json        settings of this tool (expiry periods, consistent snapshots, ...)
    keys/                  private signing keys, PKCS#8 PEM, 0600 (online roles; tribes;
                           root unless --offline-keys); keys/retired/ after a rotation
    metadata/              SERVED: 1.root.json .. N.root.json, root.json, timestamp.json,
                           snapshot.json, targets.json, <role>.json (+ N.<role>.json when
                           consistent snapshots are on)
    targets/               SERVED: projects/<project>.json (+ <sha256>.<project>.json when
                           consistent snapshots are on)
    history/               every metadata version ever published (not served; used to build
                           the rollback / mix-and-match attack variants)
    .lock                  flock() against concurrent commands (cron vs operator)

Only ``metadata/`` and ``targets/`` may be served.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple
from urllib import parse

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.exceptions import DownloadHTTPError, UnsignedMetadataError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Key,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient.fetcher import FetcherInterface

TOP_LEVEL = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("timestamp", "snapshot")
CONFIG_NAME = "keyservice.json"
CONFIG_FORMAT = 1
#: Default lifetimes, in days. "delegated" covers tribe roles and their hash bins.
DEFAULT_EXPIRES_DAYS: Dict[str, float] = {
    "root": 365,
    "targets": 90,
    "delegated": 90,
    "snapshot": 7,
    "timestamp": 1,
}
KEY_TYPES = ("ed25519", "ecdsa", "ecdsa-p384", "rsa")
PROJECT_PREFIX = "projects/"
PROJECT_RE = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,253}[a-z0-9])?$")
ROLE_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")
#: Recipient key limits: what the filter accepts (filter/core/src/format/recipients.rs).
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 4096
EC_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
JWK_CURVES = {"P-256": (ec.SECP256R1, 32), "P-384": (ec.SECP384R1, 48), "P-521": (ec.SECP521R1, 66)}
JWK_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
JWK_ALG = {"RSA": "RSA-OAEP", "EC": "ECDH-ES+A256KW"}

SERIALIZER = JSONSerializer(compact=False)


class KeyServiceError(Exception):
    """A command cannot be carried out; the message says why and what to do."""


# ============================================================================================
# small helpers


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def fmt_time(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def expiry_in(days: float, now: Optional[dt.datetime] = None) -> dt.datetime:
    return (now or utcnow()) + dt.timedelta(seconds=round(days * 86400))


def short(keyid: str) -> str:
    return keyid[:8]


def role_file(role: str, version: Optional[int] = None) -> str:
    """File name of a role's metadata (role names URL-encoded, as clients request them)."""
    name = parse.quote(role, "")
    return f"{version}.{name}.json" if version is not None else f"{name}.json"


def project_path(project: str) -> str:
    check_project_name(project)
    return f"{PROJECT_PREFIX}{project}.json"


def check_project_name(project: str) -> None:
    if not PROJECT_RE.match(project or ""):
        raise KeyServiceError(
            f"project name {project!r} is not valid: lowercase letters, digits, '.', '_' and "
            "'-', starting and ending with a letter or digit (Harbor project names)"
        )


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def md_bytes(md: Metadata) -> bytes:
    return md.to_bytes(SERIALIZER) + b"\n"


# ============================================================================================
# recipient keys (what the filter encrypts to)


def _b64u_decode(value: Any, member: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise KeyServiceError(f"JWK member {member!r} is missing or not a string")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise KeyServiceError(f"JWK member {member!r} is not base64url (no padding)")
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


def check_public_key(key: Any) -> str:
    """Refuse keys the filter cannot or must not use; return a description ("RSA-3072")."""
    if isinstance(key, rsa.RSAPublicKey):
        bits = key.key_size
        if bits < RSA_MIN_BITS:
            raise KeyServiceError(f"RSA key of {bits} bits is too weak: at least {RSA_MIN_BITS}")
        if bits > RSA_MAX_BITS:
            raise KeyServiceError(f"RSA key of {bits} bits is larger than {RSA_MAX_BITS}")
        if key.public_numbers().e < 65537:
            raise KeyServiceError(f"RSA public exponent {key.public_numbers().e} is too small")
        return f"RSA-{bits}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = EC_CURVES.get(key.curve.name)
        if curve is None:
            raise KeyServiceError(
                f"EC curve {key.curve.name} is not supported: use P-256, P-384 or P-521"
            )
        return f"EC {curve}"
    raise KeyServiceError(
        f"{type(key).__name__.lstrip('_')} keys are not supported recipients: use RSA "
        "(2048-4096 bits) or EC P-256/P-384/P-521"
    )


def spki_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def recipient_id(key: Any) -> str:
    """A recipient's id: SHA-256 of its DER SubjectPublicKeyInfo, hex."""
    return hashlib.sha256(spki_der(key)).hexdigest()


def public_key_from_pem(text: str) -> Any:
    blocks = re.findall(r"-----BEGIN ([A-Z0-9 ]+)-----", text)
    if not blocks:
        raise KeyServiceError("not a PEM file (no -----BEGIN ...----- line)")
    if len(blocks) > 1:
        raise KeyServiceError(f"the PEM holds {len(blocks)} blocks: give one public key per file")
    label = blocks[0]
    if label.endswith("PRIVATE KEY"):
        raise KeyServiceError(
            f"this is a private key ({label}): the key service publishes public keys only; "
            "give the PKIX public key (openssl pkey -pubout)"
        )
    if label == "RSA PUBLIC KEY":
        raise KeyServiceError("PKCS#1 'RSA PUBLIC KEY': convert to PKIX (openssl rsa -RSAPublicKey_in -pubout)")
    if label != "PUBLIC KEY":
        raise KeyServiceError(f"PEM block {label!r} is not a PKIX 'PUBLIC KEY'")
    try:
        return serialization.load_pem_public_key(text.encode())
    except (ValueError, TypeError) as err:
        raise KeyServiceError(f"cannot read the public key: {err}") from err


def public_key_from_jwk(jwk: Any) -> Any:
    if not isinstance(jwk, dict):
        raise KeyServiceError("a JWK must be a JSON object")
    private = [m for m in JWK_PRIVATE_MEMBERS if m in jwk]
    if private:
        raise KeyServiceError(
            f"the JWK holds private members {private}: publish the public JWK only"
        )
    kty = jwk.get("kty")
    if kty not in JWK_ALG:
        raise KeyServiceError(f"JWK kty {kty!r} is not supported: use \"RSA\" or \"EC\"")
    if "alg" in jwk and jwk["alg"] != JWK_ALG[kty]:
        raise KeyServiceError(
            f"JWK alg {jwk['alg']!r} is not what the gateway uses for {kty}: omit it or use "
            f"{JWK_ALG[kty]!r}"
        )
    try:
        if kty == "RSA":
            n = int.from_bytes(_b64u_decode(jwk.get("n"), "n"), "big")
            e = int.from_bytes(_b64u_decode(jwk.get("e"), "e"), "big")
            return rsa.RSAPublicNumbers(e, n).public_key()
        crv = jwk.get("crv")
        if crv not in JWK_CURVES:
            raise KeyServiceError(f"JWK curve {crv!r} is not supported: use P-256, P-384 or P-521")
        curve, size = JWK_CURVES[crv]
        xb, yb = _b64u_decode(jwk.get("x"), "x"), _b64u_decode(jwk.get("y"), "y")
        if len(xb) > size or len(yb) > size:
            raise KeyServiceError(f"JWK x/y are longer than {size} bytes for {crv}")
        x, y = int.from_bytes(xb, "big"), int.from_bytes(yb, "big")
        return ec.EllipticCurvePublicNumbers(x, y, curve()).public_key()
    except ValueError as err:
        raise KeyServiceError(f"invalid {kty} JWK: {err}") from err


def recipient_entry_key(entry: Any) -> Any:
    """The public key of a recipient entry ``{"pem": ...}`` or ``{"jwk": {...}}``, checked."""
    if not isinstance(entry, dict) or len([k for k in ("pem", "jwk") if k in entry]) != 1:
        raise KeyServiceError('a recipient entry needs exactly one of "pem" and "jwk"')
    key = public_key_from_pem(entry["pem"]) if "pem" in entry else public_key_from_jwk(entry["jwk"])
    check_public_key(key)
    return key


def recipient_from_file(path: Path, kind: str) -> Dict[str, Any]:
    """Read and check a recipient public key file; return its document entry."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise KeyServiceError(f"cannot read {path}: {err}") from err
    try:
        if kind == "pem":
            key = public_key_from_pem(text)
            check_public_key(key)
            pem = key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode()
            return {"pem": pem}
        try:
            jwk = json.loads(text)
        except ValueError as err:
            raise KeyServiceError(f"not JSON: {err}") from err
        recipient_entry_key({"jwk": jwk})
        return {"jwk": jwk}
    except KeyServiceError as err:
        raise KeyServiceError(f"{path}: {err}") from None


def describe_entry(entry: Dict[str, Any]) -> Tuple[str, str, str]:
    """(recipient id, description, form) of a document entry."""
    key = recipient_entry_key(entry)
    return recipient_id(key), check_public_key(key), "pem" if "pem" in entry else "jwk"


def project_document(project: str, recipients: Sequence[Dict[str, Any]]) -> bytes:
    doc = {"project": project, "recipients": list(recipients)}
    return (json.dumps(doc, indent=2) + "\n").encode()


def parse_project_document(data: bytes, project: Optional[str] = None) -> List[Dict[str, Any]]:
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise KeyServiceError(f"project document is not JSON: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("recipients"), list):
        raise KeyServiceError('project document has no "recipients" list')
    if project is not None and doc.get("project") != project:
        raise KeyServiceError(f"project document names {doc.get('project')!r}, not {project!r}")
    for entry in doc["recipients"]:
        recipient_entry_key(entry)
    return doc["recipients"]


# ============================================================================================
# signing keys


def generate_signer(key_type: str) -> CryptoSigner:
    if key_type == "ed25519":
        return CryptoSigner.generate_ed25519()
    if key_type == "ecdsa":
        return CryptoSigner.generate_ecdsa()
    if key_type == "ecdsa-p384":
        return CryptoSigner.generate_ecdsa(scheme="ecdsa-sha2-nistp384")
    if key_type == "rsa":
        return CryptoSigner.generate_rsa(size=3072)
    raise KeyServiceError(f"unknown key type {key_type!r}: one of {', '.join(KEY_TYPES)}")


def write_private_key(directory: Path, stem: str, signer: CryptoSigner) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(directory, 0o700)
    path = directory / f"{stem}-{short(signer.public_key.keyid)}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_bytes)
    return path


class KeyStore:
    """Private keys found in a list of directories (``*.pem``, PKCS#8), by public key value."""

    def __init__(self, dirs: Sequence[Path]):
        self.dirs = [Path(d) for d in dirs if d is not None]
        self._by_public: Optional[Dict[str, Tuple[Path, Any]]] = None

    def _scan(self) -> Dict[str, Tuple[Path, Any]]:
        if self._by_public is None:
            found: Dict[str, Tuple[Path, Any]] = {}
            for d in self.dirs:
                if not d.is_dir():
                    continue
                for path in sorted(d.glob("*.pem")):
                    try:
                        data = path.read_bytes()
                    except OSError:
                        continue
                    if b"PRIVATE KEY" not in data:
                        continue
                    try:
                        priv = serialization.load_pem_private_key(data, password=None)
                        pub = SSlibKey.from_crypto(priv.public_key())
                    except (ValueError, TypeError):
                        continue
                    found.setdefault(pub.keyval["public"], (path, priv))
            self._by_public = found
        return self._by_public

    def invalidate(self) -> None:
        self._by_public = None

    def path_of(self, key: Key) -> Optional[Path]:
        hit = self._scan().get(key.keyval.get("public", ""))
        return hit[0] if hit else None

    def signer(self, key: Key) -> Optional[CryptoSigner]:
        hit = self._scan().get(key.keyval.get("public", ""))
        if hit is None:
            return None
        return CryptoSigner(hit[1], key)  # type: ignore[arg-type]


# ============================================================================================
# the repository


def load_config(repo: Path) -> Dict[str, Any]:
    path = repo / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeyServiceError(
            f"{repo} is not a key service repository (no {CONFIG_NAME}): run "
            f"`keyservice init --repo {repo}`"
        ) from None
    if cfg.get("format") != CONFIG_FORMAT:
        raise KeyServiceError(f"{path}: unknown format {cfg.get('format')!r}")
    return cfg


class Repository:
    """A key service repository on disk, edited in memory and published by :meth:`commit`."""

    def __init__(
        self,
        path: Path,
        offline_keys: Optional[Path] = None,
        extra_keys: Sequence[Path] = (),
        now: Optional[dt.datetime] = None,
    ):
        self.path = Path(path).resolve()
        self.config = load_config(self.path)
        self.meta_dir = self.path / "metadata"
        self.targets_dir = self.path / "targets"
        self.keys_dir = self.path / "keys"
        self.history_dir = self.path / "history"
        cfg_offline = self.config.get("offline_keys")
        self.offline_dir = Path(offline_keys).resolve() if offline_keys else (
            Path(cfg_offline) if cfg_offline else None
        )
        self.extra_key_dirs = [Path(p).resolve() for p in extra_keys]
        self.keystore = KeyStore([self.keys_dir, *(d for d in [self.offline_dir] if d), *self.extra_key_dirs])
        self.now = now or utcnow()
        self.consistent = bool(self.config.get("consistent_snapshot"))
        self._md: Dict[str, Metadata] = {}
        self._orig_version: Dict[str, int] = {}
        self._prev_root: Optional[Root] = None
        self._dirty: Set[str] = set()
        self._new_roles: Set[str] = set()
        self._force: Set[str] = set()
        self._target_files: Dict[str, bytes] = {}
        self._retire: List[Path] = []
        self.changes: List[str] = []

    # ---------------------------------------------------------------- settings
    def expires_days(self, role: str) -> float:
        days = self.config.get("expires_days", {})
        kind = role if role in TOP_LEVEL else "delegated"
        return float(days.get(kind, DEFAULT_EXPIRES_DAYS[kind]))

    def key_dir_for(self, role: str) -> Path:
        if role in self.config.get("offline_roles", ["root"]) and self.offline_dir is not None:
            return self.offline_dir
        return self.keys_dir

    # ---------------------------------------------------------------- reading
    def _read(self, name: str) -> Metadata:
        path = self.meta_dir / name
        try:
            return Metadata.from_bytes(path.read_bytes())
        except FileNotFoundError:
            raise KeyServiceError(f"{path} is missing") from None

    def md(self, role: str) -> Metadata:
        if role not in self._md:
            self._md[role] = self._read(role_file(role))
            self._orig_version[role] = self._md[role].signed.version
        return self._md[role]

    @property
    def root(self) -> Root:
        return self.md("root").signed  # type: ignore[return-value]

    def targets(self, role: str = "targets") -> Targets:
        return self.md(role).signed  # type: ignore[return-value]

    def delegator_of(self, role: str) -> str:
        """Name of the role that delegates ``role`` ("root" for top-level roles)."""
        if role in TOP_LEVEL:
            return "root"
        for parent, child in self.delegation_edges():
            if child == role:
                return parent
        raise KeyServiceError(f"role {role!r} is not delegated by any role of this repository")

    def delegation_edges(self) -> List[Tuple[str, str]]:
        """(delegator, delegated) for every delegated role, in depth-first pre-order."""
        edges: List[Tuple[str, str]] = []
        seen = {"targets"}

        def visit(parent: str) -> None:
            dele = self.targets(parent).delegations
            if dele is None:
                return
            if dele.roles is not None:
                children = list(dele.roles)
            else:
                children = list(dele.succinct_roles.get_roles())  # type: ignore[union-attr]
            for child in children:
                if child in seen:
                    continue
                seen.add(child)
                edges.append((parent, child))
                visit(child)

        visit("targets")
        return edges

    def all_targets_roles(self) -> List[str]:
        return ["targets"] + [c for _, c in self.delegation_edges()]

    def delegator_obj(self, role: str) -> Any:
        parent = self.delegator_of(role)
        return self.root if parent == "root" else self.targets(parent)

    def role_keys(self, role: str) -> Tuple[List[Key], int]:
        delegator = self.delegator_obj(role)
        r = delegator.get_delegated_role(role)
        return [delegator.get_key(k) for k in r.keyids], r.threshold

    # ---------------------------------------------------------------- resolution
    def find_owner(self, path: str) -> Tuple[str, bool]:
        """The role a TUF client takes ``path`` from, as it walks the delegations.

        Returns ``(role, True)`` when some role lists the target (the first one in the
        client's pre-order depth-first walk), else ``(role, False)`` with the role a new
        target must be added to: the first role on that walk whose delegations do not cover
        ``path`` any further.
        """
        to_visit: List[str] = ["targets"]
        visited: Set[str] = set()
        first_leaf: Optional[str] = None
        while to_visit:
            role = to_visit.pop()
            if role in visited:
                continue
            t = self.targets(role)
            if path in t.targets:
                return role, True
            visited.add(role)
            children: List[str] = []
            if t.delegations is not None:
                for child, terminating in t.delegations.get_roles_for_target(path):
                    children.append(child)
                    if terminating:
                        to_visit = []
                        break
            if not children and first_leaf is None:
                first_leaf = role
            to_visit.extend(reversed(children))
        return first_leaf or "targets", False

    def project_doc(self, project: str) -> Tuple[str, Optional[List[Dict[str, Any]]]]:
        path = project_path(project)
        role, found = self.find_owner(path)
        if not found:
            return role, None
        return role, parse_project_document(self.read_target(role, path), project)

    def read_target(self, role: str, path: str) -> bytes:
        if path in self._target_files:
            return self._target_files[path]
        info = self.targets(role).targets[path]
        data = (self.targets_dir / path).read_bytes()
        info.verify_length_and_hashes(data)
        return data

    def projects(self) -> List[Tuple[str, str]]:
        """(project, owning role) for every project document a client would find."""
        out = []
        seen: Set[str] = set()
        for role in self.all_targets_roles():
            for path in self.targets(role).targets:
                if not path.startswith(PROJECT_PREFIX) or not path.endswith(".json") or path in seen:
                    continue
                seen.add(path)
                owner, found = self.find_owner(path)
                if found and owner == role:
                    out.append((path[len(PROJECT_PREFIX) : -len(".json")], role))
        return sorted(out)

    # ---------------------------------------------------------------- editing
    def touch(self, role: str) -> None:
        """Mark ``role`` for re-signing (with a version bump) at commit."""
        self.md(role)
        if role == "root" and self._prev_root is None:
            self._prev_root = copy.deepcopy(self.root)
        self._dirty.add(role)

    def force(self, role: str) -> None:
        """Publish a new version of snapshot / timestamp even if nothing below changed."""
        self._force.add(role)

    def add_new_role(self, role: str, md: Metadata) -> None:
        self._md[role] = md
        self._orig_version[role] = 0
        self._new_roles.add(role)
        self._dirty.add(role)

    def set_target(self, role: str, path: str, data: bytes) -> None:
        t = self.targets(role)
        t.targets[path] = TargetFile.from_data(path, data, ["sha256"])
        self._target_files[path] = data
        self.touch(role)

    def remove_target(self, role: str, path: str) -> None:
        del self.targets(role).targets[path]
        self.touch(role)

    def new_keys(self, role: str, count: int, key_type: str, directory: Optional[Path] = None,
                 stem: Optional[str] = None) -> List[Key]:
        keys = []
        for _ in range(count):
            signer = generate_signer(key_type)
            path = write_private_key(directory or self.key_dir_for(role), stem or role, signer)
            self.changes.append(f"key   {role}: new {key_type} key {short(signer.public_key.keyid)} -> {path}")
            keys.append(signer.public_key)
        self.keystore.invalidate()
        return keys

    def retire_keys(self, keys: Sequence[Key], still_used: Callable[[Key], bool] = lambda k: False) -> None:
        for key in keys:
            if still_used(key):
                continue
            path = self.keystore.path_of(key)
            if path is not None:
                self._retire.append(path)

    # ---------------------------------------------------------------- signing
    def _signers_for(self, keys: Sequence[Key]) -> List[CryptoSigner]:
        out = []
        for key in keys:
            signer = self.keystore.signer(key)
            if signer is not None:
                out.append(signer)
        return out

    def _missing_keys_message(self, role: str, keys: Sequence[Key], threshold: int, have: int) -> str:
        where = ", ".join(str(d) for d in self.keystore.dirs)
        ids = " ".join(short(k.keyid) for k in keys)
        hint = ""
        if role == "root" or (role in self.config.get("offline_roles", []) and self.offline_dir is None):
            hint = " (offline keys: pass --offline-keys DIR)"
        elif role not in TOP_LEVEL:
            hint = " (a tribe's keys: pass --keys DIR where the tribe keeps them)"
        return (
            f"cannot sign {role}: it needs {threshold} of the keys [{ids}] but only {have} "
            f"private key(s) were found in {where}{hint}"
        )

    def _sign(self, role: str, md: Metadata, keys: Sequence[Key], threshold: int) -> List[str]:
        signers = self._signers_for(keys)
        if len(signers) < threshold:
            raise KeyServiceError(self._missing_keys_message(role, keys, threshold, len(signers)))
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        return [s.public_key.keyid for s in signers]

    # ---------------------------------------------------------------- publishing
    def _write_meta(self, role: str, md: Metadata, versioned: bool) -> bytes:
        data = md_bytes(md)
        version = md.signed.version
        if versioned:
            write_atomic(self.meta_dir / role_file(role, version), data)
        write_atomic(self.history_dir / role_file(role, version), data)
        return data

    def _log(self, role: str, old: int, md: Metadata, signed_by: Sequence[str]) -> None:
        old_s = f"v{old}" if old else "(new)"
        self.changes.append(
            f"meta  {role:<10} {old_s} -> v{md.signed.version}  expires {fmt_time(md.signed.expires)}"
            f"  signed by [{' '.join(short(k) for k in signed_by)}]"
        )

    def _publish_root(self) -> None:
        md = self.md("root")
        prev = self._prev_root
        assert prev is not None
        root: Root = md.signed  # type: ignore[assignment]
        root.version = prev.version + 1
        root.expires = expiry_in(self.expires_days("root"), self.now)
        old_keys = [prev.get_key(k) for k in prev.roles["root"].keyids]
        new_keys = [root.get_key(k) for k in root.roles["root"].keyids]
        signers: Dict[str, CryptoSigner] = {}
        for s in self._signers_for(old_keys + new_keys):
            signers.setdefault(s.public_key.keyid, s)
        md.signatures.clear()
        for s in signers.values():
            md.sign(s, append=True)
        payload = md.signed_bytes
        for who, r, keys in (("current", prev, old_keys), ("new", root, new_keys)):
            try:
                r.verify_delegate("root", payload, md.signatures)
            except UnsignedMetadataError:
                have = sum(1 for k in keys if k.keyid in signers)
                raise KeyServiceError(
                    f"root v{root.version} must be signed by {r.roles['root'].threshold} of the "
                    f"{who} root keys: "
                    + self._missing_keys_message("root", keys, r.roles["root"].threshold, have)
                ) from None
        data = md_bytes(md)
        write_atomic(self.meta_dir / role_file("root", root.version), data)
        write_atomic(self.history_dir / role_file("root", root.version), data)
        write_atomic(self.meta_dir / "root.json", data)
        self._log("root", prev.version, md, list(signers))

    def _publish_targets_role(self, role: str, delegator: Any) -> None:
        md = self.md(role)
        old = self._orig_version.get(role, 0)
        if role not in self._new_roles:
            md.signed.version = old + 1
        md.signed.expires = expiry_in(self.expires_days(role), self.now)
        r = delegator.get_delegated_role(role)
        keys = [delegator.get_key(k) for k in r.keyids]
        signed_by = self._sign(role, md, keys, r.threshold)
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
        data = self._write_meta(role, md, self.consistent)
        self._pending_meta.append((role, data))
        self._log(role, old, md, signed_by)

    def _preflight(self, changed_targets: Sequence[str]) -> None:
        """Refuse before writing anything when some role could not be signed."""
        need: List[Tuple[str, List[Key], int]] = []
        if "root" in self._dirty and self._prev_root is not None:
            prev = self._prev_root
            need.append(("root", [prev.get_key(k) for k in prev.roles["root"].keyids],
                         prev.roles["root"].threshold))
            need.append(("root", [self.root.get_key(k) for k in self.root.roles["root"].keyids],
                         self.root.roles["root"].threshold))
        snapshot = bool(changed_targets) or "snapshot" in self._force or self._online_keys_changed("snapshot")
        timestamp = snapshot or "timestamp" in self._force or self._online_keys_changed("timestamp")
        online = (["snapshot"] if snapshot else []) + (["timestamp"] if timestamp else [])
        for role in list(changed_targets) + online:
            keys, threshold = self.role_keys(role)
            need.append((role, keys, threshold))
        for role, keys, threshold in need:
            have = len(self._signers_for(keys))
            if have < threshold:
                raise KeyServiceError(self._missing_keys_message(role, keys, threshold, have))

    def commit(self) -> List[str]:
        """Sign and publish everything changed, then a new snapshot and timestamp."""
        self._pending_meta: List[Tuple[str, bytes]] = []
        self._preflight([r for r in self.all_targets_roles() if r in self._dirty])
        if "root" in self._dirty:
            self._publish_root()
        # target files first (with their hashed names), so new metadata never points at
        # a file not yet there
        for path, data in self._target_files.items():
            if self.consistent:
                digest = hashlib.sha256(data).hexdigest()
                d, sep, base = path.rpartition("/")
                write_atomic(self.targets_dir / f"{d}{sep}{digest}.{base}", data)
        changed_targets = [r for r in self.all_targets_roles() if r in self._dirty]
        # every role is checked against its delegator's new state; the unversioned names
        # are written only after all of them (below)
        for role in changed_targets:
            parent = self.delegator_of(role)
            delegator = self.root if parent == "root" else self.targets(parent)
            self._publish_targets_role(role, delegator)
        for path, data in self._target_files.items():
            write_atomic(self.targets_dir / path, data)
        self._pending_snapshot = None
        if changed_targets or "snapshot" in self._force or self._online_keys_changed("snapshot"):
            self._publish_snapshot(changed_targets)
        if (self._pending_snapshot is not None or "timestamp" in self._force
                or self._online_keys_changed("timestamp")):
            self._publish_timestamp()
        # unversioned names last: a client of a non-consistent repository reads these
        for role, data in self._pending_meta:
            write_atomic(self.meta_dir / role_file(role), data)
        for path in self._retire:
            dest = path.parent / "retired" / path.name
            dest.parent.mkdir(mode=0o700, exist_ok=True)
            if path.exists():
                os.replace(path, dest)
                self.changes.append(f"key   retired {path} -> {dest}")
        self._dirty.clear()
        self._force.clear()
        self._new_roles.clear()
        self._target_files.clear()
        self._retire = []
        self._prev_root = None
        self._orig_version = {r: m.signed.version for r, m in self._md.items()}
        return self.changes

    _pending_snapshot: Optional[bytes] = None

    def _online_keys_changed(self, role: str) -> bool:
        prev = self._prev_root
        return prev is not None and (
            prev.roles[role].keyids != self.root.roles[role].keyids
            or prev.roles[role].threshold != self.root.roles[role].threshold
        )

    def _publish_snapshot(self, changed: Sequence[str]) -> None:
        md = self.md("snapshot")
        snap: Snapshot = md.signed  # type: ignore[assignment]
        old = self._orig_version["snapshot"]
        for role in changed:
            snap.meta[role_file(role)] = MetaFile(version=self.targets(role).version)
        snap.version = old + 1
        snap.expires = expiry_in(self.expires_days("snapshot"), self.now)
        keys, threshold = self.role_keys("snapshot")
        signed_by = self._sign("snapshot", md, keys, threshold)
        self.root.verify_delegate("snapshot", md.signed_bytes, md.signatures)
        data = self._write_meta("snapshot", md, self.consistent)
        self._pending_meta.append(("snapshot", data))
        self._pending_snapshot = data
        self._log("snapshot", old, md, signed_by)

    def _publish_timestamp(self) -> None:
        md = self.md("timestamp")
        ts: Timestamp = md.signed  # type: ignore[assignment]
        old = self._orig_version["timestamp"]
        if self._pending_snapshot is not None:
            data = self._pending_snapshot
        else:
            data = (self.meta_dir / role_file("snapshot")).read_bytes()
        snap_version = Metadata.from_bytes(data).signed.version
        ts.snapshot_meta = MetaFile(
            version=snap_version,
            length=len(data),
            hashes={"sha256": hashlib.sha256(data).hexdigest()},
        )
        ts.version = old + 1
        ts.expires = self._timestamp_expiry or expiry_in(self.expires_days("timestamp"), self.now)
        keys, threshold = self.role_keys("timestamp")
        signed_by = self._sign("timestamp", md, keys, threshold)
        self.root.verify_delegate("timestamp", md.signed_bytes, md.signatures)
        data = self._write_meta("timestamp", md, False)
        self._pending_meta.append(("timestamp", data))
        self._pending_snapshot = None
        self._log("timestamp", old, md, signed_by)

    _timestamp_expiry: Optional[dt.datetime] = None


@contextlib.contextmanager
def locked(repo: Path, create: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the repository (cron jobs and operators take turns)."""
    repo = Path(repo)
    if create:
        repo.mkdir(parents=True, exist_ok=True)
    elif not (repo / CONFIG_NAME).exists():
        load_config(repo.resolve())  # raises the "not a repository" error
    with open(repo / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ============================================================================================
# commands


def _parse_key_types(specs: Sequence[str]) -> Dict[str, str]:
    out = {r: "ed25519" for r in TOP_LEVEL}
    for spec in specs or []:
        if "=" in spec:
            role, kt = spec.split("=", 1)
            if role not in TOP_LEVEL:
                raise KeyServiceError(f"--key-type {spec}: role must be one of {', '.join(TOP_LEVEL)}")
            roles = [role]
        else:
            kt, roles = spec, list(TOP_LEVEL)
        if kt not in KEY_TYPES:
            raise KeyServiceError(f"--key-type {spec}: key type must be one of {', '.join(KEY_TYPES)}")
        for r in roles:
            out[r] = kt
    return out


def _parse_expires(specs: Sequence[str]) -> Dict[str, float]:
    out = dict(DEFAULT_EXPIRES_DAYS)
    for spec in specs or []:
        role, sep, days = spec.partition("=")
        if not sep or role not in out:
            raise KeyServiceError(
                f"--expires-days {spec}: give ROLE=DAYS with ROLE one of {', '.join(out)}"
            )
        try:
            value = float(days)
        except ValueError:
            raise KeyServiceError(f"--expires-days {spec}: {days!r} is not a number") from None
        if value <= 0:
            raise KeyServiceError(f"--expires-days {spec}: must be positive")
        out[role] = value
    return out


def init_repository(
    repo: Path,
    consistent_snapshot: bool = False,
    root_keys: int = 1,
    root_threshold: int = 1,
    key_types: Sequence[str] = (),
    expires: Sequence[str] = (),
    offline_keys: Optional[Path] = None,
    offline_targets: bool = False,
    force: bool = False,
) -> List[str]:
    repo = Path(repo).resolve()
    if (repo / CONFIG_NAME).exists() or (repo / "metadata" / "root.json").exists():
        if not force:
            raise KeyServiceError(f"{repo} already holds a key service repository (use --force to replace it)")
        # never delete keys: the old repository is set aside
        aside = Path(tempfile.mkdtemp(prefix=f"{repo.name}.replaced-{utcnow().strftime('%Y%m%dT%H%M%SZ')}-",
                                      dir=repo.parent))
        for sub in ("metadata", "targets", "history", "keys", CONFIG_NAME):
            if (repo / sub).exists():
                os.replace(repo / sub, aside / sub)
        set_aside = [f"repo  the previous repository was moved to {aside}"]
    else:
        set_aside = []
    if root_threshold < 1 or root_keys < root_threshold:
        raise KeyServiceError("--root-threshold must be between 1 and --root-keys")
    types = _parse_key_types(key_types)
    days = _parse_expires(expires)
    offline_roles = ["root"] + (["targets"] if offline_targets else [])
    if offline_targets and offline_keys is None:
        raise KeyServiceError("--offline-targets needs --offline-keys DIR")
    config = {
        "format": CONFIG_FORMAT,
        "consistent_snapshot": bool(consistent_snapshot),
        "expires_days": days,
        "offline_keys": str(Path(offline_keys).resolve()) if offline_keys else None,
        "offline_roles": offline_roles,
        "key_types": types,
    }
    repo.mkdir(parents=True, exist_ok=True)
    write_atomic(repo / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    for sub in ("metadata", "targets", "history"):
        (repo / sub).mkdir(exist_ok=True)
    (repo / "keys").mkdir(mode=0o700, exist_ok=True)

    r = Repository(repo)
    now = r.now
    root = Root(version=1, expires=expiry_in(r.expires_days("root"), now), consistent_snapshot=bool(consistent_snapshot))
    counts = {"root": root_keys, "targets": 1, "snapshot": 1, "timestamp": 1}
    for role in TOP_LEVEL:
        for key in r.new_keys(role, counts[role], types[role]):
            root.add_key(key, role)
    root.roles["root"].threshold = root_threshold
    mds: Dict[str, Metadata] = {
        "root": Metadata(root),
        "targets": Metadata(Targets(version=1, expires=expiry_in(r.expires_days("targets"), now))),
        "snapshot": Metadata(Snapshot(version=1, expires=expiry_in(r.expires_days("snapshot"), now))),
        "timestamp": Metadata(Timestamp(version=1, expires=expiry_in(r.expires_days("timestamp"), now),
                                        snapshot_meta=MetaFile(version=1))),
    }
    r._md = dict(mds)
    r._orig_version = {k: 0 for k in mds}
    # root v1 signed by its own keys
    keys = [root.get_key(k) for k in root.roles["root"].keyids]
    signed_by = r._sign("root", mds["root"], keys, root_threshold)
    root.verify_delegate("root", mds["root"].signed_bytes, mds["root"].signatures)
    data = md_bytes(mds["root"])
    for name in ("1.root.json", "root.json"):
        write_atomic(r.meta_dir / name, data)
    write_atomic(r.history_dir / "1.root.json", data)
    r._log("root", 0, mds["root"], signed_by)
    r._pending_meta = []
    # targets v1 (new), snapshot v1 and timestamp v1
    r._new_roles = {"targets"}
    r._publish_targets_role("targets", root)
    r._orig_version["snapshot"] = 0
    r._publish_snapshot(["targets"])
    r._orig_version["timestamp"] = 0
    r._publish_timestamp()
    for role, d in r._pending_meta:
        write_atomic(r.meta_dir / role_file(role), d)
    mode = "on" if consistent_snapshot else "off"
    r.changes.insert(0, f"repo  {repo}  consistent snapshots {mode}, root threshold {root_threshold}/{root_keys}")
    return set_aside + r.changes


# -------------------------------------------------------------------------------- recipients


def _entries_ids(entries: Sequence[Dict[str, Any]]) -> List[str]:
    return [describe_entry(e)[0] for e in entries]


def _set_project(r: Repository, project: str, entries: List[Dict[str, Any]], role: str) -> None:
    path = project_path(project)
    r.set_target(role, path, project_document(project, entries))


def _owner_for_write(r: Repository, project: str) -> Tuple[str, Optional[List[Dict[str, Any]]]]:
    role, entries = r.project_doc(project)
    return role, entries


def add_recipient(r: Repository, project: str, entries: Sequence[Dict[str, Any]]) -> List[str]:
    role, current = _owner_for_write(r, project)
    current = list(current or [])
    ids = _entries_ids(current)
    added = 0
    for entry in entries:
        rid, desc, form = describe_entry(entry)
        if rid in ids:
            r.changes.append(f"project {project}: {desc} {rid[:16]} is already a recipient")
            continue
        current.append(entry)
        ids.append(rid)
        added += 1
        r.changes.append(f"project {project} (role {role}): + recipient {rid[:16]} {desc} ({form})")
    if added:
        _set_project(r, project, current, role)
        r.commit()
    return r.changes


def _select(current: Sequence[Dict[str, Any]], keyid: Optional[str], index: Optional[int]) -> int:
    ids = _entries_ids(current)
    if index is not None:
        if not 0 <= index < len(current):
            raise KeyServiceError(f"--index {index} is out of range: the project has {len(current)} recipient(s)")
        return index
    assert keyid is not None
    k = keyid.lower()
    hits = [i for i, rid in enumerate(ids) if rid.startswith(k)]
    if len(k) < 8:
        raise KeyServiceError("--keyid needs at least 8 hex digits")
    if not hits:
        raise KeyServiceError(f"no recipient with id {keyid}: see `keyservice list`")
    if len(hits) > 1:
        raise KeyServiceError(f"recipient id {keyid} is ambiguous: give more digits")
    return hits[0]


def remove_recipient(r: Repository, project: str, keyid: Optional[str], index: Optional[int]) -> List[str]:
    role, current = _owner_for_write(r, project)
    if current is None:
        raise KeyServiceError(f"project {project} has no recipient document")
    i = _select(current, keyid, index)
    if len(current) == 1:
        raise KeyServiceError(
            f"refusing to remove the last recipient of {project}: pushes to it would be refused; "
            "use set-recipients to replace it, or remove-project"
        )
    rid, desc, _ = describe_entry(current[i])
    del current[i]
    r.changes.append(f"project {project} (role {role}): - recipient {rid[:16]} {desc}")
    _set_project(r, project, current, role)
    r.commit()
    return r.changes


def set_recipients(r: Repository, project: str, entries: Sequence[Dict[str, Any]]) -> List[str]:
    if not entries:
        raise KeyServiceError("set-recipients needs at least one --pem or --jwk")
    role, current = _owner_for_write(r, project)
    current = list(current or [])
    old_ids = _entries_ids(current)
    new: List[Dict[str, Any]] = []
    new_ids: List[str] = []
    for entry in entries:
        rid = describe_entry(entry)[0]
        if rid not in new_ids:
            new.append(entry)
            new_ids.append(rid)
    if new_ids == old_ids and new == current:
        r.changes.append(f"project {project}: recipients unchanged")
        return r.changes
    for e, rid in zip(current, old_ids):
        if rid not in new_ids:
            r.changes.append(f"project {project} (role {role}): - recipient {rid[:16]} {describe_entry(e)[1]}")
    for e, rid in zip(new, new_ids):
        if rid not in old_ids:
            r.changes.append(f"project {project} (role {role}): + recipient {rid[:16]} {describe_entry(e)[1]}")
    _set_project(r, project, new, role)
    r.commit()
    return r.changes


def remove_project(r: Repository, project: str) -> List[str]:
    path = project_path(project)
    role, found = r.find_owner(path)
    if not found:
        raise KeyServiceError(f"project {project} has no recipient document")
    r.remove_target(role, path)
    r.changes.append(f"project {project} (role {role}): removed")
    r.commit()
    return r.changes


def list_projects(r: Repository, project: Optional[str] = None) -> List[str]:
    lines: List[str] = []
    projects = r.projects()
    if project is not None:
        role, entries = r.project_doc(project)
        if entries is None:
            raise KeyServiceError(
                f"project {project} has no recipient document (it would belong to role {role})"
            )
        projects = [(project, role)]
    for name, role in projects:
        t = r.targets(role)
        entries = parse_project_document(r.read_target(role, project_path(name)), name)
        lines.append(f"{name}  (role {role} v{t.version}, expires {fmt_time(t.expires)})")
        for i, e in enumerate(entries):
            rid, desc, form = describe_entry(e)
            lines.append(f"  [{i}] {rid[:16]}  {desc:<9}  {form}")
    if not lines:
        lines.append("no projects")
    return lines


def status_lines(r: Repository) -> List[str]:
    lines = [f"repository {r.path}  consistent snapshots {'on' if r.consistent else 'off'}"]
    now = utcnow()

    def line(role: str, signed: Any, keys: Sequence[Key], threshold: int, extra: str = "") -> None:
        have = ["+" if r.keystore.path_of(k) else "-" for k in keys]
        left = signed.expires - now
        period = r.expires_days(role.split("..")[0])
        warn = "  EXPIRED" if left.total_seconds() <= 0 else (
            "  expires soon" if left < dt.timedelta(days=min(7, period / 4)) else "")
        ks = " ".join(f"{short(k.keyid)}{h}" for k, h in zip(keys, have))
        lines.append(
            f"  {role:<12} v{signed.version:<4} expires {fmt_time(signed.expires)}  "
            f"threshold {threshold}  keys [{ks}]{extra}{warn}"
        )

    for role in TOP_LEVEL:
        keys, th = r.role_keys(role)
        line(role, r.md(role).signed, keys, th)
    for parent, role in r.delegation_edges():
        d = r.targets(parent).delegations
        assert d is not None
        keys, th = r.role_keys(role)
        if d.roles is not None:
            line(role, r.md(role).signed, keys, th, f"  paths {d.roles[role].paths}  (delegated by {parent})")
            continue
        sr = d.succinct_roles
        assert sr is not None
        if role != next(sr.get_roles()):
            continue
        bins = [r.md(b).signed for b in sr.get_roles()]
        oldest = min(bins, key=lambda t: t.expires)
        last = f"{sr.name_prefix}-{sr.number_of_bins - 1:0{sr.suffix_len}x}"
        line(f"{role}..{last}", oldest, keys, th,
             f"  {sr.number_of_bins} hash bins of {parent}, versions "
             f"{min(t.version for t in bins)}..{max(t.version for t in bins)} (earliest expiry shown)")
    lines.append("  (+ private key present here, - not here)")
    return lines


# -------------------------------------------------------------------------------- delegation


def delegate(
    r: Repository,
    tribe: str,
    paths: Sequence[str],
    threshold: int = 1,
    nkeys: Optional[int] = None,
    key_type: str = "ed25519",
    hash_bins: Optional[int] = None,
    tribe_keys_dir: Optional[Path] = None,
    public_keys: Sequence[Path] = (),
) -> List[str]:
    if not ROLE_RE.match(tribe or "") or tribe in TOP_LEVEL:
        raise KeyServiceError(
            f"tribe name {tribe!r} is not valid: lowercase letters, digits, '-' and '_' "
            "(and not a top-level role name)"
        )
    if not paths:
        raise KeyServiceError("--paths is required (e.g. 'projects/tribe-a-*.json')")
    for p in paths:
        if not p.startswith(PROJECT_PREFIX) or not p.endswith(".json"):
            raise KeyServiceError(f"--paths {p!r}: project documents are projects/<project>.json")
    existing = set(r.all_targets_roles())
    if tribe in existing:
        raise KeyServiceError(f"role {tribe} already exists (rotate its keys with rotate-key --role {tribe})")
    bit_length = None
    if hash_bins is not None:
        if hash_bins < 2 or hash_bins & (hash_bins - 1) or hash_bins > 2**16:
            raise KeyServiceError("--hash-bins must be a power of two between 2 and 65536")
        bit_length = hash_bins.bit_length() - 1
        clash = [n for n in existing if n.startswith(f"{tribe}-")]
        if clash:
            raise KeyServiceError(f"bin names {tribe}-* would clash with roles {clash}")
    top = r.targets("targets")
    if top.delegations is not None and top.delegations.roles is None:
        raise KeyServiceError("top-level targets uses succinct delegations; cannot add a named role")
    keys: List[Key] = []
    for pub in public_keys:
        try:
            pk = serialization.load_pem_public_key(Path(pub).read_bytes())
            keys.append(SSlibKey.from_crypto(pk))
        except (OSError, ValueError) as err:
            raise KeyServiceError(f"--pubkey {pub}: {err}") from None
        r.changes.append(f"key   {tribe}: registered public key {short(keys[-1].keyid)} from {pub}")
    if tribe_keys_dir is not None:
        r.keystore.dirs.append(Path(tribe_keys_dir).resolve())
    want = max(threshold, nkeys or 0, 1)
    if len(keys) < want:
        keys += r.new_keys(tribe, want - len(keys), key_type, tribe_keys_dir or r.keys_dir, f"tribe-{tribe}")
    if threshold < 1 or threshold > len(keys):
        raise KeyServiceError(f"--threshold {threshold} must be between 1 and the number of keys ({len(keys)})")
    if top.delegations is None:
        top.delegations = Delegations(keys={}, roles={})
    role = DelegatedRole(tribe, [k.keyid for k in keys], threshold, True, paths=list(paths))
    assert top.delegations.roles is not None
    top.delegations.roles[tribe] = role
    for k in keys:
        top.delegations.keys[k.keyid] = k
    r.touch("targets")
    expires = expiry_in(r.expires_days(tribe), r.now)
    tribe_md = Metadata(Targets(version=1, expires=expires))
    r.add_new_role(tribe, tribe_md)
    bins: List[str] = []
    if bit_length is not None:
        succinct = SuccinctRoles([k.keyid for k in keys], threshold, bit_length, tribe)
        tribe_md.signed.delegations = Delegations(keys={k.keyid: k for k in keys}, succinct_roles=succinct)  # type: ignore[attr-defined]
        for name in succinct.get_roles():
            r.add_new_role(name, Metadata(Targets(version=1, expires=expires)))
            bins.append(name)
    r.changes.append(
        f"role  {tribe}: delegated by targets for {list(paths)} (terminating), threshold "
        f"{threshold}, keys [{' '.join(short(k.keyid) for k in keys)}]"
        + (f", {len(bins)} hash bins {bins[0]}..{bins[-1]}" if bins else "")
    )
    # move the projects now delegated out of the top-level targets
    for path in sorted(list(top.targets)):
        if role.is_delegated_path(path):
            data = (r.targets_dir / path).read_bytes()
            top.targets[path].verify_length_and_hashes(data)
            del top.targets[path]
            dest = succinct.get_role_for_target(path) if bit_length is not None else tribe
            r.targets(dest).targets[path] = TargetFile.from_data(path, data, ["sha256"])
            r._target_files[path] = data
            r.changes.append(f"project {path}: moved from targets to {dest}")
    r.commit()
    return r.changes


# -------------------------------------------------------------------------------- rotations


def rotate_root(r: Repository, threshold: Optional[int] = None, nkeys: Optional[int] = None,
                key_type: Optional[str] = None, keep_keys: bool = False) -> List[str]:
    r.touch("root")
    root = r.root
    cur = root.roles["root"]
    old_keys = [root.get_key(k) for k in cur.keyids]
    if keep_keys:
        if nkeys is not None:
            raise KeyServiceError("--keep-keys and --keys exclude each other")
        new_threshold = threshold or cur.threshold
        if new_threshold > len(cur.keyids):
            raise KeyServiceError(f"--threshold {new_threshold} is more than the {len(cur.keyids)} root keys")
        cur.threshold = new_threshold
        r.changes.append(f"root  root keys kept [{' '.join(short(k.keyid) for k in old_keys)}], threshold {new_threshold}")
    else:
        count = nkeys or len(cur.keyids)
        new_threshold = threshold or min(cur.threshold, count)
        if new_threshold < 1 or new_threshold > count:
            raise KeyServiceError(f"--threshold {new_threshold} must be between 1 and --keys {count}")
        kt = key_type or r.config.get("key_types", {}).get("root", "ed25519")
        # make sure the current keys can sign before generating anything
        have = len(r._signers_for(old_keys))
        if have < cur.threshold:
            raise KeyServiceError(r._missing_keys_message("root", old_keys, cur.threshold, have))
        new = r.new_keys("root", count, kt)
        for k in old_keys:
            root.revoke_key(k.keyid, "root")
        for k in new:
            root.add_key(k, "root")
        root.roles["root"].threshold = new_threshold
        r.changes.append(
            f"root  root keys [{' '.join(short(k.keyid) for k in old_keys)}] -> "
            f"[{' '.join(short(k.keyid) for k in new)}], threshold {new_threshold}"
        )
        r.retire_keys(old_keys)
    r.commit()
    return r.changes


def rotate_key(r: Repository, role: str, nkeys: int = 1, threshold: Optional[int] = None,
               key_type: Optional[str] = None, directory: Optional[Path] = None) -> List[str]:
    if role == "root":
        raise KeyServiceError("use rotate-root for the root keys")
    if role in TOP_LEVEL:
        root = r.root
        old_ids = list(root.roles[role].keyids)
        old_keys = [root.get_key(k) for k in old_ids]
        kt = key_type or r.config.get("key_types", {}).get(role, "ed25519")
        th = threshold or min(root.roles[role].threshold, max(nkeys, 1))
        if th > nkeys:
            raise KeyServiceError(f"--threshold {th} is more than --keys {nkeys}")
        # root keys are needed for the new root: check before generating
        rk = [root.get_key(k) for k in root.roles["root"].keyids]
        have = len(r._signers_for(rk))
        if have < root.roles["root"].threshold:
            raise KeyServiceError(r._missing_keys_message("root", rk, root.roles["root"].threshold, have))
        r.touch("root")
        root = r.root
        new = r.new_keys(role, nkeys, kt, directory)
        for k in old_ids:
            root.revoke_key(k, role)
        for k in new:
            root.add_key(k, role)
        root.roles[role].threshold = th
        r.changes.append(
            f"root  {role} keys [{' '.join(short(k) for k in old_ids)}] -> "
            f"[{' '.join(short(k.keyid) for k in new)}], threshold {th}"
        )
        in_use = {k for rr in root.roles.values() for k in rr.keyids}
        r.retire_keys(old_keys, lambda k: k.keyid in in_use)
        if role == "targets":
            r.touch("targets")
        r.force("snapshot")
        r.force("timestamp")
        r.commit()
        return r.changes
    # a delegated role (tribe)
    parent = r.delegator_of(role)
    pt = r.targets(parent)
    assert pt.delegations is not None
    if pt.delegations.roles is None:
        raise KeyServiceError(f"{role} is a hash bin: rotate the keys of {parent} instead")
    dr = pt.delegations.roles[role]
    old_ids = list(dr.keyids)
    old_keys = [pt.delegations.keys[k] for k in old_ids]
    th = threshold or min(dr.threshold, max(nkeys, 1))
    if th > nkeys:
        raise KeyServiceError(f"--threshold {th} is more than --keys {nkeys}")
    # the delegator must be able to sign
    pkeys, pth = r.role_keys(parent)
    have = len(r._signers_for(pkeys))
    if have < pth:
        raise KeyServiceError(r._missing_keys_message(parent, pkeys, pth, have))
    kt = key_type or "ed25519"
    new = r.new_keys(role, nkeys, kt, directory or r.keys_dir, f"tribe-{role}")
    for k in old_ids:
        pt.revoke_key(k, role)
    for k in new:
        pt.add_key(k, role)
    dr.threshold = th
    r.touch(parent)
    r.touch(role)
    own = r.targets(role).delegations
    if own is not None and own.succinct_roles is not None and set(own.succinct_roles.keyids) == set(old_ids):
        for k in old_ids:
            r.targets(role).revoke_key(k)
        for k in new:
            r.targets(role).add_key(k)
        own.succinct_roles.threshold = th
        for b in own.succinct_roles.get_roles():
            r.touch(b)
    r.changes.append(
        f"role  {role} keys [{' '.join(short(k) for k in old_ids)}] -> "
        f"[{' '.join(short(k.keyid) for k in new)}], threshold {th} (in {parent})"
    )
    r.retire_keys(old_keys)
    r.commit()
    return r.changes


def resign_timestamp(r: Repository, expires_hours: Optional[float] = None) -> List[str]:
    if expires_hours is not None:
        if expires_hours <= 0:
            raise KeyServiceError("--expires-hours must be positive")
        r._timestamp_expiry = r.now + dt.timedelta(seconds=round(expires_hours * 3600))
    r.md("timestamp")
    r.md("snapshot")
    r.force("timestamp")
    r.commit()
    snap = r.md("snapshot").signed
    if snap.expires - r.now < dt.timedelta(days=min(2, r.expires_days("snapshot") / 2)):
        r.changes.append(
            f"WARNING snapshot expires {fmt_time(snap.expires)}: run `keyservice refresh`"
        )
    return r.changes


def refresh(r: Repository, renew_within_days: Optional[float] = None) -> List[str]:
    """New snapshot and timestamp; re-sign the targets roles that expire soon."""
    for role in r.all_targets_roles():
        t = r.targets(role)
        window = renew_within_days if renew_within_days is not None else min(7.0, r.expires_days(role) / 4)
        if t.expires - r.now < dt.timedelta(days=window):
            keys, th = r.role_keys(role)
            if len(r._signers_for(keys)) >= th:
                r.touch(role)
            else:
                r.changes.append(
                    f"WARNING {role} expires {fmt_time(t.expires)} and its keys are not here: "
                    f"re-sign it with `keyservice refresh --keys DIR`"
                )
    root = r.root
    if root.expires - r.now < dt.timedelta(days=30):
        r.changes.append(f"WARNING root expires {fmt_time(root.expires)}: run `keyservice rotate-root --keep-keys`")
    r.force("snapshot")
    r.force("timestamp")
    r.commit()
    return r.changes


# -------------------------------------------------------------------------------- verification


class DirFetcher(FetcherInterface):
    """A python-tuf fetcher that reads a served directory instead of HTTP (for `check`)."""

    def __init__(self, base: Path):
        self.base = Path(base).resolve()

    def _fetch(self, url: str) -> Iterator[bytes]:
        rel = parse.unquote(parse.urlparse(url).path).lstrip("/")
        path = (self.base / rel).resolve()
        if self.base not in path.parents or not path.is_file():
            raise DownloadHTTPError(f"{rel} not found", 404)
        yield path.read_bytes()


def verify_served(served: Path, trusted_root: Optional[bytes] = None,
                  projects: Optional[Sequence[str]] = None) -> Dict[str, List[Dict[str, Any]]]:
    """Run python-tuf's client over a served directory (``metadata/``, ``targets/``).

    Starts from ``trusted_root`` (default: ``metadata/1.root.json``, so the whole root
    chain is checked), refreshes, and downloads every project document. Returns
    ``{project: recipients}``; raises python-tuf's exceptions on any failure.
    """
    from tuf.ngclient import Updater

    served = Path(served)
    if trusted_root is None:
        trusted_root = (served / "metadata" / "1.root.json").read_bytes()
    out: Dict[str, List[Dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        up = Updater(
            metadata_dir=tmp,
            metadata_base_url="http://keyservice.invalid/metadata/",
            target_base_url="http://keyservice.invalid/targets/",
            target_dir=tmp,
            fetcher=DirFetcher(served),
            bootstrap=trusted_root,
        )
        up.refresh()
        if projects is None:
            names = set()
            for f in (served / "metadata").glob("*.json"):
                if re.match(r"^\d+\.", f.name) or f.name in ("root.json", "timestamp.json", "snapshot.json"):
                    continue
                try:
                    md = Metadata.from_bytes(f.read_bytes())
                except Exception:  # noqa: BLE001 - only collecting names
                    continue
                for p in getattr(md.signed, "targets", {}):
                    if p.startswith(PROJECT_PREFIX) and p.endswith(".json"):
                        names.add(p[len(PROJECT_PREFIX) : -len(".json")])
            projects = sorted(names)
        for project in projects:
            info = up.get_targetinfo(project_path(project))
            if info is None:
                raise KeyServiceError(f"project {project}: no verified recipient document")
            dest = Path(tmp) / "t" / parse.quote(info.path, "")
            up.download_target(info, str(dest))
            out[project] = parse_project_document(dest.read_bytes(), project)
    return out


# -------------------------------------------------------------------------------- demo


def ensure_recipient_keys(keys_dir: Path, project: str = "demo") -> Dict[str, Path]:
    """The demo recipients: RSA-3072 and EC P-256, PKCS#8 private + PKIX public PEM.

    Same names and formats as scripts/gateway.py's ensure_keys (kept if present).
    """
    keys_dir.mkdir(parents=True, exist_ok=True)
    out: Dict[str, Path] = {}
    for kind in ("rsa", "ec"):
        priv_path = keys_dir / f"{project}-{kind}.pem"
        pub_path = keys_dir / f"{project}-{kind}.pub.pem"
        if priv_path.exists():
            key = serialization.load_pem_private_key(priv_path.read_bytes(), password=None)
        else:
            key = rsa.generate_private_key(65537, 3072) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        if not pub_path.exists() or pub_path.read_bytes() != pub_pem:
            pub_path.write_bytes(pub_pem)
        out[kind] = pub_path
    return out


DEMO_KEY_TYPES = ["root=ecdsa", "targets=rsa", "snapshot=ecdsa", "timestamp=ed25519"]


def demo(repo: Path, keys_dir: Path, project: str = "demo") -> List[str]:
    """Build (or keep, refreshing what expires soon) the local gateway's demo repository."""
    repo = Path(repo).resolve()
    pubs = ensure_recipient_keys(Path(keys_dir), project)
    entries = [recipient_from_file(pubs["rsa"], "pem"), recipient_from_file(pubs["ec"], "pem")]
    changes: List[str] = []
    if (repo / CONFIG_NAME).exists():
        try:
            kept: List[str] = [f"demo  keeping the repository at {repo}"]
            kept += refresh_if_needed(Repository(repo))
            kept += set_recipients(Repository(repo), project, entries)
            verify_served(repo, projects=[project])
            return kept
        except Exception as err:  # noqa: BLE001 - any defect: rebuild
            reason = f"{type(err).__name__}: {err}"
        stale = repo.with_name(repo.name + ".invalid-" + utcnow().strftime("%Y%m%dT%H%M%SZ"))
        os.replace(repo, stale)
        changes.append(f"demo  the repository at {repo} is not valid ({reason}); moved to {stale}")
    changes += init_repository(repo, consistent_snapshot=True, root_keys=2, root_threshold=2,
                               key_types=DEMO_KEY_TYPES)
    changes += set_recipients(Repository(repo), project, entries)
    verify_served(repo, projects=[project])
    return changes


def refresh_if_needed(r: Repository) -> List[str]:
    """Refresh only when some metadata expires within a day (or a quarter of its lifetime);
    renew root (same keys) when it expires within 30 days."""
    changes: List[str] = []
    if r.root.expires - r.now < dt.timedelta(days=30):
        changes += rotate_root(r, keep_keys=True)
        r = Repository(r.path, r.offline_dir, r.extra_key_dirs)
    soon = False
    for role in r.all_targets_roles() + ["snapshot", "timestamp"]:
        left = r.md(role).signed.expires - r.now
        if left < dt.timedelta(days=min(1.0, r.expires_days(role) / 4)):
            soon = True
    return changes + (refresh(r) if soon else [])


# ============================================================================================
# attack variants of the served repository (for the end-to-end tests)

#: kind -> whether the attack uses the key service's online (snapshot/timestamp) keys, the
#: python-tuf exception it causes, which client it defeats ("any"; "warm": one that has seen
#: the current metadata; "cold": one that downloads the attacked file), and what it does.
#: "leaves_newer_versions": a client that saw the attack keeps the newer timestamp/snapshot
#: versions it verified (validly signed with the online keys) and refuses the genuine
#: repository as a rollback until the online keys are rotated (rotate-key) or it restarts
#: from its pinned root.
ATTACKS: Dict[str, Dict[str, Any]] = {
    "tampered-target": {
        "leaves_newer_versions": False,
        "online_keys": False,
        "expect": "LengthOrHashMismatchError",
        "client": "cold",
        "what": "the project document is replaced by one listing attacker keys (same length); "
                "metadata untouched, so its length/hashes no longer match (arbitrary software "
                "attack). Detected by any client that downloads the document; a client that "
                "kept a verified copy keeps using it.",
    },
    "rollback": {
        "leaves_newer_versions": False,
        "online_keys": False,
        "expect": "BadVersionNumberError",
        "client": "warm",
        "what": "the previous genuine timestamp (and, without consistent snapshots, the "
                "snapshot/targets it names) is served again. Needs a client that has seen the "
                "current timestamp; a client starting from scratch accepts the older, genuine "
                "state (TUF cannot tell it apart; expiry bounds it).",
    },
    "rollback-targets": {
        "leaves_newer_versions": True,
        "online_keys": True,
        "expect": "BadVersionNumberError",
        "client": "warm",
        "what": "with the key service's online snapshot and timestamp keys, a new snapshot "
                "names the previous version of the role holding the project (e.g. before a "
                "recipient rotation) and that genuine older role metadata is served. Needs a "
                "client that has seen the current snapshot.",
    },
    "freeze": {
        "leaves_newer_versions": False,
        "online_keys": True,
        "expect": "ExpiredMetadataError",
        "client": "any",
        "what": "the timestamp (next version, genuine timestamp key) expired an hour ago, as "
                "when an attacker keeps serving stale metadata or the re-signing cron stopped "
                "(indefinite freeze attack).",
    },
    "fast-forward": {
        "leaves_newer_versions": True,
        "online_keys": True,
        "expect": "BadVersionNumberError",
        "client": "any",
        "what": "with the online snapshot and timestamp keys, the snapshot claims version "
                "N+1000 of the role holding the project, which cannot be produced without that "
                "role's key; the served role metadata is still version N (fast-forward attack). "
                "Recovery after such a compromise: rotate-key --role snapshot/timestamp.",
    },
    "mix-and-match": {
        "leaves_newer_versions": False,
        "online_keys": False,
        "expect": "BadVersionNumberError",
        "client": "cold",
        "what": "current timestamp and snapshot, but the previous genuine version of the role "
                "holding the project (served under the current name). Detected by any client "
                "that downloads that role; a client that kept the current version keeps it.",
    },
    "bad-signature": {
        "leaves_newer_versions": True,
        "online_keys": True,
        "expect": "UnsignedMetadataError",
        "client": "any",
        "what": "the role holding the project lists an attacker document (next version) and "
                "carries the previous signatures, which do not verify; snapshot and timestamp "
                "re-signed with the online keys.",
    },
    "too-few-signatures": {
        "leaves_newer_versions": False,
        "online_keys": True,
        "expect": "UnsignedMetadataError",
        "client": "any",
        "what": "a new root version gives the targets role an attacker key, signed by one root "
                "key fewer than the threshold (only the attacker's key when the threshold is "
                "1); targets with the attacker document signed by that key; snapshot and "
                "timestamp re-signed with the online keys.",
    },
    "substituted-key": {
        "leaves_newer_versions": True,
        "online_keys": True,
        "expect": "UnsignedMetadataError",
        "client": "any",
        "what": "the key service replaces the project's recipients with attacker keys and "
                "re-signs the role holding them with an attacker key not trusted by its "
                "delegator; snapshot and timestamp re-signed with the online keys.",
    },
}


class _Attack:
    def __init__(self, r: Repository, out: Path, project: str):
        self.r = r
        self.out = out
        self.project = project
        self.path = project_path(project)
        self.owner, found = r.find_owner(self.path)
        if not found:
            raise KeyServiceError(f"project {project} has no recipient document to attack")
        self.genuine = r.read_target(self.owner, self.path)
        self.now = utcnow()
        self.notes: List[str] = []
        self.attacker_files: List[str] = []

    # -- files
    def load(self, role: str) -> Metadata:
        return Metadata.from_bytes((self.out / "metadata" / role_file(role)).read_bytes())

    def write_meta(self, role: str, md: Metadata) -> bytes:
        data = md_bytes(md)
        v = md.signed.version
        if role == "root" or (self.r.consistent and role != "timestamp"):
            write_atomic(self.out / "metadata" / role_file(role, v), data)
        write_atomic(self.out / "metadata" / role_file(role), data)
        return data

    def write_target(self, data: bytes, digest: Optional[str] = None) -> None:
        write_atomic(self.out / "targets" / self.path, data)
        if self.r.consistent:
            digest = digest or hashlib.sha256(data).hexdigest()
            d, sep, base = self.path.rpartition("/")
            write_atomic(self.out / "targets" / f"{d}{sep}{digest}.{base}", data)

    def history(self, role: str, version: int) -> bytes:
        p = self.r.history_dir / role_file(role, version)
        if version < 1:
            raise KeyServiceError(
                f"{role} has only version 1: nothing older to replay (this attack needs a "
                f"repository where {role} changed at least once; let the client see the newer one)"
            )
        if not p.exists():
            raise KeyServiceError(
                f"{p} is missing: this attack replays version {version} of {role}, so the "
                f"repository needs an older version (make a change or run `keyservice refresh` "
                f"first, and let the client see the newer one)"
            )
        return p.read_bytes()

    # -- keys
    def attacker_signer(self, name: str) -> CryptoSigner:
        signer = generate_signer("ed25519")
        d = self.out / "attacker"
        path = write_private_key(d, name, signer)
        self.attacker_files.append(str(path.relative_to(self.out)))
        return signer

    def attacker_document(self, pad_to: Optional[int] = None) -> bytes:
        """Attacker recipients of the same types as the genuine ones (same document length
        when ``pad_to`` is given)."""
        entries = []
        d = self.out / "attacker"
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for i, e in enumerate(parse_project_document(self.genuine)):
            pub = recipient_entry_key(e)
            if isinstance(pub, rsa.RSAPublicKey):
                priv: Any = rsa.generate_private_key(65537, pub.key_size)
            else:
                priv = ec.generate_private_key(type(pub.curve)())
            path = d / f"recipient-{i}.pem"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
            self.attacker_files.append(str(path.relative_to(self.out)))
            if "pem" in e:
                entries.append({"pem": priv.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()})
            else:
                entries.append({"jwk": _public_jwk(priv.public_key())})
        data = json.dumps({"project": self.project, "recipients": entries}, separators=(",", ":")).encode()
        if pad_to is not None and len(data) + 1 <= pad_to:
            data = data + b" " * (pad_to - len(data) - 1) + b"\n"
        else:
            data += b"\n"
        return data

    def online_bump(self, meta: Dict[str, int]) -> None:
        """New snapshot (with ``meta`` role versions) and timestamp, signed with the
        repository's genuine online keys, as a compromised key service could."""
        r = self.r
        snap_md = self.load("snapshot")
        snap: Snapshot = snap_md.signed  # type: ignore[assignment]
        for role, version in meta.items():
            snap.meta[role_file(role)] = MetaFile(version=version)
        snap.version += 1
        snap.expires = expiry_in(r.expires_days("snapshot"), self.now)
        keys, th = r.role_keys("snapshot")
        r._sign("snapshot", snap_md, keys, th)
        data = self.write_meta("snapshot", snap_md)
        ts_md = self.load("timestamp")
        ts: Timestamp = ts_md.signed  # type: ignore[assignment]
        ts.snapshot_meta = MetaFile(version=snap.version, length=len(data),
                                    hashes={"sha256": hashlib.sha256(data).hexdigest()})
        ts.version += 1
        ts.expires = expiry_in(r.expires_days("timestamp"), self.now)
        keys, th = r.role_keys("timestamp")
        r._sign("timestamp", ts_md, keys, th)
        self.write_meta("timestamp", ts_md)
        self.notes.append(f"snapshot v{snap.version} and timestamp v{ts.version} signed with the online keys")

    def _replace_document(self, md: Metadata) -> bytes:
        doc = self.attacker_document()
        t: Targets = md.signed  # type: ignore[assignment]
        t.targets[self.path] = TargetFile.from_data(self.path, doc, ["sha256"])
        t.version += 1
        t.expires = expiry_in(self.r.expires_days(self.owner), self.now)
        self.write_target(doc)
        return doc

    # -- the attacks
    def tampered_target(self) -> None:
        doc = self.attacker_document(pad_to=len(self.genuine))
        self.write_target(doc, hashlib.sha256(self.genuine).hexdigest())
        self.notes.append(f"{self.path}: {len(doc)} bytes (genuine {len(self.genuine)})")

    def rollback(self) -> None:
        cur = self.load("timestamp").signed.version
        old = self.history("timestamp", cur - 1)
        write_atomic(self.out / "metadata" / "timestamp.json", old)
        old_ts: Timestamp = Metadata.from_bytes(old).signed  # type: ignore[assignment]
        if not self.r.consistent:
            sv = old_ts.snapshot_meta.version
            old_snap = self.history("snapshot", sv)
            write_atomic(self.out / "metadata" / "snapshot.json", old_snap)
            for name, mf in Metadata.from_bytes(old_snap).signed.meta.items():  # type: ignore[attr-defined]
                role = parse.unquote(name[: -len(".json")])
                write_atomic(self.out / "metadata" / name, self.history(role, mf.version))
        self.notes.append(f"timestamp v{cur} -> v{cur - 1} (snapshot v{old_ts.snapshot_meta.version})")

    def rollback_targets(self) -> None:
        cur = self.load(self.owner).signed.version
        old = self.history(self.owner, cur - 1)
        write_atomic(self.out / "metadata" / role_file(self.owner), old)
        if self.r.consistent:
            write_atomic(self.out / "metadata" / role_file(self.owner, cur - 1), old)
        self.online_bump({self.owner: cur - 1})
        self.notes.append(f"{self.owner} v{cur} -> v{cur - 1}")

    def freeze(self) -> None:
        md = self.load("timestamp")
        md.signed.version += 1
        md.signed.expires = self.now - dt.timedelta(hours=1)
        keys, th = self.r.role_keys("timestamp")
        self.r._sign("timestamp", md, keys, th)
        self.write_meta("timestamp", md)
        self.notes.append(f"timestamp v{md.signed.version} expired {fmt_time(md.signed.expires)}")

    def fast_forward(self) -> None:
        cur_bytes = (self.out / "metadata" / role_file(self.owner)).read_bytes()
        cur = Metadata.from_bytes(cur_bytes).signed.version
        ff = cur + 1000
        if self.r.consistent:
            write_atomic(self.out / "metadata" / role_file(self.owner, ff), cur_bytes)
        self.online_bump({self.owner: ff})
        self.notes.append(f"snapshot names {self.owner} v{ff}; served {self.owner} is v{cur}")

    def mix_and_match(self) -> None:
        cur = self.load(self.owner).signed.version
        old = self.history(self.owner, cur - 1)
        write_atomic(self.out / "metadata" / role_file(self.owner), old)
        if self.r.consistent:
            write_atomic(self.out / "metadata" / role_file(self.owner, cur), old)
        self.notes.append(f"{self.owner} v{cur - 1} served where the snapshot names v{cur}")

    def bad_signature(self) -> None:
        md = self.load(self.owner)
        sigs = dict(md.signatures)
        self._replace_document(md)
        md.signatures.clear()
        md.signatures.update(sigs)
        self.write_meta(self.owner, md)
        self.online_bump({self.owner: md.signed.version})
        self.notes.append(f"{self.owner} v{md.signed.version} with the signatures of v{md.signed.version - 1}")

    def substituted_key(self) -> None:
        md = self.load(self.owner)
        self._replace_document(md)
        signer = self.attacker_signer(f"attacker-{self.owner}")
        md.signatures.clear()
        md.sign(signer)
        self.write_meta(self.owner, md)
        self.online_bump({self.owner: md.signed.version})
        self.notes.append(f"{self.owner} v{md.signed.version} signed by attacker key {short(signer.public_key.keyid)}")

    def too_few_signatures(self) -> None:
        r = self.r
        root_md = self.load("root")
        root: Root = root_md.signed  # type: ignore[assignment]
        threshold = root.roles["root"].threshold
        genuine = r._signers_for([root.get_key(k) for k in root.roles["root"].keyids])[: threshold - 1]
        tsigner = self.attacker_signer("attacker-targets")
        for k in list(root.roles["targets"].keyids):
            root.revoke_key(k, "targets")
        root.add_key(tsigner.public_key, "targets")
        root.version += 1
        root.expires = expiry_in(r.expires_days("root"), self.now)
        root_md.signatures.clear()
        for s in genuine:
            root_md.sign(s, append=True)
        if not genuine:
            root_md.sign(self.attacker_signer("attacker-root"), append=True)
        self.write_meta("root", root_md)
        targets_md = self.load("targets")
        doc = self.attacker_document()
        t: Targets = targets_md.signed  # type: ignore[assignment]
        t.targets[self.path] = TargetFile.from_data(self.path, doc, ["sha256"])
        t.version += 1
        t.expires = expiry_in(r.expires_days("targets"), self.now)
        targets_md.signatures.clear()
        targets_md.sign(tsigner)
        self.write_target(doc)
        self.write_meta("targets", targets_md)
        self.online_bump({"targets": t.version})
        self.notes.append(
            f"root v{root.version} signed by {len(genuine)} of the {threshold} root signatures "
            f"required" + ("" if genuine else " (plus the attacker's)")
        )


def _public_jwk(pub: Any) -> Dict[str, str]:
    def b64(n: int, size: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()

    if isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        return {"kty": "RSA", "n": b64(nums.n, (nums.n.bit_length() + 7) // 8), "e": b64(nums.e, 3)}
    crv = EC_CURVES[pub.curve.name]
    size = JWK_CURVES[crv][1]
    nums = pub.public_numbers()
    return {"kty": "EC", "crv": crv, "x": b64(nums.x, size), "y": b64(nums.y, size)}


def make_attack(r: Repository, out: Path, kind: str, project: str = "demo") -> List[str]:
    """Copy the served repository into ``out`` and apply attack ``kind`` there."""
    if kind not in ATTACKS:
        raise KeyServiceError(f"unknown attack {kind!r}: one of {', '.join(ATTACKS)}")
    out = Path(out).resolve()
    if out == r.path or r.path in out.parents:
        raise KeyServiceError("--out must be outside the repository")
    if out.exists():
        if not (out / "ATTACK.json").exists() and any(out.iterdir()):
            raise KeyServiceError(f"{out} exists and is not an attack directory: refusing to overwrite")
        for sub in ("metadata", "targets", "attacker", "ATTACK.json"):
            p = out / sub
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(r.meta_dir, out / "metadata", ignore=shutil.ignore_patterns(".tmp-*"))
        shutil.copytree(r.targets_dir, out / "targets", ignore=shutil.ignore_patterns(".tmp-*"))
        a = _Attack(r, out, project)
        getattr(a, kind.replace("-", "_"))()
    except BaseException:
        for sub in ("metadata", "targets", "attacker"):
            shutil.rmtree(out / sub, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    info = dict(ATTACKS[kind])
    report = {
        "kind": kind,
        "project": project,
        "role": a.owner,
        "expect": {"python-tuf": info["expect"]},
        "client": info["client"],
        "online_keys": info["online_keys"],
        "leaves_newer_versions": info["leaves_newer_versions"],
        "description": info["what"],
        "details": a.notes,
        "attacker_keys": a.attacker_files,
        "source_repository": str(r.path),
        "created": fmt_time(a.now),
    }
    write_atomic(out / "ATTACK.json", (json.dumps(report, indent=2) + "\n").encode())
    lines = [f"attack {kind} on project {project} (role {a.owner}) -> {out}"]
    lines += [f"  {n}" for n in a.notes]
    who = {"any": "any client", "warm": "a client that has seen the current metadata",
           "cold": "a client that downloads the attacked file"}[info["client"]]
    lines.append(f"  expect: python-tuf {info['expect']}; defeats {who}")
    return lines


# ============================================================================================
# serving (nginx)


def nginx_config(served: Path, listen: str, state: Path) -> str:
    """An nginx configuration serving only ``metadata/`` and ``targets/`` of ``served``.

    ``served`` is not resolved: when it is a symlink, nginx follows it on every request, so
    re-pointing the link (``ln -sfn``) switches what is served without a reload."""
    served = Path(served).absolute()
    state = Path(state).resolve()
    user = "user root;\n" if os.geteuid() == 0 else ""
    tmp = state / "tmp"
    return f"""# key service: nginx serving {served} (generated by scripts/keyservice serve-config)
# run:  nginx -p {state} -e {state}/error.log -c {state}/nginx.conf -g "daemon off;"
# stop: kill -QUIT $(cat {state}/nginx.pid)
{user}worker_processes 1;
pid {state}/nginx.pid;
error_log {state}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log {state}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ application/json json; }}
    default_type application/octet-stream;
    sendfile on;
    server_tokens off;
    server {{
        listen {listen};
        server_name _;
        location ~ /\\. {{ return 404; }}
        location /metadata/ {{
            alias {served}/metadata/;
            add_header Cache-Control "no-cache" always;
        }}
        location /targets/ {{
            alias {served}/targets/;
            add_header Cache-Control "no-cache" always;
        }}
        location / {{ return 404; }}
    }}
}}
"""


def write_nginx_config(served: Path, listen: str, state: Optional[Path] = None) -> Path:
    served = Path(served).absolute()
    if not (served / "metadata").is_dir() or not (served / "targets").is_dir():
        raise KeyServiceError(f"{served} has no metadata/ and targets/ to serve")
    state = Path(state).resolve() if state else served / ".nginx"
    for sub in ("tmp",):
        (state / sub).mkdir(parents=True, exist_ok=True)
    conf = state / "nginx.conf"
    write_atomic(conf, nginx_config(served, listen, state).encode())
    return conf
