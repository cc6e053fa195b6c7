"""The guest stress suite (`fsbuild smoke --suite stress`): its guest programs
(ci/guest/fsstress.c, ci/guest/stress.sh), its settings in /etc/fsmoke.conf, the checks a
run must report, and the mechanism metrics read back from smoke.json."""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path

from fsbuild import paths, proc
from fsbuild.errors import BuildError

SUITES = ("smoke", "stress")
# A debug kernel under TCG runs ~10x slower than mini; 15 scenarios of STRESS_SECS each
# plus boot fit in this with room (measured run time is printed in the verdict).
DEFAULT_TIMEOUT_S = 1500.0
STRESS_SECS = 8
STRESS_CONNS = 8
# Every scenario ci/guest/stress.sh runs: a run missing one did not test it.
SCENARIOS = ("metrics_plain", "metrics_fastsocket", "demo_naive", "demo_proxy", "nginx", "churn_kill",
             "reload", "repin", "two_listeners", "mixed_accept", "exec_child", "spawn_storm",
             "rmmod", "params", "irq_move", "netns", "hostile", "leaks", "dmesg")
REQUIRED_CHECKS = tuple(f"stress_{s}" for s in SCENARIOS)
METRIC_CHECKS = {"plain": "stress_metrics_plain", "fastsocket": "stress_metrics_fastsocket"}
_METRIC_RE = re.compile(r"\b([a-z_]+)=(-?[0-9]+(?:\.[0-9]+)?)\b")
METRICS = ("conns_per_s", "spurious_per_accept", "syn_cpu_share", "rfd_share", "cross_cpu",
           "resets", "estab_resets", "listen_drops", "listen_overflows")


NGINX = Path("/usr/sbin/nginx")
NGINX_BUNDLE = "nginx-root.tar"
LDD_RE = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x")


def guest_programs(build_dir: Path) -> list[Path]:
    """fsstress (dynamic musl, so LD_PRELOAD=libsocket.so applies), stress.sh and, when the
    host has Debian's nginx, the nginx bundle: all for /bin."""
    guest = paths.repo_root() / "ci" / "guest"
    build_dir.mkdir(parents=True, exist_ok=True)
    prog = _compile(guest / "fsstress.c", build_dir / "fsstress",
                    [paths.repo_root() / "module" / "fastsocket_abi.h"])
    script = build_dir / "stress.sh"
    shutil.copyfile(guest / "stress.sh", script)
    bundle = nginx_bundle(build_dir)
    return [prog, script] + ([bundle] if bundle else [])


def nginx_bundle(build_dir: Path, nginx: Path = NGINX) -> Path | None:
    """A real server for the guest: Debian's nginx with the glibc libraries ldd names, the
    glibc loader and a glibc build of libsocket.so (/lib/glibc/libsocket.so), as a tar the
    guest unpacks at / (a musl libsocket.so cannot be preloaded into a glibc program).
    None when the host has no nginx: the scenario then skips and says so."""
    if not nginx.is_file() or shutil.which("ldd") is None:
        return None
    libdir = build_dir / "glibc"
    proc.run(["make", "-s", "-C", str(paths.repo_root() / "library"), f"BUILDDIR={libdir}"],
             timeout=300, error=BuildError)
    ldd = proc.run(["ldd", str(nginx)], timeout=60, error=BuildError).stdout.decode(errors="replace")
    files = {nginx.as_posix().lstrip("/"): nginx, "lib/glibc/libsocket.so": libdir / "libsocket.so"}
    for m in LDD_RE.finditer(ldd):
        files[m.group(1).lstrip("/")] = Path(m.group(1)).resolve()
    out = build_dir / NGINX_BUNDLE
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, src in sorted(files.items()):
            data = src.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    if not out.exists() or out.read_bytes() != buf.getvalue():
        out.write_bytes(buf.getvalue())
    return out


def _compile(src: Path, out: Path, deps: list[Path]) -> Path:
    newest = max(p.stat().st_mtime for p in [src, *deps])
    if out.exists() and out.stat().st_mtime >= newest:
        return out
    proc.run(["musl-gcc", "-O2", "-s", "-pthread", "-o", str(out), str(src)], timeout=120, error=BuildError)
    return out


def verdict_dir(profile_out: Path, suite: str, config: str) -> Path:
    """Where a run's smoke.json, JUnit XML and logs go. A stress run on the mini RPMs (CI's
    `make stress-ci`) writes out/<target>/stress/: out/<target>/smoke.json stays the demo's
    verdict. The debug profile's out/<target>/debug/ is the stress suite's own."""
    return profile_out / "stress" if suite == "stress" and config != "debug" else profile_out


def guest_config(secs: int = STRESS_SECS, conns: int = STRESS_CONNS) -> dict[str, str]:
    return {"SUITE": "stress", "STRESS_SECS": str(secs), "STRESS_CONNS": str(conns)}


def metrics(checks: list[dict[str, str]]) -> dict[str, dict[str, float]]:
    """{"plain": {...}, "fastsocket": {...}} from the metrics checks of a smoke.json."""
    out: dict[str, dict[str, float]] = {}
    by_name = {c["name"]: c for c in checks}
    for label, name in METRIC_CHECKS.items():
        detail = by_name.get(name, {}).get("detail", "")
        _, _, tail = detail.partition("metrics: ")
        values = {k: float(v) for k, v in _METRIC_RE.findall(tail) if k in METRICS}
        if values:
            out[label] = values
    return out
