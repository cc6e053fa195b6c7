"""fsbuild.stress and its guest programs. fsstress is built with the host gcc and run on the
host (plain kernel, no module): the client's checks, the churn signals and the counters are
the same code the guest runs. The guest run itself is the slow test at the end."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, proc_children, proc_state, require_tool

from fsbuild import qemu, smoke, stress
from fsbuild.errors import SmokeCheckError

GUEST = ROOT / "ci" / "guest"


@pytest.fixture(scope="module")
def fsstress(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("gcc")
    out = tmp_path_factory.mktemp("fsstress") / "fsstress"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-pthread", "-o", str(out), str(GUEST / "fsstress.c")],
                   check=True, capture_output=True, timeout=120)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _counts(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", line)}


class Serve:
    def __init__(self, exe: Path, tmp: Path, *args: str) -> None:
        self.port = _free_port()
        self.stats = tmp / "serve.stats"
        self.proc = subprocess.Popen([str(exe), "serve", "-p", str(self.port), "-s", str(self.stats), *args],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().startswith("serve: ready")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> dict[str, float]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        return _counts(self.stats.read_text())


def _load(exe: Path, *args: str) -> tuple[int, dict[str, float]]:
    r = subprocess.run([str(exe), "load", *args], capture_output=True, text=True, timeout=60)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("load:")][-1]
    return r.returncode, _counts(line)


def test_serve_answers_every_request_and_counts_them(fsstress: Path, tmp_path: Path) -> None:
    srv = Serve(fsstress, tmp_path, "-w", "2")
    rc, load = _load(fsstress, "-a", f"127.0.0.1:{srv.port}", "-c", "4", "-n", "300")
    st = srv.stop()
    assert rc == 0 and load["ok"] == 300 and load["requests"] == 300
    assert st["accepted"] == 300 and st["errors"] == 0
    assert 0 <= st["spurious"] <= st["wakeups"] and st["on_syn_cpu"] <= st["accepted"]


def _bad_server(reply: bytes, linger_reset: bool = False) -> tuple[int, threading.Event]:
    lis = socket.socket()
    lis.bind(("127.0.0.1", 0))
    lis.listen(64)
    stop = threading.Event()

    def run() -> None:
        lis.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = lis.accept()
            except OSError:
                continue
            c.recv(1024)
            if linger_reset:  # RST instead of FIN
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            else:
                c.sendall(reply)
            c.close()
        lis.close()

    threading.Thread(target=run, daemon=True).start()
    return int(lis.getsockname()[1]), stop


@pytest.mark.parametrize("reply, field", [
    (b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nshort", "bad"),       # body cut short
    (b"HTTP/1.0 503 Busy\r\nContent-Length: 2\r\n\r\nno", "bad"),          # not a 200
    (b"HTTP/1.0 200 OK\r\n\r\nno length", "bad"),                          # unverifiable body
    (b"", "resets"),                                                       # RST
])
def test_load_checks_every_response(fsstress: Path, reply: bytes, field: str) -> None:
    port, stop = _bad_server(reply, linger_reset=not reply)
    try:
        rc, load = _load(fsstress, "-a", f"127.0.0.1:{port}", "-c", "2", "-n", "20")
    finally:
        stop.set()
    assert rc == 1 and load[field] == 20 and load["ok"] == 0


def _under_load(fsstress: Path, srv: Serve, sig: int, times: int) -> tuple[int, dict[str, float]]:
    result: list[tuple[int, dict[str, float]]] = []
    t = threading.Thread(target=lambda: result.append(
        _load(fsstress, "-a", f"127.0.0.1:{srv.port}", "-c", "4", "-d", "3")))
    t.start()
    for _ in range(times):
        time.sleep(0.4)
        srv.signal(sig)
    t.join()
    return result[0]


@pytest.mark.parametrize("sig, counter", [(signal.SIGUSR2, "restarts"), (signal.SIGHUP, "reloads"),
                                          (signal.SIGUSR1, "repins")])
def test_churn_on_a_plain_kernel_loses_nothing(fsstress: Path, tmp_path: Path, sig: int, counter: str) -> None:
    # The baseline Fastsocket must match (issue 10 item 14): a plain server loses nothing
    # when workers are SIGKILLed and restarted, reloaded or re-pinned under load.
    srv = Serve(fsstress, tmp_path, "-w", "3")
    rc, load = _under_load(fsstress, srv, sig, 4)
    st = srv.stop()
    assert (rc, load["resets"], load["errors"], load["bad"]) == (0, 0, 0, 0), (load, st)
    assert load["ok"] > 0 and st[counter] >= 1


def _exec_child_waiting(server: int, timeout: float = 20.0) -> bool:
    """True once worker 0, exec'd into `fsstress child FDS`, sleeps on its inherited
    listeners. "serve: ready" comes from the master: on a loaded host the exec could still be
    under way when the load ends, and worker 1 took all 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for k in proc_children(server):
            try:
                argv = Path(f"/proc/{k}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[1:2] == [b"child"] and proc_state(k) == "S":
                return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("flag", ["-m", "-e"])
def test_mixed_accept_and_exec_child_serve(fsstress: Path, tmp_path: Path, flag: str) -> None:
    srv = Serve(fsstress, tmp_path, "-w", "2", flag)
    if flag == "-e":
        assert _exec_child_waiting(srv.proc.pid), "the exec'd child never came up"
    rc, load = _load(fsstress, "-a", f"127.0.0.1:{srv.port}", "-c", "4", "-n", "200")
    st = srv.stop()
    assert rc == 0 and load["ok"] == 200
    if flag == "-m":
        assert st["plain"] > 0  # the raw accept4 worker took its share
    else:
        assert st["accepted"] < 200  # the exec'd child (no counters) accepted the rest


def test_hostile_and_storm_need_the_device(fsstress: Path) -> None:
    for cmd in ("hostile", "storm"):
        r = subprocess.run([str(fsstress), cmd], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "PATH": "/usr/bin:/bin"})
        if Path("/dev/fastsocket").exists():
            pytest.skip("this host has /dev/fastsocket: the guest test covers it")
        assert r.returncode == 1 and "/dev/fastsocket" in r.stdout


