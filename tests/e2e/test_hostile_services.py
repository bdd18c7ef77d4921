"""A hostile key service can refuse, never crash or wedge the gateway; lookups of projects are
bounded (issue 13, item 5).

The key service of these stacks is tests/hostile_keyservice.py in place of nginx: it serves the
stack's TUF repository over TLS (the certificate scripts/gateway.py made, validated by Envoy's
key-service cluster) and misbehaves on demand — a body cut short (Content-Length larger than
sent, then close), a body dripping slower than `timeout_ms`, no answer at all, a 64 MiB body,
a reset connection, a close without a byte, junk (not JSON nor UTF-8, huge JSON, deeply
nested JSON, wrong content types, header names and values that are not UTF-8), a redirect,
404, 500, a status line that is not HTTP, plaintext where TLS is expected. Each fault meets
the gateway twice: on the request path (a push to a project without a fresh record waits for a
lookup) and on the refresh timer alone (no client request while the refresh fails). After each:
pushes to the project answer 503 with an OCI error body naming it (fail closed), `GET /v2/` and
an upload to a passthrough repository still work, Envoy's log has no panic or trap, and once the
real key service (nginx) is back a push is encrypted and decrypts.

The flood test sends 2 000 unauthenticated POSTs naming distinct random projects under a policy
that encrypts by default, and counts what reaches the key service (the counting server), what
the gateway remembers (`ocicrypt_keyservice_projects_remembered`, at most
`key_service.max_projects`) and that pushes to the real project still work.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

import helpers
from conftest import _start_stack, stop_stack
from hostile_keyservice import FAULTS, HARMLESS, HostileKeyService

pytestmark = [pytest.mark.filter]

TIMEOUT_MS = 1500  # key_service.timeout_ms in these stacks: the drip and stall faults outlast it
TIMER_REFRESH = 2  # seconds between refreshes in the timer stack
CRASH_SIGNS = ("panicked", "RuntimeError: unreachable", "wasm trap", "Wasm VM failed", "Function: proxy_on_")
#: Faults applied only to the target files (after a refresh that succeeds): the download path.
TARGET_ONLY = ["truncate", "drip", "oversize", "junk"]
CASES = [(f, None) for f in FAULTS] + [(f, r"^/targets/") for f in TARGET_ONLY]


def case_id(case) -> str:
    fault, only = case
    return fault + ("-targets" if only else "")


class Served:
    """A stack whose key service is a HostileKeyService (or, for a while, the real nginx)."""

    def __init__(self, stack):
        self.stack = stack
        o = stack.opts
        tls = o.keyservice_tls_dir
        self.ks = HostileKeyService(o.keyservice_addr, o.keyservice_served,
                                    tls / "server.crt", tls / "server.key").start()

    def real_key_service(self):
        """Stop the hostile server, start nginx (the real key service) on its address."""
        self.ks.stop()
        self.stack.gw.start_keyservice()

    def hostile_again(self):
        self.stack.gw.stop_keyservice()
        self.ks.start()

    def stop(self):
        self.ks.stop()


def _hostile_stack(tmp_path_factory, name, offset, **extra):
    s = _start_stack(tmp_path_factory, name, offset, filter=True, start_keyservice=False,
                     keyservice_timeout_ms=TIMEOUT_MS, **extra)
    served = Served(s)
    return s, served


def _stop(s, served):
    served.stop()
    stop_stack(s)


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("img-hostile")
    return helpers.build_image(d / "layout", "v1", 1 * helpers.MIB, marker=helpers.new_marker())


@pytest.fixture(scope="module")
def request_path(tmp_path_factory, small_image):
    """Records last one second (max_age_seconds 1, so no lookup starts from earlier metadata):
    every push looks the project up on the request path; the timer refreshes once an hour."""
    s, served = _hostile_stack(tmp_path_factory, "hostile-request", 70,
                               keyservice_refresh_seconds=3600, keyservice_max_age_seconds=1)
    try:
        push_and_decrypt(s, small_image, "demo/hostile-warmup", Path(str(tmp_path_factory.mktemp("w"))))
        time.sleep(3)  # the timer's first (and, for an hour, only) refresh happens now
        yield s, served
    finally:
        _stop(s, served)


@pytest.fixture(scope="module")
def timer_path(tmp_path_factory, small_image):
    """The timer refreshes every TIMER_REFRESH seconds; records stay usable three periods."""
    s, served = _hostile_stack(tmp_path_factory, "hostile-timer", 80,
                               keyservice_refresh_seconds=TIMER_REFRESH)
    try:
        push_and_decrypt(s, small_image, "demo/hostile-warmup", Path(str(tmp_path_factory.mktemp("w"))))
        yield s, served
    finally:
        _stop(s, served)


def upload_start(stack, repo):
    return requests.post(f"http://{stack.addr}/v2/{repo}/blobs/uploads/", timeout=60)


def wait_for_status(stack, repo, want, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        r = upload_start(stack, repo)
        if r.status_code == want or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


def push_and_decrypt(stack, image, repo, out: Path):
    helpers.skopeo_push(image, f"{stack.addr}/{repo}:v1", extra=["--preserve-digests"])
    manifest = stack.direct().get_manifest(repo, "v1").json()
    helpers.assert_encrypted_manifest(manifest, image)
    helpers.skopeo_pull(f"{stack.registry_addr}/{repo}:v1", out, "v1",
                        keys=[stack.keys["ec"]["private"]])
    helpers.assert_decrypted_matches(out, "v1", image)


def log_since(stack, offset: int) -> str:
    with open(stack.envoy_log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def assert_refused_naming(r, project):
    assert r.status_code == 503, f"{r.status_code} {r.text[:300]}"
    body = r.json()
    err = body["errors"][0]
    assert err["code"] == "UNAVAILABLE", body
    assert f'project "{project}"' in err["message"], body


def assert_still_serving(stack, tag):
    """GET /v2/ through the filter, and a whole upload to a passthrough repository."""
    assert requests.get(f"http://{stack.addr}/v2/", timeout=30).status_code == 200
    reg = stack.via_gateway()
    data = f"passthrough after {tag} {uuid.uuid4()}".encode()
    r = reg.upload_monolithic(f"plain/hostile-{tag}", data)
    assert r.status_code == 201, f"{r.status_code} {r.text[:300]}"
    assert stack.direct().get_blob(f"plain/hostile-{tag}", helpers.sha256_digest(data)) == data


def assert_no_crash(stack, offset):
    bad = [l for l in log_since(stack, offset).splitlines() if any(m in l for m in CRASH_SIGNS)]
    assert not bad, "the plugin crashed:\n" + "\n".join(bad[:10])


def recover(stack, served, small_image, tag, tmp_path):
    """The real key service back: the next push is encrypted and decrypts."""
    served.real_key_service()
    try:
        r = wait_for_status(stack, "demo/hostile-back", 202)
        assert r.status_code == 202, f"not back: {r.status_code} {r.text[:300]}"
        push_and_decrypt(stack, small_image, f"demo/hostile-{tag}", tmp_path / "out")
    finally:
        served.hostile_again()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_request_path_lookup_meets_a_hostile_key_service(request_path, small_image, case,
                                                         tmp_path):
    stack, served = request_path
    fault, only = case
    tag = "req-" + case_id(case)
    offset = stack.envoy_log.stat().st_size
    time.sleep(2.2)  # the last record (max_age_seconds 1, whole seconds) is stale: a lookup
    before = served.ks.count
    served.ks.set(fault, only)
    try:
        t0 = time.monotonic()
        r = upload_start(stack, f"demo/{tag}")
        took = time.monotonic() - t0
        asked = served.ks.requests_since(before)
        assert any(f == fault for _, _, f in asked), \
            f"the lookup never met the fault: {asked}; answer {r.status_code} " \
            f"{r.text[:400]}\n{log_since(stack, offset)[-4000:]}"
        if fault == "not-tls":
            assert any(p == "(TLS hello)" for _, p, _ in asked), asked
        if fault in HARMLESS:
            # Genuine bytes whatever the headers say: TUF verifies them, the push goes on.
            assert r.status_code == 202, f"{r.status_code} {r.text[:300]}"
            push_and_decrypt(stack, small_image, f"demo/{tag}", tmp_path / "out")
        else:
            assert_refused_naming(r, "demo")
            # Bounded by the fetches' timeouts, not wedged.
            assert took < 6 * TIMEOUT_MS / 1000 + 5, f"the refusal took {took:.1f}s"
            # A second push meanwhile is refused too (from memory or by its own lookup).
            assert_refused_naming(upload_start(stack, f"demo/{tag}"), "demo")
        assert_still_serving(stack, tag)
    finally:
        served.ks.set(None)
    assert_no_crash(stack, offset)
    if fault not in HARMLESS:
        recover(stack, served, small_image, tag, tmp_path)
    assert_no_crash(stack, offset)


def _self_signed(tmp_path: Path, name: str = "keyservice.local"):
    """A certificate for the key service's name (and 127.0.0.1) from a CA Envoy does not trust."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    crt, k = tmp_path / "other.crt", tmp_path / "other.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return crt, k


