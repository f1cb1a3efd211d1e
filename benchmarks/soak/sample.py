#!/usr/bin/env python3
"""Samples one SBC process every N seconds into a CSV (benchmarks/soak/run.sh, scale/run.sh).

Columns: unix time, seconds since start, VmRSS / VmHWM (KiB), open fds (/proc/PID/fd),
threads, CPU seconds (utime+stime), the admin /status table sizes and the /metrics gauges of
the tables (transactions, registrations, calls, media sessions, connections, free media
ports), and the pool's active node. Stops after --seconds, when the process is gone, or on
SIGTERM. Only ever talks to the loopback admin URL it is given.
"""
import argparse
import csv
import json
import os
import signal
import sys
import time
import urllib.request
from urllib.parse import urlparse

GAUGES = [
    "sbc_transactions",
    "sbc_registrations",
    "sbc_calls",
    "sbc_media_sessions",
    "sbc_connections",
    "sbc_media_ports_free",
]
STATUS = ["registrations", "transactions", "connections", "calls", "media_sessions"]
CLK = os.sysconf("SC_CLK_TCK")
stop = False


def on_term(*_):
    global stop
    stop = True


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])
    return out


def anon_huge_kib(pid):
    """Resident transparent huge pages (smaps_rollup), to tell khugepaged's collapses from
    growth of the SBC's own memory."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def get(url, timeout=3.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8", "replace")


def metrics(admin):
    vals = {}
    for line in get(admin + "/metrics").splitlines():
        if not line or line[0] == "#":
            continue
        name, _, rest = line.partition(" ")
        base = name.split("{", 1)[0]
        if base in GAUGES and "{" not in name:
            try:
                vals[base] = float(rest.split()[0])
            except (ValueError, IndexError):
                pass
    return vals


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--admin", required=True)
    ap.add_argument("--every", type=float, default=10)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--csv", required=True)
    ap.add_argument("--events", default=None)
    a = ap.parse_args()
    host = urlparse(a.admin).hostname or ""
    if not host.startswith("127.") and host != "::1":
        sys.exit("admin URL must be loopback")
    if not 1 <= a.seconds <= 4 * 3600:
        sys.exit("--seconds must be 1..14400")
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    cols = (["t", "elapsed_s", "rss_kib", "hwm_kib", "fds", "threads", "cpu_s"]
            + ["status_" + s for s in STATUS] + GAUGES + ["active", "anon_huge_kib"])
    t0 = time.time()
    next_at = t0
    with open(a.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        while not stop and time.time() - t0 <= a.seconds:
            now = time.time()
            row = {"t": f"{now:.1f}", "elapsed_s": f"{now - t0:.1f}"}
            try:
                st = proc_status(a.pid)
                row.update(rss_kib=st.get("VmRSS"), hwm_kib=st.get("VmHWM"),
                           threads=st.get("Threads"),
                           fds=len(os.listdir(f"/proc/{a.pid}/fd")),
                           cpu_s=f"{cpu_seconds(a.pid):.2f}",
                           anon_huge_kib=anon_huge_kib(a.pid))
            except (FileNotFoundError, ProcessLookupError):
                print("process gone", file=sys.stderr)
                break
            try:
                s = json.loads(get(a.admin + "/status"))
                for k in STATUS:
                    row["status_" + k] = s.get(k)
                pools = s.get("pools") or []
                row["active"] = pools[0].get("active") if pools else None
            except Exception as e:  # noqa: BLE001 - a missed sample is logged, not fatal
                print(f"status: {e}", file=sys.stderr)
            try:
                row.update(metrics(a.admin))
            except Exception as e:  # noqa: BLE001
                print(f"metrics: {e}", file=sys.stderr)
            w.writerow([row.get(c, "") for c in cols])
            f.flush()
            next_at += a.every
            while not stop and time.time() < next_at:
                time.sleep(min(0.5, max(0.0, next_at - time.time())))


if __name__ == "__main__":
    main()
