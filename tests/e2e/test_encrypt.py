"""Pushes through the filter into encrypted repositories (demo/**), checked by an oracle that is
independent of our code: skopeo (containers/ocicrypt) decrypts with each demo private key and
the layers must come back bit for bit; the registry's storage must hold no plaintext."""
from __future__ import annotations

import base64
import json

import pytest

import helpers
from conftest import PUSH_FIXTURES, Push
from helpers import MT_INDEX, sha256_digest

pytestmark = [pytest.mark.filter, pytest.mark.clients]


def stored_image_manifest(stack, push: Push) -> dict:
    """The image manifest the registry holds for the push (following an index to its child)."""
    direct = stack.direct()
    r = direct.get_manifest(push.repo, push.tag)
    assert r.status_code == 200, f"{push.ref} not in the registry: {r.status_code} {r.text[:300]}"
    manifest = r.json()
    if manifest.get("mediaType") == MT_INDEX:
        (child,) = manifest["manifests"]
        r = direct.get_manifest(push.repo, child["digest"])
        assert r.status_code == 200, f"index child {child['digest']} missing: {r.status_code}"
        assert sha256_digest(r.content) == child["digest"]
        manifest = r.json()
    return manifest


@pytest.mark.parametrize("push_name", PUSH_FIXTURES)
def test_push_stores_encrypted_layers(request, stack, push_name):
    push: Push = request.getfixturevalue(push_name)
    push.check()
    manifest = stored_image_manifest(stack, push)
    helpers.assert_encrypted_manifest(manifest, push.image, exact=push.exact)
    direct = stack.direct()
    for layer in manifest["layers"]:
        data = direct.get_blob(push.repo, layer["digest"])
        assert sha256_digest(data) == layer["digest"] and len(data) == layer["size"]
        jwe = json.loads(base64.b64decode(layer["annotations"][helpers.ANN_KEYS_JWE]))
        algs = sorted(r["header"]["alg"] for r in jwe.get("recipients", []))
        assert algs == ["ECDH-ES+A256KW", "RSA-OAEP"], f"one JWE for both demo recipients: {jwe}"
    assert direct.get_blob(push.repo, push.image.config.digest) == \
        push.image.config.path.read_bytes()


@pytest.mark.parametrize("key", ["rsa", "ec"])
@pytest.mark.parametrize("push_name", PUSH_FIXTURES)
def test_oracle_decrypts_with_each_key(request, stack, push_name, key, tmp_path):
    """skopeo --decryption-key <one demo key> straight from the registry: original layers."""
    push: Push = request.getfixturevalue(push_name)
    push.check()
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{stack.registry_addr}/{push.ref}", out, push.tag,
                        keys=[stack.keys[key]["private"]])
    helpers.assert_decrypted_matches(out, push.tag, push.image, exact=push.exact)


def test_oracle_pull_through_gateway(stack, push_skopeo, tmp_path):
    push_skopeo.check()
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{stack.addr}/{push_skopeo.ref}", out, "v1",
                        keys=[stack.keys["rsa"]["private"]])
    helpers.assert_decrypted_matches(out, "v1", push_skopeo.image, exact=True)


def test_wrong_key_fails_and_no_key_gives_only_ciphertext(stack, push_skopeo, wrong_key, tmp_path):
    push_skopeo.check()
    src = f"{stack.registry_addr}/{push_skopeo.ref}"
    proc = helpers.skopeo_pull(src, tmp_path / "wrong", "v1", keys=[wrong_key], check=False)
    assert proc.returncode != 0, "a key that is no recipient must not decrypt"
    assert "decrypt" in proc.stderr, proc.stderr[-2000:]
    # Without a key skopeo copies the encrypted image as it is (and succeeds): no plaintext.
    out = tmp_path / "nokey"
    helpers.skopeo_pull(src, out, "v1")
    manifest, _, _ = helpers.read_layout(out, "v1")
    assert all(l["mediaType"].endswith("+encrypted") for l in manifest["layers"])
    assert not set(l["digest"] for l in manifest["layers"]) & set(push_skopeo.image.layer_digests)
    assert not helpers.scan_for(out, [push_skopeo.image.marker.encode()])


