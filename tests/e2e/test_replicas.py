"""Two gateway replicas (two Envoys with the filter) in front of one registry, sharing only
`replicas.state_key`: the requests of one push alternate between them, with no affinity, and the
push still succeeds, decrypts and stores no plaintext. The upload state travels sealed in the
Location the client echoes; the ledger is kept in the registry. A restart of a replica between
the blob uploads and the manifest loses nothing."""
import base64
import os
import re
import shutil

import pytest
import requests

import gateway
import helpers
from conftest import STARTED, WASM_OVERRIDE, Stack, _write_owner

pytestmark = [pytest.mark.filter]


#: E2E_WASM_PATH reaches these gateways too (they are not started by conftest).
WASM = {"wasm_path": WASM_OVERRIDE} if WASM_OVERRIDE is not None else {}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    key = base64.b64encode(os.urandom(32)).decode()
    ports = helpers.free_ports(7)
    first_state = tmp_path_factory.mktemp("replica-a")
    _write_owner(first_state)
    a = gateway.Gateway(gateway.Options(
        state_dir=first_state, gateway_addr=f"127.0.0.1:{ports[0]}",
        registry_addr=f"127.0.0.1:{ports[1]}", admin_addr=f"127.0.0.1:{ports[2]}",
        keyservice_addr=f"127.0.0.1:{ports[3]}", state_key=key, keys_source="inline", **WASM))
    a.start()
    second_state = tmp_path_factory.mktemp("replica-b")
    _write_owner(second_state)
    # The second replica encrypts to the same recipients and shares only the sealing key.
    shutil.copytree(first_state / "keys", second_state / "keys")
    b_opts = gateway.Options(
        state_dir=second_state, gateway_addr=f"127.0.0.1:{ports[4]}",
        registry_addr=f"127.0.0.1:{ports[1]}", admin_addr=f"127.0.0.1:{ports[5]}",
        keyservice_addr=f"127.0.0.1:{ports[6]}", state_key=key, keys_source="inline",
        start_registry=False, **WASM)
    b = gateway.Gateway(b_opts).start()
    stacks = [Stack("replica-a", a, None, a.keys), Stack("replica-b", b, None, b.keys)]
    STARTED.extend(stacks)
    yield stacks
    for s in stacks:
        STARTED.remove(s)
    b.stop()
    a.stop()


