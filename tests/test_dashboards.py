"""The Grafana dashboard and the Prometheus alert rules of ``docs/observability`` (issue 11)
use only metrics and labels a worker serves, and are well formed.

Served: the families a :class:`~worker.metrics.Metrics` renders after one call of each
recording method, so that every labelled counter and histogram has series (what ``GET
/metrics`` answers is that text). Used: every PromQL expression of the dashboard (panel
targets, the template variables' ``label_values``) and of the rules, read by :func:`parse`, a
scanner that knows strings, ranges, Grafana's ``$variables``, calls (a name before ``(``),
keywords, ``{...}`` matchers and ``by (...)`` clauses well enough to tell metric names from the
rest. Every other name in a metric's place is reported, so a misspelt prefix is caught too.

PyYAML is not a dependency of the project, so the rules file is read by :func:`read_yaml`, a
reader of the YAML subset the file uses (block mappings and sequences, plain and quoted
scalars, ``|``/``>`` block scalars) that refuses anything else rather than skip it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import HOOKS, Metrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docs" / "observability" / "grafana-dashboard.json"
ALERTS = ROOT / "docs" / "observability" / "alerts.yml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = frozenset({"job", "instance"})
#: Metrics Prometheus makes itself.
SYNTHETIC = {"up": frozenset[str]()}

#: sample name -> label -> the values served
Served = Mapping[str, Mapping[str, frozenset[str]]]


async def render_served() -> tuple[Served, dict[str, set[str]]]:
    """What a worker serves: samples by name with their labels' values, and each family's
    sample names."""
    metrics = Metrics(token_expires_in=lambda: 100.0)

    async def lag() -> int:
        return 3

    queue = metrics.watch_queue("q", lag=lag)
    for hook in HOOKS:
        metrics.event_started()
        metrics.event_finished(hook, 200, 0.01)
    metrics.event_answered("INTERCEPTOR_PRE", 404, 0.001)
    metrics.event_started()
    metrics.event_finished("INTERCEPTOR_PRE", 503, 3.5)
    metrics.overloaded("NOTIFICATION")
    for method, status in (("GET", 200), ("POST", 404), ("PATCH", 503), ("GET", None)):
        metrics.api_request(method, status, 0.02)
    metrics.api_retry("GET")
    metrics.login("success")
    metrics.jwt_refused("expired")
    metrics.key_fetch(False)
    for child in (queue.received, queue.redelivered, queue.acknowledged, queue.retried,
                  queue.dead_lettered, queue.settle_failures, queue.receive_failures):  # fmt: skip
        child.inc()
    text, _ = await metrics.render()
    samples: dict[str, dict[str, set[str]]] = {}
    families: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            families.setdefault(family.name, set()).add(sample.name)
            labels = samples.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    served = {
        name: {k: frozenset(v) for k, v in labels.items()} for name, labels in samples.items()
    }
    return served, families


@pytest.fixture
async def served() -> Served:
    return (await render_served())[0]


# ---------------------------------------------------------------------------- PromQL


TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])
    | (?P<variable>\$\{?\w+\}?)
    | (?P<duration>(?:\d+(?:ms|[smhdwy]))+\b)
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<matchop>=~|!~|!=)
    | (?P<op>==|>=|<=|[-+*/%^<>=,(){}])
    | (?P<space>\s+)
    | (?P<other>.)
    """,
    re.VERBOSE,
)
#: Keywords followed by a list of labels in parentheses.
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", *LABEL_LISTS})
AGGREGATING = frozenset({"by", "without"})
AGGREGATORS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
})  # fmt: skip


@dataclass(frozen=True)
class Selector:
    metric: str | None
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)
    at: int  # token index


@dataclass(frozen=True)
class Grouping:
    keyword: str
    labels: tuple[str, ...]
    span: tuple[int, int] | None  # the aggregated argument's tokens; None: the whole expression


@dataclass
class Query:
    selectors: list[Selector]
    groupings: list[Grouping]
    problems: list[str]
    bare_aggregations: int = 0  # sum(...) and the like with neither by nor without

    def metrics_in(self, span: tuple[int, int] | None) -> set[str]:
        return {
            s.metric
            for s in self.selectors
            if s.metric is not None and (span is None or span[0] <= s.at <= span[1])
        }


