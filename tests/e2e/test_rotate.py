"""Issue 18: `scripts/rotate` brings stored images in line with a project's verified recipients.

One stack (registry behind basic auth, key service over TLS, Envoy with the filter and
`replicas.state_key`, so the gateway keeps its ledger in the registry). Images are pushed through the gateway to project
`rotproj` (a single image, another repository, a multi-platform index); then, driven only by
what the key service publishes:

1. a recipient is added → `scripts/rotate` re-wraps every layer key: the new key decrypts, the
   old keys still do, and the registry's own log shows no blob upload at all; a referrer of
   the image is pointed at the rewritten manifest;
2. the old recipients are removed → every layer is re-encrypted: the new key decrypts every
   layer to the original digests, the removed keys fail, no plaintext marker is in storage,
   a re-push through a restarted gateway uploads no layer (it reads the ledger records the
   tool rewrote), and garbage collection then drops every old ciphertext;
3. each run is repeated and changes nothing; a dry run writes nothing;
4. a key that opens no layer: every layer reported, nothing touched, exit status 1;
5. a run interrupted after a layer was re-encrypted (the registry fails to serve the next
   one): the image is left untouched, and the next run reuses that layer (found through the
   ledger record rewritten right after it) instead of moving it again;
6. without the state key (the ledger cannot be read): the first run re-encrypts (recipients
   unknown), the second changes nothing (the tool's own authenticated annotations say), and a
   forged annotation claiming the layer is already in line is not believed.

Judged on outcomes: skopeo (containers/ocicrypt) decrypting, the registry's log and storage.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
import requests

import helpers
from conftest import AUTH, Stack, _start_stack, stop_stack
from helpers import MIB, MT_INDEX, MT_MANIFEST, RegistryLog

pytestmark = [pytest.mark.filter, pytest.mark.clients]

REPO_ROOT = Path(__file__).resolve().parents[2]
ROTATE = REPO_ROOT / "scripts" / "rotate"
KEYSERVICE = REPO_ROOT / "scripts" / "keyservice"
PROJECT = "rotproj"


@pytest.fixture(scope="module")
def rot_stack(tmp_path_factory):
    s = _start_stack(tmp_path_factory, "rotate", 90, filter=True, creds=AUTH,
                     keyservice_refresh_seconds=2,
                     state_key=base64.b64encode(os.urandom(32)).decode(),
                     extra_rules=[{"repositories": f"{PROJECT}/**", "action": "encrypt"},
                                  {"repositories": "rotfail/**", "action": "encrypt"},
                                  {"repositories": "rotnokey/**", "action": "encrypt"},
                                  {"repositories": "rotresume/**", "action": "encrypt"}])
    yield s
    stop_stack(s)


def keyservice(s: Stack, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(KEYSERVICE), *args, "--repo",
                           str(s.opts.keyservice_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def set_recipients(s: Stack, project: str, pems: Sequence[Path], wait: bool = True) -> None:
    """Publishes `project`'s recipients; with `wait`, until an upload to it opens."""
    keyservice(s, "set-recipients", "--project", project,
               *[a for pem in pems for a in ("--pem", str(pem))])
    if not wait:
        return
    deadline = time.monotonic() + 20
    while True:
        r = requests.post(f"http://{s.addr}/v2/{project}/app/blobs/uploads/", timeout=30,
                          auth=s.creds)
        if r.status_code == 202 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 202, f"{project}: {r.status_code} {r.text[:300]}"