def test_stress_script_is_valid_sh_and_reports_every_scenario() -> None:
    require_tool("busybox")
    script = (GUEST / "stress.sh").read_text()
    subprocess.run(["busybox", "sh", "-n", str(GUEST / "stress.sh")], check=True, timeout=30)
    reported = set(re.findall(r"(?:scenario|verdict|check) (?:\"?stress_)?([a-z_]+)", script))
    reported |= set(re.findall(r"check stress_([a-z_]+)", script))
    if 'verdict "metrics_$_label"' in script and 'stress_metrics "$S_PRE" fastsocket' in script:
        reported |= {"metrics_plain", "metrics_fastsocket"}
    missing = [s for s in stress.SCENARIOS if s not in reported]
    assert not missing, f"stress.sh never reports {missing}"
    assert '[ "$SUITE" = stress ]' in (GUEST / "init").read_text()


def _run_scenarios(fsstress: Path, tmp_path: Path, body: str) -> list[smoke.Check]:
    """Source stress.sh with the init's helpers stubbed and run `body` on the host (plain
    kernel, no preload): the verdict logic the guest runs, on real counters."""
    require_tool("busybox", "timeout")
    script = f"""
check() {{ _n=$1; _s=$2; shift 2; echo "FSCHECK $_n $_s $*"; }}
step() {{ :; }}
oneline() {{ tr '\\n' ' ' | cut -c1-200; }}
NCPU=$(grep -c '^processor' /proc/cpuinfo); IRQS=""
. {GUEST / "stress.sh"}
{body}
"""
    env = {**os.environ, "STRESS_SOURCE_ONLY": "1", "STRESS_BIN": str(fsstress.parent), "STRESS_PRELOAD": "",
           "STRESS_TMP": str(tmp_path), "STRESS_SECS": "2", "STRESS_CONNS": "4", "STRESS_PORT": str(_free_port())}
    r = subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True, timeout=180, env=env)
    return smoke.parse_guest("FSBOOT host\n" + r.stdout).checks


def test_scenarios_pass_on_a_plain_kernel_with_their_counts(fsstress: Path, tmp_path: Path) -> None:
    checks = _run_scenarios(fsstress, tmp_path, """
stress_metrics "" plain
scenario churn_kill "-p $S_PORT -w 3" act_kill
scenario reload "-p $S_PORT -w 3" act_reload
scenario two_listeners "-p $S_PORT,$((S_PORT + 1)) -w 2" "" "127.0.0.1:$S_PORT,127.0.0.1:$((S_PORT + 1))"
""")
    by = {c.name: c for c in checks}
    assert list(by) == ["stress_metrics_plain", "stress_churn_kill", "stress_reload", "stress_two_listeners"]
    assert all(c.status == "pass" for c in checks), checks
    plain = stress.metrics([{"name": c.name, "detail": c.detail} for c in checks])["plain"]
    assert set(plain) == set(stress.METRICS) and plain["conns_per_s"] > 0
    assert 0 <= plain["syn_cpu_share"] <= 1 and 0 <= plain["rfd_share"] <= 1
    assert int(re.search(r"restarts=(\d+)", by["stress_churn_kill"].detail)[1]) >= 1
    assert int(re.search(r"reloads=(\d+)", by["stress_reload"].detail)[1]) >= 1


