"""The fault matrix (issue 15, part 1): processes die mid-push and dependencies misbehave, end to
end with real processes, and nothing is lost or leaked.

Two stacks, each real Envoy + filter in front of a real registry, with the fault relay
(tests/faults/fault_relay.py) on Envoy's registry cluster — Envoy still routes, the relay
forwards bytes and counts them:

- ``shared``: no ``replicas.state_key`` (upload state in Envoy's shared data), recipients from
  the TUF key service (nginx over TLS, refreshed every 2 s, records usable 6 s), the registry's
  storage a tmpfs (so that it can be made full);
- ``sealed``: ``replicas.state_key`` (upload state sealed in the Location, the ledger kept in
  the registry), inline recipients.

Every case pushes the session's 64 MiB secret image (tests/conftest.py ``secret_image``: random
data and a plaintext marker) with skopeo (one PATCH carrying the blob, then ``PUT ?digest=``) or
ctr (monolithic ``PUT ?digest=`` with the body, which the filter streams as a PATCH and
finishes by callout), meets its fault, and then:

- the faulted push failed (every fault here is mid-stream or on a request the push needs) with
  a clear error, the filter's OCI error message where the filter answers;
- once the fault is gone the same client's same push succeeds;
- the image stored decrypts with ``skopeo copy --decryption-key`` to the original layers;
- storage holds no plaintext marker and no blob under a plaintext layer digest, and no
  manifest in it names a missing blob or a plaintext layer;
- ``ocicrypt_uploads_in_flight`` is back where the case expects it (zero, apart from the
  sessions a case abandons on purpose, see ``leaks``);
- Envoy's log has no ``critical`` line and no plugin failure.

Kill points are bytes the relay forwarded to the registry (``KILL_AT`` into the layer), never
sleeps. Processes are killed by the pid the test started them with.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

import pytest
import requests

import gateway
import helpers
from conftest import STARTED, WASM_FAILURE_SIGNS, WASM_OVERRIDE, ProxiedStack, _write_owner, \
    start_registry_only
from fault_relay import FaultRelay, commit, finishing_callout, ledger_read, ledger_write
from helpers import MIB

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from test_docker import Dockerd  # noqa: E402
from test_tuf_keys import keyservice, serve  # noqa: E402

pytestmark = [pytest.mark.filter]

#: Bytes of the layer the registry has received when the kill comes (the layer is 64 MiB).
KILL_AT = 24 * MIB
#: registry.timeout_ms of the fault stacks: a hung callout is given up after this long.
REGISTRY_TIMEOUT_MS = 5000
#: tmpfs size of the shared stack's registry storage when it is not being made full.
TMPFS_SIZE = "4g"
#: Seconds a condition (a stale key record, the key service back) may take to show.
SETTLE = 30.0
#: oras's chunk size (conftest.oras_push): KILL_AT falls in its second PATCH.
ORAS_CHUNK = 16 * MIB
#: Layer size of the rows that need no mid-stream point (a fault on a callout or between pushes).
SMALL_LAYER = 4 * MIB


@dataclass
class FaultStack(ProxiedStack):
    relay: Optional[FaultRelay] = None
    #: The relay in front of Envoy the clients push through (keeps the error answers).
    front: Optional[FaultRelay] = None
    tmpfs: bool = False
    #: Plaintext digests of every image pushed (none may be stored).
    plaintext: Set[str] = field(default_factory=set)
    markers: Set[bytes] = field(default_factory=set)
    #: Files of storage already scanned and clean: (size, mtime) by path.
    scanned: Dict[Path, Tuple[int, int]] = field(default_factory=dict)

    @property
    def addr(self) -> str:
        return self.front.listen


def _fault_stack(tmp_path_factory, name: str, *, sealed: bool, tmpfs: bool) -> FaultStack:
    ports = helpers.free_ports(9)
    backend_state = tmp_path_factory.mktemp(f"faults-{name}-registry")
    storage = backend_state / "registry"
    storage.mkdir(parents=True, exist_ok=True)
    if tmpfs:
        # A storage that can be made full without filling the machine's disk.
        helpers.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", storage])
    backend = start_registry_only(backend_state, f"127.0.0.1:{ports[0]}")
    relay = FaultRelay(upstream=f"127.0.0.1:{ports[0]}", listen=f"127.0.0.1:{ports[1]}",
                       elsewhere=f"127.0.0.1:{ports[2]}").start()
    state = tmp_path_factory.mktemp(f"faults-{name}")
    _write_owner(state)
    extra = {"wasm_path": WASM_OVERRIDE} if WASM_OVERRIDE is not None else {}
    if sealed:
        extra.update(keys_source="inline", state_key=base64.b64encode(os.urandom(32)).decode())
    else:
        extra.update(keys_source="tuf", keyservice_refresh_seconds=2,
                     keyservice_max_age_seconds=6)
    gw = gateway.Gateway(gateway.Options(
        state_dir=state, gateway_addr=f"127.0.0.1:{ports[3]}",
        registry_addr=f"127.0.0.1:{ports[1]}", admin_addr=f"127.0.0.1:{ports[4]}",
        keyservice_addr=f"127.0.0.1:{ports[5]}", filter=True, start_registry=False,
        registry_timeout_ms=REGISTRY_TIMEOUT_MS, **extra),
        log=lambda m: print(m, file=sys.stderr))
    try:
        gw.start()
    except gateway.GatewayError as err:
        relay.stop()
        backend.stop()
        if tmpfs:
            helpers.run(["umount", storage], check=False)
        pytest.fail(f"fault stack {name!r} did not start: {err}", pytrace=False)
    front = FaultRelay(upstream=gw.opts.gateway_addr, listen=f"127.0.0.1:{ports[7]}",
                       elsewhere=f"127.0.0.1:{ports[8]}").start()
    s = FaultStack(f"faults-{name}", gw, None, gw.keys, backend=backend, proxy=relay,
                   relay=relay, front=front, tmpfs=tmpfs)
    STARTED.append(s)
    return s


def _stop(s: FaultStack) -> None:
    s.relay.heal()
    if s in STARTED:
        STARTED.remove(s)
    s.front.stop()
    s.gw.stop()
    s.relay.stop()
    s.backend.stop()
    if s.tmpfs:
        helpers.run(["umount", s.storage], check=False)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    s = _fault_stack(tmp_path_factory, "shared", sealed=False, tmpfs=True)
    yield s
    _stop(s)


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):
    s = _fault_stack(tmp_path_factory, "sealed", sealed=True, tmpfs=False)
    yield s
    _stop(s)


@pytest.fixture(scope="module")
def ctr_ref(containerd, secret_image) -> str:
    return containerd.import_image(secret_image, "e2e.local/faults")


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> helpers.Image:
    d = tmp_path_factory.mktemp("img-faults-small")
    return helpers.build_image(d / "layout", "v1", SMALL_LAYER, marker=helpers.new_marker())


@pytest.fixture(scope="module")
def ctr_small_ref(containerd, small_image) -> str:
    return containerd.import_image(small_image, "e2e.local/faults-small")


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory):
    """A private dockerd (tests/e2e/test_docker.py); the docker rows are skipped, with the
    reason, where it cannot start."""
    d = Dockerd(Path(tmp_path_factory.mktemp("dkd")))
    try:
        d.start()
    except (RuntimeError, pytest.fail.Exception) as err:
        d.stop()
        pytest.skip(f"dockerd cannot start here: {str(err)[-500:]}")
    yield d
    d.stop()


# ---------------------------------------------------------------------------------------------
# pushes


#: oras-py (conftest.oras_push) in a process of its own: argv image (pickled, hex), host:port,
#: repo:tag, "chunked" or "monolithic". Its retries (each failed request 5 times more) wait 1 s
#: here instead of 3 to 83 s, to keep the matrix short.
ORAS_PUSH = """
import pickle, sys, time
sleep = time.sleep
time.sleep = lambda seconds: sleep(min(seconds, 1.0))
sys.path.insert(0, %r)
from conftest import oras_push
oras_push(pickle.loads(bytes.fromhex(sys.argv[1])), sys.argv[2], sys.argv[3],
          chunked=sys.argv[4] == "chunked")
