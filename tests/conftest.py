"""Shared fixtures of the end-to-end suite.

Stacks (session-scoped, each on its own loopback ports and temporary state directory):

- ``stack``            Envoy + ocicrypt filter + registry (the product under test)
- ``auth_stack``       the same with the registry behind htpasswd basic auth
- ``token_stack``      the same with Harbor-style bearer tokens (distribution's ``auth: token``,
                       scripts/token_service.py at the gateway's /service/token), the ledger in
                       the registry (``replicas.state_key``) and a second encrypted project
- ``plain_stack``      Envoy WITHOUT the filter + registry: harness checks (clients, oracle)
- ``plain_auth_stack`` the same with basic auth
- ``ledger_stack``     the filter stack with ``replicas.state_key`` (ledger kept in the registry)
- ``lying_stack``      the filter stack in front of a lying registry (tests/lying_registry.py)

Tests that need the filter are marked ``filter``; harness checks are marked ``harness``.
When the filter cannot be built or loaded, the ``stack`` fixtures fail (error) with the reason:
nothing is skipped silently. Ports are picked free unless E2E_PORT_BASE fixes them.

One suite, both builds: ``--build wasm`` (the default; the proxy-wasm plugin) or ``--build
native`` (the Envoy dynamic module ``libocicrypt_filter.so``), or OCICRYPT_BUILD. The choice is
put in this process's OCICRYPT_BUILD, which every ``gateway.Options`` reads when it is not told
a build (the stacks here, the tests' own gateways, scripts/replicaset.py, and the scripts the
tests start, which inherit it). A test that only means something for one build says so with
``@pytest.mark.only_build("wasm", reason=...)`` and is skipped, with that reason, on the other.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(HERE))

import gateway  # noqa: E402
import helpers  # noqa: E402
from helpers import MIB, AccessLog, Image, Registry  # noqa: E402

#: Fixed ports when E2E_PORT_BASE is set (gateway BASE+n, registry +1, admin +2 for stack
#: offsets n = 0, 10, 20, 30); by default free ports are picked, so that two test sessions on
#: one machine do not collide.
PORT_BASE = int(os.environ["E2E_PORT_BASE"]) if os.environ.get("E2E_PORT_BASE") else None
BIG_LAYER_BYTES = int(os.environ.get("E2E_BIG_LAYER_MIB", "64")) * MIB
#: E2E_WASM_PATH=<file>: the filter stacks load this plugin as it is (nothing is built), e.g. a
#: copy of an earlier build, to check which tests fail on it. Ignored by a native run
#: (pytest_configure clears it).
WASM_OVERRIDE = Path(os.environ["E2E_WASM_PATH"]) if os.environ.get("E2E_WASM_PATH") else None
#: The builds of the filter the suite runs against (see the module's docstring).
BUILDS = ("wasm", "native")
#: This session's build (pytest_configure sets it from --build or OCICRYPT_BUILD).
BUILD = "wasm"
#: Envoy's log component the filter's own log lines go to, per build: wasm plugins log under
#: `wasm`, dynamic modules under `dynamic_modules`; the filter stacks run it at debug level.
FILTER_LOG_COMPONENT = {"wasm": "wasm", "native": "dynamic_modules"}
AUTH = ("e2e-user", "e2e-s3cret-pass")

#: Extra configuration of the filter stacks: project `nokeys` is covered by an encrypt rule but
#: has no recipients (no `projects` entry: the filter refuses `"recipients": []` as a
#: configuration error), so its pushes must be refused with 503.
NOKEYS_RULES = [{"repositories": "nokeys/**", "action": "encrypt"},
                # Pipeline-encrypted images are accepted only where a rule opts in.
                {"repositories": "demo/pipeline/**", "action": "encrypt",
                 "accept_encrypted": True}]
NOKEYS_PROJECTS: Dict[str, object] = {}


@dataclass
class Stack:
    """A running gateway stack and handy clients for it."""

    name: str
    gw: gateway.Gateway
    creds: Optional[Tuple[str, str]]
    keys: Dict[str, Dict[str, Path]]
    #: Envoy log lines a test provokes on purpose (the deliberate trap of test_vm_reload.py).
    expected_failures: Tuple[str, ...] = ()

    @property
    def opts(self) -> gateway.Options:
        return self.gw.opts

    @property
    def addr(self) -> str:
        """host:port of the gateway (what clients push to)."""
        return self.opts.gateway_addr

    @property
    def registry_addr(self) -> str:
        return self.opts.registry_addr

    @property
    def storage(self) -> Path:
        return self.opts.registry_dir

    @property
    def filter(self) -> bool:
        return self.opts.filter

    def registry_auth(self, creds: Optional[Tuple[str, str]]):
        """What a client sends with `creds`: basic credentials, or on a token stack tokens got
        with them (anonymous tokens for None)."""
        return helpers.BearerAuth(creds) if self.opts.token_auth else creds

    def via_gateway(self, creds: Optional[Tuple[str, str]] = "default") -> Registry:
        return Registry(self.gw.gateway_url,
                        self.registry_auth(self.creds if creds == "default" else creds))

    def direct(self) -> Registry:
        """The registry itself, bypassing Envoy (for assertions on what is really stored)."""
        return Registry(self.gw.registry_url, self.registry_auth(self.creds))

    def access_log(self) -> AccessLog:
        log = AccessLog(self.opts.access_log)
        log.mark()
        return log

    def check_alive(self) -> None:
        dead = self.gw.dead()
        assert not dead, f"{self.name}: {dead} exited; see {self.opts.state_dir}"

    @property
    def envoy_log(self) -> Path:
        return self.opts.state_dir / "envoy.log"


#: Stacks started in this session (checked after every test by `stacks_stay_healthy`).
STARTED: List[Stack] = []


def stop_stack(s: Stack) -> None:
    """Stops a stack a fixture started, and takes it out of STARTED (which
    `stacks_stay_healthy` checks after every test)."""
    if s in STARTED:
        STARTED.remove(s)
    s.gw.stop()


#: Lines in Envoy's log that mean the plugin crashed (a panic traps the VM; later requests on
#: that worker fail) even when the test that caused it passed. On the native build Rust's panic
#: hook writes "panicked at" to Envoy's stderr (this log) before the hook that caught the panic
#: refuses its request; a crash of the module is Envoy's exit, which `dead()` reports.
WASM_FAILURE_SIGNS = ("panicked at", "wasm trap", "Wasm VM failed", "Function: proxy_on_",
                      "Plugin configured to fail closed")


#: containers/image's blob-info cache (skopeo, podman, buildah): it remembers where each blob
#: was pushed and makes clients try mounts from there, so the requests a client sends would
#: depend on the tests before. Root's location, and the rootless one.
BLOB_INFO_CACHES = [Path("/var/lib/containers/cache/blob-info-cache-v1.boltdb"),
                    Path.home() / ".local/share/containers/cache/blob-info-cache-v1.boltdb"]


@pytest.fixture(autouse=True)
def fresh_blob_info_cache():
    """Every test starts with an empty blob-info cache: its clients' request sequences do not
    depend on which tests ran before (a test that wants mounts pushes twice itself)."""
    for cache in BLOB_INFO_CACHES:
        cache.unlink(missing_ok=True)
    yield


@pytest.fixture(autouse=True)
def stacks_stay_healthy(request):
    """After each test: every started stack is still running and Envoy logged no plugin crash
    while the test ran (an error in teardown names the test and quotes the log)."""
    sizes = {s.name: s.envoy_log.stat().st_size if s.envoy_log.exists() else 0 for s in STARTED}
    yield
    problems = []
    for s in STARTED:
        dead = s.gw.dead()
        if dead:
            problems.append(f"{s.name}: {dead} exited (see {s.opts.state_dir})")
            continue
        if not s.envoy_log.exists():
            continue
        with open(s.envoy_log, "rb") as f:
            f.seek(sizes.get(s.name, 0))
            new = f.read().decode(errors="replace")
        bad = [line for line in new.splitlines() if any(m in line for m in WASM_FAILURE_SIGNS)
               and not any(a in line for a in s.expected_failures)]
        if bad:
            problems.append(f"{s.name}: the plugin failed during this test:\n" + "\n".join(bad[:20]))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def pytest_addoption(parser):
    parser.addoption(
        "--build", choices=BUILDS, default=None,
        help="the filter build every stack loads: wasm (the proxy-wasm plugin) or native (the "
             "Envoy dynamic module); default: $OCICRYPT_BUILD, else wasm")


def pytest_configure(config):
    global BUILD, WASM_OVERRIDE
    build = config.getoption("--build") or os.environ.get("OCICRYPT_BUILD") or "wasm"
    if build not in BUILDS:
        raise pytest.UsageError(f"OCICRYPT_BUILD={build!r}: choose one of {', '.join(BUILDS)}")
    if "build" not in {f.name for f in dataclasses.fields(gateway.Options)}:
        if build != "wasm":
            # Running the wasm suite under a native label would be a green run that tested
            # nothing of the native build.
            raise pytest.UsageError(f"--build {build}: this checkout's scripts/gateway.py "
                                    "starts only the wasm build (no Options.build)")
    BUILD = build
    # Read by gateway.Options in this process and by every script a test starts.
    os.environ["OCICRYPT_BUILD"] = build
    if build != "wasm":
        WASM_OVERRIDE = None


def pytest_report_header(config):
    return f"ocicrypt build: {BUILD}"


def pytest_collection_modifyitems(config, items):
    """Skip, with their reason, the tests marked for the other build."""
    for item in items:
        for mark in item.iter_markers("only_build"):
            (wanted,) = mark.args
            if wanted not in BUILDS:
                raise pytest.UsageError(f"{item.nodeid}: only_build({wanted!r}) names no build")
            if wanted != BUILD:
                why = mark.kwargs.get("reason", "")
                item.add_marker(pytest.mark.skip(reason=f"{wanted} build only: {why}"))


def filter_debug_log() -> str:
    """Envoy's --component-log-level that puts the filter's own log lines at debug."""
    return f"{FILTER_LOG_COMPONENT[BUILD]}:debug"


def _write_owner(state: Path) -> None:
    """Mark a state directory as belonging to this pytest process (see pytest_sessionstart)."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "owner").write_text(json.dumps(
        {"pid": os.getpid(), "start_time": gateway._proc_start_time(os.getpid())}))


