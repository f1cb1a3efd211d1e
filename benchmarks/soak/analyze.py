#!/usr/bin/env python3
"""Verdict of a soak run (benchmarks/soak/run.sh): reads OUT/samples.csv, OUT/events.log and
the generators' JSON, writes OUT/summary.md and OUT/soak.png, prints the summary, and exits 1
when a check fails.

Checks (issue 8):
  - RSS at the end of the load within 10% of RSS after warm-up;
  - every table (transactions, registrations, calls, media sessions, connections) back to 0
    after the settle time (no load left: 0 is the expected size);
  - no fd growth: fds after the settle time <= fds before the load (+2 slack).
"""
import csv
import json
import os
import sys

TABLES = ["sbc_transactions", "sbc_registrations", "sbc_calls", "sbc_media_sessions",
          "sbc_connections"]
STATUS = ["status_transactions", "status_registrations", "status_connections",
          "status_calls", "status_media_sessions"]


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def events(out):
    ev = []
    try:
        with open(os.path.join(out, "events.log")) as f:
            for line in f:
                parts = line.split(" ", 3)
                if len(parts) == 4 and parts[0].isdigit():
                    ev.append((int(parts[0]), parts[3].strip()))
    except FileNotFoundError:
        pass
    return ev


def first_event(ev, prefix):
    for t, m in ev:
        if m.startswith(prefix):
            return t
    return None


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def main():
    out = sys.argv[1]
    with open(os.path.join(out, "samples.csv")) as f:
        rows = [r for r in csv.DictReader(f)]
    if len(rows) < 3:
        sys.exit("too few samples")
    for r in rows:
        for k in list(r):
            if k != "active":
                r[k] = num(r[k])
    ev = events(out)
    t_start = first_event(ev, "load start") or rows[0]["t"]
    t_warm = first_event(ev, "warm-up end") or rows[len(rows) // 5]["t"]
    t_gens = first_event(ev, "load generators done") or rows[-1]["t"]
    t_settled = first_event(ev, "settled") or rows[-1]["t"]
    before = [r for r in rows if r["t"] <= t_start] or rows[:1]
    base = before[-1]
    warm = next((r for r in rows if r["t"] >= t_warm), rows[0])
    steady = [r for r in rows if t_warm <= r["t"] <= t_gens]
    end_load = steady[-1] if steady else rows[-1]
    final = next((r for r in rows if r["t"] >= t_settled), rows[-1])

    lines = []
    ok = True

    def check(name, passed, detail):
        nonlocal ok
        ok = ok and passed
        lines.append(f"| {name} | {'**pass**' if passed else '**FAIL**'} | {detail} |")

    rss_w, rss_e = warm["rss_kib"], end_load["rss_kib"]
    drift = (rss_e - rss_w) / rss_w * 100 if rss_w else float("nan")
    check("RSS at end of load within 10% of RSS after warm-up", abs(drift) <= 10,
          f"{rss_w:.0f} KiB after warm-up, {rss_e:.0f} KiB at end of load ({drift:+.1f}%)")
    left = {k: final.get(k) for k in TABLES + STATUS}
    nonzero = {k: v for k, v in left.items() if v not in (None, 0, 0.0)}
    check("tables back to 0 after settling", not nonzero,
          ", ".join(f"{k}={v:g}" for k, v in left.items() if v is not None) or "no data")
    check("no fd growth", final["fds"] <= base["fds"] + 2,
          f"{base['fds']:.0f} fds before the load, {final['fds']:.0f} after settling "
          f"(max {max(r['fds'] for r in rows):.0f} under load)")

    # RSS trend over the steady part: least squares slope, KiB per hour.
    slope = None
    if len(steady) >= 3:
        xs = [r["t"] for r in steady]
        ys = [r["rss_kib"] for r in steady]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        if den:
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 3600

    def peak(k):
        vals = [r[k] for r in steady if r.get(k) is not None]
        return f"{min(vals):.0f}-{max(vals):.0f}" if vals else "-"

    cpu = None
    if steady and len(steady) > 1 and steady[-1]["t"] > steady[0]["t"]:
        cpu = (steady[-1]["cpu_s"] - steady[0]["cpu_s"]) / (steady[-1]["t"] - steady[0]["t"]) * 100
    md = [f"# Soak {os.path.basename(out)}", "",
          "| check | result | detail |", "|---|---|---|"] + lines + [""]
    md += ["| figure | value |", "|---|---|",
           f"| samples | {len(rows)} every ~{rows[1]['t'] - rows[0]['t']:.0f} s |",
           f"| steady window | {t_gens - t_warm} s (warm-up end to generators done) |",
           f"| RSS before load / after warm-up / end of load / after settle KiB | "
           f"{base['rss_kib']:.0f} / {rss_w:.0f} / {rss_e:.0f} / {final['rss_kib']:.0f} |",
           f"| RSS range in steady window KiB | {peak('rss_kib')} |",
           f"| RSS trend in steady window | {slope:+.0f} KiB/hour |" if slope is not None else "| RSS trend | - |",
           f"| VmHWM at the end KiB | {rows[-1]['hwm_kib']:.0f} |",
           (f"| transparent huge pages (AnonHugePages) after warm-up / end of load KiB | "
            f"{warm['anon_huge_kib']:.0f} / {end_load['anon_huge_kib']:.0f} |")
           if warm.get("anon_huge_kib") is not None and end_load.get("anon_huge_kib") is not None
           else "| transparent huge pages | - |",
           f"| SBC CPU in steady window | {cpu:.1f}% of a core |" if cpu is not None else "| CPU | - |",
           f"| fds in steady window | {peak('fds')} |",
           f"| threads | {peak('threads')} |"]
    for k in TABLES + ["sbc_media_ports_free"]:
        md.append(f"| {k} in steady window | {peak(k)} |")
    md.append("")
    md.append("| generator | attempted | failed | p50 ms | p99 ms | max ms |")
    md.append("|---|---|---|---|---|---|")
    for name in ("register", "calls"):
        j = load_json(os.path.join(out, f"{name}.json"))
        if j:
            md.append(f"| {name} ({j.get('rate')}/s) | {j.get('attempted')} | {j.get('failed')} "
                      f"{json.dumps(j.get('failures') or {})} | {j.get('latency_p50_ms')} | "
                      f"{j.get('latency_p99_ms')} | {j.get('latency_max_ms')} |")
    ph = load_json(os.path.join(out, "phones.json"))
    if ph:
        md.append(f"| phones ({ph['udp']} UDP + {ph['tls']} TLS): first REGISTER | {ph['udp'] + ph['tls']} | "
                  f"{ph['first_failed']} | {ph['latency_p50_ms']} | {ph['latency_p99_ms']} | {ph['latency_max_ms']} |")
        md.append(f"| phones: refreshes / unregistrations | {ph['refreshes_ok'] + ph['refreshes_failed']} / "
                  f"{ph['registered']} | {ph['refreshes_failed']} / {ph['registered'] - ph['unregistered']} "
                  f"(timeouts {ph['timeouts']}, connection errors {ph['connect_errors']}, "
                  f"reconnections {ph.get('reconnects', 0)}) | | | |")
    m = load_json(os.path.join(out, "media.json"))
    if m:
        s, td = m["setup"], m["teardown"]
        md.append(f"| media calls setup | {s['attempted']} | {s['failed']} | {s['latency_p50_ms']} | "
                  f"{s['latency_p99_ms']} | {s['latency_max_ms']} |")
        md.append(f"| media calls BYE | {td['attempted']} | {td['failed']} | {td['latency_p50_ms']} | "
                  f"{td['latency_p99_ms']} | {td['latency_max_ms']} |")
        ws = m.get("windows") or []
        if ws:
            sent = sum(w["sent"] for w in ws)
            lost = sum(w["lost"] for w in ws)
            p99 = sorted(w["lat_p99_us"] for w in ws)
            md.append("")
            md.append(f"Media: {len(ws)} windows of {ws[0]['seconds']} s, {ws[0]['streams']} streams, "
                      f"{sent} packets sent, {lost} lost ({lost / sent * 100 if sent else 0:.4f}%), "
                      f"{ws[0]['pps_relayed']:.0f} packets/s relayed; per-window one-way p99 "
                      f"{p99[0]:.0f}-{p99[-1]:.0f} us (median {p99[len(p99) // 2]:.0f}).")
    md.append("")
    md.append("Events: " + "; ".join(f"+{t - t_start}s {m}" for t, m in ev if t >= t_start))
    md.append("")
    md.append(f"**Verdict: {'all checks pass' if ok else 'a check failed'}.**")
    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    try:
        plot(out, rows, ev, t_start)
    except Exception as e:  # noqa: BLE001 - the verdict stands without the picture
        print(f"plot failed: {e}", file=sys.stderr)
    sys.exit(0 if ok else 1)


def plot(out, rows, ev, t0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [(r["t"] - t0) / 60 for r in rows]
    fig, ax = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax[0].plot(x, [r["rss_kib"] / 1024 for r in rows], label="RSS")
    ax[0].set_ylabel("MiB")
    ax[0].legend(loc="upper left")
    ax[1].plot(x, [r["fds"] for r in rows], label="open fds")
    ax[1].plot(x, [r["threads"] for r in rows], label="threads")
    ax[1].legend(loc="upper left")
    for k in TABLES:
        ys = [r.get(k) for r in rows]
        if any(v is not None for v in ys):
            ax[2].plot(x, [v if v is not None else float("nan") for v in ys], label=k)
    ax[2].set_yscale("symlog")
    ax[2].legend(loc="upper left", fontsize=8)
    ax[2].set_xlabel("minutes since load start")
    for a in ax:
        for t, m in ev:
            if any(m.startswith(p) for p in ("failover", "failback", "warm-up end", "load end")):
                a.axvline((t - t0) / 60, color="grey", ls=":", lw=1)
        a.grid(alpha=0.3)
    ax[0].set_title("SBC soak: RSS, fds and tables (dotted: warm-up end, failover, failback, load end)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "soak.png"), dpi=90)


if __name__ == "__main__":
    main()
