"""Issue 12: one keystream, one use; every layer for the project's current recipients.

The adversary is the registry's own: an administrator with push rights who reads Envoy's logs
and the registry's storage. Each finding is tried through the real Envoy and registry, uploads
driven request by request with raw HTTP, and judged on OUTCOMES read from the registry directly
(its storage directory and its API): what an upload's data file holds, what was committed,
what decrypts with which key.

Findings (numbered as in the issue):
1. keystream reuse: an older sealed state (`_ocicrypt`) replayed with the current `_state`
   (new bytes encrypted with keystream already used at that offset, both ciphertexts in the
   upload's data file), through one Envoy and across two replicas; two concurrent PATCHes on
   one session (keystream reused, a blob committed whose bytes do not hash to its digest);
   the sealed Locations an attacker needs, read from Envoy's logs;
2. a PATCH without the sealed state (or, without `replicas`, on another Envoy) after an
   encrypted first PATCH: re-sniffed from scratch, a `{...}` chunk went upstream as plaintext;
3. after a recipient rotation, a manifest naming a layer encrypted to the removed recipients
   was accepted;
4. a same-project mount not ledgered in the registry (a restarted replica then refuses the
   manifest); a project named `projects` colliding with the refresh list in shared data.
(Finding 5, the state key in Envoy's configuration dump, is not tried here.)
"""
from __future__ import annotations

import io
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import requests

import gateway
import helpers
from conftest import (STARTED, WASM_OVERRIDE, Stack, _start_stack, _write_owner,
                      filter_debug_log, stop_stack)
from helpers import MIB, MT_CONFIG, MT_LAYER_TAR, MT_MANIFEST, Answer, sha256_digest

pytestmark = [pytest.mark.filter]

STATE = "_state"
SEALED = "_ocicrypt"
KEYSERVICE = Path(__file__).resolve().parents[2] / "scripts" / "keyservice"
REFRESH = 2  # seconds between the key-service refreshes of the dedicated stack


# --------------------------------------------------------------------------------------------
# stacks


def envoy_in_front_of(tmp_path_factory, name: str, base: Stack, **extra) -> Stack:
    """Another Envoy with the filter in front of `base`'s registry (nothing else shared unless
    given in `extra`, e.g. `state_key`): the same recipients, inline. Its `direct()` and
    `registry_addr` are `base`'s registry; its storage is `base.storage`."""
    state = tmp_path_factory.mktemp(f"stack-{name}")
    _write_owner(state)
    shutil.copytree(base.opts.state_dir / "keys", state / "keys")
    ports = helpers.free_ports(3)
    if WASM_OVERRIDE is not None:
        extra.setdefault("wasm_path", WASM_OVERRIDE)
    gw = gateway.Gateway(gateway.Options(
        state_dir=state, gateway_addr=f"127.0.0.1:{ports[0]}",
        registry_addr=base.registry_addr, admin_addr=f"127.0.0.1:{ports[1]}",
        keyservice_addr=f"127.0.0.1:{ports[2]}", filter=True, keys_source="inline",
        start_registry=False, envoy_component_log_level=filter_debug_log(), **extra),
        log=lambda m: print(m, file=sys.stderr))
    try:
        gw.start()
    except gateway.GatewayError as err:
        pytest.fail(f"stack {name!r} did not start: {err}", pytrace=False)
    s = Stack(name, gw, None, gw.keys)
    STARTED.append(s)
    return s


@pytest.fixture(scope="module")
def ledger_twin(ledger_stack, tmp_path_factory):
    """A second replica beside `ledger_stack`: its own Envoy, the same registry and
    `replicas.state_key`. Tests may restart it (`gw.stop()`, `gw.start()`: Envoy only)."""
    s = envoy_in_front_of(tmp_path_factory, "ledger-twin", ledger_stack,
                          state_key=ledger_stack.opts.state_key)
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def ks_stack(tmp_path_factory):
    """A dedicated stack without `replicas` (upload state in Envoy's shared data) whose
    recipients come from the key service, refreshed every REFRESH seconds: `demo` (the stack's
    keys, never changed), and projects `rotated` and `projects` (`rotated/**` and `projects/**`
    encrypted, and `remount`) whose recipients the tests here publish and rotate."""
    s = _start_stack(tmp_path_factory, "keystream-ks", 80, filter=True,
                     keyservice_refresh_seconds=REFRESH,
                     extra_rules=[{"repositories": "rotated/**", "action": "encrypt"},
                                  {"repositories": "remount/**", "action": "encrypt"},
                                  {"repositories": "projects/**", "action": "encrypt"}])
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def shared_twin(ks_stack, tmp_path_factory):
    """Another Envoy in front of `ks_stack`'s registry, without `replicas` either (each Envoy
    keeps upload state in its own shared data)."""
    s = envoy_in_front_of(tmp_path_factory, "ks-twin", ks_stack)
    yield s
    stop_stack(s)


