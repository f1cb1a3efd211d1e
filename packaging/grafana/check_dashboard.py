#!/usr/bin/env python3
"""Checks packaging/grafana/sbc-dashboard.json against docs/metrics.md.

Every metric a query references (panel targets, annotations, template variables) must be
listed in docs/metrics.md, with the labels the query groups, matches or labels its legend
by; rate()/increase() only apply to counters and histogram series; panel ids are unique
and every panel queries the templated data source. When `promtool` is on PATH (Debian
package prometheus; or set PROMTOOL), every query is also parsed by Prometheus itself.

Standard library only. Exit status 0 when all is well, 1 with one line per problem.
Usage: python3 packaging/grafana/check_dashboard.py [DASHBOARD.json [METRICS.md]]
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "packaging" / "grafana" / "sbc-dashboard.json"
METRICS_MD = ROOT / "docs" / "metrics.md"

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"instance", "job"}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
# Grafana variables a query may use, and what promtool sees in their place.
GRAFANA_VARS = {
    "instance": ".*",
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1d",
}
DATASOURCE_UID = "${datasource}"


def load_catalogue(path):
    """name -> (type, set of labels), from the `| `name` | type | labels | help |` rows."""
    row = re.compile(r"^\|\s*`(sbc_[a-z0-9_]+)`\s*\|\s*(counter|gauge|histogram)\s*\|([^|]*)\|")
    catalogue = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = row.match(line)
        if m:
            labels = set(re.findall(r"`([a-z_][a-z0-9_]*)`", m.group(3)))
            catalogue[m.group(1)] = (m.group(2), labels)
    return catalogue


def walk_panels(panels):
    for p in panels:
        yield p
        # Collapsed rows keep their panels inside.
        yield from walk_panels(p.get("panels", []))


def queries(dash):
    """(where, expr, legend, datasource) for every PromQL query in the dashboard."""
    for p in walk_panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            where = "panel %r (id %s) target %s" % (p.get("title"), p.get("id"), t.get("refId"))
            yield where, t.get("expr", ""), t.get("legendFormat", ""), t.get("datasource")
    for a in dash.get("annotations", {}).get("list", []):
        if "expr" in a:
            legend = a.get("titleFormat", "") + " " + a.get("textFormat", "")
            yield "annotation %r" % a.get("name"), a["expr"], legend, a.get("datasource")
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            for expr in {q, v.get("definition", "")}:
                if expr:
                    # label_values(METRIC, LABEL) is Grafana syntax, not PromQL.
                    lv = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", expr)
                    if lv:
                        expr = "%s{%s=~\".+\"}" % (lv.group(1).strip(), lv.group(2))
                    yield "variable %r" % v.get("name"), expr, "", v.get("datasource")


def base_metric(name, catalogue):
    if name in catalogue:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if catalogue.get(base, ("",))[0] == "histogram":
                return base
    return None


def strip_strings(expr):
    """The expression with the contents of string literals blanked (label values, regexes)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def check_query(where, expr, legend, catalogue, problems):
    if not expr.strip():
        problems.append("%s: empty expression" % where)
        return
    bare = strip_strings(expr)
    names = set(re.findall(r"\b(sbc_[a-zA-Z0-9_:]+)\b", bare))
    if not names:
        problems.append("%s: references no sbc_ metric: %s" % (where, expr))
    allowed = set(TARGET_LABELS)
    for name in sorted(names):
        base = base_metric(name, catalogue)
        if base is None:
            problems.append("%s: metric %s is not in docs/metrics.md" % (where, name))
            continue
        allowed |= catalogue[base][1]
        if name.endswith("_bucket") and base != name:
            allowed.add("le")
    # Labels that label_replace(v, "dst", "replacement", "src", "regex") creates.
    allowed |= set(re.findall(
        r',\s*"(\w+)"\s*,\s*"[^"]*"\s*,\s*"\w+"\s*,\s*"[^"]*"\s*\)', expr))

    # rate()/increase()/irate() need a counter (or a histogram's _bucket/_count/_sum).
    for fn, name in re.findall(r"\b(rate|irate|increase)\s*\(\s*(sbc_[a-zA-Z0-9_:]+)", bare):
        base = base_metric(name, catalogue)
        if base and catalogue[base][0] == "gauge":
            problems.append("%s: %s() of gauge %s" % (where, fn, name))
        if base and catalogue[base][0] == "histogram" and base == name:
            problems.append("%s: %s() of histogram %s needs _bucket/_count/_sum"
                            % (where, fn, name))
    for name in re.findall(r"\bhistogram_quantile\s*\([^,]*,[^)]*?\b(sbc_\w+)", bare):
        if not name.endswith("_bucket"):
            problems.append("%s: histogram_quantile over %s, not a _bucket series"
                            % (where, name))

    used = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)",
                             bare):
        used |= {l.strip() for l in clause.split(",") if l.strip()}
    for selector in re.findall(r"\{([^}]*)\}", bare):
        used |= set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", selector))
    for label in sorted(used - allowed):
        problems.append("%s: label %r is not a label of %s" % (where, label, ", ".join(sorted(names))))
    for label in sorted(set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)) - allowed):
        problems.append("%s: legend uses label %r, not a label of %s"
                        % (where, label, ", ".join(sorted(names))))


