#!/usr/bin/env python3
"""Tables of benchmarks/run-media-compare.sh: medians per (stream count, relay) over the runs.

Usage: media-compare-summary.py OUT_DIR   (prints summary.md, writes OUT_DIR/summary.json)

"Added latency" is paired per round: relay percentile minus the direct run's percentile of the
same round and stream count, then the median over rounds. Ratios (SBC / rtpengine packets per
CPU-second) are likewise per round, then the median.
"""
import glob
import json
import os
import statistics
import sys

RELAY_NAMES = {
    "direct": "direct (no relay)",
    "sbc": "SBC relay",
    "sbc-base": "SBC relay, BASE_BIN",
    "rtpengine": "rtpengine 10.5",
}
# "+tick": the same relay with the generator reading arrivals once per tick (gen --rx-on-tick).
RELAY_NAMES.update({k + "+tick": v + ", gen rx on tick" for k, v in list(RELAY_NAMES.items())})


def suffix(relay):
    return "+tick" if relay.endswith("+tick") else ""


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=0):
    if x is None:
        return "-"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def main():
    out = sys.argv[1]
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        base = os.path.basename(path)
        if base.endswith(".map.json") or base == "summary.json":
            continue
        with open(path) as f:
            r = json.load(f)
        relay, streams, rnd = r["label"].rsplit("-", 2)
        runs[(relay, int(streams), int(rnd))] = r
    streams_list = sorted({k[1] for k in runs})
    relays = [r for r in RELAY_NAMES if any(k[0] == r for k in runs)]
    rounds = sorted({k[2] for k in runs})

    def added(relay, s, field):
        vals = []
        for rnd in rounds:
            a, d = runs.get((relay, s, rnd)), runs.get(("direct" + suffix(relay), s, rnd))
            if a and d:
                vals.append(a[field] - d[field])
        return med(vals)

    summary = {"rows": [], "ratios": {}, "targets": {}}
    lines = []
    lines.append(
        "| streams | relay | runs | pkts/s relayed | relay CPU % of core | **pkts/s per core** "
        "| lat p50 us | lat p99 us | **added p50 us** | **added p99 us** | max us | loss % "
        "| RSS/call setup KiB | RSS/call w/ media KiB | load avg (1 min) |"
    )
    lines.append("|" + "---|" * 15)
    for s in streams_list:
        for relay in relays:
            rs = [runs[k] for k in sorted(runs) if k[0] == relay and k[1] == s]
            if not rs:
                continue
            row = {
                "streams": s,
                "relay": relay,
                "runs": len(rs),
                "pps_relayed": med([r["pps_relayed"] for r in rs]),
                "relay_core_pct": med([r["relay_core_pct"] for r in rs]),
                "pps_per_core": med([r["pps_per_core"] for r in rs]),
                "pps_per_core_each": [r["pps_per_core"] for r in rs],
                "lat_p50_us": med([r["lat_p50_us"] for r in rs]),
                "lat_p99_us": med([r["lat_p99_us"] for r in rs]),
                "lat_max_us": med([r["lat_max_us"] for r in rs]),
                "added_p50_us": added(relay, s, "lat_p50_us") if not relay.startswith("direct") else None,
                "added_p99_us": added(relay, s, "lat_p99_us") if not relay.startswith("direct") else None,
                "loss_pct": med([r["loss_pct"] for r in rs]),
                "lost_total": sum(r["lost"] for r in rs),
                "rss_call_setup_kib": med([r["rss_per_call_setup_kib"] for r in rs]),
                "rss_call_media_kib": med([r["rss_per_call_media_kib"] for r in rs]),
                "loadavg": [r["loadavg_start"].split()[0] for r in rs],
                "send_lag_max_us": med([r["send_lag_max_us"] for r in rs]),
            }
            summary["rows"].append(row)
            lines.append(
                f"| {s:,} | {RELAY_NAMES.get(relay, relay)} | {len(rs)} | {fmt(row['pps_relayed'])} "
                f"| {fmt(row['relay_core_pct'], 1)} | **{fmt(row['pps_per_core'])}** "
                f"| {fmt(row['lat_p50_us'], 1)} | {fmt(row['lat_p99_us'], 1)} "
                f"| **{fmt(row['added_p50_us'], 1)}** | **{fmt(row['added_p99_us'], 1)}** "
                f"| {fmt(row['lat_max_us'])} | {fmt(row['loss_pct'], 3)} "
                f"| {fmt(row['rss_call_setup_kib'], 1)} | {fmt(row['rss_call_media_kib'], 1)} "
                f"| {', '.join(row['loadavg'])} |"
            )
    lines.append("")
    lines.append("| streams | relay | / rtpengine pkts per CPU-second, per round | median | target >= 2 "
                 "| added p99 us | target < 1000 us (at 1,000) |")
    lines.append("|---|---|---|---|---|---|---|")
    for s in streams_list:
        for ours in ("sbc", "sbc-base", "sbc+tick", "sbc-base+tick"):
            if ours not in relays:
                continue
            per_round = []
            for rnd in rounds:
                a, b = runs.get((ours, s, rnd)), runs.get(("rtpengine" + suffix(ours), s, rnd))
                if a and b and a.get("pps_per_core") and b.get("pps_per_core"):
                    per_round.append(a["pps_per_core"] / b["pps_per_core"])
            ratio = med(per_round)
            p99 = added(ours, s, "lat_p99_us")
            summary["ratios"][f"{ours}-{s}"] = {
                "per_round": per_round, "median": ratio, "added_p99_us": p99}
            lines.append(
                f"| {s:,} | {RELAY_NAMES[ours]} | {', '.join(f'{x:.2f}' for x in per_round) or '-'} "
                f"| **{fmt(ratio, 2)}** | {'met' if ratio and ratio >= 2 else 'MISSED' if ratio else '-'} "
                f"| {fmt(p99, 1)} "
                f"| {('met' if p99 < 1000 else 'MISSED') if p99 is not None and s >= 1000 else '-'} |"
            )
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
