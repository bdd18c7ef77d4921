"""What the filter must refuse, with an OCI error body ({"errors":[{"code":...}]}) and nothing
stored: wrong digests, bad or oversized manifests, plaintext mounts into encrypted
repositories, pushes to a project without recipients."""
from __future__ import annotations

import json
import os

import pytest

import helpers
from helpers import MT_MANIFEST, oci_error_codes, sha256_digest

pytestmark = pytest.mark.filter


def assert_nothing_stored(stack, repo, *digests):
    direct = stack.direct()
    for d in digests:
        assert not direct.blob_exists(repo, d), f"{d} exists in {repo}"
    assert helpers.repo_layer_links(stack.storage, repo) == [], \
        f"{repo} has blobs linked: {helpers.repo_layer_links(stack.storage, repo)}"


def assert_refused_by_filter(r, message_start: str) -> None:
    """The answer is the filter's refusal (its header, its message), not the registry's."""
    assert r.headers.get("x-ocicrypt-filter") == "refused", dict(r.headers)
    messages = [e.get("message", "") for e in r.json()["errors"]]
    assert any(m.startswith(message_start) for m in messages), messages


@pytest.mark.parametrize("mode", ["monolithic", "chunked"])
def test_wrong_digest_is_digest_invalid(stack, mode):
    repo = f"demo/neg-digest-{mode}"
    reg = stack.via_gateway()
    data = os.urandom(3 * helpers.MIB + 12345)
    wrong = sha256_digest(b"not the data")
    if mode == "monolithic":
        r = reg.upload_monolithic(repo, data, digest=wrong)
    else:
        r = reg.upload_chunked(repo, data, digest=wrong, chunk=1 * helpers.MIB)
    assert r.status_code == 400, f"{r.status_code} {r.text[:500]}"
    assert "DIGEST_INVALID" in oci_error_codes(r)
    # The filter's own check (the bytes are encrypted, so the registry could not tell), not the
    # registry's identical refusal.
    assert_refused_by_filter(r, "the uploaded content has digest")
    assert_nothing_stored(stack, repo, wrong, sha256_digest(data))
    assert not helpers.registry_blob_path(stack.storage, sha256_digest(data)).exists()


def test_malformed_manifest_is_manifest_invalid(stack):
    r = stack.via_gateway().put_manifest("demo/neg-manifest", "v1",
                                         b'{"schemaVersion": 2, "mediaType": "' + MT_MANIFEST.encode()
                                         + b'", "layers": [')
    assert r.status_code == 400, f"{r.status_code} {r.text[:500]}"
    assert "MANIFEST_INVALID" in oci_error_codes(r)
    assert_refused_by_filter(r, "manifest is not valid JSON")
    assert stack.direct().get_manifest("demo/neg-manifest", "v1").status_code == 404


def test_oversized_manifest_is_size_invalid(stack):
    limit = stack.opts.max_manifest_bytes
    filler = "x" * (limit + 1024)
    body = json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST,
                       "config": {"mediaType": helpers.MT_CONFIG, "digest": sha256_digest(b"{}"),
                                  "size": 2},
                       "layers": [], "annotations": {"filler": filler}}).encode()
    assert len(body) > limit
    status, _headers, resp = helpers.raw_request(stack.addr, "PUT", "/v2/demo/neg-big/manifests/v1",
                                                 body, {"Content-Type": MT_MANIFEST})
    assert status == 413, f"{status} {resp[:500]!r}"
    assert _headers.get("x-ocicrypt-filter") == "refused", _headers
    (err,) = json.loads(resp)["errors"]
    assert err["code"] == "SIZE_INVALID" and err["message"].startswith("manifest of "), resp[:500]
    assert stack.direct().get_manifest("demo/neg-big", "v1").status_code == 404


def test_mount_of_plaintext_into_encrypted_repo_is_not_honoured(stack, plain_app):
    """POST /v2/demo/x/blobs/uploads/?mount=<plaintext>&from=plain/app must not return 201: the
    filter turns it into a normal upload (202) and the plaintext blob never appears in demo/x."""
    digest = plain_app.layers[0].digest
    direct = stack.direct()
    assert direct.blob_exists("plain/app", digest), "precondition: plain/app holds the blob"
    r = stack.via_gateway().request("POST", "/v2/demo/x/blobs/uploads/",
                                    params={"mount": digest, "from": "plain/app"},
                                    headers={"Content-Length": "0"})
    assert r.status_code != 201, f"mount honoured: {r.status_code} {dict(r.headers)}"
    assert r.status_code == 202, f"{r.status_code} {r.text[:500]}"
    assert "/v2/demo/x/blobs/uploads/" in r.headers.get("Location", "")
    assert not direct.blob_exists("demo/x", digest)
    assert digest not in helpers.repo_layer_links(stack.storage, "demo/x")


def test_project_without_recipients_is_refused(stack, plain_image):
    """nokeys/** must be encrypted but has no recipients: fail closed with 503, naming the
    project, and store nothing."""
    reg = stack.via_gateway()
    data = os.urandom(1 * helpers.MIB)
    refusals = []
    # Refused at the session's start, before any byte is sent (README: 503).
    r = reg.start_upload("nokeys/app")
    refusals.append(r)
    assert r.status_code == 503, f"{r.request.method} {r.status_code} {r.text[:500]}"
    assert "UNAVAILABLE" in oci_error_codes(r)
    assert_refused_by_filter(r, 'no verified recipient keys for project "nokeys"')
    assert_nothing_stored(stack, "nokeys/app", sha256_digest(data))

    proc = helpers.skopeo_push(plain_image, f"{stack.addr}/nokeys/app:v1", check=False)
    assert proc.returncode != 0, "a push to a project without recipients must fail"
    assert_nothing_stored(stack, "nokeys/app", *plain_image.layer_digests)
    assert stack.direct().get_manifest("nokeys/app", "v1").status_code == 404
