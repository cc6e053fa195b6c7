#!/usr/bin/env python3
"""Benchmark libsocket.so on loopback (no module on the host).

1. Demo server requests/s (one connection per request, so accept/close interposition is
   on the hot path): plain, LD_PRELOAD fallback, LD_PRELOAD portable (SO_REUSEPORT),
   interleaved over a few rounds in the same run; medians and ratios vs plain.
2. The interposer's own cost: socket()+close() pairs per second with and without the
   preload, which isolates the library from the noise of a shared machine.
Target: the fallback preload costs < 3 %.  Exit 1 only when a run had errors.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOOP_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
	long n = atol(argv[1]);
	struct timespec a, b;
	/* CPU time, not wall time: other load on the machine does not count */
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
	for (long i = 0; i < n; i++) close(socket(AF_INET, SOCK_STREAM, 0));
	clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
	printf("%.0f\n", n / ((b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9));
	return 0;
}
"""
CONFIGS = {"plain": None, "fallback": {}, "portable": {"FASTSOCKET_PORTABLE": "1"}}


def build(out: Path) -> None:
    for sub in ("library", "demo"):
        subprocess.run(["make", "-s", "-C", str(ROOT / sub), f"BUILDDIR={out}"], check=True)
    (out / "loop.c").write_text(LOOP_C)
    subprocess.run(["cc", "-O2", "-o", str(out / "loop"), str(out / "loop.c")], check=True)


def env_for(out: Path, extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTSOCKET_") and k != "LD_PRELOAD"}
    if extra is not None:
        env.update(extra, LD_PRELOAD=str(out / "libsocket.so"), FASTSOCKET_QUIET="1")
    return env


def cpu_ns(pid: int) -> int:
    """CPU time of a process (ns): time on CPU, so waiting for a busy machine is not counted."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) * 10**9 // os.sysconf("SC_CLK_TCK")


def server_rps(out: Path, extra: dict[str, str] | None, secs: float,
               workers: int) -> tuple[float, float, int]:
    """(requests/s, server CPU microseconds per request, errors)"""
    log = out / "server.log"
    log.unlink(missing_ok=True)
    srv = subprocess.Popen([str(out / "server"), "-w", str(workers), "-a", "127.0.0.1:0", "-o", str(log)],
                           env=env_for(out, extra), start_new_session=True)
    try:
        port = None
        for _ in range(200):
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text() if log.exists() else "")
            if m:
                port = int(m[1])
                break
            time.sleep(0.025)
        if port is None:
            raise RuntimeError("server did not start")
        time.sleep(0.2)  # workers up
        kids = [int(k) for k in Path(f"/proc/{srv.pid}/task/{srv.pid}/children").read_text().split()]
        before = sum(cpu_ns(k) for k in kids)
        r = subprocess.run([str(out / "loadgen"), "-d", str(secs), "-c", "16", "-w", str(workers),
                            f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=secs + 60)
        used = sum(cpu_ns(k) for k in kids) - before
        m = re.search(r"requests=(\d+) errors=(\d+) rps=(\d+)", r.stdout)
        if not m or int(m[1]) == 0:
            raise RuntimeError(f"loadgen failed: {r.stdout} {r.stderr}")
        return float(m[3]), used / 1000 / int(m[1]), int(m[2])
    finally:
        srv.send_signal(signal.SIGTERM)
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(srv.pid, signal.SIGKILL)
            srv.wait()


def loop_rate(out: Path, extra: dict[str, str] | None, n: int) -> float:
    r = subprocess.run([str(out / "loop"), str(n)], env=env_for(out, extra), capture_output=True,
                       text=True, check=True, timeout=120)
    return float(r.stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--secs", type=float, default=2.0, help="seconds per server measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    errors = 0
    with tempfile.TemporaryDirectory(prefix="bench_userspace.") as tmp:
        out = Path(tmp)
        build(out)
        rps: dict[str, list[float]] = {k: [] for k in CONFIGS}
        cpu: dict[str, list[float]] = {k: [] for k in CONFIGS}
        for _ in range(args.rounds):
            for name, extra in CONFIGS.items():
                value, us, errs = server_rps(out, extra, args.secs, args.workers)
                rps[name].append(value)
                cpu[name].append(us)
                errors += errs
        loops: dict[str, list[float]] = {k: [] for k in ("plain", "fallback")}
        for _ in range(max(5, 2 * args.rounds)):
            for name in loops:
                loops[name].append(loop_rate(out, CONFIGS[name], 100_000))
    # A shared machine only ever slows a run down: the best run is the least disturbed one.
    med = {k: statistics.median(v) for k, v in rps.items()}
    best = {k: max(v) for k, v in rps.items()}
    spread = (max(rps["plain"]) - min(rps["plain"])) / med["plain"] * 100
    print(f"bench_userspace: demo server, loopback, {args.workers} workers, connection per request, "
          f"{args.rounds} x {args.secs:g} s")
    for name, values in rps.items():
        print(f"  {name:9s} median {med[name]:9.0f} best {best[name]:9.0f} req/s   "
              f"runs {' '.join(f'{v:.0f}' for v in values)}")
    for a, b in (("fallback", "plain"), ("portable", "plain"), ("portable", "fallback")):
        print(f"  ratio {a}/{b}: median {med[a] / med[b]:.3f}  best {best[a] / best[b]:.3f}")
    print(f"  run-to-run spread of plain: {spread:.1f} % (wall-clock rates on a shared machine)")
    cm = {k: statistics.median(v) for k, v in cpu.items()}
    for name, values in cpu.items():
        print(f"  {name:9s} server CPU per request: median {cm[name]:6.1f} us   "
              f"runs {' '.join(f'{v:.1f}' for v in values)}")
    for a in ("fallback", "portable"):
        print(f"  ratio CPU/request {a}/plain: {cm[a] / cm['plain']:.3f}")
    lm = {k: max(v) for k, v in loops.items()}
    cost = (1 - lm["fallback"] / lm["plain"]) * 100
    print(f"bench_userspace: socket()+close() pairs per CPU-second (best of {len(loops['plain'])}): plain {lm['plain']:.0f}, "
          f"fallback preload {lm['fallback']:.0f}, ratio {lm['fallback'] / lm['plain']:.3f}")
    # CPU per request is what the preload can cost; it is robust to a busy machine.
    server_cost = (cm["fallback"] / cm["plain"] - 1) * 100
    verdict = "met" if server_cost < 3 and cost < 3 else "NOT met"
    print(f"bench_userspace: fallback cost: server CPU/request {server_cost:+.1f} %, "
          f"socket+close {cost:+.1f} % (target < 3 %: {verdict})")
    if errors:
        print(f"bench_userspace: {errors} failed requests", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
