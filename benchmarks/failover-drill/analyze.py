#!/usr/bin/env python3
"""Figures of the failover drill (benchmarks/failover-drill/run.sh) from its output directory.

    analyze.py OUT            summary.md on stdout, summary.json in OUT
    analyze.py --one OUT NAME one line for run NAME (printed by run.sh after each run)

Per run NAME the directory holds NAME.calls.csv and NAME.regs.csv (sbc-loadgen --trace:
num,start_unix_ns,setup_us,outcome), NAME.kill (when the primary was killed, Unix seconds),
NAME.log (the proxy's log) and NAME.proxy (which proxy).

Definitions (t = 0 at the kill):
- detection: when the proxy declared the primary down. SBC: its log line "node pbx-primary
  is down"; Kamailio: the dispatcher's dst-down event route (DSDOWN ts=..., after probes or,
  with WITH_MARK, after the first failed call). For the SBC also the switch ("pool pbx failed
  over"); the dispatcher has no switch of its own (algorithm 8 takes the first active node).
- new calls / registrations: those whose first request left at t >= 0. Failed = any outcome
  but ok (INVITE or REGISTER without 2xx, or a call whose BYE failed).
- in flight: started before t = 0 and failed (a call set up on the primary whose BYE died
  with it, or whose INVITE was on its way).
- baseline: setup latency (INVITE -> 200) of the calls of the 5 s before the kill that were
  over before it, p50/p99.
- delayed: a new call whose setup took more than the baseline p99 + 100 ms; its extra delay
  is its setup latency minus the baseline p50. Same for REGISTERs.
- gap: until the start of the last delayed new call.
- first ok: from t = 0 to the 200 of the first successful new call (which the standby
  answered: the primary was dead).
"""

import csv
import json
import os
import re
import statistics
import sys
from datetime import datetime

BASELINE_S = 5.0
DELAY_MARGIN_MS = 100.0


def read_trace(path):
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append(
                {
                    "t": int(r["start_unix_ns"]) / 1e9,
                    "setup_ms": int(r["setup_us"]) / 1000.0 if r["setup_us"] else None,
                    "outcome": r["outcome"],
                }
            )
    rows.sort(key=lambda r: r["t"])
    return rows


ANSI = re.compile(r"\x1b\[[0-9;]*m")
RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z")


def rfc3339(line):
    m = RFC3339.match(line)
    if not m:
        return None
    text = m.group(1)
    frac = ""
    if "." in text:
        text, frac = text.split(".")
    t = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S")
    epoch = (t - datetime(1970, 1, 1)).total_seconds()
    return epoch + (float("0." + frac) if frac else 0.0)


def log_events(path, proxy, kill):
    """(detection s, switch s) after the kill, from the proxy's log."""
    down = switch = None
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return None, None
    for raw in lines:
        line = ANSI.sub("", raw).strip()
        if proxy.startswith("sbc"):
            t = rfc3339(line)
            if t is None or t < kill:
                continue
            if down is None and "node pbx-primary is down" in line:
                down = t - kill
            if switch is None and "failed over from pbx-primary" in line:
                switch = t - kill
        else:
            # dst is the node for a probe verdict, the call's Request-URI when the node was
            # marked down by a failed call (WITH_MARK): the first one after the kill counts.
            m = re.search(r"DSDOWN ts=(\d+(?:\.\d+)?) dst=", line)
            if m and down is None and float(m.group(1)) >= kill:
                down = float(m.group(1)) - kill
    if not proxy.startswith("sbc"):
        switch = down  # dispatcher alg 8: the next new call goes to the standby
    return down, switch


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def ops(rows, kill):
    new = [r for r in rows if r["t"] >= kill]
    before = [r for r in rows if r["t"] < kill]
    # Only operations that were over before the kill: one in flight at the kill may have
    # waited for the dead primary too.
    base = [
        r["setup_ms"]
        for r in before
        if r["t"] >= kill - BASELINE_S
        and r["outcome"] == "ok"
        and r["setup_ms"] is not None
        and r["t"] + r["setup_ms"] / 1000.0 < kill
    ]
    p50 = pct(base, 50) or 0.0
    p99 = pct(base, 99) or 0.0
    threshold = p99 + DELAY_MARGIN_MS
    delayed = [r for r in new if r["setup_ms"] is not None and r["setup_ms"] > threshold]
    extra = [r["setup_ms"] - p50 for r in delayed]
    ok_new = [r for r in new if r["outcome"] == "ok" and r["setup_ms"] is not None]
    first_ok = min((r["t"] + r["setup_ms"] / 1000.0 - kill for r in ok_new), default=None)
    failed_new = [r for r in new if r["outcome"] != "ok"]
    causes = {}
    for r in failed_new:
        causes[r["outcome"]] = causes.get(r["outcome"], 0) + 1
    return {
        "total": len(rows),
        "new": len(new),
        "failed_new": len(failed_new),
        "failed_new_causes": causes,
        "failed_in_flight": sum(1 for r in before if r["outcome"] != "ok"),
        "baseline_p50_ms": p50,
        "baseline_p99_ms": p99,
        "delayed": len(delayed),
        "extra_p50_ms": pct(extra, 50),
        "extra_max_ms": max(extra) if extra else None,
        "gap_s": (max(r["t"] for r in delayed) - kill) if delayed else 0.0,
        "first_ok_s": first_ok,
    }


