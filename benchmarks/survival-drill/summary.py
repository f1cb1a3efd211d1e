#!/usr/bin/env python3
"""Table of the survival contrast (benchmarks/survival-drill/run.sh): medians over runs per
proxy, then every run. Usage: summary.py OUT (reads OUT/results.jsonl)."""
import json
import statistics
import sys
from pathlib import Path


def load(out):
    rows = []
    for line in (Path(out) / "results.jsonl").read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def med(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    m = statistics.median(values)
    return int(m) if float(m).is_integer() else round(m, 1)


def dash(v):
    return "-" if v is None else str(v)


def cells(r):
    ref, bye = r["refresh"], r["bye"]
    fail = lambda a: a["r408"] + a["none"] + a["other"]
    return [
        f"{r['up_at_kill']}/{r['calls']}",
        f"{r['rtp_kept_flowing']}",
        f"{r['rtp_lost']} of {r['rtp_sent']}",
        f"{ref['ok200']}",
        f"{fail(ref)} ({ref['r408']} / {ref['none']} / {ref['other']})",
        f"{r['refresh_reached_far_end']}",
        f"{dash(r.get('refresh_final_ms_median'))} / {dash(r.get('bye_final_ms_median'))}",
        f"{bye['ok200']}",
        f"{fail(bye)} ({bye['r408']} / {bye['none']} / {bye['other']})",
        f"{r['hung_legs']}",
    ]


HEAD = ("| proxy | calls up at the kill | RTP kept flowing (every packet both ways) | packets lost "
        "| refreshes answered 200 | refreshes failed (408 / no answer / other) "
        "| refreshes that reached the far end | final answer after, ms (refresh / BYE, median) "
        "| BYEs answered 200 | BYEs failed (408 / no answer / other) | hung legs |")
SEP = "|" + "---|" * 11


def median_row(rs):
    def m(key, sub=None):
        return med([(r[key][sub] if sub else r.get(key)) for r in rs])
    r = {
        "calls": m("calls"), "up_at_kill": m("up_at_kill"),
        "rtp_kept_flowing": m("rtp_kept_flowing"), "rtp_lost": m("rtp_lost"),
        "rtp_sent": m("rtp_sent"),
        "refresh": {k: m("refresh", k) for k in ("ok200", "r408", "none", "other")},
        "refresh_reached_far_end": m("refresh_reached_far_end"),
        "refresh_final_ms_median": m("refresh_final_ms_median"),
        "bye_final_ms_median": m("bye_final_ms_median"),
        "bye": {k: m("bye", k) for k in ("ok200", "r408", "none", "other")},
        "hung_legs": m("hung_legs"),
    }
    return r


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    rows = load(out)
    proxies = []
    for r in rows:
        if r["proxy"] not in proxies:
            proxies.append(r["proxy"])
    n_runs = max((sum(1 for r in rows if r["proxy"] == p) for p in proxies), default=0)
    print(f"Median of {n_runs} runs per proxy (each column on its own):\n")
    print(HEAD)
    print(SEP)
    for p in proxies:
        print("| " + " | ".join([f"**{p}**"] + cells(median_row([r for r in rows if r["proxy"] == p]))) + " |")
    print("\nEvery run:\n")
    print(HEAD)
    print(SEP)
    for p in proxies:
        for i, r in enumerate([r for r in rows if r["proxy"] == p], 1):
            print("| " + " | ".join([f"{p} run {i}"] + cells(r)) + " |")
    secs = sorted({r["rtp_secs_after_kill"] for r in rows})
    print(f"\nRTP after the kill: {', '.join(map(str, secs))} s at 50 packets/s each way per call.")
    for p in proxies:
        left = [(r.get("leftover_sessions"), r.get("leftover_dialogs")) for r in rows if r["proxy"] == p]
        if any(s is not None for s, _ in left):
            print(f"{p}: relay sessions / dialogs left after the hang-ups, per run: {left}")


if __name__ == "__main__":
    main()
