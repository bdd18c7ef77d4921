"""Storage is reclaimable (issue 19): the gateway's ledger records name the ciphertext only in
annotations (their one blob is the OCI empty descriptor), so the registry's real garbage
collection (`docker-registry garbage-collect --delete-untagged`) keeps a ciphertext exactly as
long as a manifest a client pushed names it. A ledger record that outlives its ciphertext is
detected: the layer is uploaded and encrypted again, and the image decrypts. The platform
manifests of a multi-platform image are stored under their new digests and no tag, as a client
stores them without the gateway: deleting the image frees them, and a collection treats a tagged
multi-platform image as it would without the gateway (distribution 2.8's `--delete-untagged`
collects untagged index children, layers and all, with or without it).

The stack keeps the ledger in the registry (`replicas.state_key`), where the records live.
Garbage collection runs with the registry stopped (as distribution asks: a running registry
could be writing), and the registry is started again on the same storage."""
import base64
import os
import signal

import pytest

import helpers
from conftest import _start_stack, stop_stack
from test_multiplatform import multi_layout  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.filter, pytest.mark.clients]

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def gc_stack(tmp_path_factory):
    s = _start_stack(tmp_path_factory, "reclaim", 140, filter=True, keys_source="inline",
                     state_key=base64.b64encode(os.urandom(32)).decode())
    yield s
    stop_stack(s)


def collect_garbage(s, delete_untagged: bool = True) -> str:
    """The registry stopped, `garbage-collect` (`--delete-untagged` unless told otherwise) run on
    its storage, the registry started again: its output."""
    s.gw.kill("registry", signal.SIGTERM)
    try:
        flags = ["--delete-untagged"] if delete_untagged else []
        out = helpers.run(["docker-registry", "garbage-collect", *flags,
                           s.opts.state_dir / "registry.yml"], timeout=300)
    finally:
        s.gw.start_registry()
    return out.stdout


def stored_digest(s, repo: str, tag: str) -> str:
    r = s.direct().get_manifest(repo, tag)
    assert r.status_code == 200, (repo, tag, r.status_code, r.text[:300])
    return r.headers["Docker-Content-Digest"]


def ciphertexts(s, repo: str, tag: str) -> list:
    """The ciphertext digests of the layers of `repo:tag` as stored."""
    return [layer["digest"] for layer in s.direct().get_manifest(repo, tag).json()["layers"]]


def blob_stored(s, digest: str) -> bool:
    return helpers.registry_blob_path(s.storage, digest).exists()


def delete_image(s, repo: str, tag: str) -> None:
    """Deletes the manifest `repo:tag` names, through the gateway (by its stored digest: every
    tag naming it goes with it)."""
    digest = stored_digest(s, repo, tag)
    r = s.via_gateway().request("DELETE", f"/v2/{repo}/manifests/{digest}")
    assert r.status_code == 202, (r.status_code, r.text[:300])


def uploaded_layer_bytes(entries) -> int:
    return sum(int(e["bytes_received"] or 0) for e in entries
               if e["method"] in ("PATCH", "PUT") and "/blobs/uploads/" in (e["path"] or ""))


def mount_image(s, img: helpers.Image, src: str, dst: str) -> None:
    """`img`, pushed to `src` through the gateway, stored in `dst` too: its layers mounted
    from `src` (the gateway mounts their ciphertext), its config uploaded, its manifest put."""
    gw = s.via_gateway()
    for layer in img.layers:
        r = gw.request("POST", f"/v2/{dst}/blobs/uploads/?mount={layer.digest}&from={src}")
        assert r.status_code == 201, (layer.digest, r.status_code, r.text[:300])
    r = gw.upload_monolithic(dst, img.config.path.read_bytes())
    assert r.status_code == 201, (r.status_code, r.text[:300])
    r = gw.put_manifest(dst, "v1", img.manifest_bytes)
    assert r.status_code == 201, (r.status_code, r.text[:300])


def image(tmp_path, name: str) -> helpers.Image:
    return helpers.build_image(tmp_path / name, "v1", helpers.MIB, marker=helpers.new_marker())