def tokenize(expr: str) -> list[tuple[str, str]]:
    found = ((m.lastgroup or "other", m.group()) for m in TOKEN.finditer(expr))
    return [token for token in found if token[0] != "space"]


def parse(expr: str) -> Query:
    tokens = tokenize(expr)
    query = Query([], [], [])
    if not _balanced(tokens):
        query.problems.append(f"unbalanced brackets in {expr!r}")
        return query
    i = 0
    while i < len(tokens):
        i = _step(tokens, i, query)
    return query


def _step(tokens: list[tuple[str, str]], i: int, query: Query) -> int:
    """Read what starts at token ``i`` into ``query``; the index of the next token to read."""
    kind, text = tokens[i]
    after = tokens[i + 1][1] if i + 1 < len(tokens) else ""
    if kind == "other":
        query.problems.append(f"unexpected {text!r}")
    elif kind == "name" and text.lower() in LABEL_LISTS and after == "(":
        end = _closing(tokens, i + 1)
        labels = tuple(t for k, t in tokens[i + 2 : end] if k == "name")
        query.groupings.append(Grouping(text.lower(), labels, _argument(tokens, text, i, end)))
        return end + 1
    elif kind == "name" and text.lower() in AGGREGATORS and after in ("(", "by", "without"):
        query.bare_aggregations += after == "(" and _after_group(tokens, i + 1) not in AGGREGATING
    elif kind == "name" and after != "(" and text.lower() not in KEYWORDS:
        return _selector(tokens, i, text, query)
    elif text == "{":
        return _selector(tokens, i - 1, None, query)
    return i + 1


def _selector(tokens: list[tuple[str, str]], at: int, metric: str | None, query: Query) -> int:
    """A selector named ``metric`` at token ``at``, with the matchers that follow it."""
    start = at + 1
    if start >= len(tokens) or tokens[start][1] != "{":
        query.selectors.append(Selector(metric, (), at))
        return start
    end = _closing(tokens, start)
    inside = [t for t in tokens[start + 1 : end] if t[1] != ","]
    matchers = []
    for i in range(0, len(inside), 3):
        triple = inside[i : i + 3]
        kinds = tuple(k for k, _ in triple)
        if kinds not in (("name", "matchop", "string"), ("name", "op", "string")):
            query.problems.append(f"cannot read matchers of {metric}: {triple}")
            break
        matchers.append((triple[0][1], triple[1][1], _unquote(triple[2][1])))
    query.selectors.append(Selector(metric, tuple(matchers), at))
    return end + 1


def _argument(
    tokens: list[tuple[str, str]], keyword: str, at: int, end: int
) -> tuple[int, int] | None:
    """What ``by``/``without`` aggregates: the group after its labels (``sum by (a) (x)``) or
    the one before it (``sum(x) by (a)``); ``on``/``ignoring``/``group_*``: everything."""
    if keyword.lower() not in AGGREGATING:
        return None
    if end + 1 < len(tokens) and tokens[end + 1][1] == "(":
        return end + 1, _closing(tokens, end + 1)
    if at > 0 and tokens[at - 1][1] == ")":
        return _opening(tokens, at - 1), at - 1
    raise AssertionError(f"no argument for {keyword} at token {at}")


def _after_group(tokens: list[tuple[str, str]], at: int) -> str:
    """The (lower-cased) token after the group that opens at ``at``, or ``""``."""
    end = _closing(tokens, at)
    return tokens[end + 1][1].lower() if end + 1 < len(tokens) else ""


def _closing(tokens: list[tuple[str, str]], at: int) -> int:
    pairs = {"(": ")", "{": "}"}
    opening, depth = tokens[at][1], 0
    for i in range(at, len(tokens)):
        depth += (tokens[i][1] == opening) - (tokens[i][1] == pairs[opening])
        if depth == 0:
            return i
    raise AssertionError("unbalanced")  # _balanced() ran first


def _opening(tokens: list[tuple[str, str]], at: int) -> int:
    depth = 0
    for i in range(at, -1, -1):
        depth += (tokens[i][1] == ")") - (tokens[i][1] == "(")
        if depth == 0:
            return i
    raise AssertionError("unbalanced")