""" % str(Path(__file__).resolve().parents[1])

#: Clients of the matrix: skopeo (one PATCH, then PUT ?digest=), ctr (monolithic PUT),
#: oras-py monolithic (POST, PUT with the body) and chunked (PATCHes of ORAS_CHUNK), docker
#: (dockerd: a chunked PATCH of the layer it recompresses, then PUT ?digest=).
MONOLITHIC = {"ctr", "oras-mono"}
#: Clients that send a failed request again themselves (oras-py: each request up to 5 times,
#: 3 to 83 s apart; dockerd: each blob upload up to 5 times).
RETRYING = {"oras-mono", "oras-chunked", "docker"}


class Pusher:
    """Starts the push of an image to `repo` with a client, as a process of its own."""

    def __init__(self, fs: FaultStack, image: helpers.Image, containerd, ctr_ref: Optional[str],
                 docker: Optional[Tuple[Dockerd, str]] = None):
        self.fs, self.image, self.containerd, self.ctr_ref = fs, image, containerd, ctr_ref
        #: (dockerd, the name of the image loaded into it)
        self.docker = docker
        self.proc: Optional[subprocess.Popen] = None

    def start(self, client: str, repo: str) -> subprocess.Popen:
        dest = f"{self.fs.addr}/{repo}:v1"
        env = None
        if client == "skopeo":
            argv = ["skopeo", "copy", "--dest-tls-verify=false", "--preserve-digests",
                    self.image.oci_ref, f"docker://{dest}"]
        elif client == "ctr":
            argv = ["ctr", "-a", str(self.containerd.sock), "images", "push", "--plain-http",
                    dest, self.ctr_ref]
        elif client.startswith("oras-"):
            import pickle

            argv = [sys.executable, "-c", ORAS_PUSH, pickle.dumps(self.image).hex(),
                    self.fs.addr, f"{repo}:v1",
                    "chunked" if client == "oras-chunked" else "monolithic"]
        else:
            assert client == "docker" and self.docker is not None, client
            dockerd, loaded = self.docker
            dockerd.docker("tag", loaded, dest)
            argv, env = [dockerd.cli, "push", dest], dockerd.env
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, start_new_session=True,
                                     env=env)
        return self.proc

    def wait(self) -> Tuple[int, str]:
        try:
            out, _ = self.proc.communicate(timeout=helpers.CLIENT_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            out, _ = self.proc.communicate()
            return -999, f"(timed out after {helpers.CLIENT_TIMEOUT}s)\n{out}"
        return self.proc.returncode, out

    def push(self, client: str, repo: str) -> Tuple[int, str]:
        self.start(client, repo)
        return self.wait()

    def kill_client(self) -> None:
        """SIGKILL to the client this Pusher started (its pid, nothing else)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# what must hold after every case


