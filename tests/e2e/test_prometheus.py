"""Issue 20: the filter's metrics through a real Prometheus (Debian's `prometheus`).

Prometheus scrapes the gateway's Envoy admin `/stats/prometheus` every second, with the alert
rules of envoy/observability/alerts.yaml loaded (their `for:` shortened to 0s so that a firing is
seen within the test; the expressions are the shipped ones). The test pushes images with skopeo,
provokes refusals with known codes and a key-service outage, and reads everything back through
Prometheus's HTTP query API:

- what was pushed, exactly: `X @ t1 - X @ t0` for layers, bytes, JSON blobs, manifests, the
  layer-size histogram's buckets (and the quantiles PromQL computes from them), refusals by code;
- uploads in flight up while a session is open, back to 0 when it is finished;
- the key-service outage: lookup failures, 503 refusals counted one by one, and the alerts
  OcicryptKeyServiceFailing and OcicryptPushesRefusedNoKeys firing (and not before);
- every PromQL expression of the Grafana dashboard and of the alert rules evaluates, and every
  metric they name exists in what Prometheus scraped (no typo, no metric the gateway lacks).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import requests
import yaml

import conftest
import helpers
from test_tuf_keys import serve
from test_vm_reload import TRAP_HEADER, trap_stack  # noqa: F401 - trap_stack is a fixture

pytestmark = pytest.mark.filter

OBSERVABILITY = conftest.REPO / "envoy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
ALERTS = OBSERVABILITY / "alerts.yaml"
REFRESH = 2  # the filter's key-service refresh period in this stack (seconds)
MIB = helpers.MIB
#: The layer-size buckets of envoy/envoy.yaml's stats_config (bytes).
BUCKETS = [1 * MIB, 10 * MIB, 50 * MIB, 100 * MIB, 500 * MIB, 1024 * MIB, 5120 * MIB]


class Prometheus:
    """A Prometheus server of its own (storage and config under `base`), stopped by stop()."""

    def __init__(self, base: Path, admin_addr: str, rules: Path):
        self.base = base
        self.addr = f"127.0.0.1:{helpers.free_ports(1)[0]}"
        self.proc: Optional[subprocess.Popen] = None
        (base / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "envoy", "metrics_path": "/stats/prometheus",
                                "static_configs": [{"targets": [admin_addr]}]}],
        }))

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    def start(self) -> "Prometheus":
        log = open(self.base / "prometheus.log", "ab")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.base / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.base / 'data'}", f"--web.listen-address={self.addr}",
             "--storage.tsdb.retention.time=1d"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        conftest._write_owner(self.base)
        (self.base / "pids").write_text(json.dumps([{
            "name": "prometheus", "pid": self.proc.pid,
            "start_time": conftest.gateway._proc_start_time(self.proc.pid),
            "argv": self.proc.args}]))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited: " + self.log_tail())
            try:
                if requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus did not get ready: " + self.log_tail())

    def log_tail(self) -> str:
        return (self.base / "prometheus.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """Stop the process recorded in <base>/pids (the one this object started)."""
        conftest.gateway.stop_recorded(self.base, log=lambda m: None, timeout=20)
        if self.proc:
            self.proc.wait(5)

    def api(self, path: str, **params) -> dict:
        r = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body.get("status") == "success", \
            f"{path} {params}: {r.status_code} {body}"
        return body["data"]

    def query(self, expr: str, at: Optional[float] = None) -> List[dict]:
        """The instant vector (or scalar, as one sample) `expr` gives at `at` (default: now)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str, at: Optional[float] = None) -> float:
        """The single value `expr` gives (fails on an empty or many-series answer)."""
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, ok, timeout: float = 60, what: str = "") -> float:
        """Poll until the single value of `expr` satisfies `ok`; returns the time it did."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            result = self.query(expr)
            if len(result) == 1:
                last = float(result[0]["value"][1])
                if ok(last):
                    return time.time()
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or expr}: last value {last!r} (result {result})")
            time.sleep(0.5)

    def firing(self) -> Dict[str, int]:
        """{alert name: number of firing alerts} now."""
        out: Dict[str, int] = {}
        for a in self.api("alerts")["alerts"]:
            if a["state"] == "firing":
                out[a["labels"]["alertname"]] = out.get(a["labels"]["alertname"], 0) + 1
        return out


@pytest.fixture(scope="module")
def prom_stack(tmp_path_factory):
    s = conftest._start_stack(tmp_path_factory, "prometheus", 70, filter=True,
                              keyservice_refresh_seconds=REFRESH)
    yield s
    conftest.stop_stack(s)


def rules_without_waiting(src: Path, dest: Path) -> Path:
    """The shipped rules with every `for:` at 0s: the same expressions, firing at once."""
    doc = yaml.safe_load(src.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def prometheus_for(stack, tmp_path_factory) -> Prometheus:
    """A started Prometheus scraping `stack`'s Envoy, with the alert rules loaded."""
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed: run scripts/setup (Debian package prometheus)",
                    pytrace=False)
    base = tmp_path_factory.mktemp("prometheus")
    rules = rules_without_waiting(ALERTS, base / "alerts.yaml")
    p = Prometheus(base, stack.opts.admin_addr, rules)
    try:
        p.start()
    except RuntimeError as err:
        p.stop()
        pytest.fail(str(err), pytrace=False)
    # The first scrapes of the gateway are in.
    p.wait_for('up{job="envoy"}', lambda v: v == 1, what="Prometheus scrapes the admin endpoint")
    p.wait_for("count(ocicrypt_layers_encrypted)", lambda v: v == 1)
    return p