def test_a_key_service_certificate_from_another_ca_is_refused(request_path, small_image,
                                                              tmp_path):
    """TLS to the key service is validated: a server with the right name and the genuine
    repository, but a certificate the configured CA did not sign, gets no request."""
    stack, served = request_path
    offset = stack.envoy_log.stat().st_size
    crt, key = _self_signed(tmp_path)
    served.ks.stop()
    impostor = HostileKeyService(stack.opts.keyservice_addr, stack.opts.keyservice_served,
                                 crt, key).start()
    try:
        time.sleep(2.2)
        r = upload_start(stack, "demo/impostor")
        assert_refused_naming(r, "demo")
        assert "HTTP 503" in r.json()["errors"][0]["message"], r.text
        assert impostor.count == 0, "Envoy sent a request over a TLS session it should refuse"
        stats = requests.get(f"http://{stack.opts.admin_addr}/stats", timeout=10).text
        assert re.search(r"cluster\.keyservice\.ssl\.fail_verify_error: [1-9]", stats), \
            [l for l in stats.splitlines() if "keyservice.ssl" in l]
    finally:
        impostor.stop()
        served.ks.start()
    assert_no_crash(stack, offset)
    assert wait_for_status(stack, "demo/impostor", 202).status_code == 202


REFRESH_LINE = re.compile(r"key service refresh: project demo: (.*)")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_refresh_timer_meets_a_hostile_key_service(timer_path, small_image, case, tmp_path):
    stack, served = timer_path
    fault, only = case
    tag = "timer-" + case_id(case)
    offset = stack.envoy_log.stat().st_size
    before = served.ks.count
    served.ks.set(fault, only)
    try:
        # No client request: the timer alone meets the fault, within a few periods.
        deadline = time.monotonic() + 4 * TIMER_REFRESH + 6 * TIMEOUT_MS / 1000 + 5
        outcome = None
        while time.monotonic() < deadline and outcome is None:
            time.sleep(0.3)
            for line in log_since(stack, offset).splitlines():
                m = REFRESH_LINE.search(line)
                if m and (fault in HARMLESS or not m.group(1).startswith("verified")):
                    outcome = m.group(1)
        assert outcome is not None, "the timer did not refresh:\n" + log_since(stack, offset)[-3000:]
        asked = served.ks.requests_since(before)
        assert any(f == fault for _, _, f in asked), f"the timer never met the fault: {asked}"
        assert_no_crash(stack, offset)
        r = upload_start(stack, f"demo/{tag}")
        if fault in HARMLESS:
            assert outcome.startswith("verified"), outcome
            assert r.status_code == 202, f"{r.status_code} {r.text[:300]}"
            push_and_decrypt(stack, small_image, f"demo/{tag}", tmp_path / "out")
        else:
            # The failed refresh made demo's keys unusable at once.
            assert_refused_naming(r, "demo")
        assert_still_serving(stack, tag)
    finally:
        served.ks.set(None)
    assert_no_crash(stack, offset)
    if fault not in HARMLESS:
        recover(stack, served, small_image, tag, tmp_path)
    assert_no_crash(stack, offset)


