"""Issue 15.3: a 2-minute soak through two replicas (scripts/soak --minutes 2 --concurrency 3).

The script starts its own stack (two gateway replicas sharing replicas.state_key behind a
round-robin front Envoy, one registry, a private containerd and dockerd) and pushes a mix of
clients and image shapes, killing a share of the clients mid-push by their pid. Judged here
from its exit status and its summary: no failure other than the aborted pushes (whose retries
succeed), every succeeded push stored encrypted and decrypted by skopeo to the original layers,
no plaintext marker in storage, the upload-state gauge back at its start value, no process
dead, no critical or plugin-failure line in Envoy's logs, the RSS samples plotted. The RSS
slope and pushes/s are figures, printed, never asserted.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, WASM_OVERRIDE

pytestmark = [pytest.mark.filter, pytest.mark.clients]

MINUTES = 2
CONCURRENCY = 3


def test_two_minute_soak_through_two_replicas(tmp_path):
    out = tmp_path / "report"
    argv = [sys.executable, str(REPO / "scripts" / "soak"), "--minutes", str(MINUTES),
            "--concurrency", str(CONCURRENCY), "--out", str(out)]
    if WASM_OVERRIDE is not None:
        argv += ["--wasm", str(WASM_OVERRIDE)]
    log = tmp_path / "soak.log"
    with open(log, "wb") as f:
        # Its state goes under the system's temporary directory, not tmp_path: containerd's
        # and dockerd's unix socket paths must stay under 108 bytes.
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            # The soak itself, then the checks left and the storage scan: far less than this.
            rc = proc.wait(MINUTES * 60 + 900)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the script stops what it started
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            pytest.fail(f"the soak did not end; its output:\n{log.read_text()[-8000:]}")
    text = log.read_text()
    print(text[-6000:])
    summary_lines = [line for line in text.splitlines() if line.startswith("SUMMARY ")]
    assert summary_lines, f"no summary (exit status {rc}):\n{text[-8000:]}"
    summary = json.loads(summary_lines[-1][len("SUMMARY "):])
    assert summary == json.loads((out / "summary.json").read_text())
    assert rc == 0 and summary["ok"], f"the soak failed (exit status {rc}):\n{text[-8000:]}"

    assert summary["failures"] == 0
    assert summary["pushes_ok"] > 0
    # Every abort was pushed again and that retry succeeded (aborts are random: with ~20 kill
    # attempts in two minutes, none hitting a running client would be a broken harness).
    assert summary["aborted"] > 0, "no client was killed mid-push"
    # ... and so was every push ctr's own containerd failed (scripts/soak: CTR_OWN_FAULT).
    assert summary["aborted_retried_ok"] == summary["aborted"] + summary["client_faults_retried"]
    assert not summary["verify_sampled"]
    assert summary["verified"] == summary["pushes_ok"] and summary["verify_wrong"] == 0
    assert summary["plaintext_markers"] == 0
    assert summary["uploads_in_flight_end"] == summary["uploads_in_flight_start"]
    assert summary["dead"] == [] and summary["log_problems"] == []
    pushed = summary["by_client_shape_kind"]
    for what in ("skopeo/", "ctr/", "oras-chunked/", "oras-monolithic/", "/index/", "/repush"):
        assert any(what in k for k in pushed), f"nothing pushed as {what}: {pushed}"
    if not os.environ.get("OCICRYPT_ALLOW_MISSING_TOOLS"):
        assert summary["docker"], "dockerd did not run (see the soak's output)"
        assert any(k.startswith("docker/") for k in pushed), pushed
    for name in ("a", "b"):
        rss = summary["rss"][name]
        assert rss["samples_fitted"] >= 2 and rss["slope_mib_per_hour"] is not None, rss
    assert summary["png"] and (out / "rss.png").stat().st_size > 0