@pytest.fixture(scope="module")
def prom(prom_stack, tmp_path_factory):
    p = prometheus_for(prom_stack, tmp_path_factory)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def trap_prom(trap_stack, tmp_path_factory):
    p = prometheus_for(trap_stack, tmp_path_factory)
    yield p
    p.stop()


def delta(prom: Prometheus, metric: str, t0: float, t1: float) -> float:
    """The exact change of a counter (summed over its series) between two instants, in PromQL."""
    return prom.value(f"sum({metric} @ {t1:.3f}) - sum({metric} @ {t0:.3f})")


def scraped_up_to_date(prom: Prometheus, stack, metric: str, timeout: float = 60) -> float:
    """Wait until Prometheus's latest sample of `metric` (a summed stat) is what Envoy's admin
    endpoint says now; returns then."""
    want = helpers.envoy_stats(stack.opts.admin_addr, prefix=metric)[metric]
    return prom.wait_for(f"sum({metric})", lambda v: v == want, timeout,
                         what=f"{metric} reaching {want} in Prometheus")


REFUSAL_CODES = ["digest_invalid", "manifest_invalid", "blob_upload_invalid",
                 "blob_upload_unknown", "size_invalid", "denied", "unsupported", "unavailable",
                 "unknown", "bad_gateway"]