# ---------------------------------------------------------------------------------------------
# unknown projects are bounded

FLOOD = 2000
FLOOD_REFRESH = 5
FLOOD_MAX_PROJECTS = 256


def _memory_allocated(stack) -> int:
    r = requests.get(f"http://{stack.opts.admin_addr}/memory", timeout=10)
    return int(r.json().get("allocated", 0))


def _flood(stack, names, threads=8, done=None):
    """POST an upload start naming each project, from `threads` clients; returns the answers'
    status counts and any answer that is not a 503 naming its project. `done` (a list), if
    given, receives the names in the order their answers came."""
    statuses = {}
    odd = []
    done = [] if done is None else done
    lock = threading.Lock()
    chunks = [names[i::threads] for i in range(threads)]

    def run(chunk):
        with requests.Session() as s:
            for name in chunk:
                r = s.post(f"http://{stack.addr}/v2/{name}/app/blobs/uploads/", timeout=60)
                try:
                    err = r.json()["errors"][0]
                    ok = r.status_code == 503 and err["code"] == "UNAVAILABLE" \
                        and f'project "{name}"' in err["message"]
                except (ValueError, KeyError, IndexError):
                    ok = False
                with lock:
                    done.append(name)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if not ok and len(odd) < 5:
                        odd.append((name, r.status_code, r.text[:200]))

    ts = [threading.Thread(target=run, args=(c,)) for c in chunks]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return statuses, odd