def new_ec_key(d: Path, name: str) -> Tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = d / f"{name}.pem", d / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def rotate(s: Stack, project: str, keys: Sequence[Path], *extra: str,
           expect: int = 0) -> Tuple[dict, str]:
    """Runs scripts/rotate on the stack (its state directory gives registry, key service, CA
    and pinned root; the state key comes as the gateway gets it, OCICRYPT_STATE_KEY). Returns
    the summary and the log."""
    argv = [str(ROTATE), "--state", str(s.opts.state_dir), "--project", project,
            "--registry-creds", ":".join(s.creds)]
    for k in keys:
        argv += ["--key", str(k)]
    env = dict(os.environ, OCICRYPT_STATE_KEY=s.opts.state_key)
    if "--no-state-key" in extra:
        del env["OCICRYPT_STATE_KEY"]
    proc = subprocess.run(argv + list(extra), capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == expect, \
        f"scripts/rotate exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}"
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert lines, f"no summary:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1]), proc.stderr


def multi_layout(base: Path) -> Tuple[Path, Dict[str, helpers.Image]]:
    """An OCI layout whose tag v1 names an index of two platform images."""
    layout = base / "multi-layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    children, images = [], {}
    for arch in ("amd64", "arm64"):
        img = helpers.build_image(base / arch, "v1", 1 * MIB, marker=helpers.new_marker())
        for blob in (base / arch / "blobs" / "sha256").iterdir():
            shutil.copy(blob, layout / "blobs" / "sha256" / blob.name)
        children.append({"mediaType": MT_MANIFEST, "digest": img.manifest_digest,
                         "size": len(img.manifest_bytes),
                         "platform": {"architecture": arch, "os": "linux"}})
        images[arch] = img
    index = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": children},
                       separators=(",", ":")).encode()
    digest = helpers.sha256_digest(index)
    (layout / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(index)
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": MT_INDEX,
        "manifests": [{"mediaType": MT_INDEX, "digest": digest, "size": len(index),
                       "annotations": {helpers.ANN_REF_NAME: "v1"}}]}))
    return layout, images


def stored_layers(s: Stack, repo: str, ref: str = "v1") -> List[dict]:
    """Every layer descriptor of `repo:ref` (an index: of every child, in order)."""
    reg = s.direct()
    doc = reg.get_manifest(repo, ref).json()
    if "manifests" in doc:
        return [l for child in doc["manifests"]
                for l in reg.get_manifest(repo, child["digest"]).json()["layers"]]
    return doc["layers"]


def writes(log: RegistryLog) -> List[Tuple[str, str, int]]:
    return [r for r in log.requests() if r[0] in ("PUT", "POST", "PATCH", "DELETE")]


def pull_multi(s: Stack, repo: str, out: Path, key: Path, images: Dict[str, helpers.Image],
               check: bool = True) -> subprocess.CompletedProcess:
    """skopeo copy --all with `key`; when `check`, every platform decrypts to the original
    layers."""
    if out.exists():
        shutil.rmtree(out)
    proc = helpers.run(["skopeo", "copy", "--all", "--src-tls-verify=false",
                        "--src-creds", ":".join(s.creds),
                        "--dest-oci-accept-uncompressed-layers", "--decryption-key", str(key),
                        f"docker://{s.registry_addr}/{repo}:v1", f"oci:{out}:v1"],
                       timeout=helpers.CLIENT_TIMEOUT, check=check)
    if check:
        blobs = out / "blobs" / "sha256"
        top = json.loads((out / "index.json").read_text())["manifests"][0]
        index = json.loads((blobs / top["digest"].split(":")[1]).read_text())
        assert len(index["manifests"]) == 2
        for child in index["manifests"]:
            m = json.loads((blobs / child["digest"].split(":")[1]).read_text())
            img = images[child["platform"]["architecture"]]
            assert [l["digest"] for l in m["layers"]] == img.layer_digests
            for l in m["layers"]:
                assert helpers.file_digest(blobs / l["digest"].split(":")[1]) == l["digest"]
    return proc


EMPTY = b"{}"
MT_EMPTY = "application/vnd.oci.empty.v1+json"


def push_referrer(s: Stack, repo: str, tag: str) -> str:
    """Pushes through the gateway, by digest, an artifact whose subject is `repo:tag` as
    stored (what `oras attach` or cosign's OCI 1.1 mode push). Returns its digest."""
    gw = s.via_gateway()
    r = gw.upload_monolithic(repo, EMPTY)
    assert r.status_code == 201, f"empty blob: {r.status_code} {r.text[:300]}"
    subject = s.direct().get_manifest(repo, tag)
    empty = {"mediaType": MT_EMPTY, "digest": helpers.sha256_digest(EMPTY), "size": 2}
    body = json.dumps({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "artifactType": "application/vnd.example.sbom.v1+json",
        "config": empty, "layers": [empty],
        "subject": {"mediaType": MT_MANIFEST, "digest": helpers.sha256_digest(subject.content),
                    "size": len(subject.content)},
    }, separators=(",", ":")).encode()
    digest = helpers.sha256_digest(body)
    r = gw.put_manifest(repo, digest, body)
    assert r.status_code == 201, f"referrer: {r.status_code} {r.text[:300]}"
    return digest