def _balanced(tokens: list[tuple[str, str]]) -> bool:
    stack: list[str] = []
    for kind, text in tokens:
        if kind == "op" and text in "({":
            stack.append({"(": ")", "{": "}"}[text])
        elif kind == "op" and text in ")}" and (not stack or stack.pop() != text):
            return False
    return not stack


def _unquote(text: str) -> str:
    return text[1:-1] if text.startswith("`") else re.sub(r"\\(.)", r"\1", text[1:-1])


def allowed(metric: str, served: Served) -> frozenset[str]:
    """The labels a selector of ``metric`` may name."""
    labels = SYNTHETIC.get(metric, frozenset(served.get(metric, {})))
    return labels | TARGET_LABELS


def problems(expr: str, served: Served) -> list[str]:
    """Whatever in ``expr`` a worker does not serve: metrics, labels, label values."""
    query = parse(expr)
    found = list(query.problems)
    for selector in query.selectors:
        found += _selector_problems(selector, served)
    for grouping in query.groupings:
        found += _grouping_problems(grouping, query, served)
    return found


def _selector_problems(selector: Selector, served: Served) -> Iterator[str]:
    metric = selector.metric
    if metric is None:
        yield "a selector without a metric name"
        return
    if metric not in served and metric not in SYNTHETIC:
        yield f"{metric}: not served"
        return
    for label, operator, value in selector.matchers:
        if label not in allowed(metric, served):
            yield f"{metric}: no label {label!r}"
        elif operator in ("=", "=~") and "$" not in value and label not in TARGET_LABELS:
            pattern = value if operator == "=~" else re.escape(value)
            if not any(re.fullmatch(pattern, v) for v in served[metric][label]):
                yield f"{metric}{{{label}{operator}{value!r}}}: matches no served value"


def _grouping_problems(grouping: Grouping, query: Query, served: Served) -> Iterator[str]:
    metrics = query.metrics_in(grouping.span)
    known = [m for m in metrics if m in served or m in SYNTHETIC]
    for label in grouping.labels:
        has = [m for m in known if label in allowed(m, served)]
        # by/without name labels of what they aggregate; on/ignoring of either side
        if (grouping.keyword in AGGREGATING and len(has) < len(known)) or not has:
            missing = sorted(set(known) - set(has)) or sorted(metrics)
            yield f"{grouping.keyword} ({label}): {', '.join(missing)} has no label {label!r}"


def kept_labels(expr: str, served: Served) -> frozenset[str]:
    """The labels a result of ``expr`` certainly has: those every ``by`` keeps, or, without
    aggregation, those every selected metric has (none, for a ``without`` or a bare ``sum(x)``,
    to be safe)."""
    query = parse(expr)
    if query.bare_aggregations or any(g.keyword == "without" for g in query.groupings):
        return frozenset()
    bys = [set(g.labels) for g in query.groupings if g.keyword == "by"]
    if bys:
        return frozenset(set.intersection(*bys))
    sets = [set(allowed(m, served)) for m in query.metrics_in(None)]
    return frozenset(set.intersection(*sets)) if sets else frozenset()


def template_labels(text: str) -> set[str]:
    """``{{hook}}`` of a legend, ``{{ $labels.hook }}`` of an annotation."""
    return set(re.findall(r"\{\{\s*(?:\$labels\.)?(\w+)\s*(?:\|[^}]*)?\}\}", text))


# ---------------------------------------------------------------------------- the checker


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("sum(rate(biot_worker_no_such_metric[5m]))", "biot_worker_no_such_metric: not served"),
        ('rate(biot_worker_events_total{reason="x"}[5m])', "no label 'reason'"),
        ("sum by (queue) (rate(biot_worker_events_total[5m]))", "has no label 'queue'"),
        ("sum(rate(biot_worker_events_total[5m])) by (queue)", "has no label 'queue'"),
        ('biot_worker_service_logins_total{outcome="refuse"}', "matches no served value"),
        ("biot_workr_events_total", "biot_workr_events_total: not served"),
        ("sum(rate(biot_worker_events_total[5m])", "unbalanced"),
        ('{hook="NOTIFICATION"}', "without a metric name"),
    ],
)
async def test_the_check_reports_what_is_not_served(
    served: Served, expr: str, expected: str
) -> None:
    assert any(expected in p for p in problems(expr, served)), problems(expr, served)


