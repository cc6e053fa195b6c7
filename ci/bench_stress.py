#!/usr/bin/env python3
"""Benchmark: Fastsocket's mechanisms, with and without the module, measured by the guest
stress suite in one boot (same kernel, same workload: fsstress serve -w 4, load -c 8):
spurious wakeups per accept, share accepted on the SYN's CPU, RFD share, accepts off the
SYN's CPU, resets, ListenDrops/ListenOverflows and connections/s. Under TCG the
connections/s are emulated: only their ratio means something.

usage: ci/bench_stress.py [--config mini|debug] [--target linux-6.1] [--json SMOKE_JSON]
--json reads a finished run's smoke.json instead of booting."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsbuild import build, progress, smoke, stress
from fsbuild.errors import FsbuildError

LABELS = {
    "conns_per_s": "connections/s (TCG-emulated)",
    "spurious_per_accept": "spurious wakeups per accept",
    "syn_cpu_share": "accepted on the SYN's CPU",
    "rfd_share": "RFD: replies handled on the opener's CPU",
    "cross_cpu": "accepts off the SYN's CPU",
    "resets": "resets sent (OutRsts)",
    "estab_resets": "established connections reset",
    "listen_drops": "ListenDrops",
    "listen_overflows": "ListenOverflows",
}


def run_suite(target: str, config: str) -> list[dict[str, str]] | None:
    opts = smoke.BootOptions(suite="stress", config=config, timeout=stress.DEFAULT_TIMEOUT_S)
    try:
        smoke.run(target, None, opts)
    except FsbuildError as exc:  # a failing scenario still measured the metrics
        print(f"bench_stress: suite: {exc.message}")
    path = stress.verdict_dir(build.profile_out(target, config), "stress", config) / "smoke.json"
    if not path.is_file():
        print(f"bench_stress: skipped: no {path}")
        return None
    return json.loads(path.read_text())["checks"]


def table(m: dict[str, dict[str, float]]) -> list[str]:
    plain, fs = m.get("plain", {}), m.get("fastsocket", {})
    rows = [f"{'metric':44} {'plain':>10} {'fastsocket':>11}"]
    for key, label in LABELS.items():
        a, b = plain.get(key), fs.get(key)
        rows.append(f"{label:44} {_fmt(a):>10} {_fmt(b):>11}")
    a, b = plain.get("conns_per_s"), fs.get("conns_per_s")
    if a and b:
        rows.append(f"connections/s ratio fastsocket/plain (TCG, -smp 4): {b / a:.2f}x")
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if v != int(v) else str(int(v))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="linux-6.1")
    ap.add_argument("--config", choices=["mini", "debug"], default="mini")
    ap.add_argument("--json", type=Path, help="a finished run's smoke.json")
    args = ap.parse_args()
    progress.set_quiet(True)
    if args.json:
        checks = json.loads(args.json.read_text())["checks"]
    else:
        rpms = build.profile_out(args.target, args.config) / "rpms"
        if not list(rpms.glob("kernel-*.rpm")):
            print(f"bench_stress: skipped: no kernel RPM in {rpms} (fsbuild rpm -t {args.target} "
                  f"--config {args.config})")
            return 0
        checks = run_suite(args.target, args.config)
        if checks is None:
            return 0
    m = stress.metrics(checks)
    if not m:
        print("bench_stress: the run has no metrics checks (stress_metrics_plain/_fastsocket)")
        return 1
    print("\n".join(table(m)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