def in_flight(fs: FaultStack) -> float:
    stats = helpers.envoy_stats(fs.opts.admin_addr)
    assert "ocicrypt_uploads_in_flight" in stats, sorted(stats)
    return stats["ocicrypt_uploads_in_flight"]


def scan_storage(fs: FaultStack) -> None:
    """No plaintext marker in any file of storage written since the last scan (a file that
    changed is scanned again), and no blob stored under a plaintext layer digest."""
    changed = []
    for dirpath, _dirs, files in os.walk(fs.storage):
        for name in files:
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except FileNotFoundError:
                continue  # an upload directory the registry just moved or removed
            if fs.scanned.get(p) != (st.st_size, st.st_mtime_ns):
                changed.append((p, (st.st_size, st.st_mtime_ns)))
    for p, sig in changed:
        try:
            hits = _scan_file(p, list(fs.markers))
        except FileNotFoundError:
            continue
        assert not hits, f"plaintext marker stored in {p}"
        fs.scanned[p] = sig
    for d in fs.plaintext:
        assert not helpers.registry_blob_path(fs.storage, d).exists(), \
            f"a blob is stored under the plaintext layer digest {d}"


def _scan_file(path: Path, needles: List[bytes]) -> List[bytes]:
    keep = max(len(n) for n in needles) - 1
    tail = b""
    found = []
    with open(path, "rb") as f:
        while True:
            chunk = f.read(8 * MIB)
            if not chunk:
                return found
            window = tail + chunk
            found += [n for n in needles if n in window]
            tail = window[-keep:]


