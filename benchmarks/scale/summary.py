#!/usr/bin/env python3
"""Tables and curves of a benchmarks/scale/run.sh result directory.

    summary.py OUT [PNG_DIR]

Writes OUT/summary.md, OUT/summary.json and scale-registrations.png, scale-ramp.png,
scale-media.png into OUT (and into PNG_DIR too when given, e.g. benchmarks/scale).
"""
import glob
import json
import os
import re
import shutil
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}"


def reg_runs(out):
    runs = []
    for mem_path in sorted(glob.glob(os.path.join(out, "reg-*-mem.json"))):
        m = re.search(r"reg-(\w+)-(\d+)-mem\.json$", mem_path)
        if not m:
            continue
        proxy, n = m.group(1), int(m.group(2))
        name = f"reg-{proxy}-{n}"
        mem = load(mem_path)
        ramp = []
        for j in glob.glob(os.path.join(out, f"{name}-call-*.json")):
            if j.endswith(".rss.json"):
                continue
            d = load(j)
            if not d:
                continue
            rss = load(j[:-5] + ".rss.json") or {}
            d["rss_kib_after"] = rss.get("rss_kib")
            ramp.append(d)
        ramp.sort(key=lambda d: d["rate"])
        phones = [load(p) for p in sorted(glob.glob(os.path.join(out, f"{name}-phones-*.json")))]
        phones = [p for p in phones if p]
        ok = [d for d in ramp if d["failure_ratio"] <= 0.001]
        cap = ok[-1] if ok else None
        runs.append(dict(proxy=proxy, n=n, mem=mem, ramp=ramp, phones=phones, cap=cap))
    runs.sort(key=lambda r: (r["proxy"], r["n"]))
    return runs


def media_runs(out):
    runs = []
    for p in glob.glob(os.path.join(out, "media-*.json")):
        m = re.search(r"media-(\w+)-(\d+)\.json$", p)
        d = load(p)
        if not m or not d or not d.get("windows"):
            continue
        runs.append(dict(proxy=m.group(1), calls=int(m.group(2)), d=d, w=d["windows"][0]))
    runs.sort(key=lambda r: (r["proxy"], r["calls"]))
    return runs


