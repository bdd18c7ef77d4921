"""Two gateway replicas (two Envoys with the filter) in front of one registry, sharing only
`replicas.state_key`: the requests of one push alternate between them, with no affinity, and the
push still succeeds, decrypts and stores no plaintext. The upload state travels sealed in the
Location the client echoes; the ledger is kept in the registry. A restart of a replica between
the blob uploads and the manifest loses nothing."""
import base64
import os
import shutil

import pytest
import requests

import gateway
import helpers
from conftest import STARTED, Stack, _write_owner

pytestmark = [pytest.mark.filter]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    key = base64.b64encode(os.urandom(32)).decode()
    ports = helpers.free_ports(7)
    first_state = tmp_path_factory.mktemp("replica-a")
    _write_owner(first_state)
    a = gateway.Gateway(gateway.Options(
        state_dir=first_state, gateway_addr=f"127.0.0.1:{ports[0]}",
        registry_addr=f"127.0.0.1:{ports[1]}", admin_addr=f"127.0.0.1:{ports[2]}",
        keyservice_addr=f"127.0.0.1:{ports[3]}", state_key=key, keys_source="inline"))
    a.start()
    second_state = tmp_path_factory.mktemp("replica-b")
    _write_owner(second_state)
    # The second replica encrypts to the same recipients and shares only the sealing key.
    shutil.copytree(first_state / "keys", second_state / "keys")
    b_opts = gateway.Options(
        state_dir=second_state, gateway_addr=f"127.0.0.1:{ports[4]}",
        registry_addr=f"127.0.0.1:{ports[1]}", admin_addr=f"127.0.0.1:{ports[5]}",
        keyservice_addr=f"127.0.0.1:{ports[6]}", state_key=key, keys_source="inline",
        start_registry=False)
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


def test_sealed_state_is_required_and_checked(replicas):
    a, b = replicas
    r = requests.post(f"http://{a.addr}/v2/demo/tamper/blobs/uploads/", timeout=30)
    loc = helpers.location_path(r.headers["Location"])
    r = requests.patch(f"http://{b.addr}{loc}", data=b"\x1f\x8b" + os.urandom(4096), timeout=30,
                       headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 202
    loc = helpers.location_path(r.headers["Location"])
    assert "_ocicrypt=" in loc
    tampered = loc.replace("_ocicrypt=", "_ocicrypt=AAAA")
    r = requests.put(f"http://{a.addr}{tampered}&digest=sha256:{'0' * 64}", timeout=30)
    assert r.status_code == 400 and helpers.oci_error_codes(r) == ["BLOB_UPLOAD_INVALID"], r.text


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
    a, b = replicas
    image = helpers.build_image(tmp_path / "layout", "v1", 2 * helpers.MIB, marker=helpers.new_marker())
    alternating_push([a.addr], "demo/across", image)
    # The other replica has never seen these blobs: it reads the registry's ledger.
    for layer in image.layers:
        r = requests.head(f"http://{b.addr}/v2/demo/across/blobs/{layer.digest}", timeout=30)
        assert r.status_code == 200, r.status_code
        assert r.headers["Docker-Content-Digest"] == layer.digest
    unknown = "sha256:" + "1" * 64
    assert requests.head(f"http://{b.addr}/v2/demo/across/blobs/{unknown}", timeout=30).status_code == 404
