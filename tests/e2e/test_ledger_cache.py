"""Issue 15.2: the ledger entries a gateway keeps in Envoy's shared data are a bounded cache.

Each encrypted layer leaves two ledger entries (under its plaintext and its ciphertext digest),
each stored manifest one. Envoy's shared data never deletes a key, so they are kept in a fixed
set of slots (`limits.ledger_cache_entries`) and the least recently written goes when a slot is
full. Two gateways with a tiny cache (8 entries: one slot, strictly least recently written
first) show what an eviction does:

- with `replicas.state_key` the registry holds the authenticated ledger: a manifest naming
  evicted layers is rewritten from the ledger records read back from the registry, and a re-push
  of the image uploads nothing (its HEADs are answered from those records too);
- without, the cache is the only record: a manifest naming an evicted layer is refused
  (MANIFEST_INVALID naming the layer), and the client's next push uploads the layer again (its
  HEAD is answered 404), which the gateway encrypts again.

Both images decrypt with skopeo to the original layers. The filter's gauge of entries held
(`ocicrypt_ledger_cache_entries`) never passes the capacity, and every write past it is counted
as an eviction (`ocicrypt_ledger_evictions`).
"""
from __future__ import annotations

import base64
import concurrent.futures
import os

import pytest
import requests

import helpers
from conftest import _start_stack, stop_stack
from procstat import rss_kib

pytestmark = [pytest.mark.filter]

CAPACITY = 8
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _stack(tmp_path_factory, name, offset, **extra):
    s = _start_stack(tmp_path_factory, name, offset, filter=True, keys_source="inline",
                     ledger_cache_entries=CAPACITY, **extra)
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory):
    yield from _stack(tmp_path_factory, "ledger-cache-replicas", 100,
                      state_key=base64.b64encode(os.urandom(32)).decode())


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    yield from _stack(tmp_path_factory, "ledger-cache-local", 104)


def stats(stack) -> dict:
    values = helpers.envoy_stats(stack.opts.admin_addr)
    return {
        "entries": values.get("ocicrypt_ledger_cache_entries", 0.0),
        "evictions": values.get("ocicrypt_ledger_evictions", 0.0),
        "layers": values.get("ocicrypt_layers_encrypted", 0.0),
    }


def fill(stack, repo: str, count: int, workers: int = 1) -> None:
    """Uploads `count` small distinct layers (gzip-headed random bytes, so encrypted) through
    the gateway, monolithically: 2 ledger entries each."""
    reg = stack.via_gateway()

    def one(_):
        data = b"\x1f\x8b" + os.urandom(2046)
        r = reg.upload_monolithic(repo, data)
        assert r.status_code == 201, f"{r.status_code} {r.text[:300]}"

    if workers == 1:
        for i in range(count):
            one(i)
    else:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(count)))


def assert_bounded(before: dict, after: dict) -> None:
    """The gauge stays within the capacity and every entry written past it was evicted: each
    encrypted layer wrote two new entries (manifests are counted by the caller)."""
    assert 0 < after["entries"] <= CAPACITY, after
    written = 2 * (after["layers"] - before["layers"])
    assert after["evictions"] - before["evictions"] >= written - CAPACITY, (before, after)


def push(image, dest: str) -> None:
    """skopeo, keeping the layers as they are (else it compresses the uncompressed one, and the
    manifest it pushes is not `image.manifest_bytes`)."""
    helpers.skopeo_push(image, dest, extra=["--preserve-digests"])


def put_manifest(stack, repo: str, ref: str, body: bytes) -> requests.Response:
    return requests.put(f"http://{stack.addr}/v2/{repo}/manifests/{ref}", data=body,
                        headers={"Content-Type": MT_MANIFEST}, timeout=60)


def tag_reads(log: helpers.RegistryLog, repo: str) -> list:
    return [r for r in log.requests()
            if r[0] == "GET" and r[1].startswith(f"/v2/{repo}/manifests/ocicrypt.sha256-")]


def pushed_then_evicted(s, tmp_path, repo: str) -> helpers.Image:
    """An image pushed to `repo:v1` with skopeo, then far more entries than the cache holds
    written after its: the image's are all evicted."""
    image = helpers.build_image(tmp_path / "layout", "v1", helpers.MIB,
                                marker=helpers.new_marker())
    before = stats(s)
    push(image, f"{s.addr}/{repo}:v1")
    helpers.check_stored_encrypted_and_decrypts(s, repo, image, tmp_path / "out-v1",
                                                s.keys["rsa"]["private"])
    fill(s, "demo/filler", 3 * CAPACITY)
    after = stats(s)
    print(f"{s.name}: cache {before} -> {after}")
    assert_bounded(before, after)
    return image