def pytest_sessionstart(session):
    """Stop stacks and containerd daemons left behind by an earlier pytest run that was killed
    (its processes run in their own sessions and outlive it). Only state directories whose
    owning pytest process is gone are touched, and only the processes recorded there."""
    import tempfile

    for pids in Path(tempfile.gettempdir()).glob("pytest-of-*/pytest-*/*/pids"):
        try:
            owner = json.loads((pids.parent / "owner").read_text())
        except (OSError, ValueError):
            continue
        if gateway._alive(owner["pid"]) and \
                gateway._proc_start_time(owner["pid"]) == owner["start_time"]:
            continue
        gateway.stop_recorded(pids.parent, log=lambda m: print(f"stale: {m}", file=sys.stderr))


def _start_stack(tmp_path_factory, name: str, port_offset: int, *, filter: bool,
                 creds: Optional[Tuple[str, str]] = None, **extra) -> Stack:
    state = tmp_path_factory.mktemp(f"stack-{name}")
    _write_owner(state)
    if PORT_BASE is not None:
        ports = [PORT_BASE + port_offset + i for i in range(4)]
    else:
        ports = helpers.free_ports(4)
    if WASM_OVERRIDE is not None:
        extra.setdefault("wasm_path", WASM_OVERRIDE)
    opts = gateway.Options(
        state_dir=state,
        gateway_addr=f"127.0.0.1:{ports[0]}",
        registry_addr=f"127.0.0.1:{ports[1]}",
        admin_addr=f"127.0.0.1:{ports[2]}",
        keyservice_addr=f"127.0.0.1:{ports[3]}",
        filter=filter,
        htpasswd=creds,
        envoy_component_log_level=filter_debug_log() if filter else "",
        **extra,
    )
    gw = gateway.Gateway(opts, log=lambda m: print(m, file=sys.stderr))
    try:
        gw.start()
    except gateway.GatewayError as err:
        pytest.fail(f"stack {name!r} did not start: {err}", pytrace=False)
    s = Stack(name, gw, creds, gw.keys)
    STARTED.append(s)
    return s


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """Envoy + the ocicrypt filter + registry (no auth)."""
    s = _start_stack(tmp_path_factory, "filter", 0, filter=True,
                     extra_rules=NOKEYS_RULES, extra_projects=NOKEYS_PROJECTS)
    yield s
    STARTED.remove(s)
    s.gw.stop()