def promql_for_promtool(expr):
    def sub(m):
        return GRAFANA_VARS.get(m.group(1) or m.group(2), m.group(0))
    # $name and ${name} for the variables above; label_replace's ${1} stays as it is.
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", sub, expr)


def promtool_check(exprs, problems):
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not promtool:
        print("check_dashboard: promtool not found, PromQL syntax not checked "
              "(install the Debian package prometheus or set PROMTOOL)")
        return
    rules = {"groups": [{"name": "sbc_dashboard", "rules": [
        {"record": "sbc_dashboard:query_%d" % i, "expr": promql_for_promtool(e)}
        for i, (_, e) in enumerate(exprs)]}]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dashboard-rules.yml"
        path.write_text(json.dumps(rules, indent=1))  # JSON is YAML
        run = subprocess.run([promtool, "check", "rules", str(path)],
                             capture_output=True, text=True)
    if run.returncode != 0:
        out = (run.stdout + run.stderr).strip()
        # Map "group ..., rule N" back to the panel.
        for m in re.finditer(r"rule (\d+)", out):
            i = int(m.group(1)) - 1
            if 0 <= i < len(exprs):
                out += "\n  rule %s is %s: %s" % (m.group(1), exprs[i][0], exprs[i][1])
        problems.append("promtool check rules failed:\n" + out)
    else:
        print("check_dashboard: promtool parsed %d queries" % len(exprs))


def main(argv):
    dash_path = Path(argv[1]) if len(argv) > 1 else DASHBOARD
    md_path = Path(argv[2]) if len(argv) > 2 else METRICS_MD
    problems = []
    try:
        dash = json.loads(dash_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print("check_dashboard: %s: %s" % (dash_path, e))
        return 1
    catalogue = load_catalogue(md_path)
    if len(catalogue) < 10:
        print("check_dashboard: found only %d metrics in %s; has its table format changed?"
              % (len(catalogue), md_path))
        return 1

    ids = [p.get("id") for p in walk_panels(dash.get("panels", []))]
    for i in sorted({i for i in ids if ids.count(i) > 1}, key=str):
        problems.append("panel id %s is used more than once" % i)
    for p in walk_panels(dash.get("panels", [])):
        if p.get("type") != "row" and (p.get("datasource") or {}).get("uid") != DATASOURCE_UID:
            problems.append("panel %r: datasource is not %s" % (p.get("title"), DATASOURCE_UID))

    exprs = []
    referenced = set()
    for where, expr, legend, ds in queries(dash):
        if (ds or {}).get("uid") != DATASOURCE_UID:
            problems.append("%s: datasource is not %s" % (where, DATASOURCE_UID))
        check_query(where, expr, legend, catalogue, problems)
        referenced |= {base_metric(n, catalogue) for n in
                       re.findall(r"\b(sbc_[a-zA-Z0-9_:]+)\b", strip_strings(expr))}
        exprs.append((where, expr))
    if not exprs:
        problems.append("no queries found in %s" % dash_path)
    else:
        promtool_check(exprs, problems)

    for p in problems:
        print("check_dashboard: " + p)
    if problems:
        return 1
    unused = sorted(set(catalogue) - referenced)
    print("check_dashboard: %d queries, %d of %d documented metrics used%s" % (
        len(exprs), len(referenced - {None}), len(catalogue),
        (" (not shown: %s)" % ", ".join(unused)) if unused else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