@pytest.mark.parametrize(
    "expr",
    [
        "histogram_quantile(0.99, sum by (le, hook) "
        '(rate(biot_worker_event_duration_seconds_bucket{hook=~"INTERCEPTOR_.*"}[$__rate_interval])))',
        'sum(rate(biot_worker_events_total{job=~"$job", status=~"5.."}[5m] offset 1h)) by (hook)',
        'up{job=~"biot-worker.*"} == 0 and on (instance) biot_worker_build_info',
        "vector(3) > bool 2",
    ],
)
async def test_the_check_passes_what_is_served(served: Served, expr: str) -> None:
    """Functions, keywords, strings, ranges, durations and variables are not metric names."""
    assert problems(expr, served) == []


async def test_kept_labels_follow_the_aggregation(served: Served) -> None:
    assert kept_labels("sum by (job, hook) (rate(biot_worker_events_total[5m]))", served) == {
        "job",
        "hook",
    }
    assert kept_labels("biot_worker_service_token_expires_in_seconds < 60", served) == {
        "job",
        "instance",
    }
    assert kept_labels("sum(rate(biot_worker_events_total[5m])) by (hook)", served) == {"hook"}
    assert kept_labels("count(count by (instance) (biot_worker_build_info))", served) == set()
    assert kept_labels("sum without (hook) (biot_worker_events_total)", served) == set()


# ---------------------------------------------------------------------------- the dashboard


def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    return [p for top in board["panels"] for p in (top, *top.get("panels", ()))]


def graphs(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in panels(board) if p["type"] != "row"]


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board["templating"]["list"]}