@pytest.fixture(scope="session")
def auth_stack(tmp_path_factory):
    """Envoy + the ocicrypt filter + registry behind htpasswd basic auth."""
    s = _start_stack(tmp_path_factory, "filter-auth", 10, filter=True, creds=AUTH)
    yield s
    STARTED.remove(s)
    s.gw.stop()


#: The token stack's users (name -> password): AUTH's user may pull, push and delete in demo/
#: and plain/; a robot account may pull and push in demo/ only; a reader may only pull; team's
#: developer works in project team/ only; `short`'s tokens expire about 10 s after they are issued
#: (distribution accepts a token until 60 s past its exp); `admin` may also list the catalog.
TOKEN_ROBOT = ("robot$demo+ci", "e2e-robot-pass")
TOKEN_READER = ("reader", "e2e-reader-pass")
TOKEN_TEAM = ("team-dev", "e2e-team-pass")
TOKEN_SHORT = ("short", "e2e-short-pass")
#: May list every repository (registry:catalog:*), as Harbor's system administrators: what
#: scripts/rotate needs to find a project's repositories.
TOKEN_ADMIN = ("admin", "e2e-admin-pass")
TOKEN_USERS = [
    {"name": AUTH[0], "password": AUTH[1],
     "access": {"demo": ["pull", "push", "delete"], "plain": ["pull", "push", "delete"]}},
    {"name": TOKEN_ROBOT[0], "password": TOKEN_ROBOT[1], "access": {"demo": ["pull", "push"]}},
    {"name": TOKEN_READER[0], "password": TOKEN_READER[1],
     "access": {"demo": ["pull"], "plain": ["pull"]}},
    {"name": TOKEN_TEAM[0], "password": TOKEN_TEAM[1],
     "access": {"team": ["pull", "push", "delete"]}},
    {"name": TOKEN_SHORT[0], "password": TOKEN_SHORT[1], "access": {"demo": ["pull", "push"]},
     "ttl_seconds": -50},
    {"name": TOKEN_ADMIN[0], "password": TOKEN_ADMIN[1], "catalog": True,
     "access": {"demo": ["pull", "push", "delete"]}},
]


