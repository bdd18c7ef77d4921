"""The user's repository shows the user's tags (issue 19): through the gateway,
`GET /v2/<name>/tags/list` of an encrypted repository leaves out the gateway's reserved
`ocicrypt.…` tags (ledger records, platform manifests pushed by digest), which the registry
itself still lists. Real clients (skopeo list-tags, oras-py) see only what they pushed; `n`,
`last` and `Link` stay the registry's (distribution 2.8 ignores `n` and `last` and answers the
whole list, so here every answer is one page: the paging of registries that do page is
covered natively, gateway_tags_list.rs). The gateway reads the list by callout and answers
itself; an answer over `limits.max_manifest_bytes` is refused `502`, never shown with the
reserved tags.

The stack keeps the ledger in the registry (`replicas.state_key`), which is where reserved
tags come from for every encrypted layer."""
import base64
import json
import os

import pytest

import helpers
from conftest import _start_stack, oras_registry, stop_stack

pytestmark = [pytest.mark.filter, pytest.mark.clients]

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
#: limits.max_manifest_bytes of the stack: above any manifest pushed here, below the tags list
#: of `too-many`.
LIMIT = 16 * 1024


@pytest.fixture(scope="module")
def tags_stack(tmp_path_factory):
    s = _start_stack(tmp_path_factory, "tags-list", 150, filter=True, keys_source="inline",
                     max_manifest_bytes=LIMIT,
                     state_key=base64.b64encode(os.urandom(32)).decode())
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def pushed(tags_stack, tmp_path_factory):
    """A 2-layer image pushed with skopeo to demo/tl:v1 and :latest."""
    d = tmp_path_factory.mktemp("img-tags")
    image = helpers.build_image(d / "layout", "v1", helpers.MIB, marker=helpers.new_marker())
    for tag in ("v1", "latest"):
        helpers.skopeo_push(image, f"{tags_stack.addr}/demo/tl:{tag}", extra=["--preserve-digests"])
    return image


def empty_image(reg, repo: str) -> bytes:
    """A manifest with no layers, its `{}` config uploaded to `repo` straight to the registry."""
    r = reg.upload_monolithic(repo, b"{}")
    assert r.status_code == 201, (r.status_code, r.text[:200])
    config = {"mediaType": "application/vnd.oci.empty.v1+json",
              "digest": helpers.sha256_digest(b"{}"), "size": 2}
    return json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config,
                       "layers": []}).encode()


def reserved(tags):
    return [t for t in tags if t.lower().startswith("ocicrypt.")]


def test_only_the_pushed_tags_are_listed(tags_stack, pushed):
    s = tags_stack
    direct = helpers.tags(s.direct(), "demo/tl")
    # The registry holds a ledger record per encrypted layer, under reserved tags.
    assert len(reserved(direct)) == 2, direct
    r = s.via_gateway().request("GET", "/v2/demo/tl/tags/list",
                                headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert r.json() == {"name": "demo/tl", "tags": sorted(["v1", "latest"], key=direct.index)}
    # The gateway's own answer (it read the list by callout), unencoded.
    assert r.headers.get("X-Ocicrypt-Filter") == "answered"
    assert r.headers.get("Content-Encoding") is None

    out = helpers.run(["skopeo", "list-tags", "--tls-verify=false",
                       f"docker://{s.addr}/demo/tl"], timeout=helpers.CLIENT_TIMEOUT).stdout
    assert sorted(json.loads(out)["Tags"]) == ["latest", "v1"], out

    reg = oras_registry(s.addr)
    assert sorted(reg.get_tags(f"{s.addr}/demo/tl")) == ["latest", "v1"]
    assert len(reg.get_tags(f"{s.addr}/demo/tl", N=1)) == 1


def test_paging_parameters_pass_and_never_show_reserved_tags(tags_stack, pushed):
    s = tags_stack
    gw = s.via_gateway()
    direct = helpers.tags(s.direct(), "demo/tl")
    for query in ["n=1", "n=2", "n=100", f"last={direct[0]}", "n=1&last=latest", "n=0"]:
        via = gw.request("GET", f"/v2/demo/tl/tags/list?{query}")
        raw = s.direct().request("GET", f"/v2/demo/tl/tags/list?{query}")
        assert via.status_code == raw.status_code, query
        if raw.status_code != 200:
            continue
        # The registry's page, less the reserved tags; its Link (if any) as it sent it.
        assert via.json()["tags"] == [t for t in raw.json()["tags"] if not reserved([t])], query
        assert via.headers.get("Link") == raw.headers.get("Link"), query


def test_many_tags_each_listed_once(tags_stack, pushed):
    s = tags_stack
    gw = s.via_gateway()
    manifest = gw.get_manifest("demo/tl", "v1")
    assert manifest.status_code == 200
    # Long enough for the registry to answer chunked (over Go's 2 KiB): the held-body path.
    user = [f"t{i:03d}-{'x' * 40}" for i in range(60)]
    for tag in user:
        r = s.direct().put_manifest("demo/tl", tag, manifest.content,
                                    manifest.headers["Content-Type"])
        assert r.status_code == 201, (tag, r.status_code, r.text[:200])
    seen = []
    path = "/v2/demo/tl/tags/list?n=7"
    for _ in range(100):
        r = gw.request("GET", path)
        assert r.status_code == 200, r.text[:300]
        seen += r.json()["tags"]
        link = r.headers.get("Link")
        if not link:
            break
        path = link.split(";")[0].strip("<> ")
    assert sorted(seen) == sorted(user + ["v1", "latest"]), seen
    assert len(seen) == len(set(seen))


def test_passthrough_repositories_are_untouched(tags_stack, pushed):
    s = tags_stack
    m = empty_image(s.direct(), "plain/tl")
    # A tag that looks reserved, in a repository the gateway does not encrypt, is the user's.
    for tag in ("v1", "ocicrypt.mine"):
        r = s.direct().put_manifest("plain/tl", tag, m)
        assert r.status_code == 201, r.text[:200]
    via = s.via_gateway().request("GET", "/v2/plain/tl/tags/list")
    raw = s.direct().request("GET", "/v2/plain/tl/tags/list")
    assert via.content == raw.content


def test_an_answer_over_the_limit_is_refused_not_shown_unfiltered(tags_stack, pushed):
    s = tags_stack
    m = empty_image(s.direct(), "demo/too-many")
    # 300 tags of 70 characters: over LIMIT (the registry answers it chunked, no length).
    for i in range(300):
        r = s.direct().put_manifest("demo/too-many", f"{'x' * 66}{i:04d}", m)
        assert r.status_code == 201, r.text[:200]
    raw = s.direct().request("GET", "/v2/demo/too-many/tags/list")
    assert len(raw.content) > LIMIT
    r = s.via_gateway().request("GET", "/v2/demo/too-many/tags/list")
    assert r.status_code == 502, (r.status_code, r.text[:300])
    assert helpers.oci_error_codes(r) == ["UNKNOWN"], r.text[:300]
    assert "limits.max_manifest_bytes" in r.text
    # The gateway goes on serving.
    r = s.via_gateway().request("GET", "/v2/demo/tl/tags/list")
    assert r.status_code == 200 and not reserved(r.json()["tags"])