@pytest.mark.parametrize("push_name", ["push_skopeo", "push_ctr", "push_oras_mono",
                                       "push_oras_chunked"])
def test_client_sees_its_own_digests(request, stack, push_name):
    """Responses keep the client's view: blob uploads answer with the plaintext digest the client
    pushed, and no ciphertext digest leaks into Docker-Content-Digest or Location."""
    push: Push = request.getfixturevalue(push_name)
    push.check()
    stored = stored_image_manifest(stack, push)
    ciphertext = {l["digest"] for l in stored["layers"]}
    plaintext = {push.image.config.digest, *push.image.layer_digests}
    uploads = [e for e in push.entries if "/blobs/" in (e["path"] or "")]
    done = [e for e in uploads if e["method"] == "PUT" and e["status"] == 201]
    assert done, AccessLogSummary(push)
    assert {e["resp_digest"] for e in done} <= plaintext, AccessLogSummary(push)
    assert set(push.image.layer_digests) <= {e["resp_digest"] for e in done}, AccessLogSummary(push)
    for e in uploads:
        for value in (e.get("resp_digest") or "", e.get("resp_location") or ""):
            assert not any(c.split(":")[1] in value for c in ciphertext), \
                f"ciphertext digest leaked to the client: {e}"


def AccessLogSummary(push: Push) -> str:  # noqa: N802 - reads as a message
    return helpers.AccessLog.summary(push.entries)


def test_no_plaintext_in_registry_storage(request, stack, tmp_path):
    """After every client pushed: the MARKERs appear nowhere under the registry's storage
    (blobs, uploads, manifests), and no blob exists under a plaintext layer digest."""
    pushes = [request.getfixturevalue(n) for n in PUSH_FIXTURES]
    assert any(p.error is None for p in pushes), "no push succeeded: the scan would prove nothing"
    markers = {p.image.marker.encode() for p in pushes}
    hits = helpers.scan_for(stack.storage, markers)
    assert not hits, f"plaintext marker found in registry storage: {hits}"

    plaintext = set()
    for p in pushes:
        plaintext.update(p.image.layer_digests)
        if not p.exact and p.error is None:
            # the layers skopeo really pushed (gzipped on the fly): learn them from the oracle
            out = tmp_path / f"oracle-{p.client}"
            helpers.skopeo_pull(f"{stack.registry_addr}/{p.ref}", out, p.tag,
                                keys=[stack.keys["rsa"]["private"]])
            manifest, _, _ = helpers.read_layout(out, p.tag)
            plaintext.update(l["digest"] for l in manifest["layers"])
    present = [d for d in sorted(plaintext) if helpers.registry_blob_path(stack.storage, d).exists()]
    assert not present, f"plaintext layer blobs stored: {present}"
    ok = [p for p in pushes if p.error is None]
    assert helpers.registry_blob_path(stack.storage, ok[0].image.config.digest).exists(), \
        "the (never encrypted) config is missing: the storage path layout is not what we think"


def test_repush_to_another_encrypted_repository(stack, push_skopeo, tmp_path):
    """The same image again into demo/app-again: skopeo's blob-info cache remembers the blobs in
    demo/app and tries HEAD there and a cross-repo mount; the result must still be a correctly
    encrypted image that decrypts."""
    push_skopeo.check()
    log = stack.access_log()
    helpers.skopeo_push(push_skopeo.image, f"{stack.addr}/demo/app-again:v1",
                        extra=["--preserve-digests"])
    entries = log.entries()
    manifest = stack.direct().get_manifest("demo/app-again", "v1").json()
    helpers.assert_encrypted_manifest(manifest, push_skopeo.image)
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{stack.registry_addr}/demo/app-again:v1", out, "v1",
                        keys=[stack.keys["ec"]["private"]])
    helpers.assert_decrypted_matches(out, "v1", push_skopeo.image)
    links = helpers.repo_layer_links(stack.storage, "demo/app-again")
    assert not set(links) & set(push_skopeo.image.layer_digests), helpers.AccessLog.summary(entries)


