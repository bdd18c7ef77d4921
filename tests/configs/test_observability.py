"""envoy/observability/: the Grafana dashboard is importable Grafana JSON (the fields Grafana's
dashboard schema requires, a Prometheus data-source variable every query uses, panels laid out
on the 24-column grid), and the alert rules pass `promtool check rules` and their unit tests
(`promtool test rules`). That every expression evaluates against real metrics is checked by
tests/e2e/test_prometheus.py."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OBS = REPO / "envoy" / "observability"
PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "text", "heatmap"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((OBS / "grafana-dashboard.json").read_text())


def all_panels(dash: dict) -> list:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def test_dashboard_has_the_schema_fields(dashboard):
    d = dashboard
    assert isinstance(d["title"], str) and d["title"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"]), d["uid"]
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["id"] is None, "an exported dashboard carries no database id"
    assert isinstance(d["version"], int)
    assert set(d["time"]) == {"from", "to"}
    assert isinstance(d["templating"]["list"], list)
    assert isinstance(d["annotations"]["list"], list)
    assert isinstance(d["tags"], list)


def test_every_query_uses_the_prometheus_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus", ds
    want = {"type": "prometheus", "uid": "${datasource}"}
    queries = 0
    for p in all_panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"] == want, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and refs, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == want, (p["title"], t)
            assert t["expr"].strip(), (p["title"], t)
            queries += 1
            # Every variable a query names is declared (or one of Grafana's own).
            for name in re.findall(r"\$\{?([A-Za-z_]\w*)", t["expr"]):
                assert name in variables or name in ("__rate_interval", "__range",
                                                     "__interval"), (p["title"], name)
    assert queries >= 20
    inst = variables["instance"]
    assert inst["type"] == "query" and inst["datasource"] == want
    assert inst["query"]["query"].startswith("label_values(")


def test_panels_are_laid_out_on_the_grid(dashboard):
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells = set()
    for p in all_panels(dashboard):
        assert p["type"] in PANEL_TYPES, p["type"]
        g = p["gridPos"]
        assert all(isinstance(g[k], int) and g[k] >= 0 for k in "hwxy"), p["title"]
        assert 1 <= g["w"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine


@pytest.mark.parametrize("command,name", [("check", "alerts.yaml"),
                                          ("test", "alerts-test.yaml")])
def test_promtool_accepts_the_rules(command, name):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: run scripts/setup (Debian package prometheus)")
    proc = subprocess.run([promtool, command, "rules", name], cwd=OBS, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


def test_every_alert_is_unit_tested_or_seen_firing():
    rules = [r["alert"] for g in yaml.safe_load((OBS / "alerts.yaml").read_text())["groups"]
             for r in g["rules"]]
    tested = {t["alertname"] for case in yaml.safe_load((OBS / "alerts-test.yaml").read_text())
              ["tests"] for t in case.get("alert_rule_test", [])}
    e2e = (REPO / "tests" / "e2e" / "test_prometheus.py").read_text()
    fired = {a for a in rules if f'"{a}"' in e2e}
    missing = [a for a in rules if a not in tested | fired]
    assert not missing, f"alerts neither unit-tested nor seen firing: {missing}"
