"""The Prometheus rules and scrape configuration lint with promtool, the alerts fire when they
should (promtool's rule unit tests), and the PrometheusRule carries the same rules."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPONENT = REPO_ROOT / "k8s" / "components" / "prometheus"
RULES = COMPONENT / "batchlab.rules.yml"
CONFIG = COMPONENT / "prometheus.yml"
RULE_TESTS = Path(__file__).resolve().parent / "data" / "batchlab.rules.test.yml"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, cwd=cwd)


def test_promtool_checks_rules(promtool):
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_as_the_rule_unit_tests_expect(promtool):
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_checks_config(promtool, tmp_path):
    result = run(promtool, "check", "config", str(CONFIG))
    output = result.stdout + result.stderr
    if result.returncode != 0 and "field kubernetes_sd_configs not found" in output:
        # Debian's Prometheus is built without Kubernetes service discovery. Check everything
        # else (globals, relabelling, the rule file) with the discovery swapped for a static
        # target; upstream promtool checks the file as it is.
        config = yaml.safe_load(CONFIG.read_text())
        for scrape in config["scrape_configs"]:
            assert scrape.pop("kubernetes_sd_configs")[0]["role"] == "pod"
            scrape["static_configs"] = [{"targets": ["127.0.0.1:9101"]}]
        config["rule_files"] = [str(RULES)]
        copy = tmp_path / "prometheus.yml"
        copy.write_text(yaml.safe_dump(config))
        result = run(promtool, "check", "config", str(copy))
        output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SUCCESS" in output


def test_prometheus_rule_has_the_same_groups_as_the_rules_file():
    manifest = yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"], (
        "prometheusrule.yaml is stale: run python scripts/render_prometheus_rule.py"
    )


def test_rules_follow_naming_conventions():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    records = [r for g in groups for r in g["rules"] if "record" in r]
    alerts = [r for g in groups for r in g["rules"] if "alert" in r]
    assert records and alerts
    for rule in records:
        # level:metric:operations (Prometheus' recording rule naming).
        assert re.fullmatch(r"[a-z_]+:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]
    for rule in alerts:
        assert re.fullmatch(r"Batchlab[A-Za-z]+", rule["alert"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
    # The alerts are all there.
    names = {r["alert"] for r in alerts}
    assert {"BatchlabTrialNoProgress", "BatchlabDivergenceRateHigh",
            "BatchlabCheckpointFailures", "BatchlabRPCErrorRatioHigh"} <= names
    # Every alert has a unit test.
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert names <= tested, f"alerts without a rule unit test: {names - tested}"