def test_a_scenario_fails_on_a_lost_request(fsstress: Path, tmp_path: Path) -> None:
    # The client talks to a port nobody listens on: refused connections fail the scenario.
    checks = _run_scenarios(fsstress, tmp_path, """
st_serve "" -p $S_PORT -w 1
st_load_bg -a 127.0.0.1:$((S_PORT + 1)); st_load_wait; st_stop
verdict lost "" ""
""")
    assert [(c.name, c.status) for c in checks] == [("stress_lost", "fail")]
    assert "refused=" in checks[0].detail


def test_repin_scenario_passes_its_herd_check_on_a_plain_kernel(fsstress: Path, tmp_path: Path) -> None:
    # The re-pin scenario as the guest runs it, with its spurious-wakeup check: a plain
    # kernel (one queue) loses nothing and does not spin when a worker is re-pinned.
    checks = _run_scenarios(fsstress, tmp_path, """
scenario repin "-p $S_PORT -w 3" act_repin "" herd_check
""")
    assert [(c.name, c.status) for c in checks] == [("stress_repin", "pass")], checks
    counts = _counts(checks[0].detail.split("|")[1])
    assert counts["repins"] >= 1 and counts["spurious"] <= counts["accepted"]


@pytest.mark.parametrize("spurious, status", [(3923, "fail"), (3, "pass")])
def test_herd_check_fails_a_worker_spinning_on_an_undrainable_queue(
        fsstress: Path, tmp_path: Path, spurious: int, status: str) -> None:
    # Last 6.1 debug run before the fix: 295 accepted, 3,923 wakeups that found nothing.
    checks = _run_scenarios(fsstress, tmp_path, f"""
LOAD="load: requests=295 ok=295 errors=0 resets=0 timeouts=0 refused=0 bad=0"; LRC=0; ACT_FAIL=""
SERVE="serve: accepted=295 wakeups=4028 spurious={spurious} repins=6"
herd_check; verdict repin "$ACT_FAIL" ""
""")
    assert [(c.name, c.status) for c in checks] == [("stress_repin", status)]
    assert ("spurious wakeups 3923 > accepted 295" in checks[0].detail) == (status == "fail")


def test_guest_programs_build_with_musl(tmp_path: Path) -> None:
    require_tool("musl-gcc")
    progs = stress.guest_programs(tmp_path)
    assert [p.name for p in progs][:2] == ["fsstress", "stress.sh"]
    # dynamic: LD_PRELOAD must reach `fsstress serve` in the guest
    assert b"ld-musl" in progs[0].read_bytes()


def test_nginx_bundle_has_the_server_its_libraries_and_a_glibc_libsocket(tmp_path: Path) -> None:
    if not stress.NGINX.is_file():
        pytest.skip("no /usr/sbin/nginx on this host (apt-get install nginx-light)")
    require_tool("ldd", "gcc", "make")
    import tarfile
    bundle = stress.nginx_bundle(tmp_path)
    assert bundle is not None
    with tarfile.open(bundle) as tf:
        names = set(tf.getnames())
    assert {"usr/sbin/nginx", "lib/glibc/libsocket.so", "lib64/ld-linux-x86-64.so.2"} <= names
    assert any(n.endswith("/libc.so.6") for n in names)
    assert stress.nginx_bundle(tmp_path, tmp_path / "no-nginx") is None


def test_stress_checks_are_required_by_classify() -> None:
    guest = "FSBOOT 6.1\n" + "".join(f"FSCHECK {n} pass ok\n" for n in smoke.REQUIRED_CHECKS) + "FSDONE\n"
    vm = qemu.VmResult(stopped_by="done", returncode=0, timed_out=False, duration_s=1.0, status="", events=[])
    _, err, _ = smoke.classify(smoke.parse_guest(guest), "", vm, 30.0, "tcg")
    assert err is None
    checks, err, _msg = smoke.classify(smoke.parse_guest(guest), "", vm, 30.0, "tcg",
                                      required=smoke.REQUIRED_CHECKS + stress.REQUIRED_CHECKS)
    assert err is SmokeCheckError and "stress_hostile" in checks[-1].detail