def quantile_from(buckets: Dict[float, float], q: float) -> float:
    """Prometheus's histogram_quantile over cumulative bucket counts (linear in the bucket)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        if buckets[b] >= rank:
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (buckets[b] - prev_count)
        prev_bound, prev_count = b, buckets[b]
    raise AssertionError("rank beyond the last bucket")


#: Series only the wasm build has: Envoy's wasm VM stats (the V8 runtime, VM reloads). The
#: native module runs in no VM. (Its keystream counters exist, at zero: it prefetches nothing.)
WASM_ONLY_SERIES = ("envoy_wasm_",)


def wasm_only_elsewhere(expr: str) -> bool:
    """An expression over series only the wasm build has, on a native run."""
    return conftest.BUILD != "wasm" and any(s in expr for s in WASM_ONLY_SERIES)


def test_metrics_alerts_and_dashboard_through_prometheus(prom_stack, prom, tmp_path):
    s = prom_stack
    reg = s.via_gateway()
    assert prom.firing() == {}, "alerts firing before anything happened"

    # --- pushes: two images by skopeo, and one chunked upload held open for a moment --------
    t0 = time.time()
    images = [helpers.build_image(tmp_path / f"img{i}", "v1", 2 * MIB + 1000 * i,
                                  marker=helpers.new_marker()) for i in range(2)]
    for i, image in enumerate(images):
        helpers.skopeo_push(image, f"{s.addr}/demo/prom{i}:v1", extra=["--preserve-digests"])
    pushed = [d for image in images for d in image.manifest["layers"]]
    # 12 MiB in two PATCHes, the session open between them: uploads in flight 1, then 0.
    blob = b"\x1f\x8b" + os.urandom(12 * MIB - 2)
    r = reg.start_upload("demo/prom-chunked")
    assert r.status_code == 202, r.text
    half = len(blob) // 2
    r = reg.request("PATCH", r.headers["Location"], data=blob[:half], headers={
        "Content-Type": "application/octet-stream", "Content-Range": f"0-{half - 1}"})
    assert r.status_code == 202, r.text
    prom.wait_for("sum(ocicrypt_uploads_in_flight)", lambda v: v == 1,
                  what="uploads in flight while a session is open")
    r = reg.request("PATCH", r.headers["Location"], data=blob[half:], headers={
        "Content-Type": "application/octet-stream",
        "Content-Range": f"{half}-{len(blob) - 1}"})
    assert r.status_code == 202, r.text
    r = reg.request("PUT", r.headers["Location"], params={"digest": helpers.sha256_digest(blob)},
                    headers={"Content-Length": "0"})
    assert r.status_code == 201, r.text
    prom.wait_for("sum(ocicrypt_uploads_in_flight)", lambda v: v == 0,
                  what="uploads in flight back to 0")
    # Histograms reach the admin endpoint at Envoy's stats flush (every 5 s): wait for the five.
    prom.wait_for(f"sum(ocicrypt_layer_bytes_count) - sum(ocicrypt_layer_bytes_count @ {t0:.3f})",
                  lambda v: v >= 5, what="the layer-size histogram in Prometheus")
    t1 = max(scraped_up_to_date(prom, s, m) for m in (
        "ocicrypt_layers_encrypted", "ocicrypt_manifests_rewritten", "ocicrypt_layer_bytes_count"))

    sizes = [d["size"] for d in pushed] + [len(blob)]
    assert delta(prom, "ocicrypt_layers_encrypted", t0, t1) == len(sizes) == 5
    assert delta(prom, "ocicrypt_bytes_encrypted", t0, t1) == sum(sizes)
    assert delta(prom, "ocicrypt_json_blobs_passed", t0, t1) == 2  # the configs
    assert delta(prom, "ocicrypt_manifests_rewritten", t0, t1) == 2
    assert delta(prom, "ocicrypt_mounts_rewritten", t0, t1) == 0
    assert delta(prom, "ocicrypt_layer_bytes_count", t0, t1) == 5
    # Envoy's histogram keeps values to about 2 significant digits: the sum is close, not exact.
    hsum = delta(prom, "ocicrypt_layer_bytes_sum", t0, t1)
    assert abs(hsum - sum(sizes)) <= 0.05 * sum(sizes), (hsum, sum(sizes))
    # The buckets, exactly: each layer where its size puts it.
    got = {float(x["metric"]["le"]): float(x["value"][1]) for x in prom.query(
        f"sum by (le) (ocicrypt_layer_bytes_bucket @ {t1:.3f} - "
        f"ocicrypt_layer_bytes_bucket @ {t0:.3f})")}
    want = {float(b): float(sum(1 for z in sizes if z <= b)) for b in BUCKETS}
    want[float("inf")] = 5.0
    assert got == want, f"layer sizes {sizes}: buckets {got}"
    assert want[1 * MIB] == 2 and want[10 * MIB] == 4  # 2 small, 2 of about 2 MiB, one of 12
    for q in (0.5, 0.9, 0.99):
        value = prom.value(
            f"histogram_quantile({q}, sum by (le) (ocicrypt_layer_bytes_bucket @ {t1:.3f} - "
            f"ocicrypt_layer_bytes_bucket @ {t0:.3f}))")
        assert value == pytest.approx(quantile_from(want, q)), q
    assert prom.value(f"histogram_quantile(0.5, sum by (le) (ocicrypt_layer_bytes_bucket @ "
                      f"{t1:.3f} - ocicrypt_layer_bytes_bucket @ {t0:.3f}))") \
        == pytest.approx(1 * MIB + 9 * MIB * 0.25)  # rank 2.5 of 5: a quarter into (1, 10] MiB
    for code in REFUSAL_CODES:
        assert delta(prom, f"ocicrypt_refusals_{code}", t0, t1) == 0, code
    assert delta(prom, "ocicrypt_keyservice_project_failures", t0, t1) == 0
    assert prom.value("max(ocicrypt_keyservice_targets_version)") >= 1
    assert prom.value("max(ocicrypt_keyservice_root_version)") >= 1

    # --- refusals with known codes --------------------------------------------------------
    t2 = time.time()
    data = b"\x1f\x8b" + os.urandom(1 * MIB)
    for _ in range(2):
        r = reg.upload_monolithic("demo/prom-refused", data,
                                  digest=helpers.sha256_digest(b"not the data"))
        assert r.status_code == 400 and helpers.oci_error_codes(r) == ["DIGEST_INVALID"], r.text
    r = reg.put_manifest("demo/prom-refused", "v1", b'{"schemaVersion": 2, "layers": [')
    assert r.status_code == 400 and helpers.oci_error_codes(r) == ["MANIFEST_INVALID"], r.text
    t3 = scraped_up_to_date(prom, s, "ocicrypt_refusals_manifest_invalid")
    t3 = max(t3, scraped_up_to_date(prom, s, "ocicrypt_refusals_digest_invalid"))
    refused = {code: delta(prom, f"ocicrypt_refusals_{code}", t2, t3) for code in REFUSAL_CODES}
    assert refused == {**{c: 0 for c in REFUSAL_CODES}, "digest_invalid": 2,
                       "manifest_invalid": 1}, refused
    assert delta(prom, "ocicrypt_layers_encrypted", t2, t3) == 0
    prom.wait_for("sum(ocicrypt_uploads_in_flight)", lambda v: v == 0,
                  what="uploads in flight after the refused uploads")
    assert prom.firing() == {}, "alerts firing before the key service failed"

    # --- the key service goes away ----------------------------------------------------------
    t4 = time.time()
    serve(s, s.opts.state_dir / "nothing-here")
    try:
        prom.wait_for(f"sum(ocicrypt_keyservice_project_failures) - "
                      f"sum(ocicrypt_keyservice_project_failures @ {t4:.3f})", lambda v: v > 0,
                      what="a failed key-service lookup")
        # Once the failure is recorded, pushes are refused; every 503 is counted.
        unavailable = 0
        deadline = time.monotonic() + 30
        while unavailable < 3 and time.monotonic() < deadline:
            r = reg.start_upload("demo/prom-nokeys")
            if r.status_code == 503:
                assert helpers.oci_error_codes(r) == ["UNAVAILABLE"], r.text
                unavailable += 1
            else:
                assert r.status_code == 202, r.text
                time.sleep(0.5)
        assert unavailable == 3, "pushes were not refused while the key service was down"
        t5 = scraped_up_to_date(prom, s, "ocicrypt_refusals_unavailable")
        assert delta(prom, "ocicrypt_refusals_unavailable", t4, t5) == unavailable
        deadline = time.monotonic() + 30
        while not {"OcicryptKeyServiceFailing", "OcicryptPushesRefusedNoKeys"} <= \
                set(prom.firing()) and time.monotonic() < deadline:
            time.sleep(0.5)
        firing = prom.firing()
        assert firing.get("OcicryptKeyServiceFailing") == 1, firing
        assert firing.get("OcicryptPushesRefusedNoKeys") == 1, firing
        assert not {"OcicryptFilterVmReloaded", "OcicryptFilterVmReloadFailing",
                    "OcicryptUnknownRefusal", "OcicryptKeystreamSegmentRefused"} & set(firing)
    finally:
        serve(s, s.opts.keyservice_dir)

    # --- every expression of the dashboard and the alert rules, against this Prometheus -----
    check_expressions(prom, time.time() - t0)


def dashboard_expressions(dash: dict) -> List[str]:
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))
    walk(dash["panels"])
    return exprs


def substitute(expr: str, dash: dict, seconds: float) -> str:
    """Grafana's variables as Grafana would fill them for this Prometheus: $__rate_interval a
    few scrapes, $__range the test's duration, the others their current (default) value."""
    values = {"__rate_interval": "15s", "__range": f"{max(int(seconds), 15)}s"}
    for var in dash["templating"]["list"]:
        cur = var.get("current", {}).get("value")
        if var["type"] == "query":
            values[var["name"]] = var.get("allValue", ".*") if cur in (["$__all"], "$__all") \
                else cur
        elif var["type"] != "datasource":
            values[var["name"]] = cur
    out = re.sub(r"\$\{(\w+)\}|\$([A-Za-z_]\w*)",
                 lambda m: values[m.group(1) or m.group(2)], expr)  # not label_replace's $1
    assert not re.search(r"\$\{?[A-Za-z_]", out), out
    return out