def test_collection_frees_deleted_and_untagged_images_and_keeps_used_ciphertext(gc_stack,
                                                                             tmp_path):
    s = gc_stack
    shared, deleted, retagged, other = (image(tmp_path, n) for n in
                                        ("shared", "deleted", "retagged", "other"))
    # `shared` is stored in two repositories of the project (the second by mounts of the first
    # one's ciphertext, asked for here: skopeo asks only when its machine-wide blob-info cache
    # remembers the first push); only the first is deleted.
    helpers.skopeo_push(shared, f"{s.addr}/demo/gc-shared-a:v1", extra=["--preserve-digests"])
    mount_image(s, shared, "demo/gc-shared-a", "demo/gc-shared-b")
    assert ciphertexts(s, "demo/gc-shared-a", "v1") == ciphertexts(s, "demo/gc-shared-b", "v1")
    # `deleted` is deleted; `retagged` loses its only tag to `other` (left untagged).
    helpers.skopeo_push(deleted, f"{s.addr}/demo/gc-deleted:v1", extra=["--preserve-digests"])
    helpers.skopeo_push(retagged, f"{s.addr}/demo/gc-retag:v1", extra=["--preserve-digests"])
    shared_blobs = ciphertexts(s, "demo/gc-shared-a", "v1")
    deleted_blobs = ciphertexts(s, "demo/gc-deleted", "v1")
    retagged_blobs = ciphertexts(s, "demo/gc-retag", "v1")
    helpers.skopeo_push(other, f"{s.addr}/demo/gc-retag:v1", extra=["--preserve-digests"])
    other_blobs = ciphertexts(s, "demo/gc-retag", "v1")
    for d in shared_blobs + deleted_blobs + retagged_blobs + other_blobs:
        assert blob_stored(s, d), d

    delete_image(s, "demo/gc-shared-a", "v1")
    delete_image(s, "demo/gc-deleted", "v1")
    out = collect_garbage(s)
    print(out[-2000:])

    gone = {d: not blob_stored(s, d) for d in deleted_blobs + retagged_blobs}
    assert all(gone.values()), f"ciphertexts kept after their images went: {gone}"
    kept = {d: blob_stored(s, d) for d in shared_blobs + other_blobs}
    assert all(kept.values()), f"ciphertexts a stored image names were collected: {kept}"
    # The images still stored decrypt to their layers.
    helpers.check_stored_encrypted_and_decrypts(s, "demo/gc-shared-b", shared,
                                                tmp_path / "out-shared",
                                                s.keys["rsa"]["private"])
    helpers.check_stored_encrypted_and_decrypts(s, "demo/gc-retag", other,
                                                tmp_path / "out-other", s.keys["ec"]["private"])
    # The ledger records outlive their ciphertext (small manifests whose only blob is `{}`).
    tags = helpers.tags(s.direct(), "demo/gc-deleted")
    assert any(t.startswith("ocicrypt.sha256-") for t in tags), tags


def test_a_ledger_record_whose_ciphertext_is_gone_counts_as_unknown(gc_stack, tmp_path):
    s = gc_stack
    img = image(tmp_path, "gone")
    helpers.skopeo_push(img, f"{s.addr}/demo/gc-gone:v1", extra=["--preserve-digests"])
    blobs = ciphertexts(s, "demo/gc-gone", "v1")
    delete_image(s, "demo/gc-gone", "v1")
    collect_garbage(s)
    assert not any(blob_stored(s, d) for d in blobs), blobs

    # A HEAD of the plaintext digest: the gateway knows the layer, asks the registry about its
    # ciphertext, which is gone: 404, the client must upload it.
    gw = s.via_gateway()
    for layer in img.layers:
        r = gw.request("HEAD", f"/v2/demo/gc-gone/blobs/{layer.digest}")
        assert r.status_code == 404, (layer.digest, r.status_code)

    # A manifest naming the layers without uploading them is refused by the registry (the
    # rewritten manifest names ciphertexts it no longer has); nothing is stored.
    r = gw.request("PUT", "/v2/demo/gc-gone/manifests/v2", data=img.manifest_bytes,
                   headers={"Content-Type": MT_MANIFEST})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert "MANIFEST_BLOB_UNKNOWN" in helpers.oci_error_codes(r), r.text[:300]
    assert s.direct().get_manifest("demo/gc-gone", "v2").status_code == 404

    # A push uploads and encrypts the layers again, and the image decrypts.
    log = s.access_log()
    helpers.skopeo_push(img, f"{s.addr}/demo/gc-gone:v1", extra=["--preserve-digests"])
    sent = uploaded_layer_bytes(log.entries())
    assert sent >= img.layers[0].size, helpers.AccessLog.summary(log.entries())
    helpers.check_stored_encrypted_and_decrypts(s, "demo/gc-gone", img, tmp_path / "out",
                                                s.keys["rsa"]["private"])
    for d in ciphertexts(s, "demo/gc-gone", "v1"):
        assert blob_stored(s, d), d