def assert_referrer_names(s: Stack, repo: str, referrer: str, tag: str) -> None:
    """The referrer (stored under the gateway's reserved tag of its digest) names what
    `repo:tag` is now."""
    stored = s.direct().get_manifest(repo, "ocicrypt.sha256-" + referrer.split(":")[1])
    assert stored.status_code == 200, stored.text[:300]
    now = s.direct().get_manifest(repo, tag).content
    assert stored.json()["subject"]["digest"] == helpers.sha256_digest(now), \
        "the referrer still names the manifest from before the rotation"


def test_add_then_remove_recipients(rot_stack, tmp_path):
    s = rot_stack
    rsa, ec = s.keys["rsa"], s.keys["ec"]
    set_recipients(s, PROJECT, [rsa["public"], ec["public"]])
    app = helpers.build_image(tmp_path / "app", "v1", 2 * MIB, marker=helpers.new_marker())
    other = helpers.build_image(tmp_path / "other", "v1", 1 * MIB, marker=helpers.new_marker())
    helpers.skopeo_push(app, f"{s.addr}/{PROJECT}/app:v1", creds=s.creds,
                        extra=["--preserve-digests"])
    helpers.skopeo_push(other, f"{s.addr}/{PROJECT}/other:v1", creds=s.creds,
                        extra=["--preserve-digests"])
    layout, platform_images = multi_layout(tmp_path)
    helpers.run(["skopeo", "copy", "--all", "--preserve-digests", "--dest-tls-verify=false",
                 "--dest-creds", ":".join(s.creds), f"oci:{layout}:v1", f"docker://{s.addr}/{PROJECT}/multi:v1"],
                timeout=helpers.CLIENT_TIMEOUT)
    referrer = push_referrer(s, f"{PROJECT}/app", "v1")
    repos = {"app": app, "other": other}
    n_layers = 2 + 2 + 2 * 2
    before = {r: stored_layers(s, f"{PROJECT}/{r}") for r in ("app", "other", "multi")}

    # --- 1. a recipient added: re-wrap only --------------------------------------------------
    new_priv, new_pub = new_ec_key(tmp_path, "escrow")
    set_recipients(s, PROJECT, [rsa["public"], ec["public"], new_pub], wait=False)

    log = RegistryLog.of(s)
    summary, err = rotate(s, PROJECT, [rsa["private"]], "--dry-run")
    assert writes(log) == [], f"a dry run wrote to the registry: {writes(log)}"
    assert summary["rewrapped"] == n_layers and summary["reencrypted"] == 0, (summary, err)
    assert {r: stored_layers(s, f"{PROJECT}/{r}") for r in before} == before

    # --delete-replaced: the manifests a run replaces are deleted by digest, so that a
    # collection without --delete-untagged frees them (step 4).
    log = RegistryLog.of(s)
    summary, err = rotate(s, PROJECT, [rsa["private"]], "--delete-replaced")
    assert summary["rewrapped"] == n_layers, (summary, err)
    # app, other, multi's index and its two platforms, the referrer and its subject (app).
    assert summary["manifests_deleted"] == 6, (summary, err)
    assert summary["reencrypted"] == 0 and summary["bytes_uploaded"] == 0, summary
    assert summary["failed"] == 0 and summary["repositories"] == 3, summary
    assert summary["referrers_repointed"] == 1, summary
    assert_referrer_names(s, f"{PROJECT}/app", referrer, "v1")
    uploads = [r for r in log.requests() if "/blobs/" in r[1] and r[0] != "GET"
               and r[0] != "HEAD"]
    assert uploads == [], f"re-wrapping uploaded blobs: {uploads}"
    assert any(r[0] == "PUT" and "/manifests/" in r[1] for r in log.requests())
    after = {r: stored_layers(s, f"{PROJECT}/{r}") for r in before}
    for r in before:
        assert [l["digest"] for l in after[r]] == [l["digest"] for l in before[r]], \
            "re-wrapping changed a ciphertext"
        assert all(a["annotations"][helpers.ANN_KEYS_JWE] != b["annotations"][helpers.ANN_KEYS_JWE]
                   for a, b in zip(after[r], before[r])), "a layer key was not re-wrapped"
    for name, img in repos.items():
        for label, key in (("new", new_priv), ("rsa", rsa["private"]), ("ec", ec["private"])):
            out = tmp_path / f"wrap-{name}-{label}"
            helpers.skopeo_pull(f"{s.registry_addr}/{PROJECT}/{name}:v1", out, "v1", keys=[key],
                               creds=s.creds)
            helpers.assert_decrypted_matches(out, "v1", img)
    pull_multi(s, f"{PROJECT}/multi", tmp_path / "wrap-multi", new_priv, platform_images)

    log = RegistryLog.of(s)
    summary, err = rotate(s, PROJECT, [rsa["private"]])
    assert summary["unchanged"] == n_layers and summary["rewrapped"] == 0 \
        and summary["reencrypted"] == 0 and summary["tags_repointed"] == 0, (summary, err)
    assert writes(log) == [], f"a second run wrote: {writes(log)}"

    # --- 2. the old recipients removed: re-encrypt -------------------------------------------
    set_recipients(s, PROJECT, [new_pub], wait=False)
    log = RegistryLog.of(s)
    summary, err = rotate(s, PROJECT, [new_priv], "--jobs", "2", "--delete-replaced")
    assert summary["reencrypted"] == n_layers and summary["rewrapped"] == 0, (summary, err)
    total = sum(l["size"] for r in before for l in before[r])
    assert summary["bytes_uploaded"] == total == summary["bytes_downloaded"], summary
    assert summary["ledger_updated"] == n_layers and summary["ledger_stale"] == 0, summary
    committed = [r for r in log.blob_writes() if r[0] == "PUT"]
    assert len(committed) == n_layers, committed
    reencrypted = {r: stored_layers(s, f"{PROJECT}/{r}") for r in before}
    for r in before:
        old = {l["digest"] for l in before[r]}
        assert not old & {l["digest"] for l in reencrypted[r]}, "a ciphertext was kept"
    for name, img in repos.items():
        out = tmp_path / f"enc-{name}-new"
        helpers.skopeo_pull(f"{s.registry_addr}/{PROJECT}/{name}:v1", out, "v1", keys=[new_priv],
                               creds=s.creds)
        helpers.assert_decrypted_matches(out, "v1", img)
        for label, key in (("rsa", rsa["private"]), ("ec", ec["private"])):
            old = helpers.skopeo_pull(f"{s.registry_addr}/{PROJECT}/{name}:v1",
                                      tmp_path / f"enc-{name}-{label}", "v1", keys=[key],
                                      creds=s.creds, check=False)
            assert old.returncode != 0, f"the removed {label} key opens {name} after rotation"
    pull_multi(s, f"{PROJECT}/multi", tmp_path / "enc-multi", new_priv, platform_images)
    old = pull_multi(s, f"{PROJECT}/multi", tmp_path / "enc-multi-rsa", rsa["private"],
                     platform_images, check=False)
    assert old.returncode != 0, "the removed rsa key opens the multi-platform image"
    markers = [i.marker.encode() for i in [app, other, *platform_images.values()]]
    assert helpers.scan_for(s.storage, markers) == [], "plaintext in the registry's storage"
    assert summary["referrers_repointed"] == 1, summary
    assert_referrer_names(s, f"{PROJECT}/app", referrer, "v1")

    log = RegistryLog.of(s)
    summary, err = rotate(s, PROJECT, [new_priv])
    assert summary["unchanged"] == n_layers and summary["reencrypted"] == 0 \
        and summary["tags_repointed"] == 0, (summary, err)
    assert writes(log) == [], f"a second run wrote: {writes(log)}"

    # --- 3. a re-push through a restarted gateway finds the rotated layers in the ledger -----
    s.gw.stop()
    s.gw.start()
    set_recipients(s, PROJECT, [new_pub])
    log = RegistryLog.of(s)
    helpers.skopeo_push(app, f"{s.addr}/{PROJECT}/app:v2", creds=s.creds,
                        extra=["--preserve-digests"])
    assert log.blob_writes() == [], f"the re-push uploaded blobs: {log.blob_writes()}"
    assert [l["digest"] for l in stored_layers(s, f"{PROJECT}/app", "v2")] == \
        [l["digest"] for l in reencrypted["app"]]

    # --- 4. garbage collection drops the ciphertext the removed keys open --------------------
    old_blobs = {l["digest"] for r in before for l in before[r]}
    assert all(helpers.registry_blob_path(s.storage, d).exists() for d in old_blobs)
    config = s.opts.state_dir / "registry.yml"
    # Without --delete-untagged: distribution 2.8's would collect multi's untagged platform
    # manifests, rotated ones included (operator's guide 1.5); the replaced manifests are gone
    # already (--delete-replaced).
    gc = helpers.run(["/usr/bin/docker-registry", "garbage-collect", str(config)])
    kept = [d for d in old_blobs if helpers.registry_blob_path(s.storage, d).exists()]
    assert kept == [], f"garbage collection kept old ciphertext: {kept}\n{gc.stdout[-2000:]}"
    for r in reencrypted:
        for l in reencrypted[r]:
            assert helpers.registry_blob_path(s.storage, l["digest"]).exists(), \
                f"garbage collection dropped a rotated layer of {r}"
    for name, img in repos.items():
        out = tmp_path / f"gc-{name}"
        helpers.skopeo_pull(f"{s.registry_addr}/{PROJECT}/{name}:v1", out, "v1",
                            keys=[new_priv], creds=s.creds)
        helpers.assert_decrypted_matches(out, "v1", img)
    pull_multi(s, f"{PROJECT}/multi", tmp_path / "gc-multi", new_priv, platform_images)