def test_metrics_are_read_back_from_the_checks() -> None:
    checks = [{"name": "stress_metrics_plain", "status": "pass",
               "detail": "requests=10 ok=10 | serve | metrics: conns_per_s=41.5 spurious_per_accept=0.750 "
                         "syn_cpu_share=0.25 rfd_share=0.5 cross_cpu=30 resets=0 estab_resets=0 "
                         "listen_drops=2 listen_overflows=1"},
              {"name": "stress_metrics_fastsocket", "status": "fail", "detail": "metrics: conns_per_s=60"}]
    m = stress.metrics(checks)
    assert m["plain"]["spurious_per_accept"] == 0.75 and m["plain"]["listen_drops"] == 2
    assert m["fastsocket"] == {"conns_per_s": 60.0}
    assert stress.metrics([]) == {}


def test_bench_prints_both_sides_and_the_ratio(tmp_path: Path) -> None:
    run = tmp_path / "smoke.json"
    run.write_text(json.dumps({"verdict": "pass", "duration_s": 1, "checks": [
        {"name": "stress_metrics_plain", "status": "pass", "detail": "metrics: conns_per_s=40.0 spurious_per_accept=0.500"},
        {"name": "stress_metrics_fastsocket", "status": "pass", "detail": "metrics: conns_per_s=50.0 spurious_per_accept=0.000"}]}))
    r = subprocess.run([sys.executable, str(ROOT / "ci" / "bench_stress.py"), "--json", str(run)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.search(r"spurious wakeups per accept\s+0\.500\s+0\s*$", r.stdout, re.M)
    assert "ratio fastsocket/plain (TCG, -smp 4): 1.25x" in r.stdout
    run.write_text(json.dumps({"verdict": "fail", "duration_s": 1, "checks": []}))
    assert subprocess.run([sys.executable, str(ROOT / "ci" / "bench_stress.py"), "--json", str(run)],
                          capture_output=True, timeout=60).returncode == 1


def test_a_process_that_does_not_finish_cannot_stall_the_suite(fsstress: Path, tmp_path: Path) -> None:
    # After an oops, a scenario's process may never exit: every wait is bounded.
    start = time.monotonic()
    checks = _run_scenarios(fsstress, tmp_path, """
sleep 100 & bwait $! 1; check bwait pass "rc=$?"
bg_run 1 $S_TMP/x.out sleep 100; check bg_run pass "rc=$BRC"
""")
    assert [(c.name, c.detail) for c in checks] == [("bwait", "rc=137"), ("bg_run", "rc=137")]
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(("suite", "config", "where"), [
    ("stress", "mini", "linux-6.1/stress"), ("stress", "debug", "linux-6.1/debug"),
    ("smoke", "mini", "linux-6.1")])
def test_a_stress_run_on_the_mini_rpms_keeps_the_demo_verdict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suite: str, config: str, where: str) -> None:
    # `make stress-ci` boots the mini RPMs with --suite stress: out/<target>/smoke.json is the
    # demo's verdict and must survive; the stress verdict (same shape) goes to stress/.
    out = tmp_path / "out"
    monkeypatch.setenv("FSBUILD_OUT", str(out))
    demo = out / "linux-6.1" / "smoke.json"
    demo.parent.mkdir(parents=True)
    demo.write_text('{"verdict": "pass", "duration_s": 1, "checks": []}\n')
    booted: list[Path] = []

    def fake_boot(_kin: smoke.KernelInputs, vout: Path, _o: smoke.BootOptions, _s: object) -> smoke.Verdict:
        booted.append(vout)
        return smoke.Verdict("pass", 2.0, [smoke.Check("stress_x", "pass", suite)])

    monkeypatch.setattr(smoke, "find_kernel_rpm", lambda d: d / "kernel.rpm")
    monkeypatch.setattr(smoke, "stage_rpm", lambda rpm, root: smoke.KernelInputs("k", rpm, root, rpm))
    monkeypatch.setattr(smoke, "boot", fake_boot)
    smoke.run("linux-6.1", tmp_path, smoke.BootOptions(suite=suite, config=config))
    assert booted == [out / where]
    written = json.loads((out / where / "smoke.json").read_text())
    assert set(written) == {"verdict", "duration_s", "checks"} and written["checks"][0]["detail"] == suite
    assert (out / where / "smoke-junit.xml").is_file()
    if where != "linux-6.1":
        assert json.loads(demo.read_text())["checks"] == []


def test_cpu_metrics_are_left_out_not_zero_without_so_incoming_cpu(fsstress: Path, tmp_path: Path) -> None:
    # 2.6.32 (el6) has no SO_INCOMING_CPU: serve's syn_known and load's rfd_seen stay 0, and
    # the metrics must say n/a instead of reporting 0% locality.
    checks = _run_scenarios(fsstress, tmp_path, """
check old pass "$(cpu_metrics "serve: accepted=40 spurious=2 on_syn_cpu=0 syn_known=0" "load: rfd_local=0 rfd_seen=0")$(cpu_metrics_na "serve: accepted=40 syn_known=0")"
check new pass "$(cpu_metrics "serve: accepted=40 spurious=2 on_syn_cpu=10 syn_known=40" "load: rfd_local=5 rfd_seen=20")$(cpu_metrics_na "serve: accepted=40 syn_known=40")"
""")
    by = {c.name: c.detail for c in checks}
    old = stress.metrics([{"name": "stress_metrics_plain", "detail": "metrics: " + by["old"]}])["plain"]
    assert old == {"spurious_per_accept": 0.05} and "n/a (no SO_INCOMING_CPU" in by["old"]
    new = stress.metrics([{"name": "stress_metrics_plain", "detail": "metrics: " + by["new"]}])["plain"]
    assert new == {"spurious_per_accept": 0.05, "syn_cpu_share": 0.25, "cross_cpu": 30, "rfd_share": 0.25}
    assert "n/a" not in by["new"]


def test_dmesg_reports_ignore_the_el6_debug_boot_notices_only(fsstress: Path, tmp_path: Path) -> None:
    # The first el6 debug run failed stress_dmesg on two boot notices (kmemleak off at boot,
    # debug objects' pool moved); real reports of the same subsystems must still count.
    log = tmp_path / "dmesg"
    log.write_text("[    0.000000] kmemleak: Kernel memory leak detector disabled\n"
                   "[    0.000000] ODEBUG: 11 of 11 active objects replaced\n"
                   "[    1.000000] igb 0000:00:03.0: eth0: PCIe Link\n"
                   "[   50.000000] ODEBUG: free active (active state 0) object type: timer_list\n"
                   "[   51.000000] kmemleak: 3 new suspected memory leaks (see /sys/kernel/debug/kmemleak)\n"
                   "[   52.000000] WARNING: at net/ipv4/tcp.c:100 tcp_close+0x1/0x2()\n")
    checks = _run_scenarios(fsstress, tmp_path, f"""
dmesg_reports < {log} > {tmp_path}/hits
while read -r l; do check hit pass "$l"; done < {tmp_path}/hits
""")
    assert [c.detail.split("] ", 1)[1] for c in checks] == [
        "ODEBUG: free active (active state 0) object type: timer_list",
        "kmemleak: 3 new suspected memory leaks (see /sys/kernel/debug/kmemleak)",
        "WARNING: at net/ipv4/tcp.c:100 tcp_close+0x1/0x2()"]


def test_hostile_caller_starts_with_and_without_a_cpuset(fsstress: Path, tmp_path: Path) -> None:
    # The linux-6.1 mini kernel has no cpusets: the caller's command was `... > ; exec ...`,
    # a shell syntax error, and the hostile check never ran (rc=2).
    require_tool("taskset")
    if Path("/dev/fastsocket").exists():
        pytest.skip("this host has /dev/fastsocket: the guest test covers it")
    checks = _run_scenarios(fsstress, tmp_path, f"""
sh -c "$(hostile_cmd '')" > $S_TMP/none.out 2>&1; check none pass "rc=$? $(cat $S_TMP/none.out)"
sh -c "$(hostile_cmd {tmp_path}/tasks)" > $S_TMP/set.out 2>&1; check set pass "rc=$? $(cat $S_TMP/set.out)"
""")
    for c in checks:
        assert c.detail.startswith("rc=1 hostile: /dev/fastsocket:"), c
    assert (tmp_path / "tasks").read_text().strip().isdigit()


def test_netns_skips_with_the_reason_on_a_kernel_without_namespaces(tmp_path: Path) -> None:
    # The linux-6.1 mini kernel has no CONFIG_NET_NS: the scenario failed (netns rc=1)
    # instead of saying it cannot apply. A stub fsstress answers as that kernel does.
    stub = tmp_path / "bin" / "fsstress"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\n[ "$1" = netns ] && { echo "netns: unshare(CLONE_NEWNET): Invalid argument" >&2; exit 1; }\n'
                    'echo "stub: $1 not expected" >&2; exit 3\n')
    stub.chmod(0o755)
    checks = _run_scenarios(stub, tmp_path, "stress_netns")
    assert [(c.name, c.status) for c in checks] == [("stress_netns", "skip")]
    assert "no network namespaces" in checks[0].detail
