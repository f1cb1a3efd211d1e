#!/usr/bin/env python3
"""Tables of a benchmarks/run-proxy-compare.sh result directory (Markdown on stdout,
summary.json beside the runs).

Usage: proxy-compare-summary.py OUT_DIR

Every cell of the comparison table is the median over the runs of that proxy/scenario/rate,
column by column (so a row need not be one run). The SBC/Kamailio ratios are given two ways:
ratio of the medians, and the median of the per-round ratios (round r of the SBC against
round r of Kamailio, measured minutes apart)."""

import glob
import json
import os
import re
import statistics
import sys


def median(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    values.sort()
    return values[(len(values) - 1) // 2] if len(values) % 2 else statistics.median(values)


def load(out, name):
    with open(os.path.join(out, name + ".json")) as f:
        run = json.load(f)
    extra_path = os.path.join(out, name + ".extra.json")
    if os.path.exists(extra_path):
        with open(extra_path) as f:
            run["extra"] = json.load(f)
    ok = run.get("succeeded") or 0
    extra = run.get("extra", {})
    run["proxy_cpu_pct"] = (
        100.0 * run["cpu_seconds"] / run["elapsed_s"] if run.get("cpu_seconds") is not None else None
    )
    if ok and extra.get("tail_s"):
        run["cpu_us_per_op_incl_tail"] = (
            1e6 * (extra["proxy_cpu_run_s"] + extra["proxy_cpu_tail_s"]) / ok
        )
    else:
        run["cpu_us_per_op_incl_tail"] = None
    run["proxy_socket_drops"] = extra.get("proxy_socket_drops")
    run["failure_pct"] = 100.0 * run["failed"] / run["attempted"] if run["attempted"] else None
    return run


def fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and digits == 0):
        return f"{int(v):,}"
    return f"{v:,.{digits}f}"


def fail_causes(runs):
    total = {}
    for r in runs:
        for k, n in (r.get("failures") or {}).items():
            total[k] = total.get(k, 0) + n
    return ", ".join(f"{k} {n}" for k, n in sorted(total.items())) or "-"


def main():
    out = sys.argv[1]
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(out, "*.json")))
    cmp = {}
    search = {}
    for name in names:
        m = re.fullmatch(r"cmp-(\w+)-(call|register)-(\d+)-(\d+)", name)
        if m:
            cmp.setdefault((m[1], m[2], int(m[3])), {})[int(m[4])] = load(out, name)
            continue
        m = re.fullmatch(r"search-(\w+)-call-(\d+)", name)
        if m:
            search.setdefault(m[1], {})[int(m[2])] = load(out, name)

    with open(os.path.join(out, "env.txt")) as f:
        env = f.read()
    print("```")
    print(env.rstrip())
    print("```")
    print()

    summary = {"comparison": [], "ratios": [], "search": {}}
    cols = [
        ("attempted", "attempted", 0),
        ("failed", "failed", 0),
        ("latency_p50_ms", "p50 ms", 3),
        ("latency_p99_ms", "p99 ms", 3),
        ("latency_max_ms", "max ms", 1),
        ("cpu_us_per_op", "proxy CPU us/op", 1),
        ("cpu_us_per_op_incl_tail", "incl. tail us/op", 1),
        ("proxy_cpu_pct", "proxy % of core", 1),
        ("send_lag_max_ms", "gen. lag max ms", 1),
        ("retransmissions", "retrans.", 0),
        ("proxy_socket_drops", "drops at proxy socket", 0),
    ]
    if cmp:
        print("Fixed rates, median of the runs (proxy on core 1; sbc-loadgen + sbc-uas on core 0):")
        print()
        print("| proxy | scenario | rate/s | runs | " + " | ".join(c[1] for c in cols) + " | failure causes (all runs) |")
        print("|" + "---|" * (5 + len(cols)))
        order = {"sbc": 0, "kamailio": 1}
        for key in sorted(cmp, key=lambda k: (k[1], k[2], order.get(k[0], 9), k[0])):
            runs = [cmp[key][i] for i in sorted(cmp[key])]
            row = {"proxy": key[0], "scenario": key[1], "rate": key[2], "runs": len(runs)}
            cells = []
            for field, _, digits in cols:
                v = median([r.get(field) for r in runs])
                row[field] = v
                cells.append(fmt(v, digits))
            row["failures"] = fail_causes(runs)
            row["per_run_cpu_us_per_op"] = [r.get("cpu_us_per_op") for r in runs]
            summary["comparison"].append(row)
            print(f"| {key[0]} | {key[1]} | {key[2]:,} | {len(runs)} | " + " | ".join(cells) + f" | {row['failures']} |")
        print()
        print("CPU per operation of each run (us/op, run 1, 2, 3 ...):")
        print()
        for row in summary["comparison"]:
            print(f"- {row['proxy']} {row['scenario']} {row['rate']}/s: "
                  + ", ".join(fmt(v) for v in row["per_run_cpu_us_per_op"]))
        print()
        for scenario in ("call", "register"):
            rates = sorted({k[2] for k in cmp if k[1] == scenario})
            for rate in rates:
                s = cmp.get(("sbc", scenario, rate))
                k = cmp.get(("kamailio", scenario, rate))
                if not s or not k:
                    continue
                for field, label in (("cpu_us_per_op", "CPU/op"), ("cpu_us_per_op_incl_tail", "CPU/op incl. tail")):
                    sm = median([r.get(field) for r in s.values()])
                    km = median([r.get(field) for r in k.values()])
                    if sm is None or not km:
                        continue
                    per_round = [
                        s[i][field] / k[i][field]
                        for i in sorted(set(s) & set(k))
                        if s[i].get(field) is not None and k[i].get(field)
                    ]
                    rr = {
                        "scenario": scenario, "rate": rate, "what": field,
                        "sbc": sm, "kamailio": km, "ratio_of_medians": sm / km,
                        "median_of_round_ratios": median(per_round),
                        "round_ratios": per_round,
                    }
                    summary["ratios"].append(rr)
                    print(f"- SBC/Kamailio {label}, {scenario} {rate}/s: {sm:.1f} / {km:.1f} us = "
                          f"**{sm / km:.2f}** (per-round ratios "
                          + ", ".join(f"{x:.2f}" for x in per_round)
                          + f"; median {median(per_round):.2f}); target <= 0.67")
        print()

    for proxy, steps in search.items():
        print(f"Max-rate search, {proxy} on core 1 (one run per step; pass = failed/attempted <= limit):")
        print()
        print("| calls/s | attempted | failed | failure % | p50 ms | p99 ms | max ms | proxy CPU us/call | proxy % of core | retrans. | gen. lag max ms | drops proxy/uas socket | failure causes |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        rows = []
        limit = float(os.environ.get("MAX_FAIL", "0.001"))
        last_pass = None
        for rate in sorted(steps):
            r = steps[rate]
            passed = bool(r["attempted"]) and r["not_started"] == 0 and r["failed"] / r["attempted"] <= limit
            if passed and (last_pass is None or last_pass == max(x["rate"] for x in rows)):
                last_pass = rate
            rows.append({
                "rate": rate, "attempted": r["attempted"], "failed": r["failed"],
                "failure_pct": r["failure_pct"], "latency_p50_ms": r["latency_p50_ms"],
                "latency_p99_ms": r["latency_p99_ms"], "latency_max_ms": r["latency_max_ms"],
                "cpu_us_per_op": r["cpu_us_per_op"], "proxy_cpu_pct": r["proxy_cpu_pct"],
                "retransmissions": r["retransmissions"], "not_started": r["not_started"],
                "failures": r.get("failures") or {}, "passed": passed,
                "proxy_socket_drops": r.get("extra", {}).get("proxy_socket_drops"),
                "uas_socket_drops": r.get("extra", {}).get("uas_socket_drops"),
            })
            print(f"| {rate:,} | {r['attempted']:,} | {r['failed']:,} | {fmt(r['failure_pct'], 3)} | "
                  f"{fmt(r['latency_p50_ms'], 3)} | {fmt(r['latency_p99_ms'], 3)} | {fmt(r['latency_max_ms'], 1)} | "
                  f"{fmt(r['cpu_us_per_op'])} | {fmt(r['proxy_cpu_pct'])} | {r['retransmissions']:,} | "
                  f"{fmt(r['send_lag_max_ms'])} | {r.get('extra', {}).get('proxy_socket_drops', '-')}/{r.get('extra', {}).get('uas_socket_drops', '-')} | {fail_causes([r])} |")
        summary["search"][proxy] = {"max_fail": limit, "highest_passing_rate": last_pass, "steps": rows}
        print()
        print(f"Highest call rate {proxy} held with failures <= {100 * limit:g}%: "
              + (f"**{last_pass:,}/s**" if last_pass else "none of the steps")
              + ("" if not rows or not rows[-1]["passed"] else " (the last step tried passed: the limit is higher)"))
        print()
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
