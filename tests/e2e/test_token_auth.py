"""Harbor-style bearer-token auth: the registry (distribution, `auth: token`) answers `401` with
`WWW-Authenticate: Bearer realm="<gateway>/service/token",…`, clients fetch a token per
repository and action from the token service behind the gateway (scripts/token_service.py) and
push through the gateway with it. The filter has no credentials of its own: its callouts
(opening sessions, finishing monolithic uploads, the ledger's reads and writes with
`replicas.state_key`, the delete check) carry the client's token, so they can do exactly what
that token allows in the request's repository and nothing elsewhere.

Judged by real outcomes: what the registry stores (its storage directory, its own log, read
through its API), and skopeo `--decryption-key` pulling every stored image back to the original
layers."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import List, Set

import pytest
import requests

import helpers
from conftest import (AUTH, TOKEN_ADMIN, TOKEN_READER, TOKEN_ROBOT, TOKEN_SHORT, TOKEN_TEAM,
                      Push, attempt_push)
from helpers import MIB, BearerAuth, Registry, RegistryLog
from test_multiplatform import multi_layout  # noqa: F401  (a fixture)

pytestmark = [pytest.mark.filter, pytest.mark.auth, pytest.mark.clients]

LEDGER_TAG = re.compile(r"^ocicrypt\.sha256-[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def tok_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("img-token")
    return helpers.build_image(d / "layout", "v1", 8 * MIB, marker=helpers.new_marker())


def token_log(stack) -> List[dict]:
    """Every token the token service issued so far (user, requested and granted scopes)."""
    path = stack.opts.state_dir / "token-service.log"
    return [json.loads(line) for line in path.read_text().splitlines()
            if line.startswith("{") and '"user"' in line]


def blob_files(stack) -> Set[str]:
    """The digests of every blob the registry has stored."""
    root = stack.storage / "docker/registry/v2/blobs/sha256"
    return {p.parent.name for p in root.glob("*/*/data")} if root.exists() else set()


def decrypts(stack, repo: str, image, tmp_path: Path, keys, exact: bool = True,
             creds=AUTH) -> None:
    """The stored `repo:v1` is encrypted, and skopeo (with a token from `creds`) pulls it back
    through the gateway, decrypting with each of `keys` alone, to the original layers."""
    r = stack.via_gateway(creds).get_manifest(repo, "v1")
    assert r.status_code == 200, f"{repo}: {r.status_code} {r.text[:300]}"
    helpers.assert_encrypted_manifest(r.json(), image, exact=exact)
    for i, key in enumerate(keys):
        out = tmp_path / f"out-{repo.replace('/', '-')}-{i}"
        helpers.skopeo_pull(f"{stack.addr}/{repo}:v1", out, "v1", creds=creds, keys=[key])
        helpers.assert_decrypted_matches(out, "v1", image, exact=exact)


def demo_keys(stack):
    return [stack.keys["rsa"]["private"], stack.keys["ec"]["private"]]


def tags(stack, repo: str, creds=AUTH) -> List[str]:
    """The repository's tags as the registry itself lists them (the gateway's `tags/list`
    leaves out its reserved ledger tags), read with a token got with `creds`."""
    reg = helpers.Registry(stack.gw.registry_url, stack.registry_auth(creds))
    r = reg.request("GET", f"/v2/{repo}/tags/list")
    assert r.status_code == 200, f"tags of {repo}: {r.status_code} {r.text[:300]}"
    return r.json().get("tags") or []


def tags_via_gateway(stack, repo: str, creds=AUTH) -> List[str]:
    r = stack.via_gateway(creds).request("GET", f"/v2/{repo}/tags/list")
    assert r.status_code == 200, f"tags of {repo}: {r.status_code} {r.text[:300]}"
    return r.json().get("tags") or []


def token_for(stack, creds, scope: str) -> str:
    """A token from the token service through the gateway, as clients get one."""
    r = requests.get(f"{stack.gw.gateway_url}/service/token", auth=creds, timeout=30,
                     params={"service": "ocicrypt-registry", "scope": scope})
    assert r.status_code == 200, f"{creds[0]}: {r.status_code} {r.text}"
    return r.json()["token"]


def claims(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


# --------------------------------------------------------------------------------------------
# the challenge and the token service


def test_registry_challenge_names_the_token_service_behind_the_gateway(token_stack):
    r = requests.get(f"{token_stack.gw.gateway_url}/v2/demo/app/tags/list", timeout=30)
    assert r.status_code == 401
    params = BearerAuth.challenge(r.headers["WWW-Authenticate"])
    assert params == {"realm": f"http://{token_stack.addr}/service/token",
                      "service": "ocicrypt-registry", "scope": "repository:demo/app:pull"}
    # Anonymous: a token, with no access in it.
    anon = requests.get(params["realm"], params={"service": params["service"],
                                                 "scope": params["scope"]}, timeout=30)
    assert anon.status_code == 200
    assert claims(anon.json()["token"])["access"] == [
        {"type": "repository", "name": "demo/app", "actions": []}]
    bad = requests.get(params["realm"], params={"service": params["service"]}, timeout=30,
                       auth=(AUTH[0], "wrong"))
    assert bad.status_code == 401
    # A robot account gets only what it holds: nothing in plain/, push and pull in demo/.
    t = claims(token_for(token_stack, TOKEN_ROBOT,
                         "repository:plain/x:pull,push repository:demo/x:pull,push,delete"))
    assert t["access"] == [{"type": "repository", "name": "plain/x", "actions": []},
                           {"type": "repository", "name": "demo/x", "actions": ["pull", "push"]}]


# --------------------------------------------------------------------------------------------
# every push flow with tokens


@pytest.fixture(scope="module")
def tok_push_skopeo(token_stack, tok_image) -> Push:
    return attempt_push(token_stack, "skopeo", "demo/app", tok_image, True,
                        lambda p: helpers.skopeo_push(tok_image, f"{token_stack.addr}/{p.ref}",
                                                      creds=AUTH, extra=["--preserve-digests"]))


def test_skopeo_chunked_push_with_tokens(token_stack, tok_push_skopeo, tmp_path):
    tok_push_skopeo.check()
    patches = [e for e in tok_push_skopeo.entries if e["method"] == "PATCH"]
    assert patches, "skopeo sent no PATCH:\n" + helpers.AccessLog.summary(tok_push_skopeo.entries)
    decrypts(token_stack, "demo/app", tok_push_skopeo.image, tmp_path, demo_keys(token_stack))
    asked = [t["requested"] for t in token_log(token_stack) if t["user"] == AUTH[0]]
    assert ["repository:demo/app:pull,push"] in asked, asked
    # The ledger (replicas.state_key) was written by the filter's callouts, which carry the
    # client's token: its records are in the repository the token was for.
    ledger = [t for t in tags(token_stack, "demo/app") if LEDGER_TAG.match(t)]
    assert len(ledger) == 2, tags(token_stack, "demo/app")
    # Through the gateway, with the same token, the user sees only the tags pushed.
    assert not [t for t in tags_via_gateway(token_stack, "demo/app") if LEDGER_TAG.match(t)]


def test_ctr_monolithic_push_with_tokens(token_stack, containerd, tok_image, tmp_path):
    ref = containerd.import_image(tok_image, "e2e.local/token")
    push = attempt_push(token_stack, "ctr", "demo/ctr", tok_image, True,
                        lambda p: containerd.push(ref, f"{token_stack.addr}/{p.ref}", creds=AUTH))
    push.check()
    monolithic = [e for e in push.entries if e["method"] == "PUT" and "/blobs/uploads/" in
                  e["path"] and int(e["bytes_received"] or 0) > MIB]
    assert monolithic, "ctr sent no monolithic PUT:\n" + helpers.AccessLog.summary(push.entries)
    decrypts(token_stack, "demo/ctr", tok_image, tmp_path, demo_keys(token_stack))


def test_single_post_upload_with_tokens(token_stack, tok_image, tmp_path):
    """`POST ?digest=` carrying the whole blob (the filter opens a session by callout with the
    client's token, streams the body into it and finishes it by callout). The client starts
    without a token: the first POST gets the registry's challenge through the filter, the
    client fetches a token for its scope and sends the POST again."""
    auth = BearerAuth(AUTH)
    repo = "demo/post"
    reg = Registry(token_stack.gw.gateway_url, auth)
    for desc in [tok_image.manifest["config"], *tok_image.manifest["layers"]]:
        data = tok_image.blob_path(desc["digest"]).read_bytes()
        r = reg.request("POST", f"/v2/{repo}/blobs/uploads/", params={"digest": desc["digest"]},
                        data=data, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, f"{desc['digest']}: {r.status_code} {r.text[:300]}"
        assert r.headers["Docker-Content-Digest"] == desc["digest"]
    r = reg.put_manifest(repo, "v1", tok_image.manifest_bytes)
    assert r.status_code == 201, r.text
    # One token, got by following the challenge (distribution names the actions in any order).
    (granted,) = [claims(g["token"])["access"] for g in auth.granted]
    assert [(a["name"], sorted(a["actions"])) for a in granted] == [(repo, ["pull", "push"])]
    decrypts(token_stack, repo, tok_image, tmp_path, demo_keys(token_stack)[:1])


def test_single_post_upload_without_a_push_token_gets_the_challenge(token_stack, tok_image):
    """`POST ?digest=` with a body and no token, or a pull-only one: the filter's session
    callout is answered 401, and the client gets that 401 with the registry's challenge
    (scope pull,push: what to fetch); nothing is stored."""
    layer = tok_image.manifest["layers"][0]
    data = tok_image.blob_path(layer["digest"]).read_bytes()
    before = blob_files(token_stack)
    pull_only = {"Authorization": "Bearer " + token_for(token_stack, AUTH,
                                                        "repository:demo/post-bare:pull")}
    for headers in ({}, pull_only):
        r = requests.post(f"{token_stack.gw.gateway_url}/v2/demo/post-bare/blobs/uploads/",
                          params={"digest": layer["digest"]}, data=data, timeout=60,
                          headers={"Content-Type": "application/octet-stream", **headers})
        assert r.status_code == 401, r.text
        assert helpers.oci_error_codes(r) == ["UNAUTHORIZED"]
        assert "registry answered 401" in r.text and "nothing was stored" in r.text
        params = BearerAuth.challenge(r.headers.get("WWW-Authenticate", ""))
        assert params.get("realm") == f"http://{token_stack.addr}/service/token", r.headers
        scope = params.get("scope", "").rpartition(":")
        assert scope[0] == "repository:demo/post-bare", r.headers
        assert sorted(scope[2].split(",")) == ["pull", "push"], r.headers
    assert blob_files(token_stack) == before


def test_cross_repository_mount_with_tokens(token_stack, tok_image, tmp_path):
    """skopeo pushes to a second repository of the project and mounts the layers from the
    first: its token names both repositories, the filter mounts the ciphertext."""
    src, dst = "demo/mount-src", "demo/mount-dst"
    helpers.skopeo_push(tok_image, f"{token_stack.addr}/{src}:v1", creds=AUTH,
                        extra=["--preserve-digests"])
    log = token_stack.access_log()
    helpers.skopeo_push(tok_image, f"{token_stack.addr}/{dst}:v1", creds=AUTH,
                        extra=["--preserve-digests"])
    entries = [e for e in log.entries() if e["path"]]  # (token requests log no client path)
    mounts = [e for e in entries if e["method"] == "POST" and "mount=" in e["path"]]
    assert mounts and all(e["status"] == 201 for e in mounts), helpers.AccessLog.summary(entries)
    assert not [e for e in entries if e["method"] in ("PATCH", "PUT") and "/blobs/uploads/" in
                e["path"] and int(e["bytes_received"] or 0) > MIB], \
        "the big layer was uploaded again:\n" + helpers.AccessLog.summary(entries)
    asked = [t["requested"] for t in token_log(token_stack) if t["user"] == AUTH[0]]
    assert any(f"repository:{src}:pull" in scopes and f"repository:{dst}:pull,push" in scopes
               for scopes in asked), asked
    decrypts(token_stack, dst, tok_image, tmp_path, demo_keys(token_stack)[:1])


def test_repush_after_restart_reads_the_ledger_with_the_clients_token(token_stack, tok_image,
                                                                       tmp_path):
    """With the ledger in the registry and Envoy restarted (its memory gone), a re-push is
    deduplicated by HEAD: the filter reads the ledger record with the client's token."""
    repo = "demo/dedupe"
    helpers.skopeo_push(tok_image, f"{token_stack.addr}/{repo}:v1", creds=AUTH,
                        extra=["--preserve-digests"])
    token_stack.gw.kill("envoy")
    token_stack.gw.start_envoy()
    log, reglog = token_stack.access_log(), RegistryLog.of(token_stack)
    helpers.skopeo_push(tok_image, f"{token_stack.addr}/{repo}:v2", creds=AUTH,
                        extra=["--preserve-digests"])
    entries = log.entries()
    big = tok_image.layer_digests[0]
    heads = [e for e in entries if e["method"] == "HEAD" and e["path"].endswith(big)]
    assert heads and heads[-1]["status"] == 200, helpers.AccessLog.summary(entries)
    assert not [e for e in entries if "/blobs/uploads/" in (e["path"] or "")
                and int(e["bytes_received"] or 0) > MIB], helpers.AccessLog.summary(entries)
    reads = [r for r in reglog.requests() if r[0] == "GET" and "/manifests/ocicrypt.sha256-" in r[1]]
    assert all(r[1].startswith(f"/v2/{repo}/") for r in reads), reads
    for d in tok_image.layer_digests:  # (the config is no layer: no record, read 404)
        tag = "ocicrypt.sha256-" + d.split(":")[1]
        assert ("GET", f"/v2/{repo}/manifests/{tag}", 200) in reads, reads
    r = token_stack.via_gateway().get_manifest(repo, "v2")
    assert r.status_code == 200
    assert r.json()["layers"] == token_stack.via_gateway().get_manifest(repo, "v1").json()["layers"]
    decrypts(token_stack, repo, tok_image, tmp_path, demo_keys(token_stack)[:1])


def test_multi_platform_index_with_tokens(token_stack, multi_layout, tmp_path):
    layout, images = multi_layout
    helpers.run(["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
                 "--dest-creds", f"{AUTH[0]}:{AUTH[1]}",
                 f"oci:{layout}:v1", f"docker://{token_stack.addr}/demo/multi:v1"],
                timeout=helpers.CLIENT_TIMEOUT)
    helpers.skopeo_pull_all(f"{token_stack.addr}/demo/multi:v1", tmp_path / "out",
                            token_stack.keys["ec"]["private"], images, creds=AUTH)
    stored = token_stack.via_gateway().get_manifest("demo/multi", "v1").json()
    for child in stored["manifests"]:
        m = token_stack.via_gateway().get_manifest("demo/multi", child["digest"]).json()
        assert all(x["mediaType"].endswith("+encrypted") for x in m["layers"]), m


# --------------------------------------------------------------------------------------------
# what a token does not allow


def test_pull_only_user_cannot_push(token_stack, tok_image):
    before = blob_files(token_stack)
    reglog = RegistryLog.of(token_stack)
    proc = helpers.skopeo_push(tok_image, f"{token_stack.addr}/demo/readonly:v1",
                               creds=TOKEN_READER, check=False)
    assert proc.returncode != 0
    assert re.search(r"unauthorized|denied|401|403", proc.stderr, re.I), proc.stderr
    # The registry's answer passes through as it is: 401 with its insufficient_scope challenge.
    reg = token_stack.via_gateway(TOKEN_READER)
    r = reg.start_upload("demo/readonly")
    assert r.status_code == 401, r.text
    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
    assert helpers.oci_error_codes(r) == ["UNAUTHORIZED"]
    writes = [x for x in reglog.requests() if x[0] != "GET" and x[0] != "HEAD"]
    assert writes and all(x[2] == 401 for x in writes), writes
    assert blob_files(token_stack) == before
    assert not (token_stack.storage / "docker/registry/v2/repositories/demo/readonly").exists()


@pytest.fixture(scope="module")
def team_push(token_stack, tok_image):
    """tok_image pushed to project team/ by its developer (encrypted to team's key)."""
    helpers.skopeo_push(tok_image, f"{token_stack.addr}/team/app:v1", creds=TOKEN_TEAM,
                        extra=["--preserve-digests"])
    return tok_image


def test_team_push_decrypts_with_teams_key(token_stack, team_push, tmp_path):
    decrypts(token_stack, "team/app", team_push, tmp_path, [token_stack.team_key],
             creds=TOKEN_TEAM)
    ledger = [t for t in tags(token_stack, "team/app", TOKEN_TEAM) if LEDGER_TAG.match(t)]
    assert len(ledger) == 2


def test_project_token_cannot_make_the_filter_act_in_another_project(token_stack, team_push):
    """The demo/ robot's token, aimed at project team/ every way the filter acts: nothing in
    team/ is read or written (the registry's log: every request there answered 401/403), the
    ledger there is whole, and nothing of team/ turns up in demo/."""
    team = token_stack.via_gateway(TOKEN_TEAM)
    team_tags = tags(token_stack, "team/app", TOKEN_TEAM)
    ledger_tag = next(t for t in team_tags if LEDGER_TAG.match(t))
    ledger_digest = team.get_manifest("team/app", ledger_tag).headers["Docker-Content-Digest"]
    big = team_push.layer_digests[0]
    before = blob_files(token_stack)
    reglog = RegistryLog.of(token_stack)

    proc = helpers.skopeo_push(team_push, f"{token_stack.addr}/team/robot:v1", creds=TOKEN_ROBOT,
                               check=False)
    assert proc.returncode != 0, proc.stdout
    robot = token_stack.via_gateway(TOKEN_ROBOT)
    # HEAD dedupe of team's layer (the filter knows it from its ledger).
    assert robot.request("HEAD", f"/v2/team/app/blobs/{big}").status_code == 401
    # The ledger record itself, read and deleted.
    assert robot.get_manifest("team/app", ledger_tag).status_code == 401
    r = robot.request("DELETE", f"/v2/team/app/manifests/{ledger_digest}")
    assert r.status_code in (401, 403), r.text
    # A mount from team/ into the robot's own project: an upload, not a mount.
    r = robot.start_upload("demo/robot", params={"mount": big, "from": "team/app"})
    assert r.status_code == 202, r.text
    robot.request("DELETE", r.headers["Location"])
    # A manifest in demo/ naming team's layers: the filter's ledger lookups stay in demo/.
    r = robot.put_manifest("demo/robot", "v1", team_push.manifest_bytes)
    assert r.status_code == 400 and helpers.oci_error_codes(r) == ["MANIFEST_INVALID"], r.text

    in_team = [x for x in reglog.requests() if x[1].startswith("/v2/team/")]
    assert in_team and all(x[2] in (401, 403) for x in in_team), in_team
    assert tags(token_stack, "team/app", TOKEN_TEAM) == team_tags
    assert team.get_manifest("team/app", ledger_tag).status_code == 200
    assert blob_files(token_stack) == before
    assert not (token_stack.storage / "docker/registry/v2/repositories/team/robot").exists()


def test_delete_needs_pull_too_to_pass_the_ledger_guard(token_stack, tok_push_skopeo, tok_image):
    """A token scoped to `delete` alone cannot delete a ledger record (the filter cannot read it
    to tell); with pull too the guard refuses it as the ledger's; skopeo delete (scope `*`)
    deletes an image."""
    tok_push_skopeo.check()
    reg = token_stack.via_gateway()
    ledger_tag = next(t for t in tags(token_stack, "demo/app") if LEDGER_TAG.match(t))
    digest = reg.get_manifest("demo/app", ledger_tag).headers["Docker-Content-Digest"]
    path = f"{token_stack.gw.gateway_url}/v2/demo/app/manifests/{digest}"
    for scope, needle in [("delete", "needs pull as well as delete"), ("pull,delete", "ledger")]:
        token = token_for(token_stack, AUTH, f"repository:demo/app:{scope}")
        r = requests.delete(path, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 403 and needle in r.text, f"{scope}: {r.status_code} {r.text}"
    assert reg.get_manifest("demo/app", ledger_tag).status_code == 200

    helpers.skopeo_push(tok_image, f"{token_stack.addr}/demo/todelete:v1", creds=AUTH)
    helpers.run(["skopeo", "delete", "--tls-verify=false", "--creds", f"{AUTH[0]}:{AUTH[1]}",
                 f"docker://{token_stack.addr}/demo/todelete:v1"], timeout=helpers.CLIENT_TIMEOUT)
    assert reg.get_manifest("demo/todelete", "v1").status_code == 404
    asked = [t["requested"] for t in token_log(token_stack) if t["user"] == AUTH[0]]
    assert ["repository:demo/todelete:*"] in asked, asked[-3:]


# --------------------------------------------------------------------------------------------
# tokens that expire mid-push


#: How long the registry takes a `short` token (its exp is 50 s in the past; distribution
#: allows 60 s of leeway), and how long the slow body below streams.
SHORT_VALID_S = 10
SLOW_BODY_S = 16


def test_token_expiring_during_a_monolithic_upload_stores_nothing(token_stack, tok_image,
                                                                   tmp_path):
    """The token is good when the PUT's headers reach the registry and has expired when the
    filter finishes the upload by callout: the client gets a clear refusal, no blob is stored;
    the same upload with a fresh token then succeeds."""
    repo = "demo/expiry"
    layer = tok_image.manifest["layers"][0]
    data = tok_image.blob_path(layer["digest"]).read_bytes()
    before = blob_files(token_stack)
    reglog = RegistryLog.of(token_stack)
    short = {"Authorization": "Bearer " + token_for(token_stack, TOKEN_SHORT,
                                                    f"repository:{repo}:pull,push")}
    gw = token_stack.gw.gateway_url
    r = requests.post(f"{gw}/v2/{repo}/blobs/uploads/", headers=short, timeout=60)
    assert r.status_code == 202, r.text
    piece = 512 * 1024

    def slow():  # the token expires while the body streams
        for i in range(0, len(data), piece):
            yield data[i:i + piece]
            time.sleep(SLOW_BODY_S * piece / len(data))

    r = requests.put(Registry(gw).url(r.headers["Location"]), params={"digest": layer["digest"]},
                     data=slow(), timeout=120,
                     headers={**short, "Content-Type": "application/octet-stream"})
    started = [x for x in reglog.requests() if x[0] == "PATCH"]
    assert [x[2] for x in started] == [202], \
        f"the token had expired before the body started (machine too slow?): {started}"
    # The registry's own 401 and error body, handed on by the filter.
    assert r.status_code == 401, f"{r.status_code} {r.text}"
    assert helpers.oci_error_codes(r) == ["UNAUTHORIZED"], r.text
    # ... with its challenge: the client fetches a fresh token and sends the upload again.
    assert 'error="invalid_token"' in r.headers.get("WWW-Authenticate", ""), r.headers
    finishes = [x for x in reglog.requests() if x[0] == "PUT" and "/blobs/uploads/" in x[1]]
    assert finishes and all(x[2] == 401 for x in finishes), reglog.requests()
    assert blob_files(token_stack) == before
    assert not helpers.scan_for(token_stack.storage / "docker/registry/v2/blobs",
                                [tok_image.marker.encode()])

    # The retry, with a fresh (long-lived) token.
    reg = token_stack.via_gateway()
    for desc in [tok_image.manifest["config"], *tok_image.manifest["layers"]]:
        blob = tok_image.blob_path(desc["digest"]).read_bytes()
        r = reg.upload_monolithic(repo, blob, desc["digest"])
        assert r.status_code == 201, f"{r.status_code} {r.text[:300]}"
    assert reg.put_manifest(repo, "v1", tok_image.manifest_bytes).status_code == 201
    decrypts(token_stack, repo, tok_image, tmp_path, demo_keys(token_stack)[:1])


def test_token_expiring_between_chunks_is_refused_and_the_upload_goes_on(token_stack, tok_image,
                                                                         tmp_path):
    """A PATCH with an expired token gets the registry's 401 (invalid_token) through the
    gateway; with a fresh token the same session goes on, and the blob decrypts."""
    repo = "demo/expiry-chunks"
    layer = tok_image.manifest["layers"][0]
    data = tok_image.blob_path(layer["digest"]).read_bytes()
    short = BearerAuth(TOKEN_SHORT)
    short.tokens[repo] = token_for(token_stack, TOKEN_SHORT, f"repository:{repo}:pull,push")
    issued = time.monotonic()
    reg = Registry(token_stack.gw.gateway_url, short)
    r = reg.start_upload(repo)
    assert r.status_code == 202, r.text
    half = len(data) // 2
    r = reg.request("PATCH", r.headers["Location"], data=data[:half], headers={
        "Content-Type": "application/octet-stream", "Content-Range": f"0-{half - 1}"})
    assert r.status_code == 202, r.text
    assert not short.granted, "the short token expired before the first chunk (machine too slow?)"
    loc = r.headers["Location"]
    time.sleep(max(0.0, SHORT_VALID_S + 2 - (time.monotonic() - issued)))
    stale = {"Authorization": f"Bearer {short.tokens[repo]}",
             "Content-Type": "application/octet-stream", "Content-Range": f"{half}-{len(data) - 1}"}
    r = requests.patch(reg.url(loc), data=data[half:], headers=stale, timeout=60)
    assert r.status_code == 401, r.text
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]

    fresh = token_stack.via_gateway()
    r = fresh.request("PATCH", loc, data=data[half:], headers={
        "Content-Type": "application/octet-stream", "Content-Range": f"{half}-{len(data) - 1}"})
    assert r.status_code == 202, r.text
    r = fresh.request("PUT", r.headers["Location"], params={"digest": layer["digest"]},
                      headers={"Content-Length": "0"})
    assert r.status_code == 201, r.text
    for desc in [tok_image.manifest["config"], tok_image.manifest["layers"][1]]:
        blob = tok_image.blob_path(desc["digest"]).read_bytes()
        assert fresh.upload_monolithic(repo, blob, desc["digest"]).status_code == 201
    assert fresh.put_manifest(repo, "v1", tok_image.manifest_bytes).status_code == 201
    decrypts(token_stack, repo, tok_image, tmp_path, demo_keys(token_stack)[:1])


# --------------------------------------------------------------------------------------------
# scripts/rotate's bearer-token flow against this token service


def run_rotate(stack, creds, *extra: str) -> subprocess.CompletedProcess:
    rotate = Path(__file__).resolve().parents[2] / "scripts" / "rotate"
    return subprocess.run([str(rotate), "--state", str(stack.opts.state_dir), "--project", "demo",
                           "--key", str(stack.keys["rsa"]["private"]),
                           "--registry-creds", f"{creds[0]}:{creds[1]}", *extra],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OCICRYPT_STATE_KEY=stack.opts.state_key))


