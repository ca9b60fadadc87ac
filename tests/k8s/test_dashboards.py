"""The Grafana dashboards are valid, every panel queries Prometheus, and every dashboard query
and rule expression names only metrics that batchlab defines (or recording rules)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from observability_queries import (
    DASHBOARDS_DIR,
    RULES_FILE,
    observability_queries,
    promql_metric_names,
    recording_rule_names,
)

from batchlab.rpc.metrics import make_metrics, series_names

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO_ROOT / DASHBOARDS_DIR).glob("*.json"))
# Series Prometheus itself adds to every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


@pytest.fixture(scope="module")
def known_series() -> set[str]:
    # Without a registry, make_metrics also registers the process collectors (process_*), as
    # the services get them.
    defined = set(series_names(make_metrics().registry))
    return defined | recording_rule_names(REPO_ROOT / RULES_FILE) | PROMETHEUS_SERIES


def _panels(panels):
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", ()))


def test_there_are_three_dashboards():
    assert [p.name for p in DASHBOARDS] == [
        "experiment-overview.json", "system-health.json", "training-curves.json",
    ]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_valid_and_every_panel_queries_prometheus(path):
    board = json.loads(path.read_text())
    assert board["uid"].startswith("batchlab-") and board["title"].startswith("batchlab / ")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = set()
    for panel in _panels(board["panels"]):
        assert panel["id"] not in ids, f"duplicate panel id {panel['id']}"
        ids.add(panel["id"])
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        targets = panel.get("targets")
        assert targets, f"panel {panel['title']!r} has no targets"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        ref_ids = [t["refId"] for t in targets]
        assert len(set(ref_ids)) == len(ref_ids)
        for target in targets:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r}: empty expr"
    # Every $variable an expression uses is defined (or one of Grafana's own).
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", path.read_text()))
    builtin = {"__rate_interval", "__interval", "__range", "datasource"}
    assert used - builtin <= set(variables), f"undefined variables {used - builtin - set(variables)}"


def test_training_curves_are_templated_by_experiment_study_and_trial():
    board = json.loads((REPO_ROOT / DASHBOARDS_DIR / "training-curves.json").read_text())
    names = [v["name"] for v in board["templating"]["list"]]
    assert names[:4] == ["datasource", "experiment", "study", "trial"]
    exprs = [t["expr"] for p in _panels(board["panels"]) for t in p.get("targets", ())]
    for gauge in ("batchlab_trial_train_loss", "batchlab_trial_learning_rate",
                  "batchlab_trial_eval_metric"):
        (expr,) = [e for e in exprs if e.startswith(gauge + "{")]
        for variable in ("experiment", "study", "trial"):
            assert f'{variable}=~"${variable}"' in expr, expr


def test_extraction_finds_every_query():
    queries = observability_queries(REPO_ROOT)
    kinds = {q.kind for q in queries}
    assert kinds == {"panel", "variable", "record", "alert"}
    panel_targets = sum(
        len(p.get("targets", ()))
        for path in DASHBOARDS
        for p in _panels(json.loads(path.read_text())["panels"])
    )
    assert sum(q.kind == "panel" for q in queries) == panel_targets
    # Grafana variables are filled in for Prometheus' API.
    query = next(q for q in queries if "$__rate_interval" in q.expr and "$" in q.expr)
    assert "$" not in query.promql({"experiment": "minimal"})


def test_every_query_names_only_defined_metrics(known_series):
    unknown = {}
    for query in observability_queries(REPO_ROOT):
        names = promql_metric_names(query.expr)
        assert names, f"{query.source}: names no metric: {query.expr}"
        missing = names - known_series
        if missing:
            unknown[query.source] = sorted(missing)
    assert not unknown, json.dumps(unknown, indent=2)


def test_every_recording_rule_is_used_or_alerted_on():
    recorded = recording_rule_names(REPO_ROOT / RULES_FILE)
    used = set()
    for query in observability_queries(REPO_ROOT):
        if query.kind != "record":
            used |= promql_metric_names(query.expr)
    # Recording rules that only feed other recording rules count as used through them.
    for query in observability_queries(REPO_ROOT):
        if query.kind == "record":
            used |= promql_metric_names(query.expr) & recorded
    assert recorded <= used, f"unused recording rules: {recorded - used}"


def test_metric_name_scanner_on_tricky_expressions():
    cases = {
        'sum by (service, code) (rate(batchlab_rpc_requests_total{code!~"OK|x{y}"}[5m]))':
            {"batchlab_rpc_requests_total"},
        "histogram_quantile(0.99, sum by (le) (rate(a_bucket[$__rate_interval])))": {"a_bucket"},
        "time() - b_timestamp_seconds > 15 * 60": {"b_timestamp_seconds"},
        "x unless on () sum(y{state=\"busy\"}) > 0 and bool 1e3": {"x", "y"},
        'label_replace(up, "dst", "$1", "src", "(.*)") offset 5m': {"up"},
        "a:b:c / on (e) group_left (f) d offset 1h30m": {"a:b:c", "d"},
        "vector(0)": set(),
    }
    for expr, expected in cases.items():
        assert promql_metric_names(expr) == expected, expr