def test_a_key_that_opens_nothing_leaves_everything_untouched(rot_stack, tmp_path, wrong_key):
    s = rot_stack
    rsa, ec = s.keys["rsa"], s.keys["ec"]
    set_recipients(s, "rotfail", [rsa["public"], ec["public"]])
    img = helpers.build_image(tmp_path / "img", "v1", 1 * MIB, marker=helpers.new_marker())
    helpers.skopeo_push(img, f"{s.addr}/rotfail/app:v1", creds=s.creds,
                        extra=["--preserve-digests"])
    before = s.direct().get_manifest("rotfail/app", "v1").content
    _new_priv, new_pub = new_ec_key(tmp_path, "other")
    set_recipients(s, "rotfail", [new_pub], wait=False)
    log = RegistryLog.of(s)
    summary, err = rotate(s, "rotfail", [wrong_key], expect=1)
    assert summary["failed"] == 2 and summary["reencrypted"] == 0, (summary, err)
    assert "left untouched" in err and "none of the given keys opens it" in err, err
    assert writes(log) == [], f"wrote to the registry: {writes(log)}"
    assert s.direct().get_manifest("rotfail/app", "v1").content == before


def key_id(pub_pem: Path) -> str:
    """The tool's id of a recipient key (ocicrypt_core's fingerprint of the set holding only
    it): sha256 over the sha256 of the key's canonical bytes (EC: the uncompressed point)."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(pub_pem.read_bytes())
    point = key.public_bytes(serialization.Encoding.X962,
                             serialization.PublicFormat.UncompressedPoint)
    return hashlib.sha256(hashlib.sha256(point).digest()).hexdigest()


def test_without_the_state_key(rot_stack, tmp_path):
    s = rot_stack
    rsa, ec = s.keys["rsa"], s.keys["ec"]
    repo = "rotnokey/app"
    set_recipients(s, "rotnokey", [rsa["public"], ec["public"]])
    img = helpers.build_image(tmp_path / "img", "v1", 1 * MIB, marker=helpers.new_marker())
    helpers.skopeo_push(img, f"{s.addr}/{repo}:v1", creds=s.creds,
                        extra=["--preserve-digests"])
    before = stored_layers(s, repo)
    new_priv, new_pub = new_ec_key(tmp_path, "added")
    set_recipients(s, "rotnokey", [rsa["public"], ec["public"], new_pub], wait=False)

    summary, err = rotate(s, "rotnokey", [rsa["private"]], "--no-state-key")
    assert summary["reencrypted"] == 2 and summary["ledger_stale"] == 2, (summary, err)
    assert "recipients unknown" in err, err
    assert not {l["digest"] for l in before} & {l["digest"] for l in stored_layers(s, repo)}
    for label, key in (("new", new_priv), ("rsa", rsa["private"]), ("ec", ec["private"])):
        out = tmp_path / f"nokey-{label}"
        helpers.skopeo_pull(f"{s.registry_addr}/{repo}:v1", out, "v1", keys=[key],
                            creds=s.creds)
        helpers.assert_decrypted_matches(out, "v1", img)

    log = RegistryLog.of(s)
    summary, err = rotate(s, "rotnokey", [rsa["private"]], "--no-state-key")
    assert summary["unchanged"] == 2 and summary["reencrypted"] == 0, (summary, err)
    assert writes(log) == [], f"a second run wrote: {writes(log)}"

    # The registry forges "already wrapped to exactly the new key" on every layer (it cannot
    # make the MAC without the layer key): the tool must not believe it.
    set_recipients(s, "rotnokey", [new_pub], wait=False)
    manifest = s.direct().get_manifest(repo, "v1").json()
    for layer in manifest["layers"]:
        layer["annotations"]["org.ocicrypt-filter.recipient-keys"] = key_id(new_pub)
    forged = json.dumps(manifest, separators=(",", ":")).encode()
    assert s.direct().put_manifest(repo, "v1", forged).status_code == 201
    summary, err = rotate(s, "rotnokey", [new_priv], "--no-state-key")
    assert summary["reencrypted"] == 2 and summary["unchanged"] == 0, (summary, err)
    for label, key in (("rsa", rsa["private"]), ("ec", ec["private"])):
        old = helpers.skopeo_pull(f"{s.registry_addr}/{repo}:v1", tmp_path / f"forged-{label}",
                                  "v1", keys=[key], creds=s.creds, check=False)
        assert old.returncode != 0, f"the removed {label} key opens the image"


def test_an_interrupted_run_resumes(rot_stack, tmp_path):
    s = rot_stack
    rsa, ec = s.keys["rsa"], s.keys["ec"]
    repo = "rotresume/app"
    set_recipients(s, "rotresume", [rsa["public"], ec["public"]])
    img = helpers.build_image(tmp_path / "img", "v1", 4 * MIB, marker=helpers.new_marker())
    helpers.skopeo_push(img, f"{s.addr}/{repo}:v1", creds=s.creds,
                        extra=["--preserve-digests"])
    before = stored_layers(s, repo)
    new_priv, new_pub = new_ec_key(tmp_path, "resume")
    set_recipients(s, "rotresume", [new_pub], wait=False)

    # The registry cannot serve the second layer: the first is re-encrypted, then the run fails.
    data = helpers.registry_blob_path(s.storage, before[1]["digest"])
    away = data.with_name("data.away")
    data.rename(away)
    try:
        summary, err = rotate(s, "rotresume", [rsa["private"]], expect=1)
    finally:
        away.rename(data)
    assert summary["bytes_uploaded"] == before[0]["size"], (summary, err)
    assert "left untouched" in err, err
    assert stored_layers(s, repo) == before, "a half-rotated image was written"

    log = RegistryLog.of(s)
    summary, err = rotate(s, "rotresume", [rsa["private"]])
    assert summary["reencrypted"] == 2 and summary["resumed"] == 1, (summary, err)
    assert summary["bytes_uploaded"] == before[1]["size"], (summary, err)
    committed = [r for r in log.blob_writes() if r[0] == "PUT"]
    assert len(committed) == 1, f"the resumed layer was uploaded again: {committed}"
    after = stored_layers(s, repo)
    assert not {l["digest"] for l in before} & {l["digest"] for l in after}
    out = tmp_path / "resumed"
    helpers.skopeo_pull(f"{s.registry_addr}/{repo}:v1", out, "v1", keys=[new_priv],
                        creds=s.creds)
    helpers.assert_decrypted_matches(out, "v1", img)
    old = helpers.skopeo_pull(f"{s.registry_addr}/{repo}:v1", tmp_path / "resumed-rsa", "v1",
                              keys=[rsa["private"]], creds=s.creds, check=False)
    assert old.returncode != 0, "the removed rsa key opens the image"
    summary, err = rotate(s, "rotresume", [new_priv])
    assert summary["unchanged"] == 2, (summary, err)