def test_a_mount_of_a_gone_ciphertext_becomes_an_encrypted_upload(gc_stack, tmp_path):
    s = gc_stack
    img = image(tmp_path, "mount")
    helpers.skopeo_push(img, f"{s.addr}/demo/gc-mount-src:v1", extra=["--preserve-digests"])
    blobs = ciphertexts(s, "demo/gc-mount-src", "v1")
    delete_image(s, "demo/gc-mount-src", "v1")
    collect_garbage(s)
    assert not any(blob_stored(s, d) for d in blobs), blobs

    # The gateway would mount the source's ciphertext, which is gone: the registry opens an
    # upload session instead (202), never a mount of anything else.
    big = img.layers[0]
    r = s.via_gateway().request(
        "POST", f"/v2/demo/gc-mount-dst/blobs/uploads/?mount={big.digest}&from=demo/gc-mount-src")
    assert r.status_code == 202, (r.status_code, r.text[:300])
    assert big.digest not in helpers.repo_layer_links(s.storage, "demo/gc-mount-dst")

    # skopeo (which tries the same mount when its blob-info cache remembers the source) ends up
    # uploading the layers, encrypted, and the image decrypts.
    log = s.access_log()
    helpers.skopeo_push(img, f"{s.addr}/demo/gc-mount-dst:v1", extra=["--preserve-digests"])
    entries = log.entries()
    assert uploaded_layer_bytes(entries) >= big.size, helpers.AccessLog.summary(entries)
    helpers.check_stored_encrypted_and_decrypts(s, "demo/gc-mount-dst", img, tmp_path / "out",
                                                s.keys["ec"]["private"])


def push_multi(s, layout, repo: str) -> tuple:
    """`skopeo copy --all` of the two-platform layout to `repo:v1` through the gateway: the
    stored children's digests, and the blobs they name (their layers and configs)."""
    helpers.run(["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
                 f"oci:{layout}:v1", f"docker://{s.addr}/{repo}:v1"],
                timeout=helpers.CLIENT_TIMEOUT)
    index = s.direct().get_manifest(repo, "v1").json()
    children = [c["digest"] for c in index["manifests"]]
    layers = []
    for child in children:
        layers += [layer["digest"] for layer in
                   s.direct().get_manifest(repo, child).json()["layers"]]
    return children, layers


def test_deleting_a_multi_platform_image_frees_its_platform_manifests_and_layers(
        gc_stack, multi_layout):
    """The gateway stores each platform manifest under its new digest and no tag of its own,
    so deleting the index and collecting (`--delete-untagged`) frees the platform manifests
    and every layer of theirs, as without the gateway. (Before, each stayed under a reserved
    tag `ocicrypt.sha256-…`, with its layers, for good.)"""
    s = gc_stack
    layout, images = multi_layout
    repo = "demo/gc-multi-deleted"
    children, layers = push_multi(s, layout, repo)
    assert len(children) == 2 and len(layers) == sum(len(i.layers) for i in images.values())
    for d in children + layers:
        assert blob_stored(s, d), d
    # With the ledger in the registry each platform has a record under the reserved tag of its
    # pushed digest: a small manifest naming the stored one in annotations only.
    for img in images.values():
        record = s.direct().get_manifest(repo, "ocicrypt.sha256-" + img.manifest_digest[7:])
        assert record.json()["artifactType"] == "application/vnd.ocicrypt-filter.ledger.v1"
        assert not set(children) & {record.json()["config"]["digest"],
                                    *(l["digest"] for l in record.json()["layers"])}
    delete_image(s, repo, "v1")
    print(collect_garbage(s)[-2000:])
    for child in children:
        assert s.direct().get_manifest(repo, child).status_code == 404, child
    kept = [d for d in children + layers if blob_stored(s, d)]
    assert not kept, f"kept after the image was deleted: {kept}"


def test_a_tagged_multi_platform_image_fares_in_a_collection_as_without_the_gateway(
        gc_stack, multi_layout, tmp_path):
    """The same two-platform image stored as pushed (a passthrough repository) and through the
    gateway (encrypted): a collection without `--delete-untagged` keeps both whole, and the
    encrypted one decrypts, every platform; distribution 2.8's `--delete-untagged` deletes the
    untagged platform manifests of both (and their layers) while their index stays tagged —
    the registry's behaviour, not the gateway's. Run last: it leaves both images broken."""
    s = gc_stack
    layout, images = multi_layout
    stored = {repo: push_multi(s, layout, repo) for repo in ("plain/gc-multi", "demo/gc-multi")}

    collect_garbage(s, delete_untagged=False)
    for repo, (children, layers) in stored.items():
        for child in children:
            assert s.direct().get_manifest(repo, child).status_code == 200, (repo, child)
        assert all(blob_stored(s, d) for d in layers), repo
    helpers.skopeo_pull_all(f"{s.registry_addr}/demo/gc-multi:v1", tmp_path / "out",
                            s.keys["rsa"]["private"], images)

    collect_garbage(s, delete_untagged=True)
    fate = {repo: ([s.direct().get_manifest(repo, c).status_code for c in children],
                   [blob_stored(s, d) for d in layers])
            for repo, (children, layers) in stored.items()}
    assert fate["demo/gc-multi"] == fate["plain/gc-multi"], fate
    assert fate["plain/gc-multi"] == ([404, 404], [False] * len(stored["plain/gc-multi"][1])), \
        f"distribution's --delete-untagged no longer collects index children: {fate}"
    assert s.direct().get_manifest("demo/gc-multi", "v1").status_code == 200