def test_with_replicas_evicted_entries_are_read_back_from_the_registry(replicated, tmp_path):
    s = replicated
    key = s.keys["rsa"]["private"]
    image = pushed_then_evicted(s, tmp_path, "demo/early")

    # The manifest again, under a new tag: every layer is unknown to the cache now and read
    # back from the registry's ledger (authenticated), then rewritten.
    log = helpers.RegistryLog.of(s)
    r = put_manifest(s, "demo/early", "v2", image.manifest_bytes)
    assert r.status_code == 201, r.text
    reads = tag_reads(log, "demo/early")
    for layer in image.layers:
        tag = "ocicrypt.sha256-" + layer.digest.split(":", 1)[1]
        assert ("GET", f"/v2/demo/early/manifests/{tag}", 200) in reads, reads
    out = tmp_path / "out-v2"
    helpers.skopeo_pull(f"{s.registry_addr}/demo/early:v2", out, "v2", keys=[key])
    helpers.assert_decrypted_matches(out, "v2", image)

    # Evicted again; a re-push by skopeo: its HEADs read the ledger back, no blob is uploaded.
    fill(s, "demo/filler", 3 * CAPACITY)
    log = helpers.RegistryLog.of(s)
    push(image, f"{s.addr}/demo/early:v3")
    assert not log.blob_writes(), log.blob_writes()
    assert tag_reads(log, "demo/early"), "the re-push read nothing back"
    out = tmp_path / "out-v3"
    helpers.skopeo_pull(f"{s.registry_addr}/demo/early:v3", out, "v3", keys=[key])
    helpers.assert_decrypted_matches(out, "v3", image)
    assert stats(s)["entries"] <= CAPACITY


def test_without_replicas_an_evicted_layer_is_uploaded_again(local, tmp_path):
    s = local
    key = s.keys["rsa"]["private"]
    image = pushed_then_evicted(s, tmp_path, "demo/local")

    # The cache was the only record: a manifest naming the evicted layers is refused.
    r = put_manifest(s, "demo/local", "v2", image.manifest_bytes)
    assert r.status_code == 400, r.text
    assert r.headers.get("x-ocicrypt-filter") == "refused", dict(r.headers)
    (err,) = r.json()["errors"]
    assert err["code"] == "MANIFEST_INVALID", err
    assert any(layer.digest in err["message"] for layer in image.layers), err

    # The client pushes again: the HEADs of the evicted layers answer 404, so it uploads them,
    # and the gateway encrypts them again.
    log = helpers.RegistryLog.of(s)
    encrypted = stats(s)["layers"]
    push(image, f"{s.addr}/demo/local:v2")
    uploads = [w for w in log.blob_writes() if w[0] == "PUT"]
    assert len(uploads) >= len(image.layers), log.requests()
    assert stats(s)["layers"] - encrypted == len(image.layers)
    out = tmp_path / "out-v2"
    helpers.skopeo_pull(f"{s.registry_addr}/demo/local:v2", out, "v2", keys=[key])
    helpers.assert_decrypted_matches(out, "v2", image)
    assert not helpers.scan_for(s.storage, [image.marker.encode()])


#: Layers for the memory check: 2 000 entries of ≈ 2.2 KiB each held for good would be ≈ 4 MiB
#: of values alone, ≈ 12 MiB of Envoy RSS as measured before the cache (≈ 6 KiB per layer).
MANY = 2_000


def test_without_replicas_memory_stays_bounded(local):
    """Thousands of layers through a gateway with a cache of 8: the gauge stays at the capacity,
    every entry past it is evicted, and Envoy's RSS does not grow with the layers."""
    s = local
    fill(s, "demo/warm", 200, workers=4)
    before, rss_before = stats(s), rss_kib(s.gw.pid("envoy")) / 1024
    fill(s, "demo/many", MANY, workers=4)
    after, rss_after = stats(s), rss_kib(s.gw.pid("envoy")) / 1024
    print(f"{MANY} more layers: cache {before} -> {after}; "
          f"Envoy RSS {rss_before:.1f} -> {rss_after:.1f} MiB")
    assert after["layers"] - before["layers"] == MANY
    assert after["entries"] == CAPACITY
    assert after["evictions"] - before["evictions"] == 2 * MANY + before["entries"] - CAPACITY
    assert rss_after < rss_before + 8, \
        f"Envoy grew {rss_after - rss_before:.1f} MiB over {MANY} layers"