def metric_selectors(expr: str) -> List[str]:
    """Selectors that name metrics in an expression: `name` and {__name__=~"regex"}."""
    names = {f'{{__name__=~"{rx}"}}' for rx in re.findall(r'__name__=~"([^"]+)"', expr)}
    # Label names (in matchers and in by/without clauses) and strings are not metric names.
    bare = re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", expr)
    bare = re.sub(r'\w+\s*(?:=~|!~|!=|=)\s*"[^"]*"', "", bare)
    bare = re.sub(r'"[^"]*"', '""', bare)
    names |= set(re.findall(r"\b((?:ocicrypt|envoy)_[a-z0-9_]+)\b", bare))
    return sorted(names)


def check_expressions(prom: Prometheus, seconds: float) -> None:
    dash = json.loads(DASHBOARD.read_text())
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    exprs = [substitute(e, dash, seconds) for e in dashboard_expressions(dash)]
    assert len(exprs) >= 20, exprs
    empty = [e for e in exprs if not prom.query(e) and not wasm_only_elsewhere(e)]
    assert not empty, f"dashboard expressions with no data after the pushes: {empty}"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+), *(\w+)\)",
                                         var["query"]["query"]).groups()
            values = prom.api(f"label/{label}/values", **{"match[]": metric})
            assert values, f"variable {var['name']}: no values"
    # Each alert expression evaluates (an empty answer is fine: not firing), and the rules as
    # loaded evaluate without error.
    for rule in rules:
        prom.query(rule["expr"])
    loaded = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in loaded) == sorted(r["alert"] for r in rules)
    bad = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert not bad, bad
    # No expression names a metric Prometheus never scraped from the gateway.
    selectors = sorted({sel for e in exprs + [r["expr"] for r in rules]
                        for sel in metric_selectors(e)})
    missing = [sel for sel in selectors
               if not prom.query(f"count({sel})") and not wasm_only_elsewhere(sel)]
    assert not missing, f"metrics named in the dashboard or the alerts that do not exist: {missing}"