def test_rotate_with_bearer_tokens(token_stack, tok_push_skopeo, tmp_path):
    """scripts/rotate lists the project's repositories (registry:catalog:*) and reads every
    image and ledger record with tokens from the token service. The recipients have not
    changed: everything is in line, nothing is written. A project user without the catalog
    scope cannot list: the run fails and says so."""
    tok_push_skopeo.check()
    reglog = RegistryLog.of(token_stack)
    proc = run_rotate(token_stack, TOKEN_ADMIN)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    summary = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
    reads = [x for x in reglog.requests() if x[0] in ("GET", "HEAD")]
    assert ("GET", "/v2/_catalog?n=1000", 200) in reads, reads[:5]
    assert any(x[1].startswith("/v2/demo/app/manifests/") and x[2] == 200 for x in reads), reads
    assert not [x for x in reglog.requests() if x[0] not in ("GET", "HEAD")], summary
    asked = [t for t in token_log(token_stack) if t["user"] == TOKEN_ADMIN[0]]
    assert any(g["type"] == "registry" and g["actions"] == ["*"]
               for t in asked for g in t["granted"]), asked
    decrypts(token_stack, "demo/app", tok_push_skopeo.image, tmp_path, demo_keys(token_stack))

    proc = run_rotate(token_stack, AUTH)
    assert proc.returncode != 0, proc.stdout
    assert "catalog" in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr[-3000:]
    print(summary, [x for x in (proc.stdout + proc.stderr).splitlines() if "catalog" in x.lower()])


def test_no_plaintext_in_token_registry_storage(token_stack, tok_image, tok_push_skopeo):
    tok_push_skopeo.check()
    assert not helpers.scan_for(token_stack.storage, [tok_image.marker.encode()])
    present = [d for d in tok_image.layer_digests
               if helpers.registry_blob_path(token_stack.storage, d).exists()]
    assert not present, f"plaintext layer blobs stored: {present}"