#: The gateway's ledger records (filter/core/src/distribution/ledger.rs): their artifact type, and the OCI
#: empty descriptor that is their config and only layer.
LEDGER_ARTIFACT_TYPE = "application/vnd.ocicrypt-filter.ledger.v1"
MT_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def check_manifests(fs: FaultStack) -> int:
    """Every manifest revision in every repository of storage names only blobs that are stored
    and linked into the repository, and no plaintext layer (layers are `+encrypted`, or the
    ledger's ciphertext reference). Returns how many manifests were read."""
    import json

    repos = fs.storage / "docker" / "registry" / "v2" / "repositories"
    count = 0
    for revisions in repos.rglob("_manifests/revisions/sha256"):
        repo_dir = revisions.parent.parent.parent
        repo = str(repo_dir.relative_to(repos))
        for rev in revisions.iterdir():
            if not (rev / "link").exists():
                continue
            digest = (rev / "link").read_text().strip()
            data = helpers.registry_blob_path(fs.storage, digest).read_bytes()
            doc = json.loads(data)
            count += 1
            named = [c["digest"] for c in doc.get("manifests", [])]
            if "layers" in doc:
                named.append(doc["config"]["digest"])
                ledger = doc.get("artifactType") == LEDGER_ARTIFACT_TYPE
                for layer in doc["layers"]:
                    mt = layer["mediaType"]
                    # A ledger record's one layer is the empty descriptor (the ciphertext it
                    # maps to is an annotation, so garbage collection does not keep it).
                    empty = ledger and mt == MT_EMPTY and layer["digest"] == EMPTY_DIGEST
                    assert mt.endswith("+encrypted") or empty, \
                        f"{repo}@{digest} names a plaintext layer: {layer}"
                    assert layer["digest"] not in fs.plaintext, \
                        f"{repo}@{digest} names a plaintext digest: {layer}"
                    named.append(layer["digest"])
            for d in named:
                hexd = d.split(":", 1)[1]
                if "manifests" in doc and d in [c["digest"] for c in doc["manifests"]]:
                    link = repo_dir / "_manifests" / "revisions" / "sha256" / hexd / "link"
                else:
                    link = repo_dir / "_layers" / "sha256" / hexd / "link"
                assert helpers.registry_blob_path(fs.storage, d).exists() and link.exists(), \
                    f"{repo}@{digest} names {d}, which is not stored in {repo}"
    return count


