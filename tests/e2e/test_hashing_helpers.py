"""The native build's hashing helpers (README, Two builds: "One stream on two threads"): the
two hashes of an upload's ciphertext run on threads of the module (`ocicrypt-hash-N`, one per
CPU Envoy may use, at most 8) while the stream's worker encrypts; `OCICRYPT_HASH_THREADS=0` in
Envoy's environment hashes on the worker instead. Either way what lands in the registry is
ciphertext that skopeo decrypts to the byte-identical layer, with no plaintext stored."""
import os
from pathlib import Path
from typing import Dict

import pytest

import helpers
from conftest import STARTED, _start_stack

pytestmark = [pytest.mark.filter,
              pytest.mark.only_build("native", reason="the wasm build has no threads: its VM "
                                     "hashes on the stream's worker (its prefetch moves AES "
                                     "work instead: test_keystream_prefetch.py)")]

HASH_THREAD = "ocicrypt-hash-"


def envoy_pid(stack) -> int:
    return next(p.pid for name, p in stack.gw.procs if name == "envoy")


def hash_threads(pid: int) -> Dict[str, float]:
    """CPU seconds of each of Envoy's hashing helper threads, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if not (task / "comm").read_text().strip().startswith(HASH_THREAD):
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[task.name] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return out


@pytest.fixture(scope="module")
def inline_stack(tmp_path_factory):
    """A native gateway whose Envoy runs with OCICRYPT_HASH_THREADS=0."""
    s = _start_stack(tmp_path_factory, "hash-inline", 160, filter=True, keys_source="inline",
                     envoy_env={"OCICRYPT_HASH_THREADS": "0"})
    yield s
    STARTED.remove(s)
    s.gw.stop()


def push_big_layer(stack, repo: str, key, tmp_path):
    image = helpers.build_image(tmp_path / "layout", "v1", 24 * helpers.MIB,
                                marker=helpers.new_marker())
    helpers.skopeo_push(image, f"{stack.addr}/{repo}:v1", extra=["--preserve-digests"])
    helpers.check_stored_encrypted_and_decrypts(stack, repo, image, tmp_path / "out", key)


def test_ciphertext_is_hashed_on_helper_threads(stack, tmp_path):
    pid = envoy_pid(stack)
    before = hash_threads(pid)
    push_big_layer(stack, "demo/hash-helpers", stack.keys["rsa"]["private"], tmp_path)
    after = hash_threads(pid)
    # One per CPU Envoy may use (a cgroup quota may allow fewer), at most 8.
    assert 1 <= len(after) <= min(len(os.sched_getaffinity(pid)), 8), after
    # Two SHA-256 over 24 MiB of ciphertext: tens of milliseconds on the helpers.
    spent = sum(after.values()) - sum(before.get(t, 0.0) for t in after)
    assert spent >= 0.01, (before, after)


def test_without_helper_threads_the_worker_hashes(inline_stack, tmp_path):
    push_big_layer(inline_stack, "demo/hash-inline", inline_stack.keys["ec"]["private"],
                   tmp_path)
    assert hash_threads(envoy_pid(inline_stack)) == {}