def main():
    out = sys.argv[1]
    png_dir = sys.argv[2] if len(sys.argv) > 2 else None
    regs, media = reg_runs(out), media_runs(out)
    md = []
    if regs:
        md += ["### Registrations: memory and call capacity", "",
               "| proxy | phones (UDP + TLS) | RSS idle KiB | + UDP phones KiB | + TLS phones KiB | "
               "**bytes per UDP registration** | **bytes per TLS registration** | REGISTER p50 / p99 ms | "
               "**calls/s capacity** | setup p50 / p99 ms at capacity | CPU us/call at capacity | RSS after ramp KiB |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in regs:
            mem = r["mem"]
            udp, tls = mem["udp"], mem["tls"]
            per_udp = (mem["rss_udp_kib"] - mem["rss_base_kib"]) * 1024 / udp if udp else None
            per_tls = (mem["rss_all_kib"] - mem["rss_udp_kib"]) * 1024 / tls if tls else None
            r["per_udp_b"], r["per_tls_b"] = per_udp, per_tls
            lat50 = [p["latency_p50_ms"] for p in r["phones"] if p.get("latency_p50_ms") is not None]
            lat99 = [p["latency_p99_ms"] for p in r["phones"] if p.get("latency_p99_ms") is not None]
            cap = r["cap"]
            cap_s = f"{cap['rate']:,.0f}" if cap else "below the first step"
            if cap and cap is r["ramp"][-1]:
                cap_s = f">= {cap['rate']:,.0f} (top step)"
            md.append(
                f"| {r['proxy']} | {r['n']:,} ({udp:,} + {tls:,}) | {mem['rss_base_kib']:,} | "
                f"{mem['rss_udp_kib']:,} | {mem['rss_all_kib']:,} | {fmt(per_udp, 0)} | {fmt(per_tls, 0)} | "
                f"{fmt(max(lat50) if lat50 else None, 3)} / {fmt(max(lat99) if lat99 else None, 3)} | {cap_s} | "
                f"{fmt(cap and cap['latency_p50_ms'], 3)} / {fmt(cap and cap['latency_p99_ms'], 3)} | "
                f"{fmt(cap and cap['cpu_us_per_op'])} | {fmt(r['ramp'][-1]['rss_kib_after'] if r['ramp'] else None)} |")
        md += ["", "Calls/s ramp (one run of CALL_S seconds per step, with the phones refreshing):", "",
               "| proxy | phones | calls/s | attempted | failed | failure % | p50 ms | p99 ms | max ms | "
               "CPU us/call | proxy % of core | RSS after KiB | gen. lag max ms |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in regs:
            for d in r["ramp"]:
                pct = (d["cpu_seconds"] / d["elapsed_s"] * 100) if d.get("cpu_seconds") and d.get("elapsed_s") else None
                md.append(
                    f"| {r['proxy']} | {r['n']:,} | {d['rate']:,.0f} | {d['attempted']:,} | {d['failed']:,} | "
                    f"{d['failure_ratio'] * 100:.3f} | {fmt(d['latency_p50_ms'], 3)} | {fmt(d['latency_p99_ms'], 3)} | "
                    f"{fmt(d['latency_max_ms'], 1)} | {fmt(d['cpu_us_per_op'])} | {fmt(pct)} | "
                    f"{fmt(d['rss_kib_after'])} | {fmt(d.get('send_lag_max_ms'), 1)} |")
        md.append("")
    if media:
        md += ["### Calls with media", "",
               "| proxy | calls | packets/s per stream | packets/s relayed | lost | relay CPU % of core | "
               "packets per CPU-second | one-way p50 / p99 us | gen. send lag max ms | setup p50 / p99 ms | "
               "relay RSS idle / set up / with media / hung up KiB | **KiB per call with media** | "
               "Kamailio CPU % of core / PSS growth KiB |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in media:
            d, w = r["d"], r["w"]
            per = (w["rss_end_kib"] - d["rss_before_kib"]) / r["calls"] if w.get("rss_end_kib") else None
            r["per_call_kib"] = per
            s = d["setup"]
            k = load(os.path.join(out, f"media-{r['proxy']}-{r['calls']}-kamailio.json"))
            kam = "-"
            if k and k.get("seconds"):
                kam = (f"{k['kamailio_cpu_ticks'] / k['clk_tck'] / k['seconds'] * 100:.1f} / "
                       f"{k['kamailio_pss_after_kib'] - k['kamailio_pss_before_kib']:,}")
            md.append(
                f"| {r['proxy']} | {r['calls']:,} | {w['pps_per_stream']} | {w['pps_relayed']:,.0f} | {w['lost']:,} | "
                f"{fmt(w.get('relay_core_pct'))} | {fmt(w.get('pps_per_core'), 0)} | "
                f"{w['lat_p50_us']:,.0f} / {w['lat_p99_us']:,.0f} | {w['send_lag_max_us'] / 1000:,.1f} | "
                f"{fmt(s['latency_p50_ms'], 3)} / "
                f"{fmt(s['latency_p99_ms'], 3)} | {d['rss_before_kib']:,} / {d['rss_after_setup_kib']:,} / "
                f"{fmt(w.get('rss_end_kib'))} / {d['rss_after_teardown_kib']:,} | {fmt(per)} | {kam} |")
        md.append("")
    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(dict(
            registrations=[dict(proxy=r["proxy"], phones=r["n"], mem=r["mem"], per_udp_b=r.get("per_udp_b"),
                                per_tls_b=r.get("per_tls_b"), capacity=r["cap"] and r["cap"]["rate"])
                           for r in regs],
            media=[dict(proxy=r["proxy"], calls=r["calls"], per_call_kib=r.get("per_call_kib"),
                        pps=r["w"]["pps_relayed"], p50_us=r["w"]["lat_p50_us"], p99_us=r["w"]["lat_p99_us"],
                        cpu_pct=r["w"].get("relay_core_pct")) for r in media]), f, indent=1)
    print(text)
    try:
        pngs = plot(out, regs, media)
        if png_dir:
            for p in pngs:
                shutil.copy(p, png_dir)
    except ImportError as e:
        print(f"no plots: {e}", file=sys.stderr)


def plot(out, regs, media):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pngs = []
    if regs:
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        for proxy in sorted({r["proxy"] for r in regs}):
            rs = [r for r in regs if r["proxy"] == proxy]
            xs = [r["n"] for r in rs]
            ax[0].plot(xs, [r["mem"]["rss_all_kib"] / 1024 for r in rs], "o-", label=f"{proxy}: with phones")
            ax[0].plot(xs, [r["mem"]["rss_base_kib"] / 1024 for r in rs], "x:", label=f"{proxy}: idle")
            ax[1].plot(xs, [r["cap"]["rate"] if r["cap"] else 0 for r in rs], "o-", label=proxy)
        ax[0].set_xlabel("registered phones (SBC: 80% UDP, 20% TLS)")
        ax[0].set_ylabel("MiB (SBC RSS; Kamailio: PSS of all processes)")
        ax[0].set_title("Memory vs registrations")
        ax[1].set_xlabel("registered phones")
        ax[1].set_ylabel("calls/s with <= 0.1% failures (highest step)")
        ax[1].set_title("Call capacity vs registrations")
        for a in ax:
            a.set_xscale("log")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(out, "scale-registrations.png")
        fig.savefig(p, dpi=90)
        pngs.append(p)
        fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in regs:
            xs = [d["rate"] for d in r["ramp"]]
            lbl = f"{r['proxy']} {r['n']:,} phones"
            ax[0].plot(xs, [d["latency_p99_ms"] or 0 for d in r["ramp"]], "o-", label=lbl)
            ax[1].plot(xs, [d["failure_ratio"] * 100 for d in r["ramp"]], "o-", label=lbl)
        ax[0].set_ylabel("setup latency p99 ms")
        ax[0].set_yscale("log")
        ax[1].set_ylabel("failed calls %")
        ax[1].axhline(0.1, color="red", ls=":", lw=1)
        ax[1].set_yscale("symlog", linthresh=0.01)
        for a in ax:
            a.set_xlabel("offered calls/s")
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        ax[0].set_title("Calls/s ramp: setup p99")
        ax[1].set_title("Calls/s ramp: failures (red: 0.1%)")
        fig.tight_layout()
        p = os.path.join(out, "scale-ramp.png")
        fig.savefig(p, dpi=90)
        pngs.append(p)
    if media:
        fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
        for proxy in sorted({r["proxy"] for r in media}):
            rs = [r for r in media if r["proxy"] == proxy]
            xs = [r["calls"] for r in rs]
            ax[0].plot(xs, [r["w"]["pps_relayed"] for r in rs], "o-", label=f"{proxy}: packets/s relayed")
            ax0b = ax[0]
            ax[1].plot(xs, [r["w"]["lat_p50_us"] for r in rs], "o-", label=f"{proxy}: p50")
            ax[1].plot(xs, [r["w"]["lat_p99_us"] for r in rs], "s--", label=f"{proxy}: p99")
            ax[2].plot(xs, [r["w"]["rss_end_kib"] / 1024 if r["w"].get("rss_end_kib") else 0 for r in rs], "o-",
                       label=f"{proxy}: RSS with media")
            ax[2].plot(xs, [(r["w"].get("relay_core_pct") or 0) for r in rs], "s--", label=f"{proxy}: CPU % of a core")
            ax0b.set_ylabel("packets/s")
        ax[0].set_title("RTP packets/s relayed")
        ax[1].set_title("One-way RTP latency through the relay (us)")
        ax[1].set_yscale("log")
        ax[2].set_title("Relay process RSS (MiB) and CPU (% of a core)")
        fig.suptitle("50 packets/s per direction, except at 2,000 calls: 10 packets/s (the generator's "
                     "limit on 2 cores); kamrtpe = Kamailio + rtpengine (rtpengine's RSS and CPU)", fontsize=9)
        for a in ax:
            a.set_xlabel("concurrent calls")
            a.set_xscale("log")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.tight_layout()
        fig.subplots_adjust(top=0.85)
        p = os.path.join(out, "scale-media.png")
        fig.savefig(p, dpi=90)
        pngs.append(p)
    return pngs


if __name__ == "__main__":
    main()
