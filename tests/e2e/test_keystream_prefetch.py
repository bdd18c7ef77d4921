"""Keystream prefetch across Envoy workers (README, Performance): with --concurrency 2, the
AES-CTR keystream of a big layer is computed ahead by the other plugin VM and used by the
stream's worker. What lands in the registry must be exactly what the local path writes:
ciphertext that skopeo decrypts to the byte-identical layer, with no plaintext stored."""
import time

import pytest
import requests

import helpers
from conftest import STARTED, _start_stack

pytestmark = [pytest.mark.filter,
              pytest.mark.only_build("wasm", reason="keystream prefetch moves AES work between "
                                     "the wasm VMs of the workers (WebAssembly has no AES "
                                     "instruction); the native build encrypts with AES-NI on the "
                                     "stream's own thread and asks no one (its ocicrypt_keystream_* "
                                     "counters stay at zero)")]


@pytest.fixture(scope="module")
def prefetch_off_stack(tmp_path_factory):
    """A gateway with limits.keystream_prefetch_bytes 0."""
    s = _start_stack(tmp_path_factory, "prefetch-off", 70, filter=True,
                     keys_source="inline", keystream_prefetch_bytes=0)
    yield s
    STARTED.remove(s)
    s.gw.stop()


@pytest.fixture(scope="module")
def single_worker_stack(tmp_path_factory):
    """A gateway with --concurrency 1: the only other plugin VM is the one on Envoy's main
    thread, which must never become the helper."""
    s = _start_stack(tmp_path_factory, "single-worker", 80, filter=True,
                     keys_source="inline", concurrency=1)
    yield s
    STARTED.remove(s)
    s.gw.stop()


#: The filter's keystream counters: every scrape must hold each of them (a metric that
#: vanished must fail the test, not read as 0).
KEYSTREAM_METRICS = ("asked_bytes", "served_bytes", "used_bytes", "refused_segments")


def scrape(stack) -> dict:
    stats = helpers.envoy_stats(stack.opts.admin_addr, "ocicrypt_keystream_")
    missing = [m for m in KEYSTREAM_METRICS if f"ocicrypt_keystream_{m}" not in stats]
    assert not missing, f"metrics missing from Envoy's stats: {missing} (have {sorted(stats)})"
    return stats


def wait_for_helpers(stack):
    """A plugin VM lists itself as a helper on its first timer tick (2 s) or first stream: wait
    until this Envoy has been up longer than a tick."""
    for _ in range(40):
        info = requests.get(f"http://{stack.opts.admin_addr}/server_info", timeout=10).json()
        if int(info["uptime_current_epoch"].rstrip("s")) >= 4:
            return
        time.sleep(0.5)
    raise AssertionError("Envoy uptime did not pass 4 s")


def test_big_layer_uses_keystream_from_another_worker(stack, tmp_path):
    assert stack.opts.concurrency >= 2
    wait_for_helpers(stack)
    image = helpers.build_image(tmp_path / "layout", "v1", 40 * helpers.MIB,
                                marker=helpers.new_marker())
    repo = "demo/prefetch"
    before = scrape(stack)

    # skopeo streams the layer in a PATCH of unknown length.
    helpers.skopeo_push(image, f"{stack.addr}/{repo}:v1", extra=["--preserve-digests"])
    mid = scrape(stack)
    used = mid["ocicrypt_keystream_used_bytes"] - before["ocicrypt_keystream_used_bytes"]
    asked = mid["ocicrypt_keystream_asked_bytes"] - before["ocicrypt_keystream_asked_bytes"]
    assert used > 8 * helpers.MIB, (before, mid)
    assert asked >= used
    assert mid["ocicrypt_keystream_served_bytes"] > before["ocicrypt_keystream_served_bytes"]

    helpers.check_stored_encrypted_and_decrypts(stack, repo, image, tmp_path / "out",
                                                stack.keys["rsa"]["private"])

    # A monolithic PUT declares its length: segments are asked up to the end, not beyond.
    repo2 = "demo/prefetch-put"
    base = f"http://{stack.addr}"
    for blob in [image.config, *image.layers]:
        r = requests.post(f"{base}/v2/{repo2}/blobs/uploads/", timeout=30)
        assert r.status_code == 202, r.text
        loc = helpers.location_path(r.headers["Location"])
        sep = "&" if "?" in loc else "?"
        r = requests.put(f"{base}{loc}{sep}digest={blob.digest}", data=blob.path.read_bytes(),
                         headers={"Content-Type": "application/octet-stream"}, timeout=300)
        assert r.status_code == 201, r.text
    after = scrape(stack)
    used2 = after["ocicrypt_keystream_used_bytes"] - mid["ocicrypt_keystream_used_bytes"]
    asked2 = after["ocicrypt_keystream_asked_bytes"] - mid["ocicrypt_keystream_asked_bytes"]
    assert used2 > 8 * helpers.MIB, (mid, after)
    assert asked2 <= image.layers[0].size
    assert after["ocicrypt_keystream_refused_segments"] == \
        before["ocicrypt_keystream_refused_segments"]

    r = stack.via_gateway().put_manifest(repo2, "v1", image.manifest_bytes)
    assert r.status_code == 201, r.text
    helpers.check_stored_encrypted_and_decrypts(stack, repo2, image, tmp_path / "out2",
                                                stack.keys["ec"]["private"])


def push_without_prefetch(stack, repo: str, key, tmp_path):
    """A 24 MiB layer pushed by skopeo: no keystream asked, served or used, and still stored
    encrypted and decrypting byte-identical."""
    wait_for_helpers(stack)
    image = helpers.build_image(tmp_path / "layout", "v1", 24 * helpers.MIB,
                                marker=helpers.new_marker())
    helpers.skopeo_push(image, f"{stack.addr}/{repo}:v1", extra=["--preserve-digests"])
    stats = scrape(stack)
    for name in ("asked_bytes", "served_bytes", "used_bytes"):
        assert stats[f"ocicrypt_keystream_{name}"] == 0, stats
    helpers.check_stored_encrypted_and_decrypts(stack, repo, image, tmp_path / "out", key)


def test_prefetch_off_asks_nothing_and_still_encrypts(prefetch_off_stack, tmp_path):
    push_without_prefetch(prefetch_off_stack, "demo/prefetch-off",
                          prefetch_off_stack.keys["rsa"]["private"], tmp_path)


def test_a_single_worker_gets_no_help_from_the_main_thread(single_worker_stack, tmp_path):
    push_without_prefetch(single_worker_stack, "demo/one-worker",
                          single_worker_stack.keys["ec"]["private"], tmp_path)