def test_flood_of_unknown_projects_is_bounded(tmp_path_factory, small_image, tmp_path):
    s, served = _hostile_stack(tmp_path_factory, "hostile-flood", 90, policy_default="encrypt",
                               keyservice_refresh_seconds=FLOOD_REFRESH,
                               keyservice_max_projects=FLOOD_MAX_PROJECTS)
    try:
        push_and_decrypt(s, small_image, "demo/flood-before", tmp_path / "before")
        time.sleep(FLOOD_REFRESH + 1)  # a timer refresh: metadata verified lately
        stats0 = helpers.envoy_stats(s.opts.admin_addr)
        mem0 = _memory_allocated(s)
        n0 = served.ks.count
        names = [f"p{uuid.uuid4().hex[:14]}" for _ in range(FLOOD)]
        t0 = time.monotonic()
        answered = []
        statuses, odd = _flood(s, names, done=answered)
        flood_s = time.monotonic() - t0
        n1 = served.ks.count
        stats1 = helpers.envoy_stats(s.opts.admin_addr)
        # The newest names again, right away: a verified "no such project" is remembered (the
        # table keeps the newest answers; an update two workers race for may be dropped).
        statuses_again, odd_again = _flood(s, answered[-200:])
        n2 = served.ks.count
        stats2 = helpers.envoy_stats(s.opts.admin_addr)
        # Three refresh periods after: the timer walks the projects in use, not the flood.
        time.sleep(3 * FLOOD_REFRESH)
        n3 = served.ks.count
        stats3 = helpers.envoy_stats(s.opts.admin_addr)
        mem3 = _memory_allocated(s)

        def delta(a, b, k):
            return b.get(k, 0) - a.get(k, 0)

        lookups = "ocicrypt_keyservice_project_lookups"
        report = {
            "posts": FLOOD, "flood_seconds": round(flood_s, 1),
            "statuses": {str(k): v for k, v in statuses.items()},
            "keyservice_requests_during_flood": n1 - n0,
            "keyservice_requests_for_200_repeats": n2 - n1,
            f"keyservice_requests_in_{3 * FLOOD_REFRESH}s_after": n3 - n2,
            "project_lookups_during_flood": delta(stats0, stats1, lookups),
            "fetches_during_flood": delta(stats0, stats1, "ocicrypt_keyservice_fetches"),
            "resumed_lookups_during_flood": delta(stats0, stats1,
                                                  "ocicrypt_keyservice_resumed_lookups"),
            "answered_from_memory_of_200_repeats": delta(
                stats1, stats2, "ocicrypt_keyservice_answered_from_memory"),
            f"project_lookups_in_{3 * FLOOD_REFRESH}s_after": delta(stats2, stats3, lookups),
            "projects_remembered_after_flood": stats1.get(
                "ocicrypt_keyservice_projects_remembered"),
            f"projects_remembered_{3 * FLOOD_REFRESH}s_after": stats3.get(
                "ocicrypt_keyservice_projects_remembered"),
            "envoy_allocated_mib_before_after": [round(mem0 / 2**20, 1), round(mem3 / 2**20, 1)],
        }
        print("flood report: " + json.dumps(report), file=sys.stderr)
        (s.opts.state_dir / "flood-report.json").write_text(json.dumps(report, indent=2))
        assert not odd and statuses == {503: FLOOD}, (statuses, odd)
        assert not odd_again and statuses_again == {503: 200}, (statuses_again, odd_again)
        # Bounded: the flood costs at most a few full refreshes, not one lookup per name.
        assert n1 - n0 <= 40, report
        assert n2 - n1 <= 8, report
        assert report["answered_from_memory_of_200_repeats"] >= 150, report
        # The timer refreshes demo alone: a few fetches per period, one project lookup each.
        assert n3 - n2 <= 3 * 8 + 8, report
        assert report[f"project_lookups_in_{3 * FLOOD_REFRESH}s_after"] <= 6, report
        # What the gateway remembers is bounded by max_projects, and expires.
        remembered = report["projects_remembered_after_flood"]
        assert remembered is not None and 1 <= remembered <= FLOOD_MAX_PROJECTS, report
        assert report[f"projects_remembered_{3 * FLOOD_REFRESH}s_after"] <= 8, report
        # Floods while the key service stalls every request (no answer within timeout_ms): once
        # the timer's refresh has failed, metadata is no longer reused, and one full refresh at
        # a time asks the key service; every other lookup is answered from its failure.
        n4 = served.ks.count
        served.ks.set("stall")
        deadline = time.monotonic() + 3 * FLOOD_REFRESH + 10
        while "key service refresh: project demo: key service unreachable" not in \
                log_since(s, 0) and time.monotonic() < deadline:
            time.sleep(0.5)
        t0 = time.monotonic()
        statuses_down, odd_down = {}, []
        for _ in range(3):  # three rounds, each after the 5 s failure window
            st, od = _flood(s, [f"q{uuid.uuid4().hex[:14]}" for _ in range(300)])
            for k, v in st.items():
                statuses_down[k] = statuses_down.get(k, 0) + v
            odd_down += od
            time.sleep(6)
        down_s = time.monotonic() - t0
        n5 = served.ks.count
        served.ks.set(None)
        report_down = {"posts": 900, "seconds_since_stall": round(time.monotonic() - t0, 1),
                       "statuses": {str(k): v for k, v in statuses_down.items()},
                       "keyservice_requests_since_stall": n5 - n4}
        print("floods while stalled: " + json.dumps(report_down), file=sys.stderr)
        (s.opts.state_dir / "flood-stalled-report.json").write_text(json.dumps(report_down))
        assert not odd_down and statuses_down == {503: 900}, (statuses_down, odd_down)
        # the timer's attempts (one per period) and about one request-path refresh per round
        assert n5 - n4 <= down_s / FLOOD_REFRESH + 3 + 3 * 2 + 4, report_down
        # The real project works again once the key service answers.
        assert wait_for_status(s, "demo/flood-after", 202).status_code == 202
        push_and_decrypt(s, small_image, "demo/flood-after", tmp_path / "after")
        assert_no_crash(s, 0)
    finally:
        _stop(s, served)