def envoy_problems(fs: FaultStack, offset: int) -> List[str]:
    with open(fs.envoy_log, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [line for line in text.splitlines()
            if "[critical]" in line or any(m in line for m in WASM_FAILURE_SIGNS)]


@dataclass
class Case:
    """One row of the matrix on one stack."""

    fs: FaultStack
    pusher: Pusher
    client: str
    repo: str
    out: Path
    log_offset: int = 0
    gauge_before: float = 0.0
    envoy_restarted: bool = False
    #: Set when a kill armed by `killer` has killed its process.
    killed: threading.Event = field(default_factory=threading.Event)

    @property
    def exact(self) -> bool:
        """The client pushes the layers as they are (docker recompresses them)."""
        return self.client != "docker"

    def begin(self) -> "Case":
        self.fs.relay.heal()
        self.fs.front.errors.clear()
        self.fs.plaintext.update(self.pusher.image.layer_digests)
        self.fs.markers.add(self.pusher.image.marker.encode())
        self.log_offset = self.fs.envoy_log.stat().st_size
        self.gauge_before = in_flight(self.fs)
        return self

    def restart_envoy(self) -> None:
        self.fs.gw.start_envoy()
        self.envoy_restarted = True

    def _owner(self, name: str) -> gateway.Gateway:
        return self.fs.backend if name == "registry" else self.fs.gw

    def killer(self, name: str, restart: bool = False) -> Callable[[], None]:
        """What a relay calls to SIGKILL process `name` ("envoy" of the gateway, "registry" of
        the backend), by the pid the test started it with; `restart`: and start it again at
        once (for clients that retry a failed request themselves)."""
        def kill() -> None:
            self._owner(name).kill(name)
            if restart and name == "envoy":
                self.restart_envoy()
            self.killed.set()
        return kill

    def push_restarting(self, name: str) -> Tuple[int, str]:
        """The push, with `killer(name)` armed in the relay; whatever died is started again
        before this returns."""
        gw = self._owner(name)
        try:
            return self.pusher.push(self.client, self.repo)
        finally:
            if self.fs.relay.fired or self.fs.relay.held:
                # The client may end before the killing thread has reaped the process (while
                # it does, Popen.poll() answers "running").
                assert self.killed.wait(60), f"{name} was not killed"
            if gw.pid(name) is None:
                if name == "envoy":
                    self.restart_envoy()
                else:
                    gw.start_registry()

    def failed(self, rc: int, out: str, says: Optional[str] = None,
               answered: bool = True) -> None:
        """The push failed; when `answered` (someone answered the request the fault hit,
        rather than a connection going away), with an OCI error body, whose message holds
        `says`."""
        assert rc != 0, f"the push met no fault (fired: {self.fs.relay.fired}, misbehaved: " \
            f"{self.fs.relay.misbehaved}):\n{out[-2000:]}"
        assert rc != -999, out
        if not answered:
            return
        errors = [e for e in self.fs.front.errors if self.repo in e[1]]
        assert errors, f"the client got no error answer:\n{out[-2000:]}"
        answers = []
        for method, path, status, headers, body in errors:
            try:
                messages = [e["message"] for e in json.loads(body)["errors"]]
            except (ValueError, KeyError, TypeError) as err:
                raise AssertionError(f"{method} {path.split('?')[0]}: {status} without an OCI "
                                     f"error body: {body[:500]!r}") from err
            # The filter's own refusal, not the same words from elsewhere.
            refused = headers.get("x-ocicrypt-filter") == "refused"
            answers.append((method, path.split("?")[0], status, refused, messages))
        # Clients that upload blobs in parallel (ctr, docker) may get other answers too
        # (Envoy's 503 for a request the fault also broke): one is the filter's refusal.
        assert not says or any(refused and any(says in m for m in messages)
                               for *_, refused, messages in answers), \
            f"no refusal by the filter says {says!r}: {answers}"

    def retry_and_check(self, leaks: int = 0) -> None:
        """The same push again succeeds; then everything the module docstring lists holds.
        `leaks`: upload sessions the case left with saved state at the gateway on purpose."""
        self.fs.relay.heal()
        rc, out = self.pusher.push(self.client, self.repo)
        assert rc == 0, f"the retry failed ({rc}):\n{out[-3000:]}"
        self.check(leaks)

    def check(self, leaks: int = 0) -> None:
        fs, image = self.fs, self.pusher.image
        manifest = fs.direct().get_manifest(self.repo, "v1").json()
        helpers.assert_encrypted_manifest(manifest, image, exact=self.exact)
        helpers.skopeo_pull(f"{fs.registry_addr}/{self.repo}:v1", self.out, "v1",
                            keys=[fs.keys["rsa"]["private"]])
        plain = helpers.assert_decrypted_matches(self.out, "v1", image, exact=self.exact)
        if not self.exact:
            # The client's own plaintext (docker's gzip stream: the marker does not show in
            # it): its layer digests, and pieces of it from before the fault, must not be
            # stored either.
            for layer in plain["layers"]:
                fs.plaintext.add(layer["digest"])
                data = self.out / "blobs" / "sha256" / layer["digest"].split(":", 1)[1]
                with open(data, "rb") as f:
                    for at in range(MIB, min(layer["size"], KILL_AT) - 64, 8 * MIB):
                        f.seek(at)
                        fs.markers.add(f.read(64))
        shutil.rmtree(self.out)
        scan_storage(fs)
        assert check_manifests(fs) >= 1
        base = 0 if self.envoy_restarted else self.gauge_before
        assert in_flight(fs) == base + leaks, \
            f"upload state: {in_flight(fs)} sessions in flight, {base} before, {leaks} expected"
        problems = envoy_problems(fs, self.log_offset)
        assert not problems, "Envoy logged:\n" + "\n".join(problems[:20])


@pytest.fixture
def case_of(request, containerd, tmp_path):
    """`make(stack, client, row, small=False)`: a Case pushing the 64 MiB secret image, or
    (small) a SMALL_LAYER image for rows whose fault needs no point inside the layer."""
    def make(stack_name: str, client: str, row: str, small: bool = False) -> Case:
        fs = request.getfixturevalue(stack_name)
        image = request.getfixturevalue("small_image" if small else "secret_image")
        ctr_ref = request.getfixturevalue("ctr_small_ref" if small else "ctr_ref") \
            if client == "ctr" else None
        docker = None
        if client == "docker":
            d = request.getfixturevalue("dockerd")
            loaded = f"e2e/faults-{'small' if small else 'secret'}:v1"
            if d.docker("image", "inspect", loaded, check=False).returncode != 0:
                d.load(image, loaded)
            docker = (d, loaded)
        repo = f"demo/{stack_name}-{row}-{client}"
        return Case(fs, Pusher(fs, image, containerd, ctr_ref, docker), client, repo,
                    tmp_path / "out").begin()
    return make


# ---------------------------------------------------------------------------------------------
# 1. Envoy SIGKILLed mid-PATCH (skopeo) and mid-monolithic PUT (ctr), restarted on its ports


@pytest.mark.parametrize("stack_name,client", [
    ("shared", "skopeo"), ("shared", "ctr"), ("sealed", "skopeo"), ("sealed", "ctr"),
    ("shared", "oras-mono"), ("shared", "oras-chunked"), ("sealed", "oras-chunked"),
    ("shared", "docker")])
def test_envoy_killed_mid_layer(case_of, stack_name, client):
    c = case_of(stack_name, client, "envoy-kill")
    # oras-chunked: 8 MiB into its second PATCH, KILL_AT into the layer.
    skip, at = divmod(KILL_AT, ORAS_CHUNK) if client == "oras-chunked" else (0, KILL_AT)
    c.fs.relay.at_bytes(at, c.killer("envoy", restart=client in RETRYING), skip=skip)
    rc, out = c.push_restarting("envoy")
    assert c.fs.relay.fired, "the kill point was never reached"
    if client == "docker":
        # dockerd sends the layer again (to the restarted Envoy) and it is stored; the small
        # layer it had finished before the kill is known to no one now (no replicas.state_key:
        # the ledger went with the process), so the manifest is refused.
        c.failed(rc, out, says="was not uploaded through the encrypting gateway")
    else:
        # oras-py sends the broken request again, to the same session: the registry, holding
        # part of it already, resets each try (Envoy's 503, or no answer mid-body).
        c.failed(rc, out, answered=False)
    c.retry_and_check()


# ---------------------------------------------------------------------------------------------
# 2. The registry killed mid-upload, restarted on the same storage


@pytest.mark.parametrize("stack_name,client", [
    ("shared", "skopeo"), ("shared", "ctr"), ("sealed", "skopeo")])
def test_registry_killed_mid_layer(case_of, stack_name, client):
    c = case_of(stack_name, client, "registry-kill")
    c.fs.relay.at_bytes(KILL_AT, c.killer("registry"))
    rc, out = c.push_restarting("registry")
    assert c.fs.relay.fired, "the kill point was never reached"
    # Envoy answers the reset at once (503, an OCI body: envoy.yaml's local replies, checked in
    # tests/e2e/test_envoy_replies.py) and closes while the client is still sending: the client
    # reads that answer or only the broken pipe.
    c.failed(rc, out, answered=False)
    c.retry_and_check()


# ---------------------------------------------------------------------------------------------
# 3. The registry misbehaving on the filter's own callouts: the finishing PUT of a monolithic
#    upload, and the ledger's writes and reads (replicas)


@pytest.mark.parametrize("stack_name,action", [
    ("shared", "500"), ("shared", "503"), ("shared", "reset"), ("shared", "hang"),
    ("sealed", "reset")])
def test_finishing_callout_fails(case_of, stack_name, action):
    c = case_of(stack_name, "ctr", f"finish-{action}")
    c.fs.relay.misbehave(action, finishing_callout)
    t0 = time.monotonic()
    rc, out = c.pusher.push("ctr", c.repo)
    took = time.monotonic() - t0
    assert c.fs.relay.misbehaved, "the finishing callout never came"
    c.failed(rc, out, says="when the gateway tried to commit the encrypted blob")
    if action == "hang":
        assert took < REGISTRY_TIMEOUT_MS / 1000 * 4 + 60, f"the push hung {took:.0f}s"
    c.retry_and_check()


@pytest.mark.parametrize("action", ["503", "reset", "hang"])
def test_ledger_write_fails(case_of, action):
    c = case_of("sealed", "skopeo", f"ledger-write-{action}")
    c.fs.relay.misbehave(action, ledger_write)
    rc, out = c.pusher.push("skopeo", c.repo)
    assert c.fs.relay.misbehaved, "no ledger write came"
    # The ciphertext is committed: the message must not say "nothing was stored".
    c.failed(rc, out, says="record the encrypted blob in the registry's ledger; the encrypted "
             "blob was stored but not recorded, push again")
    c.retry_and_check()


def test_ledger_read_fails(case_of, secret_image):
    """A re-push after a restart reads the ledger from the registry; when those reads fail the
    blobs count as unknown and are uploaded (and encrypted) again: the push succeeds."""
    c = case_of("sealed", "skopeo", "ledger-read")
    rc, out = c.pusher.push("skopeo", c.repo)
    assert rc == 0, out
    c.killer("envoy")()  # a fresh process knows nothing but what the registry holds
    c.restart_envoy()
    c.fs.relay.misbehave("500", ledger_read)
    rc, out = c.pusher.push("skopeo", c.repo)
    assert c.fs.relay.misbehaved, "no ledger read came"
    assert rc == 0, f"a failed ledger read failed the push:\n{out[-3000:]}"
    c.check()


def _of_a_layer(match, image: helpers.Image):
    """`match`, for requests about one of `image`'s layers only, not about its config (which
    passes through under its own digest, and is uploaded in the same ways)."""
    config = image.config.digest.split(":", 1)[1]
    return lambda method, path, headers: match(method, path, headers) and config not in path


@pytest.mark.parametrize("client", ["oras-mono", "oras-chunked", "docker"])
def test_layer_commit_answered_503(case_of, client):
    """The registry answers 503 to the commit of a layer: the filter's finishing callout
    (oras monolithic: the filter's refusal) or the client's own final PUT, which the filter
    forwards with the ciphertext digest (oras chunked, docker: the registry's answer, which
    dockerd meets once and survives by uploading the blob again)."""
    c = case_of("shared", client, "commit-503", small=True)
    # dockerd uploads a blob again after a failure (5 tries, 5 to 20 s apart): the 503 comes
    # once for it, else every time.
    c.fs.relay.misbehave("503", _of_a_layer(commit, c.pusher.image),
                         times=1 if client == "docker" else None)
    rc, out = c.pusher.push(client, c.repo)
    assert c.fs.relay.misbehaved, "no layer commit came"
    if client == "docker":
        assert rc == 0, f"docker did not push after its own retry:\n{out[-2000:]}"
        assert "Retrying in" in out, out
    else:
        c.failed(rc, out, says="when the gateway tried to commit the encrypted blob"
                 if client in MONOLITHIC else None)
    # A refused final PUT of a client's own leaves its session's state at the gateway (the
    # client may send that PUT again) until limits.upload_idle_seconds; a failed finishing
    # callout ends its session.
    c.retry_and_check(leaks=0 if client in MONOLITHIC else len(c.fs.relay.misbehaved))


# ---------------------------------------------------------------------------------------------
# 3b. Processes killed while a callout of the filter for a layer is at the registry: the relay
#     holds the request (the finishing PUT of a monolithic upload, or the ledger write with
#     replicas), kills, then forwards it (the registry acts on a request whose sender is gone)
#     or drops it


CALLOUTS = {"commit": finishing_callout, "ledger": ledger_write}


@pytest.mark.parametrize("stack_name,client,at,then", [
    ("shared", "ctr", "commit", "release"), ("shared", "ctr", "commit", "reset"),
    ("sealed", "ctr", "commit", "release"), ("sealed", "ctr", "ledger", "release"),
    ("sealed", "skopeo", "ledger", "release"), ("sealed", "skopeo", "ledger", "reset")])
def test_envoy_killed_in_callout(case_of, stack_name, client, at, then):
    c = case_of(stack_name, client, f"envoy-kill-{at}-{then}", small=True)
    c.fs.relay.on_request(_of_a_layer(CALLOUTS[at], c.pusher.image), c.killer("envoy"),
                          then=then)
    rc, out = c.push_restarting("envoy")
    assert c.fs.relay.held, f"no {at} callout came"
    c.failed(rc, out, answered=False)
    c.retry_and_check()


@pytest.mark.parametrize("stack_name", ["shared", "sealed"])
def test_registry_killed_in_finishing_callout(case_of, stack_name):
    c = case_of(stack_name, "ctr", "registry-kill-commit", small=True)
    c.fs.relay.on_request(_of_a_layer(finishing_callout, c.pusher.image), c.killer("registry"))
    rc, out = c.push_restarting("registry")
    assert c.fs.relay.held, "no finishing callout came"
    c.failed(rc, out, says="when the gateway tried to commit the encrypted blob")
    c.retry_and_check()


# ---------------------------------------------------------------------------------------------
# 4. The key service down or misbehaving in the middle of a push, with the project's record
#    going stale before the final PUT (between pushes: tests/e2e/test_hostile_services.py and
#    test_tuf_keys.py)


def _upload_start(fs: FaultStack) -> requests.Response:
    return requests.post(f"http://{fs.addr}/v2/demo/faults-probe/blobs/uploads/", timeout=60)


def _until(cond, what: str) -> None:
    deadline = time.monotonic() + SETTLE
    while not cond():
        assert time.monotonic() < deadline, f"{what} did not happen in {SETTLE:.0f}s"
        time.sleep(0.3)


@pytest.mark.parametrize("fault", ["down", "stall", "error"])
def test_key_service_fails_mid_layer(case_of, fault):
    from hostile_keyservice import HostileKeyService

    c = case_of("shared", "skopeo", f"keys-{fault}")
    fs = c.fs
    o = fs.opts
    hostile = HostileKeyService(o.keyservice_addr, o.keyservice_served,
                                o.keyservice_tls_dir / "server.crt",
                                o.keyservice_tls_dir / "server.key")

    def fail_keys():
        # Holds the PATCH here (the relay's forwarding thread) until the gateway refuses the
        # project for want of a fresh record: the final PUT then needs a lookup that fails.
        fs.gw.stop_keyservice()
        if fault != "down":
            hostile.start()
            hostile.set(fault)
        _until(lambda: _upload_start(fs).status_code == 503, "the record going stale")

    fs.relay.at_bytes(KILL_AT, fail_keys)
    try:
        rc, out = c.pusher.push("skopeo", c.repo)
        assert fs.relay.fired, "the kill point was never reached"
        c.failed(rc, out, says='project "demo"')
    finally:
        if fault != "down":
            hostile.stop()
        fs.gw.start_keyservice()
    _until(lambda: _upload_start(fs).status_code == 202, "the key service coming back")
    # The session whose PATCH went through keeps its state at the gateway (its final PUT was
    # refused and may be sent again): nothing evicts it yet (issue 15, part 2).
    c.retry_and_check(leaks=1)


#: What the refusal names for metadata the TUF client must refuse (scripts/keyservice attack
#: kinds: "freeze" serves a timestamp that expired an hour ago, "rollback" the previous
#: timestamp with the snapshot and targets it names, "rollback-targets" a new snapshot, signed
#: with the online key, naming the previous targets).
BAD_METADATA = {"freeze": "timestamp metadata expired at ",
                "rollback": "timestamp version ",
                "rollback-targets": "targets.json version "}


@pytest.mark.parametrize("kind,when", [
    ("freeze", "mid-layer"), ("freeze", "between-pushes"), ("rollback", "mid-layer"),
    ("rollback", "between-pushes"), ("rollback-targets", "between-pushes")])
def test_key_service_serves_bad_metadata(case_of, tmp_path, kind, when):
    c = case_of("shared", "skopeo", f"keys-{kind}-{when}", small=when != "mid-layer")
    fs = c.fs
    attacked = tmp_path / f"attack-{kind}"
    keyservice(fs, "attack", "--out", str(attacked), "--kind", kind, "--project", "demo")

    def go_bad():
        serve(fs, attacked)
        _until(lambda: _upload_start(fs).status_code == 503, "the record going stale")

    try:
        if when == "mid-layer":
            fs.relay.at_bytes(KILL_AT, go_bad)
        else:
            go_bad()
        rc, out = c.pusher.push("skopeo", c.repo)
        assert when != "mid-layer" or fs.relay.fired, "the fault point was never reached"
        c.failed(rc, out, says=f'no verified recipient keys for project "demo": key service '
                 f'metadata did not verify: {BAD_METADATA[kind]}')
    finally:
        serve(fs, fs.opts.keyservice_dir)
    _until(lambda: _upload_start(fs).status_code == 202, "good metadata back")
    # Mid-layer, the session whose PATCH went through keeps its state (see above).
    c.retry_and_check(leaks=1 if when == "mid-layer" else 0)


# ---------------------------------------------------------------------------------------------
# 5. Registry storage full mid-layer (a tmpfs made just too small, then grown back)


def test_storage_full_mid_layer(case_of):
    c = case_of("shared", "skopeo", "storage-full")
    st = os.statvfs(c.fs.storage)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    size = used + KILL_AT
    helpers.run(["mount", "-o", f"remount,size={size}", c.fs.storage])
    try:
        rc, out = c.pusher.push("skopeo", c.repo)
    finally:
        helpers.run(["mount", "-o", f"remount,size={TMPFS_SIZE}", c.fs.storage])
    c.failed(rc, out)
    c.retry_and_check()


# ---------------------------------------------------------------------------------------------
# 6. The client disconnecting mid-PATCH and mid-monolithic PUT, then pushing again


@pytest.mark.parametrize("stack_name,client", [
    ("shared", "skopeo"), ("shared", "ctr"), ("sealed", "skopeo"), ("sealed", "ctr")])
def test_client_killed_mid_layer(case_of, stack_name, client):
    c = case_of(stack_name, client, "client-kill")
    c.fs.relay.at_bytes(KILL_AT, c.pusher.kill_client)
    rc, out = c.pusher.push(client, c.repo)
    assert c.fs.relay.fired, "the kill point was never reached"
    assert rc == -signal.SIGKILL, f"the client was not killed ({rc}):\n{out[-2000:]}"
    c.retry_and_check()