@pytest.fixture(scope="session")
def mount_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("img-mount")
    return helpers.build_image(d / "layout", "v1", 4 * helpers.MIB, marker=helpers.new_marker())


def test_skopeo_mount_from_plain_repository_is_not_honoured(stack, mount_image, tmp_path):
    """Push to plain/mnt (passthrough), then the same image to demo/mnt: skopeo tries to mount
    the plaintext blobs from plain/mnt. No mount of plaintext into an encrypted repository may
    succeed; skopeo then uploads and the filter encrypts."""
    helpers.skopeo_push(mount_image, f"{stack.addr}/plain/mnt:v1", extra=["--preserve-digests"])
    log = stack.access_log()
    helpers.skopeo_push(mount_image, f"{stack.addr}/demo/mnt:v1", extra=["--preserve-digests"])
    entries = log.entries()
    mounts = [e for e in entries if e["method"] == "POST" and "mount=" in (e["path"] or "")]
    assert mounts, "skopeo made no mount attempt; the scenario was not exercised:\n" + \
        helpers.AccessLog.summary(entries)
    layer_mounts = [e for e in mounts if any(d.split(":")[1] in e["path"]
                                             for d in mount_image.layer_digests)]
    assert all(e["status"] != 201 for e in layer_mounts), helpers.AccessLog.summary(entries)
    manifest = stack.direct().get_manifest("demo/mnt", "v1").json()
    helpers.assert_encrypted_manifest(manifest, mount_image)
    links = helpers.repo_layer_links(stack.storage, "demo/mnt")
    assert not set(links) & set(mount_image.layer_digests), f"plaintext linked: {links}"
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{stack.registry_addr}/demo/mnt:v1", out, "v1",
                        keys=[stack.keys["rsa"]["private"]])
    helpers.assert_decrypted_matches(out, "v1", mount_image)


@pytest.mark.parametrize("how", ["content-type", "no-auth", "no-auth-put"])
def test_refused_request_does_not_corrupt_the_upload(request, mount_image, how, tmp_path):
    """A PATCH or final PUT that the registry refuses (bad Content-Type: 500; or no credentials:
    401, which oras-py sends before retrying every request with basic auth) must neither advance
    nor consume the filter's upload state: the upload goes on and still decrypts right."""
    stack = request.getfixturevalue("auth_stack" if how.startswith("no-auth") else "stack")
    reg = stack.via_gateway()
    repo = "demo/refused-patch"
    image = mount_image
    big = image.layers[0]
    r = reg.upload_chunked(repo, big.path.read_bytes(), digest=big.digest, chunk=1 * helpers.MIB,
                           refused_patch_at=None if how == "no-auth-put" else 2, refused_how=how)
    assert r.status_code == 201, f"{r.status_code} {r.text[:500]}"
    for blob in (image.config, image.layers[1]):
        r = reg.upload_monolithic(repo, blob.path.read_bytes(), digest=blob.digest)
        assert r.status_code == 201, f"{blob.digest}: {r.status_code} {r.text[:500]}"
    r = reg.put_manifest(repo, "v1", image.manifest_bytes)
    assert r.status_code == 201, f"manifest: {r.status_code} {r.text[:500]}"
    manifest = stack.direct().get_manifest(repo, "v1").json()
    helpers.assert_encrypted_manifest(manifest, image)
    out = tmp_path / "out"
    helpers.skopeo_pull(f"{stack.registry_addr}/{repo}:v1", out, "v1", creds=stack.creds,
                        keys=[stack.keys["rsa"]["private"]])
    helpers.assert_decrypted_matches(out, "v1", image)
