"""Issue 15.2: abandoned upload sessions cannot grow the gateway's state.

Without `replicas`, each upload session's record (layer key, hash state) lives in Envoy's shared
data until the session finishes. Clients abandon sessions (a killed push, a pipeline that gives
up): 10 000 sessions are opened and abandoned here — a POST and one PATCH each, so the gateway
holds a record for every one — and the filter's own gauge of records
(`ocicrypt_uploads_in_flight`) and Envoy's memory are read before, after, and once the records
have gone idle (`limits.upload_idle_seconds`, short here) and the timer's sweep has dropped
them; then 2 000 more, to show the memory they take is reused rather than added.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import os
import time

import pytest

import helpers
from conftest import _start_stack, stop_stack
from procstat import rss_kib

pytestmark = [pytest.mark.filter]

#: Longer than opening SESSIONS takes here (80 s on a busy 2-vCPU machine): none goes idle
#: before the count is read.
IDLE = 150
SESSIONS = 10_000
WORKERS = 8


@pytest.fixture(scope="module")
def idle_stack(tmp_path_factory):
    s = _start_stack(tmp_path_factory, "abandoned", 95, filter=True, keys_source="inline",
                     upload_idle_seconds=IDLE)
    yield s
    stop_stack(s)


def gauge(stack) -> float:
    stats = helpers.envoy_stats(stack.opts.admin_addr, "ocicrypt_uploads_in_flight")
    assert "ocicrypt_uploads_in_flight" in stats, f"the gauge is missing: {sorted(stats)}"
    return stats["ocicrypt_uploads_in_flight"]


def envoy_rss_mib(stack) -> float:
    return rss_kib(stack.gw.pid("envoy")) / 1024


def abandon(addr: str, start: int, count: int) -> int:
    """Opens `count` sessions on one keep-alive connection (a new one after any close), each a
    POST and a PATCH of 4 KiB (gzip-like), and leaves them. Returns how many PATCHes the
    gateway answered 202 (each left a record)."""
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    kept = 0
    for k in range(start, start + count):
        try:
            conn.request("POST", f"/v2/demo/abandoned-{k % 50}/blobs/uploads/", body=b"",
                         headers={"Content-Length": "0"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 202, f"POST answered {resp.status}"
            loc = helpers.location_path(resp.getheader("location"))
            # gzip magic first: a random body may open like JSON and be refused later.
            conn.request("PATCH", loc, body=b"\x1f\x8b" + os.urandom(4094),
                         headers={"Content-Type": "application/octet-stream"})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 202, f"PATCH answered {resp.status}: {body[:300]!r}"
            kept += 1
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.close()
    return kept


def abandon_many(addr: str, first: int, sessions: int = SESSIONS) -> int:
    per = sessions // WORKERS
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        return sum(pool.map(lambda i: abandon(addr, first + i * per, per), range(WORKERS)))


def wait_for_gauge(stack, target: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    value = gauge(stack)
    while value != target and time.monotonic() < deadline:
        time.sleep(1)
        value = gauge(stack)
    return value


def test_abandoned_sessions_are_bounded_and_dropped_once_idle(idle_stack):
    s = idle_stack
    base_gauge, base_rss = gauge(s), envoy_rss_mib(s)
    t0 = time.monotonic()
    kept = abandon_many(s.addr, 0)
    took = time.monotonic() - t0
    full_gauge, full_rss = gauge(s), envoy_rss_mib(s)
    print(f"{SESSIONS} sessions opened and abandoned in {took:.0f} s ({kept} with a record); "
          f"records {base_gauge:.0f} -> {full_gauge:.0f}; Envoy RSS {base_rss:.0f} -> "
          f"{full_rss:.0f} MiB")
    assert kept == SESSIONS, f"only {kept} of {SESSIONS} PATCHes were taken"
    assert full_gauge == base_gauge + SESSIONS, \
        f"the gauge counts {full_gauge - base_gauge} records for {SESSIONS} abandoned sessions"

    # Idle for IDLE seconds, then swept by the timer (every slot within about half a minute).
    after = wait_for_gauge(s, base_gauge, IDLE + 60)
    idle_rss = envoy_rss_mib(s)
    print(f"records once idle and swept: {after:.0f}; Envoy RSS {idle_rss:.0f} MiB")
    assert after == base_gauge, f"{after - base_gauge} abandoned records still held"

    # More: the slots' memory is reused, not added to.
    kept2 = abandon_many(s.addr, SESSIONS, 2_000)
    again_rss, again_gauge = envoy_rss_mib(s), gauge(s)
    print(f"2 000 more: records {again_gauge:.0f}, Envoy RSS {again_rss:.0f} MiB "
          f"(after the first 10 000: {full_rss:.0f} MiB)")
    assert kept2 == 2_000 and again_gauge == base_gauge + 2_000
    assert again_rss < full_rss + 16, \
        f"Envoy grew {again_rss - full_rss:.0f} MiB more for 2 000 more sessions"