@pytest.mark.only_build("wasm", reason="a trapped wasm VM and Envoy's VM reload; a native "
                                        "module has neither")
def test_vm_crash_alert_fires_on_a_real_trap(trap_stack, trap_prom):
    """A VM of the test-trap module traps (as a panic would); Envoy's FAIL_RELOAD gives that
    worker a fresh VM on a later request, and OcicryptFilterVmReloaded fires from the real
    envoy_wasm_ocicrypt_vm_reload_success; the failed-reload alert does not."""
    s, prom = trap_stack, trap_prom
    assert prom.firing() == {}, "alerts firing before the trap"
    # The rule reads the counter through a subquery sampled at every 30 s of the clock
    # (label_replace keeps several plugins' series apart): it sees the jump from one such step
    # to the next, so the counter's 0 must be seen at one step before the trap. (A Prometheus
    # that has been scraping for longer always has it.)
    (series,) = prom.query("envoy_wasm_ocicrypt_vm_reload_success[1h]")
    first = float(series["values"][0][0])
    time.sleep(max(0.0, (first // 30 + 1) * 30 + 1 - time.time()))
    t0 = time.time()
    status, _, body = helpers.raw_request(
        s.addr, "PUT", "/v2/demo/prom-trap/manifests/trap", b"{}",
        {"Content-Type": "application/vnd.oci.image.manifest.v1+json",
         TRAP_HEADER.decode(): "1"}, timeout=30)
    assert status >= 500, (status, body[:200])
    time.sleep(1.5)  # FAIL_RELOAD's backoff (reload_config, 1 s by default)
    for _ in range(8):  # fresh connections, spread over the workers: one meets the dead VM
        r = requests.get(f"http://{s.addr}/v2/", headers={"Connection": "close"}, timeout=10)
        assert r.status_code == 200, (r.status_code, r.text[:200])
    t1 = scraped_up_to_date(prom, s, "envoy_wasm_ocicrypt_vm_reload_success")
    assert delta(prom, "envoy_wasm_ocicrypt_vm_reload_success", t0, t1) == 1
    assert delta(prom, "envoy_wasm_ocicrypt_vm_reload_failure", t0, t1) == 0
    # ... and the increase shows at the next 30 s step.
    deadline = time.monotonic() + 75
    while "OcicryptFilterVmReloaded" not in prom.firing() and time.monotonic() < deadline:
        time.sleep(0.5)
    firing = prom.firing()
    assert firing.get("OcicryptFilterVmReloaded") == 1, \
        (firing, prom.query("envoy_wasm_ocicrypt_vm_reload_success[3m:30s]"))
    assert "OcicryptFilterVmReloadFailing" not in firing, firing