def dashboard_queries(board: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, PromQL, legend) of each target and variable; ``label_values(x, l)`` is read as
    ``count by (l) (x)``, which needs the same metric and label."""
    for panel in graphs(board):
        for target in panel["targets"]:
            yield panel["title"], target["expr"], target.get("legendFormat", "")
    for name, variable in variables(board).items():
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["definition"])
            assert found, f"variable {name}: {variable['definition']}"
            assert variable["query"]["query"] == variable["definition"]
            yield f"${name}", f"count by ({found[2]}) ({found[1]})", ""


def test_dashboard_is_importable() -> None:
    board = dashboard()
    assert board["uid"] == "biot-worker"
    assert board["title"] == "biot-worker"
    assert 36 <= board["schemaVersion"] <= 41
    assert board["id"] is None  # an import makes a new dashboard
    found = variables(board)
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert found[name]["datasource"] == DATASOURCE
        assert found[name]["definition"].startswith("label_values(biot_worker_build_info")
        assert found[name]["definition"].endswith(f", {name})")


def test_every_panel_uses_the_datasource_variable() -> None:
    for panel in graphs(dashboard()):
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_panel_ids_are_unique_and_the_grid_has_no_overlap() -> None:
    everything = panels(dashboard())
    ids = [p["id"] for p in everything]
    assert all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == len(ids)
    cells: dict[tuple[int, int], str] = {}
    for panel in everything:
        grid = panel["gridPos"]
        x, y, w, h = (grid[k] for k in "xywh")
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 24, panel["title"]
        for cell in ((cx, cy) for cx in range(x, x + w) for cy in range(y, y + h)):
            assert cell not in cells, f"{panel['title']} overlaps {cells[cell]}"
            cells[cell] = panel["title"]


async def test_dashboard_uses_only_served_metrics_and_labels(served: Served) -> None:
    found = {
        f"{where}: {expr}": problems(expr, served)
        for where, expr, _ in dashboard_queries(dashboard())
    }
    assert {where: p for where, p in found.items() if p} == {}
    assert len(found) > 30  # the reader found the queries


async def test_dashboard_legends_name_labels_the_query_keeps(served: Served) -> None:
    for where, expr, legend in dashboard_queries(dashboard()):
        assert template_labels(legend) <= kept_labels(expr, served), f"{where}: {legend}"


def test_every_dashboard_query_follows_the_job_and_instance_variables() -> None:
    for where, expr, _ in dashboard_queries(dashboard()):
        if where.startswith("$"):
            continue
        for selector in parse(expr).selectors:
            assert ("job", "=~", "$job") in selector.matchers, f"{where}: {expr}"
            assert ("instance", "=~", "$instance") in selector.matchers, f"{where}: {expr}"


async def test_dashboard_shows_every_worker_metric() -> None:
    _, families = await render_served()
    used = {
        s.metric for _, expr, _ in dashboard_queries(dashboard()) for s in parse(expr).selectors
    }
    unshown = {
        family
        for family, names in families.items()
        # the text format serves a counter's _created as a family of its own
        if family.startswith("biot_worker_")
        and not family.endswith("_created")
        and not names & used
    }
    assert unshown == set()
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= used


def test_latency_panels_draw_biots_timeout() -> None:
    latency = [
        p
        for p in graphs(dashboard())
        if any("biot_worker_event_duration_seconds_bucket" in t["expr"] for t in p["targets"])
    ]
    assert latency
    for panel in latency:
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"] == "s"
        assert 3 in [step["value"] for step in defaults["thresholds"]["steps"]], panel["title"]
        if panel["type"] == "timeseries":
            assert defaults["custom"]["thresholdsStyle"]["mode"] != "off", panel["title"]


# ---------------------------------------------------------------------------- alert rules


def read_yaml(text: str) -> Any:
    """The YAML subset of the rules file; anything else raises :class:`ValueError`."""
    lines = text.splitlines()
    value, end = _yaml_node(lines, _next_line(lines, 0), 0)
    if _next_line(lines, end) < len(lines):
        raise ValueError(f"line {end + 1}: unexpected indentation")
    return value


def _next_line(lines: list[str], i: int) -> int:
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
        i += 1
    return i


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _yaml_node(lines: list[str], i: int, indent: int) -> tuple[Any, int]:
    if lines[i].lstrip().startswith("- "):
        return _yaml_sequence(lines, i, indent)
    return _yaml_mapping(lines, i, indent)


def _yaml_sequence(lines: list[str], i: int, indent: int) -> tuple[list[Any], int]:
    items = []
    while i < len(lines) and _indent(lines[i]) == indent and lines[i].lstrip().startswith("- "):
        lines[i] = lines[i].replace("- ", "  ", 1)  # the item is a mapping two columns in
        item, i = _yaml_mapping(lines, i, indent + 2)
        items.append(item)
        i = _next_line(lines, i)
    return items, i


def _yaml_mapping(lines: list[str], i: int, indent: int) -> tuple[dict[str, Any], int]:
    mapping: dict[str, Any] = {}
    while i < len(lines) and _indent(lines[i]) == indent and not lines[i].lstrip().startswith("-"):
        found = re.fullmatch(r"([\w.-]+):(?: (.*))?", lines[i].strip())
        if not found or found[1] in mapping:
            raise ValueError(f"line {i + 1}: not a new key: {lines[i]!r}")
        rest = (found[2] or "").strip()
        if rest in ("|", "|-", ">", ">-"):
            mapping[found[1]], i = _yaml_block(lines, i + 1, indent, rest[0])
        elif rest:
            mapping[found[1]], i = _yaml_scalar(rest, i), i + 1
        else:
            child = _next_line(lines, i + 1)
            if child >= len(lines) or _indent(lines[child]) <= indent:
                raise ValueError(f"line {i + 1}: empty value")
            mapping[found[1]], i = _yaml_node(lines, child, _indent(lines[child]))
        i = _next_line(lines, i)
    return mapping, i


def _yaml_block(lines: list[str], i: int, indent: int, style: str) -> tuple[str, int]:
    body: list[str] = []
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
        body.append(lines[i])
        i += 1
    while body and not body[-1].strip():
        body.pop()
    if not body:
        raise ValueError(f"line {i}: empty block scalar")
    margin = _indent(body[0])
    if style == ">":
        return " ".join(line.strip() for line in body), i
    return "\n".join(line[margin:] for line in body), i


def _yaml_scalar(text: str, i: int) -> str:
    if text[0] in "\"'":
        if len(text) < 2 or text[-1] != text[0] or "\\" in text or text[0] in text[1:-1]:
            raise ValueError(f"line {i + 1}: a quoted scalar this reader does not know: {text}")
        return text[1:-1]
    if re.search(r"[{}\[\]&*!|>%@`#]|: ", text):
        raise ValueError(f"line {i + 1}: a plain scalar this reader does not know: {text}")
    return text


def rules() -> list[dict[str, Any]]:
    document = read_yaml(ALERTS.read_text())
    assert set(document) == {"groups"}
    found: list[dict[str, Any]] = [r for group in document["groups"] for r in group["rules"]]
    text = ALERTS.read_text()
    assert len(found) == len(re.findall(r"^\s*- alert: ", text, re.MULTILINE))
    assert len(found) == len(re.findall(r"^\s*expr: ", text, re.MULTILINE))
    return found


def test_the_yaml_reader_refuses_what_it_does_not_know() -> None:
    assert read_yaml("a:\n  - b: 'x'\n    c: |-\n      y\n      z\n") == {
        "a": [{"b": "x", "c": "y\nz"}]
    }
    for text in (
        "a: {b: 1}\n",
        "a: [1]\n",
        "a: 1\na: 2\n",
        "a:\n",
        'a: "x\\"y"\n',
        "- a: b\n - c\n",
    ):
        with pytest.raises(ValueError, match="line"):
            read_yaml(text)


def test_alert_rules_are_well_formed() -> None:
    found = rules()
    names = [rule["alert"] for rule in found]
    assert len(set(names)) == len(names)
    groups = [group["name"] for group in read_yaml(ALERTS.read_text())["groups"]]
    assert len(set(groups)) == len(groups)
    for rule in found:
        name = rule["alert"]
        assert re.fullmatch(r"BiotWorker[A-Z][A-Za-z0-9]+", name)
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        for text in rule["annotations"].values():
            assert text.count("{{") == text.count("}}"), name
            assert "$labels." in text or "$value" in text, name


async def test_alerts_use_only_served_metrics_and_labels(served: Served) -> None:
    found = {rule["alert"]: problems(rule["expr"], served) for rule in rules()}
    assert {name: p for name, p in found.items() if p} == {}


async def test_alert_annotations_name_labels_the_expression_keeps(served: Served) -> None:
    for rule in rules():
        kept = kept_labels(rule["expr"], served)
        for text in rule["annotations"].values():
            assert template_labels(text) <= kept, f"{rule['alert']}: {text}"


@pytest.mark.parametrize(
    ("alert", "fragments", "duration", "severity"),
    [
        ("BiotWorkerDown", ["up{", "== 0"], "1m", "critical"),
        (
            "BiotWorkerInterceptorLatencyHigh",
            ["histogram_quantile(0.99", 'hook=~"INTERCEPTOR_.*"', "> 2.5"],
            "5m",
            "critical",
        ),
        ("BiotWorkerErrorRatioHigh", ['status=~"5.."', "> 0.05"], "5m", "critical"),
        ("BiotWorkerServiceLoginFailures", ['outcome=~"refused|failed"', "[10m]"], None, "warning"),
        ("BiotWorkerServiceLoginsAllFailing", ['outcome="success"', "== 0"], "5m", "critical"),
        (
            "BiotWorkerServiceTokenExpiring",
            ["biot_worker_service_token_expires_in_seconds < 60"],
            "2m",
            "critical",
        ),
        (
            "BiotWorkerDeadLetters",
            ["increase(biot_worker_queue_messages_dead_lettered_total[10m])", "> 0"],
            None,
            "warning",
        ),
        ("BiotWorkerJwtRefusals", ["biot_worker_jwt_refusals_total"], "5m", "warning"),
        ("BiotWorkerConsumerLagGrowing", ["deriv(", "consumer_lag_messages"], "15m", "warning"),
    ],
)
def test_the_asked_for_alerts_exist(
    alert: str, fragments: list[str], duration: str | None, severity: str
) -> None:
    rule = {r["alert"]: r for r in rules()}[alert]
    expr = " ".join(rule["expr"].split())
    for fragment in fragments:
        assert fragment in expr, expr
    assert rule.get("for") == duration
    assert rule["labels"]["severity"] == severity