def analyze_run(out, name):
    kill = float(open(os.path.join(out, name + ".kill")).read().strip())
    proxy = open(os.path.join(out, name + ".proxy")).read().strip()
    calls = ops(read_trace(os.path.join(out, name + ".calls.csv")), kill)
    regs = ops(read_trace(os.path.join(out, name + ".regs.csv")), kill)
    down, switch = log_events(os.path.join(out, name + ".log"), proxy, kill)
    return {
        "name": name,
        "proxy": proxy,
        "detection_s": down,
        "switch_s": switch,
        "calls": calls,
        "regs": regs,
    }


def fmt(v, nd=0, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}{unit}"
    return f"{v:,}{unit}"


def one_line(r):
    c, g = r["calls"], r["regs"]
    return (
        f"   {r['name']}: detection {fmt(r['detection_s'], 2, ' s')}, switch {fmt(r['switch_s'], 2, ' s')}; "
        f"calls new {c['new']} failed {c['failed_new']} {c['failed_new_causes'] or ''} "
        f"(in flight failed {c['failed_in_flight']}), delayed {c['delayed']} "
        f"extra p50/max {fmt(c['extra_p50_ms'])}/{fmt(c['extra_max_ms'])} ms, "
        f"first ok {fmt(c['first_ok_s'], 2, ' s')}; "
        f"REGISTER new {g['new']} failed {g['failed_new']} delayed {g['delayed']} "
        f"(in flight failed {g['failed_in_flight']})"
    )


def median(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values)


def main():
    args = sys.argv[1:]
    if args and args[0] == "--one":
        print(one_line(analyze_run(args[1], args[2])))
        return
    out = args[0]
    names = sorted(n[: -len(".kill")] for n in os.listdir(out) if n.endswith(".kill"))
    runs = [analyze_run(out, n) for n in names]
    order = []
    for r in runs:
        if r["proxy"] not in order:
            order.append(r["proxy"])
    env = ""
    try:
        env = open(os.path.join(out, "env.txt")).read()
    except OSError:
        pass
    print("```")
    print(env.rstrip())
    print("```")
    print()
    print(
        "| proxy | runs | detection s | switch s | failed new calls | failed REGISTERs | "
        "calls failed in flight | delayed calls | extra delay p50 ms | extra delay max ms | "
        "gap s | first ok on standby s | delayed REGISTERs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for p in order:
        rs = [r for r in runs if r["proxy"] == p]
        row = {
            "runs": len(rs),
            "detection_s": median([r["detection_s"] for r in rs]),
            "switch_s": median([r["switch_s"] for r in rs]),
            "failed_new_calls": median([r["calls"]["failed_new"] for r in rs]),
            "failed_new_regs": median([r["regs"]["failed_new"] for r in rs]),
            "calls_failed_in_flight": median([r["calls"]["failed_in_flight"] for r in rs]),
            "delayed_calls": median([r["calls"]["delayed"] for r in rs]),
            "extra_p50_ms": median([r["calls"]["extra_p50_ms"] for r in rs]),
            "extra_max_ms": median([r["calls"]["extra_max_ms"] for r in rs]),
            "gap_s": median([r["calls"]["gap_s"] for r in rs]),
            "first_ok_s": median([r["calls"]["first_ok_s"] for r in rs]),
            "delayed_regs": median([r["regs"]["delayed"] for r in rs]),
        }
        summary[p] = row
        print(
            f"| {p} | {row['runs']} | {fmt(row['detection_s'], 2)} | {fmt(row['switch_s'], 2)} | "
            f"{fmt(row['failed_new_calls'])} | {fmt(row['failed_new_regs'])} | "
            f"{fmt(row['calls_failed_in_flight'])} | {fmt(row['delayed_calls'])} | "
            f"{fmt(row['extra_p50_ms'])} | {fmt(row['extra_max_ms'])} | {fmt(row['gap_s'], 2)} | "
            f"{fmt(row['first_ok_s'], 2)} | {fmt(row['delayed_regs'])} |"
        )
    print()
    print("Cells are medians over the runs. Per run:")
    print()
    for r in runs:
        print(one_line(r))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"summary": summary, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
