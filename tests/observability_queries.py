"""Test tooling: every PromQL expression the dashboards and rules hold, and the metric names
each one reads.

The Grafana dashboards (k8s/components/grafana/dashboards/*.json) and the Prometheus rules
(k8s/components/prometheus/batchlab.rules.yml) are data that only a running Prometheus would
check. This module lists their expressions, so that tests can check offline that each names only
metrics defined in `batchlab.rpc.metrics` or recording rules, and an integration test can run
each one against a Prometheus that scraped real servers (`Query.promql` fills in Grafana's
variables).

Example:
    >>> qs = observability_queries(Path("."))                       # from the repository root
    >>> sorted(promql_metric_names('sum(rate(batchlab_rpc_requests_total{code!="OK"}[5m]))'))
    ['batchlab_rpc_requests_total']
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DASHBOARDS_DIR",
    "RULES_FILE",
    "Query",
    "dashboard_queries",
    "observability_queries",
    "promql_metric_names",
    "recording_rule_names",
    "rule_queries",
]

# Relative to the repository root.
DASHBOARDS_DIR = Path("k8s/components/grafana/dashboards")
RULES_FILE = Path("k8s/components/prometheus/batchlab.rules.yml")

# Grafana's built-in interval variables, with values fit for a short integration test.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from.

    Attributes:
      source: a readable location, e.g. "system-health.json: panel 'Latency p50 / p99' (B)".
      expr: the expression as written (Grafana variables such as $experiment left in).
      kind: "panel", "variable", "record" or "alert".
    """

    source: str
    expr: str
    kind: str

    def promql(self, variables: Mapping[str, str] | None = None) -> str:
        """The expression with Grafana's variables replaced, ready for Prometheus' API.

        Args:
          variables: values for template variables (e.g. {"experiment": "minimal"}); a
            variable not given becomes ".*", which matches anything in the `=~` matchers the
            dashboards use. $__rate_interval and friends get GRAFANA_INTERVALS.
        """
        values = {**GRAFANA_INTERVALS, **(variables or {})}

        def replace(match: re.Match[str]) -> str:
            name = match.group("braced") or match.group("bare") or match.group("brackets")
            return values.get(name, ".*")

        return _GRAFANA_VARIABLE.sub(replace, self.expr)


# $name, ${name}, ${name:format} and the deprecated [[name]].
_GRAFANA_VARIABLE = re.compile(
    r"\$\{(?P<braced>\w+)(?::[^}]*)?\}|\$(?P<bare>[A-Za-z_]\w*)|\[\[(?P<brackets>\w+)\]\]"
)


def _panels(panels: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", ()))


def _variable_expr(query: Any) -> str | None:
    """The PromQL a Grafana query variable runs, or None when it runs none.

    label_values(selector, label) reads the series of `selector`; query_result(expr) runs
    `expr`; label_values(label) and label_names() read no particular metric.
    """
    text = query.get("query", "") if isinstance(query, Mapping) else str(query or "")
    text = text.strip()
    match = re.fullmatch(r"label_values\((?P<args>.*)\)", text, flags=re.DOTALL)
    if match:
        args = match.group("args")
        selector, comma, _label = args.rpartition(",")
        return selector.strip() if comma else None
    match = re.fullmatch(r"query_result\((?P<expr>.*)\)", text, flags=re.DOTALL)
    if match:
        return match.group("expr").strip()
    return None


def dashboard_queries(path: Path) -> list[Query]:
    """The PromQL of one Grafana dashboard JSON file: panel targets and query variables."""
    board = json.loads(Path(path).read_text())
    queries = []
    for panel in _panels(board.get("panels", ())):
        for target in panel.get("targets", ()):
            if target.get("expr"):
                source = f"{path.name}: panel {panel.get('title')!r} ({target.get('refId')})"
                queries.append(Query(source, target["expr"], "panel"))
    for variable in board.get("templating", {}).get("list", ()):
        if variable.get("type") == "query":
            expr = _variable_expr(variable.get("query"))
            if expr:
                queries.append(Query(f"{path.name}: variable ${variable['name']}", expr, "variable"))
    return queries


def _rule_groups(rules: Path | Mapping[str, Any]) -> list[Mapping[str, Any]]:
    data = yaml.safe_load(Path(rules).read_text()) if isinstance(rules, Path) else rules
    return list(data.get("groups", ()))


def rule_queries(rules: Path | Mapping[str, Any]) -> list[Query]:
    """The expressions of a Prometheus rule file (or its parsed content)."""
    queries = []
    for group in _rule_groups(rules):
        for rule in group.get("rules", ()):
            kind = "record" if "record" in rule else "alert"
            source = f"rules {group['name']}: {kind} {rule.get(kind)}"
            queries.append(Query(source, str(rule["expr"]), kind))
    return queries


def recording_rule_names(rules: Path | Mapping[str, Any]) -> set[str]:
    """The series names a rule file's recording rules define."""
    return {
        rule["record"]
        for group in _rule_groups(rules)
        for rule in group.get("rules", ())
        if "record" in rule
    }


def observability_queries(repo_root: Path) -> list[Query]:
    """All dashboard and rule expressions of the repository at `repo_root`."""
    root = Path(repo_root)
    queries = []
    for path in sorted((root / DASHBOARDS_DIR).glob("*.json")):
        queries.extend(dashboard_queries(path))
    queries.extend(rule_queries(root / RULES_FILE))
    return queries


# PromQL words that are not metric names: operators, modifiers, aggregation clauses.
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "start", "end",
}
_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<braces>\{[^}]*\})
  | (?P<brackets>\[[^\]]*\])
  | (?P<duration>\b\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*\b)
  | (?P<number>\b0[xX][0-9a-fA-F]+\b|(?<![\w:])\d*\.?\d+(?:[eE][+-]?\d+)?)
  | (?P<identifier>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (a lexical scan, not a full parser).

    Strings, label matchers, range and subquery brackets, grouping label lists, durations and
    numbers are skipped; an identifier followed by "(" is a function; what is left that is no
    keyword is a metric name. `{__name__="x"}` selectors are not resolved.
    """
    # Grafana variables stand for label values or intervals, never for metric names here.
    text = Query("", expr, "").promql()
    # Drop strings first, so that a "}" or "(" inside a label value cannot confuse the rest.
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', text)
    text = _GROUPING.sub(" ", text)
    tokens = [t for t in _TOKEN.finditer(text) if not t.group(0).isspace()]
    names = set()
    for token, following in zip(tokens, [*tokens[1:], None], strict=True):
        name = token.group("identifier")
        is_call = following is not None and following.group(0) == "("
        if name and name not in _KEYWORDS and not is_call:
            names.add(name)
    return names
