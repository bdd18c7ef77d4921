"""Tests of scripts/keyservice, checked with python-tuf's own client (tuf.ngclient.Updater).

Every test runs the CLI in a temporary directory and serves the repository (or an attacked
copy) with http.server on 127.0.0.1; the python-tuf Updater is the judge of what a TUF
client accepts. One test serves it with nginx (`keyservice serve`), as the gateway does.
"""
from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, TargetFile
from tuf.ngclient import Updater

REPO_ROOT = Path(__file__).resolve().parents[2]
KEYSERVICE = REPO_ROOT / "scripts" / "keyservice"
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import keyservice_lib as ks  # noqa: E402

# ============================================================================================
# helpers


def run(*args: object, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(KEYSERVICE), *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )
    if ok and proc.returncode != 0:
        raise AssertionError(f"keyservice {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    if not ok and proc.returncode == 0:
        raise AssertionError(f"keyservice {args} should have failed:\n{proc.stdout}")
    return proc


def write_pem_public(path: Path, key) -> Path:
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def write_pem_private(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def b64u(n: int, size: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


def ec_jwk(key) -> Dict[str, str]:
    nums = key.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-384", "x": b64u(nums.x, 48), "y": b64u(nums.y, 48)}


def version_of(path: Path) -> int:
    return Metadata.from_bytes(path.read_bytes()).signed.version


def recipients_ids(entries: List[dict]) -> List[str]:
    return [ks.describe_entry(e)[0] for e in entries]


def key_id(key) -> str:
    return ks.recipient_id(key.public_key())


class Server:
    """http.server on 127.0.0.1 serving a directory that can be switched between requests."""

    def __init__(self) -> None:
        self.dir: Optional[Path] = None
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(server.dir), **kw)

            def log_message(self, *a):  # quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def serve(self, directory: Path) -> None:
        self.dir = Path(directory)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


class Client:
    """A TUF client of the key service, as the gateway is: pinned root, cached metadata."""

    def __init__(self, base_url: str, workdir: Path, trusted_root: bytes):
        self.base_url = base_url
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "targets").mkdir(exist_ok=True)
        self.trusted_root = trusted_root

    def updater(self) -> Updater:
        return Updater(
            metadata_dir=str(self.dir),
            metadata_base_url=f"{self.base_url}/metadata/",
            target_base_url=f"{self.base_url}/targets/",
            target_dir=str(self.dir / "targets"),
            bootstrap=self.trusted_root,
        )

    def recipients(self, project: str) -> Optional[List[dict]]:
        """One refresh (a new Updater, as a timer tick) and the project's verified recipients."""
        up = self.updater()
        up.refresh()
        info = up.get_targetinfo(f"projects/{project}.json")
        if info is None:
            return None
        path = up.download_target(info)
        doc = json.loads(Path(path).read_text())
        assert doc["project"] == project
        return doc["recipients"]

    def trusted(self, role: str) -> Metadata:
        return Metadata.from_bytes((self.dir / f"{role}.json").read_bytes())


def pinned_root(repo: Path) -> bytes:
    return run("pin-root", "--repo", repo).stdout.encode()


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """Recipient key pairs and their public files (made once: RSA generation is slow)."""
    d = tmp_path_factory.mktemp("recipients")
    out = {}
    out["rsa"] = rsa.generate_private_key(65537, 2048)
    out["rsa2"] = rsa.generate_private_key(65537, 3072)
    out["ec"] = ec.generate_private_key(ec.SECP256R1())
    out["ec384"] = ec.generate_private_key(ec.SECP384R1())
    files = {name: write_pem_public(d / f"{name}.pub.pem", k) for name, k in out.items()}
    jwk = d / "ec384.jwk"
    jwk.write_text(json.dumps(ec_jwk(out["ec384"])))
    files["jwk"] = jwk
    return out, files


# ============================================================================================
# init, recipients


@pytest.mark.parametrize("consistent", [False, True], ids=["plain", "consistent"])
def test_init_layout_and_first_project(tmp_path, server, keys, consistent):
    k, f = keys
    repo = tmp_path / "repo"
    flags = ["--consistent-snapshot"] if consistent else []
    out = run("init", "--repo", repo, *flags).stdout
    for role in ("root", "targets", "snapshot", "timestamp"):
        assert f"meta  {role:<10} (new) -> v1" in out
    meta = repo / "metadata"
    assert (meta / "1.root.json").read_bytes() == (meta / "root.json").read_bytes()
    for name in ("timestamp.json", "snapshot.json", "targets.json"):
        assert (meta / name).is_file()
    assert ((meta / "1.snapshot.json").is_file() and (meta / "1.targets.json").is_file()) == consistent
    assert not (meta / "1.timestamp.json").exists()
    keyfiles = sorted(p.name.split("-")[0] for p in (repo / "keys").glob("*.pem"))
    assert keyfiles == ["root", "snapshot", "targets", "timestamp"]
    assert stat.S_IMODE((repo / "keys").stat().st_mode) == 0o700
    for p in (repo / "keys").glob("*.pem"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert p.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8

    out = run("add-recipient", "--repo", repo, "--project", "demo", "--pem", f["rsa"], "--jwk", f["jwk"]).stdout
    assert "+ recipient" in out and "RSA-2048" in out and "EC P-384" in out
    assert "targets    v1 -> v2" in out and "snapshot   v1 -> v2" in out and "timestamp  v1 -> v2" in out
    assert (repo / "targets" / "projects" / "demo.json").is_file()
    hashed = list((repo / "targets" / "projects").glob("*.demo.json"))
    assert bool(hashed) == consistent

    server.serve(repo)
    client = Client(server.url, tmp_path / "client", pinned_root(repo))
    got = client.recipients("demo")
    assert recipients_ids(got) == [key_id(k["rsa"]), key_id(k["ec384"])]
    assert got[0]["pem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert got[1]["jwk"]["crv"] == "P-384"
    assert client.recipients("nothere") is None
    listing = run("list", "--repo", repo).stdout
    assert "demo  (role targets v2" in listing and "RSA-2048" in listing and "jwk" in listing
    assert "ok: python-tuf verified 1 project" in run("check", "--repo", repo).stdout


def test_refuses_private_weak_and_unsupported_keys(tmp_path, keys):
    _, f = keys
    repo = tmp_path / "repo"
    run("init", "--repo", repo)
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {
        "private.pem": (write_pem_private(bad / "private.pem", rsa.generate_private_key(65537, 2048)), "pem", "private key"),
        "rsa1024.pem": (write_pem_public(bad / "rsa1024.pem", rsa.generate_private_key(65537, 1024)), "pem", "too weak"),
        "ed25519.pem": (write_pem_public(bad / "ed25519.pem", ed25519.Ed25519PrivateKey.generate()), "pem", "not supported"),
        "k256.pem": (write_pem_public(bad / "k256.pem", ec.generate_private_key(ec.SECP256K1())), "pem", "not supported"),
    }
    priv = ec.generate_private_key(ec.SECP384R1())
    jwk = ec_jwk(priv)
    (bad / "private.jwk").write_text(json.dumps({**jwk, "d": b64u(priv.private_numbers().private_value, 48)}))
    cases["private.jwk"] = (bad / "private.jwk", "jwk", "private members")
    (bad / "alg.jwk").write_text(json.dumps({**jwk, "alg": "ECDH-ES"}))
    cases["alg.jwk"] = (bad / "alg.jwk", "jwk", "alg")
    (bad / "offcurve.jwk").write_text(json.dumps({**jwk, "y": jwk["x"]}))
    cases["offcurve.jwk"] = (bad / "offcurve.jwk", "jwk", "invalid EC JWK")
    rsa_pub = rsa.generate_private_key(65537, 2048).public_key()
    (bad / "pkcs1.pem").write_bytes(rsa_pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1))
    cases["pkcs1.pem"] = (bad / "pkcs1.pem", "pem", "PKCS#1")
    before = (repo / "metadata" / "timestamp.json").read_bytes()
    for name, (path, kind, message) in cases.items():
        proc = run("add-recipient", "--repo", repo, "--project", "demo", f"--{kind}", path, ok=False)
        assert proc.returncode == 1, name
        assert message in proc.stderr, (name, proc.stderr)
    # one bad key among good ones: nothing is published
    run("set-recipients", "--repo", repo, "--project", "demo", "--pem", f["rsa"], "--pem", bad / "rsa1024.pem", ok=False)
    assert (repo / "metadata" / "timestamp.json").read_bytes() == before
    assert not (repo / "targets" / "projects" / "demo.json").exists()
    # bad project names
    assert "not valid" in run("add-recipient", "--repo", repo, "--project", "Demo/x", "--pem", f["rsa"], ok=False).stderr


def test_rotation_is_seen_after_refresh(tmp_path, server, keys):
    k, f = keys
    repo = tmp_path / "repo"
    run("init", "--repo", repo, "--consistent-snapshot")
    run("add-recipient", "--repo", repo, "--project", "demo", "--pem", f["rsa"])
    server.serve(repo)
    client = Client(server.url, tmp_path / "client", pinned_root(repo))
    assert recipients_ids(client.recipients("demo")) == [key_id(k["rsa"])]

    # rotation = replace: the same (warm) client sees only the new keys on its next refresh
    out = run("set-recipients", "--repo", repo, "--project", "demo", "--pem", f["rsa2"], "--pem", f["ec"]).stdout
    assert "- recipient" in out and out.count("+ recipient") == 2
    assert recipients_ids(client.recipients("demo")) == [key_id(k["rsa2"]), key_id(k["ec"])]

    # same keys again: nothing published
    ts = version_of(repo / "metadata" / "timestamp.json")
    assert "unchanged" in run("set-recipients", "--repo", repo, "--project", "demo", "--pem", f["rsa2"], "--pem", f["ec"]).stdout
    assert "already a recipient" in run("add-recipient", "--repo", repo, "--project", "demo", "--pem", f["ec"]).stdout
    assert version_of(repo / "metadata" / "timestamp.json") == ts

    run("add-recipient", "--repo", repo, "--project", "demo", "--jwk", f["jwk"])
    run("remove-recipient", "--repo", repo, "--project", "demo", "--index", "0")
    assert recipients_ids(client.recipients("demo")) == [key_id(k["ec"]), key_id(k["ec384"])]
    run("remove-recipient", "--repo", repo, "--project", "demo", "--keyid", key_id(k["ec"])[:12])
    assert recipients_ids(client.recipients("demo")) == [key_id(k["ec384"])]
    assert "last recipient" in run("remove-recipient", "--repo", repo, "--project", "demo", "--index", "0", ok=False).stderr
    assert "no recipient with id" in run("remove-recipient", "--repo", repo, "--project", "demo", "--keyid", "deadbeefdead", ok=False).stderr
    run("remove-project", "--repo", repo, "--project", "demo")
    assert client.recipients("demo") is None


def test_resign_timestamp_and_refresh(tmp_path, server, keys):
    _, f = keys
    repo = tmp_path / "repo"
    run("init", "--repo", repo)
    run("add-recipient", "--repo", repo, "--project", "demo", "--pem", f["rsa"])
    meta = repo / "metadata"
    server.serve(repo)
    client = Client(server.url, tmp_path / "client", pinned_root(repo))
    client.recipients("demo")
    ts, snap = version_of(meta / "timestamp.json"), version_of(meta / "snapshot.json")

    out = run("resign-timestamp", "--repo", repo, "--expires-hours", "6").stdout
    assert f"timestamp  v{ts} -> v{ts + 1}" in out and "snapshot" not in out
    md = Metadata.from_bytes((meta / "timestamp.json").read_bytes())
    left = md.signed.expires - ks.utcnow()
    assert 5.9 * 3600 < left.total_seconds() <= 6 * 3600
    assert md.signed.snapshot_meta.version == snap
    assert version_of(meta / "snapshot.json") == snap
    client.recipients("demo")
    assert client.trusted("timestamp").signed.version == ts + 1

    out = run("refresh", "--repo", repo).stdout
    assert f"snapshot   v{snap} -> v{snap + 1}" in out and f"timestamp  v{ts + 1} -> v{ts + 2}" in out
    client.recipients("demo")
    assert client.trusted("snapshot").signed.version == snap + 1
    # the cron host may hold the timestamp key only
    cron_keys = tmp_path / "cron-keys"
    cron_keys.mkdir()
    for p in (repo / "keys").glob("*.pem"):
        if not p.name.startswith("timestamp-"):
            p.rename(cron_keys / p.name)
    assert f"v{ts + 2} -> v{ts + 3}" in run("resign-timestamp", "--repo", repo).stdout
    err = run("refresh", "--repo", repo, ok=False).stderr
    assert "cannot sign snapshot" in err
    assert version_of(meta / "timestamp.json") == ts + 3  # nothing published
    for p in cron_keys.glob("*.pem"):
        p.rename(repo / "keys" / p.name)
    ts += 1
    # refresh renews a targets role that expires soon
    out = run("refresh", "--repo", repo, "--renew-within-days", "1000").stdout
    assert "targets    v2 -> v3" in out and f"timestamp  v{ts + 2} -> v{ts + 3}" in out


# ============================================================================================
# delegations


def _tribe_repo(tmp_path: Path, f, extra: tuple = ()) -> Path:
    repo = tmp_path / "repo"
    run("init", "--repo", repo, "--consistent-snapshot")
    run("add-recipient", "--repo", repo, "--project", "tribe-a-app", "--pem", f["rsa"])
    out = run("delegate", "--repo", repo, "--tribe", "tribe-a", "--paths", "projects/tribe-a-*.json", *extra).stdout
    assert "moved from targets to tribe-a" in out
    run("delegate", "--repo", repo, "--tribe", "tribe-b", "--paths", "projects/tribe-b-*.json")
    return repo


def test_tribe_role_signs_its_projects(tmp_path, server, keys):
    k, f = keys
    repo = _tribe_repo(tmp_path, f)
    meta = repo / "metadata"
    targets_v = version_of(meta / "targets.json")
    out = run("add-recipient", "--repo", repo, "--project", "tribe-a-app", "--pem", f["ec"]).stdout
    assert "(role tribe-a)" in out and "targets    v" not in out
    run("add-recipient", "--repo", repo, "--project", "tribe-b-web", "--pem", f["rsa2"])
    run("add-recipient", "--repo", repo, "--project", "demo", "--pem", f["rsa2"])
    assert version_of(meta / "targets.json") == targets_v + 1  # only "demo" touched targets

    tribe_a = Metadata.from_bytes((meta / "tribe-a.json").read_bytes())
    targets = Metadata.from_bytes((meta / "targets.json").read_bytes())
    role = targets.signed.delegations.roles["tribe-a"]
    assert role.terminating and role.paths == ["projects/tribe-a-*.json"]
    assert set(tribe_a.signatures) == set(role.keyids)
    assert "projects/tribe-a-app.json" in tribe_a.signed.targets
    assert "projects/tribe-a-app.json" not in targets.signed.targets
    assert list((repo / "keys").glob("tribe-tribe-a-*.pem"))

    server.serve(repo)
    client = Client(server.url, tmp_path / "client", pinned_root(repo))
    assert recipients_ids(client.recipients("tribe-a-app")) == [key_id(k["rsa"]), key_id(k["ec"])]
    assert recipients_ids(client.recipients("tribe-b-web")) == [key_id(k["rsa2"])]
    assert recipients_ids(client.recipients("demo")) == [key_id(k["rsa2"])]
    lines = run("list", "--repo", repo).stdout
    assert "tribe-a-app  (role tribe-a" in lines and "tribe-b-web  (role tribe-b" in lines
    assert "paths ['projects/tribe-a-*.json']" in run("status", "--repo", repo).stdout


def _publish_role(repo: Path, role: str, md: Metadata, signer) -> None:
    """Publish ``md`` for ``role`` signed by ``signer`` (whoever that is), then a genuine new
    snapshot and timestamp (the key service's online keys)."""
    r = ks.Repository(repo)
    md.signed.version += 1
    md.signatures.clear()
    md.sign(signer)
    data = ks.md_bytes(md)
    (repo / "metadata" / f"{md.signed.version}.{role}.json").write_bytes(data)
    (repo / "metadata" / f"{role}.json").write_bytes(data)
    snap = r.md("snapshot").signed
    snap.meta[f"{role}.json"].version = md.signed.version
    r.force("snapshot")
    r.force("timestamp")
    # publish snapshot/timestamp only (role already written)
    r._pending_meta = []
    r._pending_snapshot = None
    r._publish_snapshot([])
    r._publish_timestamp()
    for name, d in r._pending_meta:
        ks.write_atomic(repo / "metadata" / ks.role_file(name), d)


def _signer(repo: Path, stem: str):
    from securesystemslib.signer import CryptoSigner

    path = next((repo / "keys").glob(f"{stem}-*.pem"))
    return CryptoSigner(serialization.load_pem_private_key(path.read_bytes(), None))


def test_stolen_tribe_key_cannot_change_another_tribe(tmp_path, server, keys):
    k, f = keys
    repo = _tribe_repo(tmp_path, f)
    run("add-recipient", "--repo", repo, "--project", "tribe-b-web", "--pem", f["rsa2"])
    server.serve(repo)
    client = Client(server.url, tmp_path / "client", pinned_root(repo))
    assert recipients_ids(client.recipients("tribe-b-web")) == [key_id(k["rsa2"])]

    # tribe-a's key lists an attacker document for tribe-b's project in tribe-a's role
    evil = b'{"project": "tribe-b-web", "recipients": [{"pem": %s}]}\n' % json.dumps(
        f["ec"].read_text()).encode()
    md = Metadata.from_bytes((repo / "metadata" / "tribe-a.json").read_bytes())
    md.signed.targets["projects/tribe-b-web.json"] = TargetFile.from_data("projects/tribe-b-web.json", evil, ["sha256"])
    _publish_role(repo, "tribe-a", md, _signer(repo, "tribe-tribe-a"))
    # the client only asks tribe-b for tribe-b's paths: the genuine recipients stay
    assert recipients_ids(client.recipients("tribe-b-web")) == [key_id(k["rsa2"])]
    assert recipients_ids(Client(server.url, tmp_path / "cold", pinned_root(repo)).recipients("tribe-b-web")) == [key_id(k["rsa2"])]


def test_targets_key_cannot_sign_a_tribe_role(tmp_path, server, keys):
    """The top-level targets key cannot forge the tribe's role metadata..."""
    k, f = keys
    repo = _tribe_repo(tmp_path, f)
    server.serve(repo)
    client = Client(server.url, tmp_path / "client", pinned_root(repo))
    assert recipients_ids(client.recipients("tribe-a-app")) == [key_id(k["rsa"])]
    md = Metadata.from_bytes((repo / "metadata" / "tribe-a.json").read_bytes())
    evil = b'{"project": "tribe-a-app", "recipients": []}\n'
    md.signed.targets["projects/tribe-a-app.json"] = TargetFile.from_data("projects/tribe-a-app.json", evil, ["sha256"])
    _publish_role(repo, "tribe-a", md, _signer(repo, "targets"))
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        client.recipients("tribe-a-app")


def test_targets_key_outranks_tribes(tmp_path, server, keys):
    """...but it delegates: listing a tribe's path itself (or re-delegating) is what TUF lets the
    delegator do. So the top-level targets key is as powerful as every tribe's together and
    belongs offline once tribes hold their projects (init --offline-targets)."""
    k, f = keys
    repo = _tribe_repo(tmp_path, f)
    server.serve(repo)
    client = Client(server.url, tmp_path / "client", pinned_root(repo))
    md = Metadata.from_bytes((repo / "metadata" / "targets.json").read_bytes())
    doc = ks.project_document("tribe-a-app", [ks.recipient_from_file(f["ec"], "pem")])
    path = "projects/tribe-a-app.json"
    md.signed.targets[path] = TargetFile.from_data(path, doc, ["sha256"])
    digest = md.signed.targets[path].hashes["sha256"]
    (repo / "targets" / "projects" / f"{digest}.tribe-a-app.json").write_bytes(doc)
    _publish_role(repo, "targets", md, _signer(repo, "targets"))
    assert recipients_ids(client.recipients("tribe-a-app")) == [key_id(k["ec"])]


def test_tribe_keys_held_by_the_tribe(tmp_path, server, keys):
    k, f = keys
    repo = tmp_path / "repo"
    tribe_keys = tmp_path / "tribe-a-laptop"
    run("init", "--repo", repo)
    run("delegate", "--repo", repo, "--tribe", "tribe-a", "--paths", "projects/tribe-a-*.json",
        "--threshold", "2", "--count", "2", "--key-type", "ecdsa", "--tribe-keys-dir", tribe_keys)
    assert len(list(tribe_keys.glob("tribe-tribe-a-*.pem"))) == 2
    assert not list((repo / "keys").glob("tribe-*"))
    err = run("add-recipient", "--repo", repo, "--project", "tribe-a-x", "--pem", f["rsa"], ok=False).stderr
    assert "cannot sign tribe-a" in err and "--keys" in err
    out = run("add-recipient", "--repo", repo, "--keys", tribe_keys, "--project", "tribe-a-x", "--pem", f["rsa"]).stdout
    assert "tribe-a    v1 -> v2" in out
    server.serve(repo)
    client = Client(server.url, tmp_path / "client", pinned_root(repo))
    assert recipients_ids(client.recipients("tribe-a-x")) == [key_id(k["rsa"])]
    # a tribe key rotation (signed by the new key, delegated anew by targets)
    out = run("rotate-key", "--repo", repo, "--keys", tribe_keys, "--role", "tribe-a", "--count", "1",
              "--threshold", "1", "--keys-dir", tribe_keys).stdout
    assert "role  tribe-a keys" in out and "retired" in out
    assert recipients_ids(client.recipients("tribe-a-x")) == [key_id(k["rsa"])]

    # a tribe that generated its own key: only the public key is registered
    tb = ks.generate_signer("ed25519")
    tdir = tmp_path / "tribe-b-keys"
    ks.write_private_key(tdir, "mine", tb)
    pub = tmp_path / "tribe-b.pub.pem"
    pub.write_bytes(tb._private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    run("delegate", "--repo", repo, "--tribe", "tribe-b", "--paths", "projects/tribe-b-*.json", "--pubkey", pub,
        ok=False)  # the new role must be signed once: needs the tribe's private key
    run("delegate", "--repo", repo, "--tribe", "tribe-b", "--paths", "projects/tribe-b-*.json", "--pubkey", pub,
        "--keys", tdir)
    run("add-recipient", "--repo", repo, "--keys", tdir, "--project", "tribe-b-x", "--pem", f["ec"])
    assert recipients_ids(client.recipients("tribe-b-x")) == [key_id(k["ec"])]


def test_hash_bins(tmp_path, server, keys):
    k, f = keys
    repo = tmp_path / "repo"
    run("init", "--repo", repo, "--consistent-snapshot")
    out = run("delegate", "--repo", repo, "--tribe", "bulk", "--paths", "projects/*.json", "--hash-bins", "8").stdout
    assert "8 hash bins bulk-0..bulk-7" in out
    projects = [f"p{i:03d}" for i in range(12)]
    for i, p in enumerate(projects):
        run("add-recipient", "--repo", repo, "--project", p, "--pem", f["rsa"] if i % 2 else f["ec"])
    bulk = Metadata.from_bytes((repo / "metadata" / "bulk.json").read_bytes()).signed
    sr = bulk.delegations.succinct_roles
    assert sr.number_of_bins == 8
    for p in projects:
        bin_name = sr.get_role_for_target(f"projects/{p}.json")
        assert f"projects/{p}.json" in Metadata.from_bytes((repo / "metadata" / f"{bin_name}.json").read_bytes()).signed.targets
    server.serve(repo)
    client = Client(server.url, tmp_path / "client", pinned_root(repo))
    for i, p in enumerate(projects):
        assert recipients_ids(client.recipients(p)) == [key_id(k["rsa"] if i % 2 else k["ec"])]
    status = run("status", "--repo", repo).stdout
    assert "bulk-0..bulk-7" in status and "8 hash bins of bulk" in status


# ============================================================================================
# root and online key rotation


def test_rotate_root(tmp_path, server, keys):
    k, f = keys
    repo = tmp_path / "repo"
    run("init", "--repo", repo, "--root-keys", "2", "--root-threshold", "2", "--key-type", "root=ecdsa")
    run("add-recipient", "--repo", repo, "--project", "demo", "--pem", f["rsa"])
    server.serve(repo)
    root1 = pinned_root(repo)
    client = Client(server.url, tmp_path / "client", root1)
    client.recipients("demo")

    out = run("rotate-root", "--repo", repo, "--count", "3", "--threshold", "2").stdout
    assert "root       v1 -> v2" in out and "retired" in out
    root2 = Metadata.from_bytes((repo / "metadata" / "2.root.json").read_bytes())
    root1_md = Metadata.from_bytes(root1)
    assert root2.signed.roles["root"].threshold == 2 and len(root2.signed.roles["root"].keyids) == 3
    assert not set(root2.signed.roles["root"].keyids) & set(root1_md.signed.roles["root"].keyids)
    # signed by the old and the new keys
    assert set(root1_md.signed.roles["root"].keyids) <= set(root2.signatures)
    assert set(root2.signed.roles["root"].keyids) <= set(root2.signatures)
    assert pinned_root(repo) == (repo / "metadata" / "2.root.json").read_bytes()
    # warm client and a client pinned to root v1 both walk to v2
    assert recipients_ids(client.recipients("demo")) == [key_id(k["rsa"])]
    assert client.trusted("root").signed.version == 2
    cold = Client(server.url, tmp_path / "cold", root1)
    cold.recipients("demo")
    assert cold.trusted("root").signed.version == 2

    # renew with the same keys
    out = run("rotate-root", "--repo", repo, "--keep-keys").stdout
    assert "root       v2 -> v3" in out
    client.recipients("demo")
    assert client.trusted("root").signed.version == 3

    # without the root keys (offline media not there): refused, nothing published
    for p in (repo / "keys").glob("root-*.pem"):
        p.rename(tmp_path / p.name)
    err = run("rotate-root", "--repo", repo, ok=False).stderr
    assert "cannot sign root" in err and "--offline-keys" in err
    assert not (repo / "metadata" / "4.root.json").exists()
    out = run("rotate-root", "--repo", repo, "--keep-keys", "--offline-keys", tmp_path).stdout
    assert "root       v3 -> v4" in out


def test_offline_root_keys(tmp_path, server, keys):
    _, f = keys
    repo, offline = tmp_path / "repo", tmp_path / "usb"
    run("init", "--repo", repo, "--offline-keys", offline, "--root-keys", "2", "--root-threshold", "1")
    assert not list((repo / "keys").glob("root-*")) and len(list(offline.glob("root-*.pem"))) == 2
    shutil.move(offline, tmp_path / "usb-unplugged")
    # everyday work needs no root key
    run("add-recipient", "--repo", repo, "--project", "demo", "--pem", f["rsa"])
    run("resign-timestamp", "--repo", repo)
    assert "--offline-keys" in run("rotate-key", "--repo", repo, "--role", "timestamp", ok=False).stderr
    out = run("rotate-key", "--repo", repo, "--role", "timestamp", "--offline-keys", tmp_path / "usb-unplugged").stdout
    assert "root       v1 -> v2" in out


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_rotate_online_key(tmp_path, server, keys, role):
    k, f = keys
    repo = tmp_path / "repo"
    run("init", "--repo", repo, "--consistent-snapshot")
    run("add-recipient", "--repo", repo, "--project", "demo", "--pem", f["rsa"])
    server.serve(repo)
    client = Client(server.url, tmp_path / "client", pinned_root(repo))
    client.recipients("demo")
    old_signer = _signer(repo, role)
    out = run("rotate-key", "--repo", repo, "--role", role, "--key-type", "ecdsa").stdout
    assert f"root  {role} keys [" in out and "root       v1 -> v2" in out
    assert "timestamp  v2 -> v3" in out and "snapshot   v2 -> v3" in out
    assert ("targets    v2 -> v3" in out) == (role == "targets")
    assert recipients_ids(client.recipients("demo")) == [key_id(k["rsa"])]
    assert client.trusted("root").signed.version == 2
    # what the retired key signs is no longer accepted
    _forge(repo, role, old_signer)
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        client.recipients("demo")


def _forge(repo: Path, role: str, signer) -> None:
    """A new version of top-level ``role`` signed by ``signer``; genuine snapshot/timestamp above it."""
    md = Metadata.from_bytes((repo / "metadata" / f"{role}.json").read_bytes())
    if role in ("targets",):
        _publish_role(repo, role, md, signer)
        return
    md.signed.version += 1
    md.signatures.clear()
    md.sign(signer)
    data = ks.md_bytes(md)
    (repo / "metadata" / f"{role}.json").write_bytes(data)
    if role == "snapshot":
        (repo / "metadata" / f"{md.signed.version}.snapshot.json").write_bytes(data)
        r = ks.Repository(repo)
        r.md("timestamp")
        r._pending_meta = []
        r._pending_snapshot = None
        r._publish_timestamp()
        for name, d in r._pending_meta:
            ks.write_atomic(repo / "metadata" / ks.role_file(name), d)


def test_fast_forward_recovery_by_rotating_timestamp_key(tmp_path, server, keys):
    """A stolen timestamp key can push clients to a huge timestamp version; rotating the key
    (new root) makes clients drop that timestamp and accept the repository's again."""
    k, f = keys
    repo = tmp_path / "repo"
    run("init", "--repo", repo)
    run("add-recipient", "--repo", repo, "--project", "demo", "--pem", f["rsa"])
    server.serve(repo)
    client = Client(server.url, tmp_path / "client", pinned_root(repo))
    client.recipients("demo")
    attacked = tmp_path / "attacked"
    shutil.copytree(repo, attacked)
    md = Metadata.from_bytes((attacked / "metadata" / "timestamp.json").read_bytes())
    md.signed.version = 99999
    md.signatures.clear()
    md.sign(_signer(repo, "timestamp"))
    (attacked / "metadata" / "timestamp.json").write_bytes(ks.md_bytes(md))
    server.serve(attacked)
    client.recipients("demo")
    assert client.trusted("timestamp").signed.version == 99999
    server.serve(repo)
    with pytest.raises(tuf_exc.BadVersionNumberError):
        client.recipients("demo")  # the repository's timestamp looks like a rollback now
    run("rotate-key", "--repo", repo, "--role", "timestamp")
    assert recipients_ids(client.recipients("demo")) == [key_id(k["rsa"])]
    assert client.trusted("timestamp").signed.version < 99999


# ============================================================================================
# attacks: each variant makes python-tuf's client fail the way ATTACK.json says


def _build_attack_repo(repo: Path, consistent: bool, root_threshold: int, f) -> None:
    flags = ["--consistent-snapshot"] if consistent else []
    run("init", "--repo", repo, *flags, "--root-keys", str(root_threshold), "--root-threshold", str(root_threshold))
    run("add-recipient", "--repo", repo, "--project", "demo", "--pem", f["rsa"])
    run("set-recipients", "--repo", repo, "--project", "demo", "--pem", f["rsa2"], "--jwk", f["jwk"])
    run("delegate", "--repo", repo, "--tribe", "tribe-a", "--paths", "projects/tribe-a-*.json")
    run("add-recipient", "--repo", repo, "--project", "tribe-a-app", "--pem", f["rsa"])
    run("set-recipients", "--repo", repo, "--project", "tribe-a-app", "--pem", f["ec"])


@pytest.fixture(scope="session")
def attack_bases(tmp_path_factory, keys):
    """Two repositories with history (consistent snapshots + root threshold 2, and plain +
    threshold 1), built once; each test works on a copy."""
    _, f = keys
    base = tmp_path_factory.mktemp("attack-bases")
    out = {}
    for consistent in (True, False):
        repo = base / ("consistent" if consistent else "plain")
        _build_attack_repo(repo, consistent, 2 if consistent else 1, f)
        out[consistent] = repo
    return out


def _attack_repo(tmp_path: Path, consistent: bool, bases) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(bases[consistent], repo)
    return repo


EXC = {
    "LengthOrHashMismatchError": tuf_exc.LengthOrHashMismatchError,
    "BadVersionNumberError": tuf_exc.BadVersionNumberError,
    "ExpiredMetadataError": tuf_exc.ExpiredMetadataError,
    "UnsignedMetadataError": tuf_exc.UnsignedMetadataError,
}


@pytest.mark.parametrize("consistent", [True, False], ids=["consistent", "plain"])
@pytest.mark.parametrize("project", ["demo", "tribe-a-app"])
@pytest.mark.parametrize("kind", list(ks.ATTACKS))
def test_attack_variants(tmp_path, server, attack_bases, kind, project, consistent):
    repo = _attack_repo(tmp_path, consistent, attack_bases)
    genuine_ids = recipients_ids(ks.Repository(repo).project_doc(project)[1])
    before = {p: p.read_bytes() for p in (repo / "metadata").iterdir()}
    out_dir = tmp_path / "attack"
    out = run("attack", "--repo", repo, "--out", out_dir, "--kind", kind, "--project", project).stdout
    assert f"attack {kind}" in out
    info = json.loads((out_dir / "ATTACK.json").read_text())
    assert info["kind"] == kind and info["project"] == project
    expected = EXC[info["expect"]["python-tuf"]]
    assert {p: p.read_bytes() for p in (repo / "metadata").iterdir()} == before  # repo untouched
    assert not (out_dir / "keys").exists() and not (out_dir / "history").exists()

    root = pinned_root(repo)
    warm = Client(server.url, tmp_path / "warm", root)
    server.serve(repo)
    assert recipients_ids(warm.recipients(project)) == genuine_ids
    server.serve(out_dir)
    cold = Client(server.url, tmp_path / "cold", root)

    if info["client"] in ("any", "warm"):
        with pytest.raises(expected):
            warm.recipients(project)
    if info["client"] in ("any", "cold"):
        with pytest.raises(expected):
            cold.recipients(project)
    # where the attack brings its own recipients, the served document does list them (an
    # unverifying client would encrypt to the attacker): the refusals above are what stops it
    attacker_recipients = [p for p in info["attacker_keys"] if "/recipient-" in p]
    if attacker_recipients:
        served = json.loads((out_dir / "targets" / "projects" / f"{project}.json").read_text())
        want = sorted(ks.recipient_id(serialization.load_pem_private_key((out_dir / p).read_bytes(), None).public_key())
                      for p in attacker_recipients)
        assert sorted(recipients_ids(served["recipients"])) == want
        assert not set(want) & set(genuine_ids)
    assert bool(attacker_recipients) == (kind in ("tampered-target", "bad-signature", "substituted-key",
                                                  "too-few-signatures"))

    if info["client"] == "cold" and kind == "mix-and-match":
        # a client that kept the current role metadata keeps using it (nothing to mix in)
        assert recipients_ids(warm.recipients(project)) == genuine_ids
    # ("warm" attacks replay older genuine metadata: a client with no history accepts that
    # older genuine state; TUF bounds it by expiry)

    # the genuine repository again: fine for the warm client unless the attack used the
    # online keys to make it verify newer snapshot/timestamp versions (recovery: rotate them,
    # see test_recovery_after_online_keys_compromise); what was rejected is not kept
    server.serve(repo)
    if not info["leaves_newer_versions"]:
        assert recipients_ids(warm.recipients(project)) == genuine_ids
    else:
        with pytest.raises(tuf_exc.RepositoryError):
            warm.recipients(project)


def test_recovery_after_online_keys_compromise(tmp_path, server, attack_bases):
    repo = _attack_repo(tmp_path, True, attack_bases)
    out_dir = tmp_path / "attack"
    run("attack", "--repo", repo, "--out", out_dir, "--kind", "substituted-key")
    warm = Client(server.url, tmp_path / "warm", pinned_root(repo))
    server.serve(repo)
    genuine = warm.recipients("demo")
    server.serve(out_dir)
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        warm.recipients("demo")
    server.serve(repo)
    with pytest.raises(tuf_exc.RepositoryError):
        warm.recipients("demo")  # it has seen the attacker's (validly signed) timestamp
    run("rotate-key", "--repo", repo, "--role", "snapshot")
    run("rotate-key", "--repo", repo, "--role", "timestamp")
    assert warm.recipients("demo") == genuine


def test_attack_preconditions(tmp_path, keys):
    _, f = keys
    repo = tmp_path / "repo"
    run("init", "--repo", repo)
    run("add-recipient", "--repo", repo, "--project", "tribe-a-x", "--pem", f["rsa"])
    run("delegate", "--repo", repo, "--tribe", "tribe-a", "--paths", "projects/tribe-a-*.json")
    # tribe-a has a single version: nothing older to mix in or roll back to
    for kind in ("mix-and-match", "rollback-targets"):
        err = run("attack", "--repo", repo, "--out", tmp_path / "x", "--kind", kind, "--project", "tribe-a-x",
                  ok=False).stderr
        assert "tribe-a has only version 1: nothing older" in err
    assert "no recipient document" in run("attack", "--repo", repo, "--out", tmp_path / "x", "--kind",
                                          "freeze", ok=False).stderr
    (tmp_path / "notattack").mkdir()
    (tmp_path / "notattack" / "precious").write_text("x")
    err = run("attack", "--repo", repo, "--out", tmp_path / "notattack", "--kind", "freeze",
              "--project", "tribe-a-x", ok=False).stderr
    assert "not an attack directory" in err
    # re-running over a previous attack directory replaces it
    run("attack", "--repo", repo, "--out", tmp_path / "a", "--kind", "freeze", "--project", "tribe-a-x")
    run("attack", "--repo", repo, "--out", tmp_path / "a", "--kind", "tampered-target", "--project", "tribe-a-x")
    assert json.loads((tmp_path / "a" / "ATTACK.json").read_text())["kind"] == "tampered-target"


# ============================================================================================
# demo, pin-root, serving with nginx


def test_demo_is_idempotent(tmp_path, server):
    repo, kdir = tmp_path / "keyservice", tmp_path / "keys"
    out = run("demo", "--repo", repo, "--keys-dir", kdir).stdout
    assert "consistent snapshots on" in out
    priv_rsa = serialization.load_pem_private_key((kdir / "demo-rsa.pem").read_bytes(), None)
    priv_ec = serialization.load_pem_private_key((kdir / "demo-ec.pem").read_bytes(), None)
    assert (kdir / "demo-rsa.pem").read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert priv_rsa.key_size == 3072 and priv_ec.curve.name == "secp256r1"
    assert stat.S_IMODE((kdir / "demo-rsa.pem").stat().st_mode) == 0o600
    root = pinned_root(repo)
    server.serve(repo)
    client = Client(server.url, tmp_path / "client", root)
    want = [ks.recipient_id(priv_rsa.public_key()), ks.recipient_id(priv_ec.public_key())]
    assert recipients_ids(client.recipients("demo")) == want
    snapshot = {p.name: p.read_bytes() for p in (repo / "metadata").iterdir()}

    out = run("demo", "--repo", repo, "--keys-dir", kdir).stdout
    assert "keeping the repository" in out and "unchanged" in out
    assert {p.name: p.read_bytes() for p in (repo / "metadata").iterdir()} == snapshot

    # an expired timestamp (the gateway was off for days) is refreshed, the root kept
    run("resign-timestamp", "--repo", repo, "--expires-hours", "0.0003")
    time.sleep(1.5)
    with pytest.raises(tuf_exc.ExpiredMetadataError):
        client.recipients("demo")
    out = run("demo", "--repo", repo, "--keys-dir", kdir).stdout
    assert "keeping the repository" in out and "timestamp" in out
    assert pinned_root(repo) == root
    assert recipients_ids(client.recipients("demo")) == want

    # new demo keys (someone deleted them): the same repository rotates the recipients
    for p in kdir.glob("demo-ec*"):
        p.unlink()
    out = run("demo", "--repo", repo, "--keys-dir", kdir).stdout
    assert "- recipient" in out and "+ recipient" in out and pinned_root(repo) == root
    new_ec = serialization.load_pem_private_key((kdir / "demo-ec.pem").read_bytes(), None)
    assert recipients_ids(client.recipients("demo"))[1] == ks.recipient_id(new_ec.public_key())

    # a broken repository is set aside and rebuilt
    (repo / "metadata" / "targets.json").write_text("{}")
    (repo / "metadata" / "timestamp.json").write_text("{}")
    out = run("demo", "--repo", repo, "--keys-dir", kdir).stdout
    assert "is not valid" in out and "(new) -> v1" in out
    assert pinned_root(repo) != root
    assert "ok: python-tuf verified 1 project" in run("check", "--repo", repo).stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                    reason="nginx is not installed (scripts/setup installs it)")
def test_served_by_nginx(tmp_path, keys):
    k, f = keys
    repo = tmp_path / "repo"
    run("init", "--repo", repo, "--consistent-snapshot")
    run("add-recipient", "--repo", repo, "--project", "demo", "--pem", f["rsa"])
    port = _free_port()
    state = tmp_path / "nginx"
    served = tmp_path / "served"  # a symlink: re-pointing it switches what nginx serves
    served.symlink_to(repo)
    proc = subprocess.Popen([sys.executable, str(KEYSERVICE), "serve", "--repo", str(served),
                             "--listen", f"127.0.0.1:{port}", "--state", str(state)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{base}/metadata/root.json", timeout=1).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None:
                    raise AssertionError(proc.stderr.read().decode())
                time.sleep(0.05)
        client = Client(base, tmp_path / "client", pinned_root(repo))
        assert recipients_ids(client.recipients("demo")) == [key_id(k["rsa"])]
        # nothing but metadata/ and targets/ is served
        key = next((repo / "keys").glob("*.pem")).name
        for path in ("/", "/keys/", f"/keys/{key}", f"/metadata/../keys/{key}", f"/targets/../keys/{key}",
                     "/keyservice.json", "/history/1.root.json", "/.lock", "/metadata/.tmp-x",
                     "/metadata/../keyservice.json"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"{base}{path}", timeout=2)
            assert err.value.code in (400, 403, 404), path
        # a rotation is served at once
        run("set-recipients", "--repo", repo, "--project", "demo", "--pem", f["ec"])
        assert recipients_ids(client.recipients("demo")) == [key_id(k["ec"])]
        # an attack variant, served by flipping the link (no nginx reload)
        run("attack", "--repo", repo, "--out", tmp_path / "attack", "--kind", "substituted-key")
        tmp_link = tmp_path / "served.new"
        tmp_link.symlink_to(tmp_path / "attack")
        os.replace(tmp_link, served)
        with pytest.raises(tuf_exc.UnsignedMetadataError):
            client.recipients("demo")
        assert urllib.request.urlopen(f"{base}/metadata/timestamp.json").read() == \
            (tmp_path / "attack" / "metadata" / "timestamp.json").read_bytes()
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{base}/attacker/", timeout=2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    conf = (state / "nginx.conf").read_text()
    assert f"alias {served}/metadata/;" in conf and f"alias {served}/targets/;" in conf


def test_pin_root_and_cli_errors(tmp_path):
    repo = tmp_path / "repo"
    run("init", "--repo", repo)
    assert json.loads(run("pin-root", "--repo", repo).stdout)["signed"]["_type"] == "root"
    run("pin-root", "--repo", repo, "--out", tmp_path / "root.json")
    assert (tmp_path / "root.json").read_bytes() == (repo / "metadata" / "root.json").read_bytes()
    assert "already holds" in run("init", "--repo", repo, ok=False).stderr
    assert "not a key service repository" in run("list", "--repo", tmp_path / "nope", ok=False).stderr
    assert "no recipient document" in run("list", "--repo", repo, "--project", "demo", ok=False).stderr
    assert run("bogus", ok=False).returncode == 2
    run("delegate", "--repo", repo, "--tribe", "t", "--paths", "projects/t-*.json")
    assert "already exists" in run("delegate", "--repo", repo, "--tribe", "t", "--paths", "projects/t-*.json", ok=False).stderr
    assert "not valid" in run("delegate", "--repo", repo, "--tribe", "targets", "--paths", "projects/x-*.json", ok=False).stderr
    assert "power of two" in run("delegate", "--repo", repo, "--tribe", "u", "--paths", "projects/u-*.json", "--hash-bins", "6", ok=False).stderr
    run("init", "--repo", repo, "--force", "--expires-days", "timestamp=0.5", "--expires-days", "targets=30")
    md = Metadata.from_bytes((repo / "metadata" / "timestamp.json").read_bytes())
    assert (md.signed.expires - ks.utcnow()).total_seconds() <= 12 * 3600
    assert "ROLE=DAYS" in run("init", "--repo", tmp_path / "r2", "--expires-days", "x", ok=False).stderr
