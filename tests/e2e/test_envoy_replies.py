"""Issue 13.6: Envoy's own answers on the gateway carry OCI error bodies too
(`local_reply_config` in envoy/envoy.yaml), while the filter's own refusals pass unchanged."""
from __future__ import annotations

import json

import pytest

import conftest
import helpers

pytestmark = pytest.mark.filter


@pytest.fixture(scope="module")
def down_stack(tmp_path_factory):
    """A filter stack whose registry is stopped once started."""
    s = conftest._start_stack(tmp_path_factory, "replies", 70, filter=True, keys_source="inline")
    yield s
    conftest.stop_stack(s)


def _errors(body: bytes):
    doc = json.loads(body)
    (err,) = doc["errors"]
    return err


def test_filter_refusals_are_not_rewrapped(down_stack):
    """The filter's 413 keeps its own code and message (no Envoy wrapper around it)."""
    big = b"{" + b" " * (5 * helpers.MIB) + b"}"
    status, headers, body = helpers.raw_request(
        down_stack.addr, "PUT", "/v2/demo/replies/manifests/v1", big,
        {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 413, body[:300]
    err = _errors(body)
    assert err["code"] == "SIZE_INVALID"
    assert err["message"].startswith("manifest of "), err


def test_registry_unreachable_is_an_oci_error(down_stack):
    """With the registry down, Envoy's 503 ("upstream connect error …", text) reaches clients
    as a registry error document, for reads, passthrough and encrypted writes alike."""
    # From here on the stack is meant to be broken: out of the after-test health check.
    conftest.STARTED.remove(down_stack)
    for name, proc in down_stack.gw.procs:
        if name == "registry":
            proc.terminate()
            proc.wait(timeout=30)
    for method, path in [("GET", "/v2/plain/replies/tags/list"),
                         ("POST", "/v2/demo/replies/blobs/uploads/"),
                         ("HEAD", "/v2/plain/replies/blobs/sha256:" + "0" * 64)]:
        status, headers, body = helpers.raw_request(down_stack.addr, method, path, b"", {})
        assert status == 503, (method, path, status, body[:200])
        if method == "HEAD":
            continue
        assert headers.get("content-type", "").startswith("application/json"), headers
        err = _errors(body)
        assert err["code"] == "UNAVAILABLE" and "registry" in err["message"], err
