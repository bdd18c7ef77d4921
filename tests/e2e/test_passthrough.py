"""Through the filter into passthrough repositories (plain/**, and the default for unknown
projects): nothing changes, digests are identical to the source."""
from __future__ import annotations

import pytest

import helpers
from conftest import oras_push

pytestmark = [pytest.mark.filter, pytest.mark.clients]


def test_skopeo_plain_push_keeps_digests(stack, plain_app):
    direct = stack.direct()
    r = direct.get_manifest("plain/app", "v1")
    assert r.status_code == 200
    assert r.content == plain_app.manifest_bytes
    assert r.headers["Docker-Content-Digest"] == plain_app.manifest_digest
    for blob in [plain_app.config, *plain_app.layers]:
        assert direct.get_blob("plain/app", blob.digest) == blob.path.read_bytes()


def test_ctr_plain_push_keeps_digests(stack, containerd, plain_image):
    ref = containerd.import_image(plain_image, "e2e.local/plain")
    containerd.push(ref, f"{stack.addr}/plain/ctr:v1")
    r = stack.direct().get_manifest("plain/ctr", "v1")
    assert r.headers["Docker-Content-Digest"] == plain_image.manifest_digest
    assert r.content == plain_image.manifest_bytes


@pytest.mark.parametrize("chunked", [False, True], ids=["monolithic", "chunked"])
def test_oras_plain_push_keeps_digests(stack, plain_image, chunked):
    repo = f"plain/oras-{'chunked' if chunked else 'mono'}"
    oras_push(plain_image, stack.addr, f"{repo}:v1", chunked=chunked, chunk_size=1 * helpers.MIB)
    manifest = stack.direct().get_manifest(repo, "v1").json()
    assert manifest["layers"] == plain_image.manifest["layers"]
    for blob in plain_image.layers:
        assert stack.direct().get_blob(repo, blob.digest) == blob.path.read_bytes()


def test_unmatched_repository_follows_default_passthrough(stack, plain_image):
    helpers.skopeo_push(plain_image, f"{stack.addr}/other/app:v1", extra=["--preserve-digests"])
    r = stack.direct().get_manifest("other/app", "v1")
    assert r.headers["Docker-Content-Digest"] == plain_image.manifest_digest