def keyservice(stack: Stack, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(KEYSERVICE), *args, "--repo",
                           str(stack.opts.keyservice_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def publish_recipients(stack: Stack, project: str, pems: Sequence[Path]) -> None:
    """Sets `project`'s recipients in the key service, then waits until an upload to
    `<project>/app` opens (the gateway looks a project up on its first push)."""
    args = [a for pem in pems for a in ("--pem", str(pem))]
    keyservice(stack, "set-recipients", "--project", project, *args)
    deadline = time.monotonic() + 20
    while True:
        r = requests.post(f"http://{stack.addr}/v2/{project}/app/blobs/uploads/", timeout=30)
        if r.status_code == 202 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 202, f"an upload to {project}/app: {r.status_code} {r.text[:300]}"


# --------------------------------------------------------------------------------------------
# uploads driven request by request


def params(loc: str) -> Dict[str, str]:
    """The query parameters of an upload Location, values as sent (still %-encoded)."""
    query = loc.split("?", 1)[1] if "?" in loc else ""
    return dict(p.split("=", 1) for p in query.split("&") if "=" in p)


def with_params(loc: str, **values: Optional[str]) -> str:
    """`loc` with parameters replaced (a value of None removes it), others kept in order."""
    path, _, query = loc.partition("?")
    pairs = [p.split("=", 1) if "=" in p else [p, ""] for p in query.split("&") if p]
    out = []
    for k, v in pairs:
        if k in values:
            if values[k] is None:
                continue
            v = values[k]
        out.append(f"{k}={v}")
    out += [f"{k}={v}" for k, v in values.items()
            if v is not None and k not in {p[0] for p in pairs}]
    return path + ("?" + "&".join(out) if out else "")


def request(addr: str, method: str, path: str, body: bytes = b"",
            headers: Optional[Dict[str, str]] = None) -> Answer:
    """One HTTP/1.1 request on a raw socket, the path sent exactly as given."""
    status, hdrs, data = helpers.raw_request(addr, method, path, body, headers or {})
    return Answer(status, hdrs, data)


def start_upload(addr: str, repo: str) -> str:
    ans = request(addr, "POST", f"/v2/{repo}/blobs/uploads/")
    assert ans.status == 202, f"POST upload {repo}: {ans.status} {ans.body[:300]!r}"
    return helpers.location_path(ans.headers["location"])


def patch(addr: str, loc: str, data: bytes, start: Optional[int] = None) -> Answer:
    """A PATCH of `data`; with `start`, the Content-Range a client states (the registry does
    not read it; without it nothing but the URL says where the chunk goes)."""
    headers = {"Content-Type": "application/octet-stream"}
    if start is not None:
        headers["Content-Range"] = f"{start}-{start + len(data) - 1}"
    return request(addr, "PATCH", loc, data, headers)


def patched(addr: str, loc: str, data: bytes, start: int) -> str:
    """PATCH that must be taken (202); returns the next Location."""
    ans = patch(addr, loc, data, start)
    assert ans.status == 202, f"PATCH at {start}: {ans.status} {ans.body[:300]!r}"
    return helpers.location_path(ans.headers["location"])


def finish(addr: str, loc: str, digest: str) -> Answer:
    return request(addr, "PUT", with_params(loc, digest=digest))


def upload_id(loc: str) -> str:
    return loc.split("?", 1)[0].rstrip("/").rsplit("/", 1)[1]


def upload_data(storage: Path, repo: str, loc: str) -> Optional[bytes]:
    """What the registry's storage holds for the upload session of `loc` (None: no session)."""
    path = (storage / "docker" / "registry" / "v2" / "repositories" / repo / "_uploads"
            / upload_id(loc) / "data")
    return path.read_bytes() if path.exists() else None


def xor(a: bytes, b: bytes) -> bytes:
    n = min(len(a), len(b))
    return (int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")).to_bytes(n, "big")


def keystream_reuse(data: bytes, chunks: Sequence[bytes], window: int = 4096) -> List[str]:
    """Two regions of an upload's stored bytes encrypted with the same keystream, found the
    way the attacker reads a chunk: stored regions at two chunk boundaries whose XOR is the XOR
    of two of the known plaintext `chunks` (what was written; identical regions included)."""
    starts = sorted({0, *itertools.accumulate(len(c) for c in chunks)})
    found = []
    for i, a in enumerate(starts):
        for b in starts[i + 1:]:
            n = min(window, len(data) - b)
            if n < 16:
                continue
            stored = xor(data[a:a + n], data[b:b + n])
            for (i_x, x), (i_y, y) in itertools.product(enumerate(chunks), repeat=2):
                m = min(n, len(x), len(y))
                if m >= 16 and stored[:m] == xor(x[:m], y[:m]):
                    found.append(f"stored bytes at {a} and {b} XOR to chunk {i_x} XOR chunk "
                                 f"{i_y}: one keystream encrypted both")
    return found


def assert_filter_refusal(ans: Answer, status: int, code: str) -> None:
    """`ans` is the filter's own refusal: `status`, `x-ocicrypt-filter: refused`, an OCI error
    body with `code`."""
    assert ans.status == status and ans.headers.get("x-ocicrypt-filter") == "refused", \
        f"expected the filter's {status} refusal, got {ans.status} {ans.headers} {ans.body[:500]!r}"
    codes = [e.get("code") for e in json.loads(ans.body).get("errors", [])]
    assert code in codes, f"codes {codes}, expected {code}: {ans.body[:500]!r}"


# --------------------------------------------------------------------------------------------
# images with a layer of known bytes


def tar_of(content: bytes) -> bytes:
    """An uncompressed tar holding `content` as one file (fixed header: two tars of equal
    length contents share their first bytes up to where the contents differ)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("data/known.bin")
        info.size, info.mode, info.mtime = len(content), 0o644, 1700000000
        tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def one_layer_image(d: Path, layer: bytes) -> helpers.Image:
    """An image (config + one uncompressed layer `layer`), its blobs written under `d`."""
    d.mkdir(parents=True, exist_ok=True)
    layer_digest = sha256_digest(layer)
    (d / "layer").write_bytes(layer)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Labels": {"e2e.unique": uuid.uuid4().hex}},
                         "rootfs": {"type": "layers", "diff_ids": [layer_digest]}},
                        separators=(",", ":")).encode()
    (d / "config").write_bytes(config)
    cfg = helpers.Blob(MT_CONFIG, sha256_digest(config), len(config), d / "config")
    lay = helpers.Blob(MT_LAYER_TAR, layer_digest, len(layer), d / "layer")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST,
                           "config": cfg.descriptor(), "layers": [lay.descriptor()]},
                          separators=(",", ":")).encode()
    return helpers.Image(d, "v1", cfg, [lay], [layer_digest], manifest, sha256_digest(manifest))


def commit_image_problems(gw: Stack, repo: str, image: helpers.Image, out: Path,
                          key: Path) -> List[str]:
    """After its layer was committed through `gw`: push the config and the manifest, then
    check what the registry stores: an encrypted manifest, its layer's stored bytes hashing to
    the stored digest, and the oracle (skopeo) decrypting it to `image`'s exact layer."""
    reg = gw.via_gateway()
    r = reg.upload_monolithic(repo, image.config.path.read_bytes())
    if r.status_code != 201:
        return [f"config push: {r.status_code} {r.text[:300]}"]
    r = reg.put_manifest(repo, "v1", image.manifest_bytes)
    if r.status_code != 201:
        return [f"manifest push: {r.status_code} {r.text[:300]}"]
    stored = gw.direct().get_manifest(repo, "v1").json()
    helpers.assert_encrypted_manifest(stored, image)
    problems = []
    e = stored["layers"][0]["digest"]
    blob = gw.direct().get_blob(repo, e)
    if sha256_digest(blob) != e:
        problems.append(f"the registry serves {repo}@{e} with bytes hashing to "
                        f"{sha256_digest(blob)}: committed bytes do not match the digest")
    pulled = helpers.skopeo_pull(f"{gw.registry_addr}/{repo}:v1", out, "v1", keys=[key],
                                 check=False)
    if pulled.returncode != 0:
        problems.append(f"the stored image does not decrypt: {pulled.stderr[-1000:]}")
    else:
        helpers.assert_decrypted_matches(out, "v1", image)
    return problems


# --------------------------------------------------------------------------------------------
# finding 1: replay of an older sealed state with the current `_state`


@pytest.mark.parametrize("replicas", ["one-envoy", "two-replicas"])
def test_replayed_sealed_state_is_refused(ledger_stack, ledger_twin, replicas, tmp_path):
    """Finding 1 (keystream reuse through an old sealed state): PATCH 1 answers L1 {S1, O1},
    PATCH 2 with L1 answers L2 {S2, O2}; a PATCH 3 to the URL with `_state=S2` but
    `_ocicrypt=O1` (no Content-Range) is refused by the filter (400 BLOB_UPLOAD_INVALID), on
    the same Envoy or on the other replica. The upload's data file holds exactly PATCH 1 +
    PATCH 2 and no two regions under one keystream; the upload then finishes with L2 and the
    committed layer decrypts to the known bytes."""
    a = ledger_stack
    b = ledger_twin if replicas == "two-replicas" else ledger_stack
    repo = f"demo/ks-replay-{replicas}"
    layer = tar_of(os.urandom(3 * MIB))
    p1, p2 = layer[:MIB], layer[MIB:]
    p3 = os.urandom(256 * 1024)
    loc0 = start_upload(a.addr, repo)
    loc1 = patched(a.addr, loc0, p1, 0)
    loc2 = patched(a.addr, loc1, p2, len(p1))
    assert SEALED in params(loc1) and SEALED in params(loc2), \
        f"precondition: the sealed state is in the Locations: {loc1} {loc2}"
    assert params(loc1)[STATE] != params(loc2)[STATE]
    replay = with_params(loc2, **{SEALED: params(loc1)[SEALED]})

    ans = patch(b.addr, replay, p3)
    data = upload_data(a.storage, repo, loc2)
    problems = []
    if ans.status == 202:
        problems.append("the replayed PATCH was answered 202")
    if data is None:
        problems.append("the upload session is gone from the registry's storage")
    else:
        if len(data) != len(p1) + len(p2):
            problems.append(f"the upload's data file holds {len(data)} bytes, not "
                            f"{len(p1)} + {len(p2)}")
        problems += keystream_reuse(data, [p1, p2, p3])
    assert not problems, f"replay answered {ans.status} {ans.body[:300]!r}: " + "; ".join(problems)
    assert_filter_refusal(ans, 400, "BLOB_UPLOAD_INVALID")

    image = one_layer_image(tmp_path / "img", layer)
    done = finish(b.addr, loc2, image.layers[0].digest)
    assert done.status == 201, f"finishing with L2: {done.status} {done.body[:300]!r}"
    problems = commit_image_problems(b, repo, image, tmp_path / "out", a.keys["rsa"]["private"])
    assert not problems, "; ".join(problems)


# --------------------------------------------------------------------------------------------
# finding 2: missing sealed state after an encrypted first PATCH


def json_chunk(marker: str) -> bytes:
    """A chunk the sniffer reads as JSON (first byte `{`, no NUL), carrying a marker."""
    return json.dumps({"a": 1, "marker": marker}).encode()


def assert_json_chunk_not_forwarded(target: Stack, storage: Path, repo: str, loc: str,
                                    first: bytes, ans: Answer, marker: str) -> None:
    data = upload_data(storage, repo, loc)
    problems = []
    if ans.status == 202:
        problems.append("the PATCH was answered 202")
    if data is None:
        problems.append("the upload session is gone from the registry's storage")
    else:
        if len(data) != len(first):
            problems.append(f"the upload's data file holds {len(data)} bytes, not the "
                            f"{len(first)} of the first PATCH")
        if marker.encode() in data:
            problems.append("the JSON chunk is stored in plaintext in the upload's data file")
    assert not problems, f"{target.name} answered {ans.status} {ans.body[:300]!r}: " \
        + "; ".join(problems)
    assert_filter_refusal(ans, 400, "BLOB_UPLOAD_INVALID")


def test_patch_without_sealed_state_is_refused(ledger_stack):
    """Finding 2 (with `replicas.state_key`): after an encrypted first PATCH, a PATCH to L1
    with `_ocicrypt` removed (`_state` kept) carrying a JSON-looking chunk is refused by the
    filter (400 BLOB_UPLOAD_INVALID) and nothing reaches the registry: the upload's data file
    holds the first PATCH only, no plaintext."""
    s = ledger_stack
    repo = "demo/ks-unsealed"
    first = tar_of(os.urandom(64 * 1024))
    loc1 = patched(s.addr, start_upload(s.addr, repo), first, 0)
    assert SEALED in params(loc1), f"precondition: a sealed state in {loc1}"
    marker = helpers.new_marker()
    ans = patch(s.addr, with_params(loc1, **{SEALED: None}), json_chunk(marker))
    assert_json_chunk_not_forwarded(s, s.storage, repo, loc1, first, ans, marker)


SESSION = "_ocicrypt_session"


def test_session_parameter_is_required_as_given(ledger_stack):
    """With `replicas.state_key`, every upload Location the gateway answers (the POST's and each
    PATCH's) names the session in `_ocicrypt_session`, the same value throughout, for a load
    balancer to hash on; a request on the session without it, naming another session, spelling
    it otherwise (escaped) or twice, is refused by the filter (400 BLOB_UPLOAD_INVALID) before
    anything reaches the registry. Otherwise one client could send two requests of one session
    to two replicas through a balancer hashing the parameter."""
    s = ledger_stack
    repo = "demo/ks-session-param"
    loc0 = start_upload(s.addr, repo)
    sid = upload_id(loc0)
    assert params(loc0).get(SESSION) == sid, f"the POST's Location does not name its session: {loc0}"
    first = tar_of(os.urandom(64 * 1024))
    loc1 = patched(s.addr, loc0, first, 0)
    assert params(loc1).get(SESSION) == sid and SEALED in params(loc1), loc1
    other = start_upload(s.addr, repo)
    escaped = sid.replace("-", "%2D", 1)
    spellings = {
        "absent": with_params(loc1, **{SESSION: None}),
        "another session's": with_params(loc1, **{SESSION: upload_id(other)}),
        "escaped": with_params(loc1, **{SESSION: escaped}),
        "twice": loc1 + f"&{SESSION}={sid}",
    }
    for what, loc in spellings.items():
        marker = helpers.new_marker()
        ans = patch(s.addr, loc, json_chunk(marker))
        print(f"{what}: {ans.status} {ans.body[:160]!r}")
        assert_json_chunk_not_forwarded(s, s.storage, repo, loc1, first, ans, marker)
    # The Location as given still goes on.
    patched(s.addr, loc1, layer_piece(), len(first))


@pytest.fixture(scope="module")
def foreign_twin(ledger_stack, tmp_path_factory):
    """An Envoy in front of `ledger_stack`'s registry with ANOTHER state key: a gateway of
    another deployment, or a replica whose key was rotated."""
    import base64

    s = envoy_in_front_of(tmp_path_factory, "foreign-twin", ledger_stack,
                          state_key=base64.b64encode(os.urandom(32)).decode())
    yield s
    stop_stack(s)


def test_sealed_state_of_another_key_is_refused(ledger_stack, foreign_twin):
    """A Location sealed by a gateway with another state key does not open: the next PATCH
    through this gateway is refused (400) and nothing reaches the registry."""
    repo = "demo/ks-foreign"
    first = tar_of(os.urandom(64 * 1024))
    loc1 = patched(ledger_stack.addr, start_upload(ledger_stack.addr, repo), first, 0)
    assert SEALED in params(loc1), f"precondition: a sealed state in {loc1}"
    marker = helpers.new_marker()
    ans = patch(foreign_twin.addr, loc1, json_chunk(marker))
    assert_json_chunk_not_forwarded(foreign_twin, ledger_stack.storage, repo, loc1, first, ans,
                                    marker)
    assert b"does not open" in ans.body, ans.body[:300]


def test_patch_on_an_envoy_without_the_state_is_refused(ks_stack, shared_twin):
    """Finding 2 (without `replicas`: state in one Envoy's shared data): the first PATCH is
    encrypted by one Envoy; the next PATCH, with the Location it answered (`_state` at an
    offset > 0) and a JSON-looking chunk, sent to another Envoy in front of the same registry,
    is refused by that filter (400) and nothing reaches the registry."""
    stack = ks_stack
    repo = "demo/ks-other-envoy"
    first = tar_of(os.urandom(64 * 1024))
    loc1 = patched(stack.addr, start_upload(stack.addr, repo), first, 0)
    assert SEALED not in params(loc1), f"precondition: no sealed state without replicas: {loc1}"
    marker = helpers.new_marker()
    ans = patch(shared_twin.addr, loc1, json_chunk(marker))
    assert_json_chunk_not_forwarded(shared_twin, stack.storage, repo, loc1, first, ans, marker)


# --------------------------------------------------------------------------------------------
# finding 1: concurrent requests on one session


class SlowRequest:
    """An HTTP/1.1 request on a raw socket whose body is sent in parts, when told."""

    def __init__(self, addr: str, method: str, path: str, headers: Dict[str, str],
                 length: int):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        head = [f"{method} {path} HTTP/1.1", f"Host: {addr}", f"Content-Length: {length}",
                "Connection: close"] + [f"{k}: {v}" for k, v in headers.items()]
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        self.thread: Optional[threading.Thread] = None

    def send(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            for i in range(0, len(data), 64 * 1024):
                self.sock.sendall(view[i:i + 64 * 1024])
        except OSError:
            pass  # answered (refused) and closed before the whole body

    def send_later(self, data: bytes) -> None:
        self.thread = threading.Thread(target=self.send, args=(data,), daemon=True)
        self.thread.start()

    def answer(self) -> Answer:
        import http.client

        try:
            resp = http.client.HTTPResponse(self.sock, method="PATCH")
            resp.begin()
            ans = Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        except (OSError, http.client.HTTPException) as err:
            ans = Answer(0, {"error": repr(err)}, b"")
        self.sock.close()
        if self.thread:
            self.thread.join(5)
        return ans


#: Bytes of each concurrent PATCH sent before the pause: less than the registry's write buffer
#: (4 KiB), so that neither has written to the data file when the other's offset is checked.
HEAD_START = 1024


TWO_REPLICA_RACE = pytest.param(
    "two-replicas",
    marks=pytest.mark.xfail(
        strict=True,
        reason="known limit: the one-request-per-session claim lives in one Envoy's shared data; "
               "two replicas have no shared store and the registry no lock (operator's guide: "
               "route a session's requests to one replica)"))


# The operator's guide (6.3) gives two routes for an Envoy load balancer in front of the
# replicas: a hash of the session's path, and a hash of the gateway's session parameter (what
# Istio's DestinationRule consistentHash.httpQueryParameterName renders).
GUIDE_ROUTES = {"path": "With Envoy as that load balancer",
                "session-parameter": "With Envoy as the balancer, hash on the session parameter"}


def guide_affinity_route(which: str) -> str:
    """A route the operator's guide gives for a load balancer in front of the replicas, as
    written there (the yaml block after the sentence `GUIDE_ROUTES[which]`)."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "operators-guide.md").read_text()
    at = guide.index(GUIDE_ROUTES[which])
    block = re.search(r"```yaml\n(.*?)```", guide[at:], re.S)
    assert block, f"the operator's guide lost its {which} affinity route"
    return block.group(1)


FRONT = """
static_resources:
  listeners:
  - name: front
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          request_timeout: 0s
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
{route}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: gateways
    type: STATIC
    lb_policy: RING_HASH
    # One request per upstream connection: only the hash keeps a session on one replica.
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {{max_requests_per_connection: 1}}
        explicit_http_config: {{http_protocol_options: {{}}}}
    load_assignment:
      cluster_name: gateways
      endpoints:
      - lb_endpoints:
{endpoints}
"""


@pytest.fixture(scope="module", params=sorted(GUIDE_ROUTES))
def affinity_front(request, ledger_stack, ledger_twin, tmp_path_factory):
    """An Envoy load balancer in front of the two replicas, routing with one of the operator's
    guide's affinity routes (RING_HASH on the upload session's path, or on the session
    parameter): its address."""
    yield from front_of_replicas(request.param, ledger_stack, ledger_twin, tmp_path_factory)


def front_of_replicas(which: str, ledger_stack, ledger_twin, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"affinity-front-{which}")
    port = helpers.free_ports(1)[0]
    route = "\n".join(" " * 16 + line for line in guide_affinity_route(which).splitlines())
    endpoints = "\n".join(
        " " * 8 + "- endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %s}}}"
        % s.addr.rsplit(":", 1)[1] for s in (ledger_stack, ledger_twin))
    cfg = d / "front.yaml"
    cfg.write_text(FRONT.format(port=port, route=route, endpoints=endpoints))
    proc = subprocess.Popen([gateway.envoy_path(), "-c", str(cfg), "--concurrency", "1",
                             "--disable-hot-restart", "--base-id", str(300 + port % 1000),
                             "--log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=open(d / "front.log", "wb"),
                            start_new_session=True)
    addr = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"http://{addr}/v2/", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"the front Envoy did not start: {(d / 'front.log').read_text()[-2000:]}"
            time.sleep(0.2)
        yield addr
    finally:
        proc.kill()
        proc.wait()


def layer_piece() -> bytes:
    """64 KiB of a layer: gzip's magic, then random bytes (random bytes alone open like JSON
    now and then, and a JSON blob holding a NUL is refused)."""
    return b"\x1f\x8b" + os.urandom(64 * 1024 - 2)


def filter_requests_served(s: Stack) -> int:
    """Requests the filter listener of `s` has served (Envoy's own count, stat prefix gateway)."""
    text = requests.get(f"http://{s.opts.admin_addr}/stats",
                        params={"filter": r"^http\.gateway\.downstream_rq_total$"},
                        timeout=10).text
    found = re.search(r"http\.gateway\.downstream_rq_total: (\d+)", text)
    assert found, f"no request count in Envoy's stats: {text[:300]!r}"
    return int(found.group(1))


MOVED = "ocicrypt_upload_sessions_moved"


def sessions_moved(s: Stack) -> float:
    """The filter's count of requests that continued a session another replica served last."""
    stats = helpers.envoy_stats(s.opts.admin_addr, MOVED)
    assert MOVED in stats, f"the counter is missing: {sorted(stats)}"
    return stats[MOVED]


def test_moved_sessions_are_counted(ledger_stack, ledger_twin):
    """Without anything keeping a session on one replica (each request sent to the other of the
    two, directly), every request after the first PATCH continues a state the other replica
    sealed: each replica counts the ones it took, so an operator sees sessions that are not
    kept together (alert rule in envoy/observability). Through one replica, none."""
    replicas = [ledger_stack, ledger_twin]
    before = [sessions_moved(s) for s in replicas]
    loc = start_upload(ledger_stack.addr, "demo/moved-counted")
    for k in range(4):
        loc = patched(replicas[k % 2].addr, loc, layer_piece(), k * 64 * 1024)
    moved = [sessions_moved(s) - b for s, b in zip(replicas, before)]
    # PATCH 0 on a (fresh state), 1 on b, 2 on a, 3 on b: three moves, two taken by b.
    assert moved == [1, 2], moved
    before = [sessions_moved(s) for s in replicas]
    loc = start_upload(ledger_twin.addr, "demo/moved-not")
    for k in range(4):
        loc = patched(ledger_twin.addr, loc, layer_piece(), k * 64 * 1024)
    assert [sessions_moved(s) - b for s, b in zip(replicas, before)] == [0, 0]


def test_affinity_route_keeps_a_session_on_one_replica(ledger_stack, ledger_twin, affinity_front):
    """The guide's route sends every request of one upload session to one replica, whatever its
    query (a new `_state` and `_ocicrypt` on each Location), and spreads sessions over both:
    judged by each replica's own count of the requests it served."""
    per_session = []
    moved_before = sessions_moved(ledger_stack) + sessions_moved(ledger_twin)
    for i in range(8):
        before = [filter_requests_served(ledger_stack), filter_requests_served(ledger_twin)]
        loc = start_upload(affinity_front, f"demo/affinity-{i}")
        for k in range(3):
            loc = patched(affinity_front, loc, layer_piece(), k * 64 * 1024)
        after = [filter_requests_served(ledger_stack), filter_requests_served(ledger_twin)]
        per_session.append([a - b for a, b in zip(after, before)])
    # The POST (a path without the session id) may land on either replica; the three PATCHes
    # of a session on one.
    for counts in per_session:
        assert sorted(counts) in ([0, 4], [1, 3]), f"a session's requests were split: {per_session}"
    assert any(c[0] >= 3 for c in per_session) and any(c[1] >= 3 for c in per_session), \
        f"all sessions on one replica: {per_session}"
    # ... and the filters saw no session move.
    assert sessions_moved(ledger_stack) + sessions_moved(ledger_twin) == moved_before


AFFINITY = "two-replicas-behind-the-guides-affinity-route"
AFFINITY_PARAM = "two-replicas-behind-a-balancer-hashing-the-session-parameter"
PEERS = "two-replicas-routing-sessions-among-themselves"


@pytest.fixture(scope="module")
def path_front(ledger_stack, ledger_twin, tmp_path_factory):
    yield from front_of_replicas("path", ledger_stack, ledger_twin, tmp_path_factory)


@pytest.fixture(scope="module")
def param_front(ledger_stack, ledger_twin, tmp_path_factory):
    yield from front_of_replicas("session-parameter", ledger_stack, ledger_twin,
                                 tmp_path_factory)


@pytest.fixture(scope="module")
def session_peers(ledger_stack, tmp_path_factory):
    """Two replicas that keep each upload session on one of them without a load balancer in
    front (operator's guide 6.3): each Envoy's client-facing listener routes on a consistent
    hash of the session's path to one of the two filter listeners. Same registry and state
    key as `ledger_stack`."""
    ports = helpers.free_ports(10)
    inner = [f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"]
    stacks = []
    try:
        for i in range(2):
            state = tmp_path_factory.mktemp(f"stack-peer{i}")
            _write_owner(state)
            shutil.copytree(ledger_stack.opts.state_dir / "keys", state / "keys")
            extra = {"wasm_path": WASM_OVERRIDE} if WASM_OVERRIDE is not None else {}
            gw = gateway.Gateway(gateway.Options(
                state_dir=state, gateway_addr=f"127.0.0.1:{ports[2 + 4 * i]}",
                admin_addr=f"127.0.0.1:{ports[3 + 4 * i]}",
                keyservice_addr=f"127.0.0.1:{ports[4 + 4 * i]}",
                registry_addr=ledger_stack.registry_addr, start_registry=False,
                filter=True, keys_source="inline", state_key=ledger_stack.opts.state_key,
                peers=inner, inner_addr=inner[i], **extra),
                log=lambda m: print(m, file=sys.stderr))
            gw.start()
            s = Stack(f"peer{i}", gw, None, ledger_stack.keys)
            STARTED.append(s)
            stacks.append(s)
        yield stacks
    finally:
        for s in stacks:
            stop_stack(s)


def test_replicas_route_a_session_to_one_filter(session_peers):
    """Without a load balancer in front, each replica's client-facing listener sends every
    request of one upload session to the same filter listener (its own or the other's),
    whichever replica the client reaches; sessions spread over both filters: judged by each
    filter listener's own request count."""
    per_session = []
    for i in range(8):
        before = [filter_requests_served(s) for s in session_peers]
        loc = start_upload(session_peers[0].addr, f"demo/peers-{i}")
        for k in range(4):
            # Each request to the other replica than the last.
            loc = patched(session_peers[(k + 1) % 2].addr, loc, layer_piece(),
                          k * 64 * 1024)
        per_session.append([filter_requests_served(s) - b for s, b in zip(session_peers, before)])
    for counts in per_session:
        assert sorted(counts) in ([0, 5], [1, 4]), f"a session's requests were split: {per_session}"
    assert any(c[0] >= 4 for c in per_session) and any(c[1] >= 4 for c in per_session), \
        f"all sessions on one filter: {per_session}"


@pytest.mark.parametrize("mode", ["sealed", "shared-data", TWO_REPLICA_RACE, AFFINITY,
                                  AFFINITY_PARAM, PEERS])
def test_concurrent_patches_on_one_session(request, mode, tmp_path):
    """Finding 1 (two concurrent PATCHes on one session): after a first PATCH, two PATCHes of
    4 MiB with different bytes are sent with the same Location at the same time, through one
    Envoy (sealed state, or state in shared data) or one through each of two replicas
    (headers and HEAD_START bytes of each first, the rest once both are in flight). At most
    one is answered 202; the other is refused (by the filter, or by the registry). The
    upload's data file never holds more than one ciphertext per offset, and whatever is
    committed with a 202's Location is stored as bytes that hash to its digest and decrypt to
    that PATCH's plaintext."""
    s = request.getfixturevalue("ks_stack" if mode == "shared-data" else "ledger_stack")
    # two-replicas: one PATCH through each replica (no gateway-side state is shared); behind
    # the guide's affinity route, both through the load balancer in front of the two.
    addrs = [s.addr, request.getfixturevalue("ledger_twin").addr if mode == "two-replicas"
             else s.addr]
    if mode == AFFINITY:
        addrs = [request.getfixturevalue("path_front")] * 2
    if mode == AFFINITY_PARAM:
        addrs = [request.getfixturevalue("param_front")] * 2
    if mode == PEERS:
        # One PATCH to each replica's client-facing listener.
        addrs = [p.addr for p in request.getfixturevalue("session_peers")]
    repo = f"demo/ks-race-{mode}"
    common = os.urandom(2 * MIB)
    layers = [tar_of(common + os.urandom(3 * MIB)) for _ in range(2)]
    first = layers[0][:MIB]
    assert layers[1][:MIB] == first
    bodies = [layer[MIB:] for layer in layers]
    loc1 = patched(s.addr, start_upload(s.addr, repo), first, 0)

    headers = {"Content-Type": "application/octet-stream",
               "Content-Range": f"{len(first)}-{len(first) + len(bodies[0]) - 1}"}
    racers = [SlowRequest(addr, "PATCH", loc1, headers, len(b)) for addr, b in zip(addrs, bodies)]
    for r, body in zip(racers, bodies):
        r.send(body[:HEAD_START])
    time.sleep(0.5)
    for r, body in zip(racers, bodies):
        r.send_later(body[HEAD_START:])
    answers = [r.answer() for r in racers]
    summary = [f"{a.status} {a.headers.get('x-ocicrypt-filter', '')} {a.body[:200]!r}"
               for a in answers]

    print(f"concurrent PATCHes ({mode}): {summary}")
    problems = []
    winners = [i for i, a in enumerate(answers) if a.status == 202]
    if len(winners) != 1:
        problems.append(f"{len(winners)} of the two concurrent PATCHes were answered 202")
    problems += [f"PATCH {i} answered {a.status}, neither taken nor refused"
                 for i, a in enumerate(answers) if a.status != 202 and a.status < 400]
    data = upload_data(s.storage, repo, loc1)
    if data is not None:
        if len(data) > len(first) + len(bodies[0]):
            problems.append(f"the upload's data file holds {len(data)} bytes: both PATCHes "
                            "were stored")
        problems += keystream_reuse(data, [first, *bodies])
    for i in winners:
        loc = helpers.location_path(answers[i].headers["location"])
        image = one_layer_image(tmp_path / f"img{i}", layers[i])
        done = finish(s.addr, loc, image.layers[0].digest)
        print(f"finishing with PATCH {i}'s Location: {done.status} {done.body[:200]!r}")
        if done.status == 201:
            problems += [f"PATCH {i}'s blob: {p}" for p in commit_image_problems(
                s, repo, image, tmp_path / f"out{i}", s.keys["ec"]["private"])]
        elif done.status < 400:
            problems.append(f"finishing with PATCH {i}'s Location: {done.status}")
    assert not problems, f"answers {summary}: " + "; ".join(problems)


# --------------------------------------------------------------------------------------------
# finding 3: recipient rotation


def new_ec_key(d: Path) -> Tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = d / "new.pem", d / "new.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def test_manifest_reusing_a_layer_from_before_a_rotation_is_refused(ks_stack, tmp_path):
    """Finding 3 (rotation): an image pushed to rotated/app (project `rotated`,
    recipients from the key service: the stack's RSA and EC keys); the project's recipients
    are replaced in the key service by a new key; once the filter has refreshed (HEAD of the
    layer answers 404), a manifest naming the layer's plaintext digest (a client skipping the
    upload) is refused (400 MANIFEST_INVALID, naming the rotation) and not stored; a full
    re-push with skopeo uploads the layer again and the stored image opens with the new key
    only. (Project `rotated` rather than `demo`: the module's other tests keep demo's keys.)"""
    s = ks_stack
    repo = "rotated/app"
    publish_recipients(s, "rotated", [s.keys["rsa"]["public"], s.keys["ec"]["public"]])
    image = helpers.build_image(tmp_path / "layout", "v1", 1 * MIB, marker=helpers.new_marker())
    layer = image.layers[0].digest
    helpers.skopeo_push(image, f"{s.addr}/{repo}:v1", extra=["--preserve-digests"])
    before = s.direct().get_manifest(repo, "v1").json()
    head = requests.head(f"http://{s.addr}/v2/{repo}/blobs/{layer}", timeout=30)
    assert head.status_code == 200, \
        f"precondition: the gateway knows the layer ({head.status_code})"

    priv, pub = new_ec_key(tmp_path)
    keyservice(s, "set-recipients", "--project", "rotated", "--pem", str(pub))
    deadline = time.monotonic() + 10 * REFRESH + 10
    while head.status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
        head = requests.head(f"http://{s.addr}/v2/{repo}/blobs/{layer}", timeout=30)
    assert head.status_code == 404, "the filter did not pick up the rotation (HEAD of the " \
        f"layer still {head.status_code})"

    ans = Answer.of(s.via_gateway().put_manifest(repo, "v2", image.manifest_bytes))
    stored = s.direct().get_manifest(repo, "v2")
    assert stored.status_code == 404, \
        f"{repo}:v2 stored ({ans.status} from the gateway) naming layers for the removed " \
        f"recipients: {stored.text[:500]}"
    assert_filter_refusal(ans, 400, "MANIFEST_INVALID")
    message = " ".join(e.get("message", "") for e in ans.json()["errors"])
    assert re.search(r"rotat", message, re.I), f"the refusal does not name the rotation: {message}"

    helpers.skopeo_push(image, f"{s.addr}/{repo}:v3", extra=["--preserve-digests"])
    after = s.direct().get_manifest(repo, "v3").json()
    helpers.assert_encrypted_manifest(after, image)
    assert after["layers"][0]["digest"] != before["layers"][0]["digest"], \
        "the re-push reused the ciphertext of the removed recipients"
    helpers.skopeo_pull(f"{s.registry_addr}/{repo}:v3", tmp_path / "new", "v1", keys=[priv])
    helpers.assert_decrypted_matches(tmp_path / "new", "v1", image)
    for kind in ("rsa", "ec"):
        old = helpers.skopeo_pull(f"{s.registry_addr}/{repo}:v3", tmp_path / f"old-{kind}", "v1",
                                  keys=[s.keys[kind]["private"]], check=False)
        assert old.returncode != 0, f"the removed {kind} recipient opens the re-pushed image"


def test_mount_and_repush_after_a_rotation_encrypt_to_the_new_recipients(ks_stack, tmp_path):
    """The recipient check on mounts (finding 3's HEAD check, for `POST ?mount=`): an image
    pushed to remount/src for the stack's RSA and EC keys; the project's recipients replaced
    by a new key. A mount of the layer into remount/dst is then turned into an upload (202;
    the registry is asked for no mount and links nothing), and skopeo's push of the same image
    to remount/dst uploads the layer again (skopeo checks a mount candidate with a HEAD first,
    which the rotation turned into 404; clients that mount blindly meet the check above): the
    registry receives its bytes, and the stored image opens with the new key only."""
    s = ks_stack
    src, dst = "remount/src", "remount/dst"
    publish_recipients(s, "remount", [s.keys["rsa"]["public"], s.keys["ec"]["public"]])
    image = helpers.build_image(tmp_path / "layout", "v1", 1 * MIB, marker=helpers.new_marker())
    layer = image.layers[0].digest
    helpers.skopeo_push(image, f"{s.addr}/{src}:v1", extra=["--preserve-digests"])
    old_cipher = s.direct().get_manifest(src, "v1").json()["layers"][0]["digest"]

    priv, pub = new_ec_key(tmp_path)
    keyservice(s, "set-recipients", "--project", "remount", "--pem", str(pub))
    deadline = time.monotonic() + 10 * REFRESH + 10
    head = requests.head(f"http://{s.addr}/v2/{src}/blobs/{layer}", timeout=30)
    while head.status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
        head = requests.head(f"http://{s.addr}/v2/{src}/blobs/{layer}", timeout=30)
    assert head.status_code == 404, "the filter did not pick up the rotation"

    seen = helpers.RegistryLog.of(s)
    r = s.via_gateway().request("POST", f"/v2/{dst}/blobs/uploads/",
                                params={"mount": layer, "from": src},
                                headers={"Content-Length": "0"})
    assert r.status_code == 202, f"a mount of a layer for the removed recipients: " \
        f"{r.status_code} {dict(r.headers)}"
    posts = [q for q in seen.requests() if q[0] == "POST" and dst in q[1]]
    assert posts and not [q for q in posts if "mount=" in q[1]], seen.requests()
    assert old_cipher not in helpers.repo_layer_links(s.storage, dst)

    seen.mark()
    helpers.skopeo_push(image, f"{s.addr}/{dst}:v1", extra=["--preserve-digests"])
    assert [q for q in seen.requests() if q[0] == "POST" and "mount=" in q[1]] == [], \
        seen.requests()
    assert seen.blob_writes(), f"the layer was not uploaded again: {seen.requests()}"
    after = s.direct().get_manifest(dst, "v1").json()
    helpers.assert_encrypted_manifest(after, image)
    assert after["layers"][0]["digest"] != old_cipher, \
        "remount/dst reuses the ciphertext of the removed recipients"
    helpers.skopeo_pull(f"{s.registry_addr}/{dst}:v1", tmp_path / "new", "v1", keys=[priv])
    helpers.assert_decrypted_matches(tmp_path / "new", "v1", image)
    for kind in ("rsa", "ec"):
        old = helpers.skopeo_pull(f"{s.registry_addr}/{dst}:v1", tmp_path / f"old-{kind}", "v1",
                                  keys=[s.keys[kind]["private"]], check=False)
        assert old.returncode != 0, f"the removed {kind} recipient opens the re-pushed image"


# --------------------------------------------------------------------------------------------
# finding 4: mounts ledgered; a project named `projects`


def test_same_project_mount_is_ledgered_in_the_registry(ledger_twin, tmp_path):
    """Finding 4a (mount not ledgered): through a replica with `replicas.state_key`, an image
    pushed to demo/a, its layers mounted into demo/b (201); the registry then holds the ledger
    tags `ocicrypt.sha256-<hex>` in demo/b; after the replica restarts (fresh Envoy, same
    registry) the manifest PUT in demo/b is accepted (201), stored encrypted, and decrypts."""
    s = ledger_twin
    src, dst = "demo/ks-mount-a", "demo/ks-mount-b"
    image = helpers.build_image(tmp_path / "layout", "v1", 1 * MIB, marker=helpers.new_marker())
    helpers.skopeo_push(image, f"{s.addr}/{src}:v1", extra=["--preserve-digests"])
    for d in image.layer_digests:
        ans = request(s.addr, "POST", f"/v2/{dst}/blobs/uploads/?mount={d}&from={src}")
        assert ans.status == 201, f"mount of {d}: {ans.status} {ans.body[:300]!r}"
    r = s.via_gateway().upload_monolithic(dst, image.config.path.read_bytes())
    assert r.status_code == 201, r.text
    tags = helpers.tags(s.direct(), dst)
    missing = [d for d in image.layer_digests
               if "ocicrypt.sha256-" + d.split(":", 1)[1] not in tags]

    s.gw.stop()
    s.gw.start()
    r = s.via_gateway().put_manifest(dst, "v1", image.manifest_bytes)
    assert not missing and r.status_code == 201, \
        f"mounted layers without a ledger tag in {dst}: {missing} (tags {tags}); manifest PUT " \
        f"after a restart: {r.status_code} {r.text[:300]}"
    helpers.assert_encrypted_manifest(s.direct().get_manifest(dst, "v1").json(), image)
    helpers.skopeo_pull(f"{s.registry_addr}/{dst}:v1", tmp_path / "out", "v1",
                        keys=[s.keys["rsa"]["private"]])
    helpers.assert_decrypted_matches(tmp_path / "out", "v1", image)


def test_project_named_projects(ks_stack, tmp_path):
    """Finding 4b (shared-data key collision): project `projects` (policy `projects/**`
    encrypted, recipients from the key service) can be pushed to; the stored image is
    encrypted and decrypts with its recipient's key."""
    s = ks_stack
    publish_recipients(s, "projects", [s.keys["ec"]["public"]])
    image = helpers.build_image(tmp_path / "layout", "v1", 1 * MIB, marker=helpers.new_marker())
    pushed = helpers.skopeo_push(image, f"{s.addr}/projects/app:v1",
                                 extra=["--preserve-digests"], check=False)
    assert pushed.returncode == 0, pushed.stderr[-1500:]
    helpers.assert_encrypted_manifest(s.direct().get_manifest("projects/app", "v1").json(), image)
    helpers.skopeo_pull(f"{s.registry_addr}/projects/app:v1", tmp_path / "out", "v1",
                        keys=[s.keys["ec"]["private"]])
    helpers.assert_decrypted_matches(tmp_path / "out", "v1", image)
    assert not helpers.scan_for(s.storage, [image.marker.encode()])


# --------------------------------------------------------------------------------------------
# finding 1: upload state in Envoy's logs


def test_logs_hold_no_upload_state(ledger_stack, tmp_path):
    """Finding 1 / what to build 1 (sealed Locations in the access log): after a chunked push
    through a stack with `replicas.state_key`, neither Envoy's access log nor Envoy's own log
    holds any `_ocicrypt` or `_state` value the gateway answered in a Location (searched as
    sent, decoded, and by a 32-character prefix)."""
    s = ledger_stack
    repo = "demo/ks-logs"
    access = s.access_log()
    envoy_offset = s.envoy_log.stat().st_size
    layer = tar_of(os.urandom(3 * MIB))
    loc = start_upload(s.addr, repo)
    locations = [loc]
    for start in range(0, len(layer), MIB):
        loc = patched(s.addr, loc, layer[start:start + MIB], start)
        locations.append(loc)
    done = finish(s.addr, loc, sha256_digest(layer))
    assert done.status == 201, f"{done.status} {done.body[:300]!r}"
    assert any(SEALED in params(l) for l in locations), \
        f"precondition: sealed Locations {locations}"

    access.entries()  # waits for the flush
    logs = {"access log": access.path, "Envoy's log": s.envoy_log}
    texts = {"access log": access.path.read_bytes()[access.offset:].decode(errors="replace"),
             "Envoy's log": s.envoy_log.read_bytes()[envoy_offset:].decode(errors="replace")}
    assert texts["access log"].strip(), "precondition: the push was logged"
    from urllib.parse import unquote

    problems = []
    for l in locations:
        for name in (STATE, SEALED):
            value = params(l).get(name)
            if not value:
                continue
            forms = {value, unquote(value), unquote(value)[:32]}
            for log, text in texts.items():
                if any(f in text for f in forms):
                    problems.append(f"{log} ({logs[log]}) holds the {name} value {value[:24]}…")
    assert not problems, "; ".join(sorted(set(problems)))