@pytest.fixture(scope="session")
def token_stack(tmp_path_factory):
    """Envoy + the ocicrypt filter + a registry that wants bearer tokens from the token service
    behind the gateway's /service/token (Harbor's way), users TOKEN_USERS; the ledger is kept
    in the registry (replicas.state_key); project team/ is encrypted too, to its own key
    (`stack.team_key`: the private key's path)."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    team_key = tmp_path_factory.mktemp("team-key") / "team-ec.pem"
    team_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    port = PORT_BASE + 84 if PORT_BASE is not None else helpers.free_ports(1)[0]
    s = _start_stack(tmp_path_factory, "token", 80, filter=True, token_auth=True,
                     token_users=TOKEN_USERS, token_service_addr=f"127.0.0.1:{port}",
                     state_key=base64.b64encode(os.urandom(32)).decode(),
                     extra_rules=[{"repositories": "team/**", "action": "encrypt"}],
                     extra_projects={"team": {"recipients": [{"pem": pub}]}})
    s.creds = AUTH
    s.team_key = team_key
    yield s
    stop_stack(s)


@pytest.fixture(scope="session")
def plain_stack(tmp_path_factory):
    """Envoy without the filter + registry: checks of the harness and of the clients."""
    s = _start_stack(tmp_path_factory, "nofilter", 20, filter=False)
    yield s
    STARTED.remove(s)
    s.gw.stop()


@pytest.fixture(scope="session")
def plain_auth_stack(tmp_path_factory):
    s = _start_stack(tmp_path_factory, "nofilter-auth", 30, filter=False, creds=AUTH)
    yield s
    STARTED.remove(s)
    s.gw.stop()


# ---------------------------------------------------------------------------------------------
# images


@pytest.fixture(scope="session")
def secret_image(tmp_path_factory) -> Image:
    """The image pushed to encrypted repositories: a big uncompressed layer carrying a MARKER,
    a tiny gzip layer and a config. Never pushed in plaintext to the filter stacks."""
    d = tmp_path_factory.mktemp("img-secret")
    return helpers.build_image(d / "layout", "v1", BIG_LAYER_BYTES, marker=helpers.new_marker())


@pytest.fixture(scope="session")
def plain_image(tmp_path_factory) -> Image:
    """An unrelated image for passthrough repositories (plain/**)."""
    d = tmp_path_factory.mktemp("img-plain")
    return helpers.build_image(d / "layout", "v1", 4 * MIB, marker=helpers.new_marker())


@pytest.fixture(scope="session")
def wrong_key(tmp_path_factory) -> Path:
    """A freshly generated RSA key that is no recipient of anything."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    path = tmp_path_factory.mktemp("wrong-key") / "wrong-rsa.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


# ---------------------------------------------------------------------------------------------
# containerd


class Containerd:
    """A private containerd daemon (own root, state and socket) driven with ctr."""

    def __init__(self, base: Path):
        self.base = base
        self.sock = base / "containerd.sock"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Containerd":
        cfg = self.base / "config.toml"
        # Only content and image services are needed (import, push): no CRI, no snapshotters
        # that need kernel features, no tracing or metrics.
        cfg.write_text(f"""version = 2
root = "{self.base}/root"
state = "{self.base}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
""")
        log = open(self.base / "containerd.log", "ab")
        self.proc = subprocess.Popen(["containerd", "--config", str(cfg)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        _write_owner(self.base)
        (self.base / "pids").write_text(json.dumps([{
            "name": "containerd", "pid": self.proc.pid,
            "start_time": gateway._proc_start_time(self.proc.pid), "argv": self.proc.args}]))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("containerd exited: "
                                   + (self.base / "containerd.log").read_text()[-3000:])
            if self.sock.exists() and self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise RuntimeError("containerd did not start: "
                           + (self.base / "containerd.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        (self.base / "pids").unlink(missing_ok=True)

    def ctr(self, *args, check: bool = True,
            timeout: float = helpers.CLIENT_TIMEOUT) -> subprocess.CompletedProcess:
        return helpers.run(["ctr", "-a", str(self.sock), *args], check=check, timeout=timeout)

    def import_image(self, image: Image, name: str, as_index: bool = False) -> str:
        """Import the layout as `name:<tag>` (a manifest image, or with as_index the layout's
        index). Returns the local reference."""
        archive = image.layout.parent / f"{image.layout.name}-{uuid.uuid4().hex[:8]}.tar"
        image.oci_archive(archive)
        ref = f"{name}:{image.tag}"
        if as_index:
            self.ctr("images", "import", "--no-unpack", "--index-name", ref, str(archive))
        else:
            self.ctr("images", "import", "--no-unpack", "--base-name", name, str(archive))
        archive.unlink()
        listed = self.ctr("images", "ls", "-q").stdout.split()
        assert ref in listed, f"ctr import did not create {ref}: {listed}"
        return ref

    def push(self, ref: str, dest: str, creds: Optional[Tuple[str, str]] = None,
             check: bool = True) -> subprocess.CompletedProcess:
        args = ["images", "push", "--plain-http"]
        if creds:
            args += ["--user", f"{creds[0]}:{creds[1]}"]
        return self.ctr(*args, dest, ref, check=check)


@pytest.fixture(scope="session")
def containerd(tmp_path_factory):
    # unix socket paths are limited to 108 bytes: keep the base short
    base = Path(tmp_path_factory.mktemp("ctd"))
    c = Containerd(base)
    try:
        c.start()
    except RuntimeError as err:
        pytest.fail(str(err), pytrace=False)
    yield c
    c.stop()


# ---------------------------------------------------------------------------------------------
# oras


def oras_registry(addr: str, creds: Optional[Tuple[str, str]] = None):
    import oras.provider

    reg = oras.provider.Registry(hostname=addr, insecure=True,
                                 auth_backend="basic" if creds else "token")
    if creds:
        reg.auth.set_basic_auth(*creds)
    return reg


def oras_push(image: Image, addr: str, repo_tag: str, chunked: bool,
              creds: Optional[Tuple[str, str]] = None, chunk_size: int = 16 * MIB) -> dict:
    """Push config and layers with oras-py (monolithic POST+PUT, or POST, PATCH with
    Content-Range per chunk, empty PUT), then the image manifest. Returns the manifest sent."""
    reg = oras_registry(addr, creds)
    container = reg.get_container(f"{addr}/{repo_tag}")
    manifest = image.manifest
    for desc in [manifest["config"], *manifest["layers"]]:
        resp = reg.upload_blob(str(image.blob_path(desc["digest"])), container, desc,
                               do_chunked=chunked, chunk_size=chunk_size)
        assert resp.status_code in (200, 201), \
            f"oras upload of {desc['digest']} to {repo_tag}: {resp.status_code} {resp.text[:500]}"
    resp = reg.upload_manifest(manifest, container)
    assert resp.status_code == 201, f"oras manifest {repo_tag}: {resp.status_code} {resp.text[:500]}"
    return manifest


# ---------------------------------------------------------------------------------------------
# pushes through the filter stack (each done once per session; a failed push is recorded, not
# raised, so that the storage scan still runs over whatever a failed push left behind)


@dataclass
class Push:
    client: str
    repo: str
    tag: str
    image: Image
    #: the client pushed the image's blobs as they are (digests can be compared exactly)
    exact: bool
    error: Optional[str] = None
    entries: List[dict] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.repo}:{self.tag}"

    def check(self) -> None:
        assert self.error is None, f"{self.client} push to {self.ref} failed: {self.error}\n" \
            f"access log:\n{AccessLog.summary(self.entries)}"


def attempt_push(stack: Stack, client: str, repo: str, image: Image, exact: bool, fn) -> Push:
    push = Push(client, repo, "v1", image, exact)
    log = stack.access_log()
    try:
        fn(push)
    except Exception as err:  # noqa: BLE001 - recorded, asserted by the tests
        push.error = f"{type(err).__name__}: {err}"
    push.entries = log.entries()
    return push


@pytest.fixture(scope="session")
def gz_image(tmp_path_factory) -> Image:
    """A second secret image, for the push where skopeo gzips the layer itself."""
    d = tmp_path_factory.mktemp("img-gz")
    return helpers.build_image(d / "layout", "v1", 8 * MIB, marker=helpers.new_marker())


@pytest.fixture(scope="session")
def push_skopeo(stack, secret_image) -> Push:
    """skopeo --preserve-digests: HEAD, POST, one PATCH (Content-Length), PUT ?digest=."""
    return attempt_push(stack, "skopeo", "demo/app", secret_image, True, lambda p: helpers.skopeo_push(
        secret_image, f"{stack.addr}/{p.ref}", extra=["--preserve-digests"]))


@pytest.fixture(scope="session")
def push_skopeo_gz(stack, gz_image) -> Push:
    """skopeo gzipping the uncompressed layer on the fly: a chunked (no Content-Length) PATCH."""
    return attempt_push(stack, "skopeo-gzip", "demo/app-gz", gz_image, False,
                        lambda p: helpers.skopeo_push(gz_image, f"{stack.addr}/{p.ref}"))


@pytest.fixture(scope="session")
def push_ctr(stack, containerd, secret_image) -> Push:
    """containerd: HEAD, POST, one PUT ?digest= carrying the blob (monolithic)."""
    ref = containerd.import_image(secret_image, "e2e.local/secret")
    return attempt_push(stack, "ctr", "demo/ctr", secret_image, True,
                        lambda p: containerd.push(ref, f"{stack.addr}/{p.ref}"))


@pytest.fixture(scope="session")
def push_ctr_index(stack, containerd, secret_image) -> Push:
    """containerd pushing an index: the child manifest by digest, then the index by tag."""
    ref = containerd.import_image(secret_image, "e2e.local/secret-index", as_index=True)
    return attempt_push(stack, "ctr-index", "demo/ctr-idx", secret_image, True,
                        lambda p: containerd.push(ref, f"{stack.addr}/{p.ref}"))


@pytest.fixture(scope="session")
def push_oras_mono(stack, secret_image) -> Push:
    return attempt_push(stack, "oras-monolithic", "demo/oras-mono", secret_image, True,
                        lambda p: oras_push(secret_image, stack.addr, p.ref, chunked=False))


@pytest.fixture(scope="session")
def push_oras_chunked(stack, secret_image) -> Push:
    """oras: POST, PATCH with Content-Range per 16 MiB, empty PUT ?digest=."""
    return attempt_push(stack, "oras-chunked", "demo/oras-chunked", secret_image, True,
                        lambda p: oras_push(secret_image, stack.addr, p.ref, chunked=True))


PUSH_FIXTURES = ["push_skopeo", "push_skopeo_gz", "push_ctr", "push_ctr_index",
                 "push_oras_mono", "push_oras_chunked"]


@pytest.fixture(scope="session")
def plain_app(stack, plain_image) -> Image:
    """plain_image pushed by skopeo (--preserve-digests) to plain/app through the filter."""
    helpers.skopeo_push(plain_image, f"{stack.addr}/plain/app:v1", extra=["--preserve-digests"])
    return plain_image


# ---------------------------------------------------------------------------------------------
# stacks for the bypass tests (tests/e2e/test_bypasses.py)


@pytest.fixture(scope="session")
def ledger_stack(tmp_path_factory):
    """Envoy + filter + registry with `replicas.state_key`: the ledger is also kept in the
    registry (tags `ocicrypt.sha256-<hex>`). Tests may restart its gateway (`gw.stop()`,
    `gw.start()`; storage is kept)."""
    import base64

    s = _start_stack(tmp_path_factory, "ledger", 50, filter=True, keys_source="inline",
                     state_key=base64.b64encode(os.urandom(32)).decode())
    yield s
    stop_stack(s)


@dataclass
class ProxiedStack(Stack):
    """A filter stack whose Envoy reaches the real registry through a proxy (`proxy`, e.g. a
    lying registry): `registry_addr`, `storage` and `direct()` are the real registry's."""

    backend: Optional[gateway.Gateway] = None
    proxy: object = None

    @property
    def registry_addr(self) -> str:
        return self.backend.opts.registry_addr

    @property
    def storage(self) -> Path:
        return self.backend.opts.registry_dir

    def direct(self) -> Registry:
        return Registry(self.backend.registry_url, self.creds)

    @property
    def registry_log(self) -> Path:
        return self.backend.opts.state_dir / "registry.log"


def start_registry_only(state: Path, addr: str, log=None) -> gateway.Gateway:
    """A real registry (docker-registry) alone, on `addr`, storage under `state`/registry. Stop
    it with `.stop()`."""
    _write_owner(state)
    ports = helpers.free_ports(2)
    backend = gateway.Gateway(gateway.Options(
        state_dir=state, registry_addr=addr, gateway_addr=f"127.0.0.1:{ports[0]}",
        admin_addr=f"127.0.0.1:{ports[1]}", filter=False),
        log=log or (lambda m: print(m, file=sys.stderr)))
    backend.prepare()
    try:
        backend.start_registry()
    except BaseException:
        backend.stop()
        raise
    return backend


@pytest.fixture(scope="session")
def lying_stack(tmp_path_factory):
    """Envoy + filter in front of a lying registry (tests/lying_registry.py, honest until told
    otherwise) in front of the real registry. `stack.proxy` is the LyingRegistry."""
    from lying_registry import LyingRegistry

    ports = helpers.free_ports(7) if PORT_BASE is None else \
        [PORT_BASE + 60 + i for i in range(7)]
    backend = start_registry_only(tmp_path_factory.mktemp("lying-backend"),
                                  f"127.0.0.1:{ports[0]}")
    proxy = LyingRegistry(upstream=f"127.0.0.1:{ports[0]}", listen=f"127.0.0.1:{ports[1]}",
                          elsewhere=f"127.0.0.1:{ports[2]}").start()
    state = tmp_path_factory.mktemp("stack-lying")
    _write_owner(state)
    extra = {"wasm_path": WASM_OVERRIDE} if WASM_OVERRIDE is not None else {}
    gw = gateway.Gateway(gateway.Options(
        state_dir=state, gateway_addr=f"127.0.0.1:{ports[3]}",
        registry_addr=f"127.0.0.1:{ports[1]}", admin_addr=f"127.0.0.1:{ports[4]}",
        keyservice_addr=f"127.0.0.1:{ports[5]}", filter=True, start_registry=False,
        keys_source="inline", envoy_component_log_level=filter_debug_log(), **extra),
        log=lambda m: print(m, file=sys.stderr))
    try:
        gw.start()
    except gateway.GatewayError as err:
        proxy.stop()
        backend.stop()
        pytest.fail(f"stack 'lying' did not start: {err}", pytrace=False)
    s = ProxiedStack("lying", gw, None, gw.keys, backend=backend, proxy=proxy)
    STARTED.append(s)
    yield s
    STARTED.remove(s)
    gw.stop()
    proxy.stop()
    backend.stop()
