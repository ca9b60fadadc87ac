"""Write k8s/components/prometheus/prometheusrule.yaml from batchlab.rules.yml.

The rules are written once, in Prometheus' rule file format (which promtool lints); this script
wraps the same groups in a PrometheusRule for prometheus-operator. tests/k8s checks the two agree.

Usage: python scripts/render_prometheus_rule.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

COMPONENT = Path(__file__).resolve().parents[1] / "k8s" / "components" / "prometheus"
HEADER = (
    "# Generated from batchlab.rules.yml by scripts/render_prometheus_rule.py; edit that file\n"
    "# and rerun the script (tests/k8s fails while the two differ).\n"
)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings as literal blocks, so expressions stay readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(rules_file: Path = COMPONENT / "batchlab.rules.yml") -> str:
    """The PrometheusRule manifest holding the groups of `rules_file`."""
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    manifest = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "batchlab",
            # kube-prometheus-stack's Prometheus selects rules by its release label.
            "labels": {"release": "kube-prometheus-stack"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=1 << 16)


def main() -> int:
    out = COMPONENT / "prometheusrule.yaml"
    out.write_text(render())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