def alternating_push(gateways, repo, image, chunk=1 << 20):
    """Push `image`, each request to the next gateway in turn: POST, PATCHes, PUT per blob."""
    turn = [0]

    def next_base():
        turn[0] += 1
        return f"http://{gateways[turn[0] % len(gateways)]}"

    for blob in [image.config, *image.layers]:
        data = blob.path.read_bytes()
        r = requests.post(f"{next_base()}/v2/{repo}/blobs/uploads/", timeout=30)
        assert r.status_code == 202, r.text
        loc = helpers.location_path(r.headers["Location"])
        for start in range(0, len(data), chunk):
            part = data[start:start + chunk]
            r = requests.patch(next_base() + loc, data=part, timeout=60, headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{start + len(part) - 1}"})
            assert r.status_code == 202, r.text
            loc = helpers.location_path(r.headers["Location"])
        sep = "&" if "?" in loc else "?"
        r = requests.put(f"{next_base()}{loc}{sep}digest={blob.digest}", timeout=60)
        assert r.status_code == 201, r.text
        assert r.headers["Docker-Content-Digest"] == blob.digest
    return next_base


def test_push_spread_over_two_replicas(replicas, tmp_path):
    a, b = replicas
    image = helpers.build_image(tmp_path / "layout", "v1", 5 * helpers.MIB, marker=helpers.new_marker())
    next_base = alternating_push([a.addr, b.addr], "demo/spread", image)
    r = requests.put(f"{next_base()}/v2/demo/spread/manifests/v1", data=image.manifest_bytes,
                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, timeout=60)
    assert r.status_code == 201, r.text
    manifest = a.direct().get_manifest("demo/spread", "v1").json()
    helpers.assert_encrypted_manifest(manifest, image)
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{a.registry_addr}/demo/spread:v1", out, "v1", keys=[a.keys["rsa"]["private"]])
    helpers.assert_decrypted_matches(out, "v1", image)
    assert not helpers.scan_for(a.storage, [image.marker.encode()])


@pytest.fixture(scope="module")
def foreign_replica(replicas, tmp_path_factory):
    """A gateway of another deployment in front of the same registry: the same recipients, its
    own `replicas.state_key`."""
    a, _ = replicas
    ports = helpers.free_ports(3)
    state = tmp_path_factory.mktemp("replica-foreign")
    _write_owner(state)
    shutil.copytree(a.opts.state_dir / "keys", state / "keys")
    gw = gateway.Gateway(gateway.Options(
        state_dir=state, gateway_addr=f"127.0.0.1:{ports[0]}",
        registry_addr=a.registry_addr, admin_addr=f"127.0.0.1:{ports[1]}",
        keyservice_addr=f"127.0.0.1:{ports[2]}",
        state_key=base64.b64encode(os.urandom(32)).decode(), keys_source="inline",
        start_registry=False, **WASM)).start()
    s = Stack("replica-foreign", gw, None, gw.keys)
    STARTED.append(s)
    yield s
    STARTED.remove(s)
    gw.stop()


def first_patch(addr: str, repo: str):
    """POST and a first PATCH (tar-looking bytes: encrypted) through `addr`; the Location and
    the bytes sent."""
    r = requests.post(f"http://{addr}/v2/{repo}/blobs/uploads/", timeout=30)
    assert r.status_code == 202, r.text
    first = helpers._tar_bytes([("a.bin", os.urandom(8192))])
    r = requests.patch(f"http://{addr}{helpers.location_path(r.headers['Location'])}",
                       data=first, timeout=30, headers={
                           "Content-Type": "application/octet-stream",
                           "Content-Range": f"0-{len(first) - 1}"})
    assert r.status_code == 202, r.text
    loc = helpers.location_path(r.headers["Location"])
    assert "_ocicrypt=" in loc, loc
    return loc, len(first)


SEALED_STATE_CASES = {
    # (how the Location is spoiled, the start of the filter's refusal)
    "tampered": "the gateway's upload state in this URL does not open",
    "missing": "the registry holds ",
    "foreign-key": "the gateway's upload state in this URL does not open",
}


@pytest.mark.parametrize("how", sorted(SEALED_STATE_CASES))
def test_sealed_state_is_required_and_checked(replicas, foreign_replica, how):
    """The next PATCH of an upload, sent to the other replica with its sealed state
    (`_ocicrypt`) altered, removed, or sealed by a gateway with another state key, is refused
    by the filter (400) and never reaches the registry: a continuation without the right
    state would reuse keystream or pass plaintext."""
    a, b = replicas
    repo = f"demo/sealed-{how}"
    loc, offset = first_patch(foreign_replica.addr if how == "foreign-key" else a.addr, repo)
    upload_id = loc.split("?")[0].rsplit("/", 1)[1]
    if how == "tampered":
        token = loc.split("_ocicrypt=", 1)[1].split("&", 1)[0]
        mid = len(token) // 2
        spoiled = token[:mid] + ("A" if token[mid] != "A" else "B") + token[mid + 1:]
        loc = loc.replace(token, spoiled)
    elif how == "missing":
        loc = re.sub(r"([?&])_ocicrypt=[^&]*&?", r"\1", loc).rstrip("&?")
        assert "_ocicrypt=" not in loc and "_state=" in loc, loc
    seen = helpers.RegistryLog.of(a)
    chunk = b'{"plaintext": "' + helpers.new_marker().encode() + b'"}'
    r = requests.patch(f"http://{b.addr}{loc}", data=chunk, timeout=30, headers={
        "Content-Type": "application/octet-stream",
        "Content-Range": f"{offset}-{offset + len(chunk) - 1}"})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert r.headers.get("x-ocicrypt-filter") == "refused", dict(r.headers)
    (err,) = r.json()["errors"]
    assert err["code"] == "BLOB_UPLOAD_INVALID", err
    assert err["message"].startswith(SEALED_STATE_CASES[how]), err
    assert not [q for q in seen.requests() if upload_id in q[1]], seen.requests()


def test_restart_between_blobs_and_manifest(replicas, tmp_path):
    a, b = replicas
    image = helpers.build_image(tmp_path / "layout", "v1", 2 * helpers.MIB, marker=helpers.new_marker())
    alternating_push([b.addr], "demo/restart", image)
    # Restart the replica that took every blob: its shared data (local ledger) is gone.
    b.gw.stop()
    b.gw.start()
    r = requests.put(f"http://{b.addr}/v2/demo/restart/manifests/v1", data=image.manifest_bytes,
                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, timeout=60)
    assert r.status_code == 201, r.text
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{a.registry_addr}/demo/restart:v1", out, "v1", keys=[a.keys["ec"]["private"]])
    helpers.assert_decrypted_matches(out, "v1", image)


def test_repush_through_the_other_replica_uploads_nothing(replicas, tmp_path):
    """An image pushed through one replica, pushed again by skopeo through the other, which has
    never seen its blobs: that replica reads the registry's ledger, answers the plaintext
    digests' HEADs, and the registry receives no blob bytes at all (no PATCH or PUT of an
    upload session in its own log); the re-pushed tag decrypts."""
    a, b = replicas
    image = helpers.build_image(tmp_path / "layout", "v1", 2 * helpers.MIB, marker=helpers.new_marker())
    alternating_push([a.addr], "demo/across", image)
    r = requests.put(f"http://{a.addr}/v2/demo/across/manifests/v1", data=image.manifest_bytes,
                     headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
                     timeout=60)
    assert r.status_code == 201, r.text
    unknown = "sha256:" + "1" * 64
    assert requests.head(f"http://{b.addr}/v2/demo/across/blobs/{unknown}", timeout=30).status_code == 404

    seen = helpers.RegistryLog.of(a)
    helpers.skopeo_push(image, f"{b.addr}/demo/across:v2", extra=["--preserve-digests"])
    requests_seen = seen.requests()
    assert [q for q in requests_seen if q[0] == "GET" and "/manifests/ocicrypt.sha256-" in q[1]], \
        f"replica b did not read the registry's ledger: {requests_seen}"
    assert seen.blob_writes() == [], f"blob bytes went to the registry again: {requests_seen}"
    helpers.skopeo_pull(f"{a.registry_addr}/demo/across:v2", tmp_path / "out", "v1",
                        keys=[a.keys["ec"]["private"]])
    helpers.assert_decrypted_matches(tmp_path / "out", "v1", image)
