"""fsbuild/farm.py: distcc / icecream farms for `fsbuild rpm`. Unit tests check the host
list reading, the generated rpmbuild command, spec and mock config; daemon tests start real
distccd (on loopback, or in private network namespaces behind a bridge: the farm's hosts)
and prove from the daemons' own logs that the jobs ran there."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, require_tool

from fsbuild import build, doctor, farm, spec, target
from fsbuild.errors import BuildError

PROBE_FLAGS_OK = ["-O2", "-c"]


# ------------------------------------------------------------------ DISTCC_HOSTS

@pytest.mark.parametrize(("tok", "kind", "host", "port", "limit"), [
    ("localhost", "local", "localhost", 0, 2),
    ("localhost/3", "local", "localhost", 0, 3),
    ("build1", "tcp", "build1", 3632, 4),
    ("10.0.0.7:4000/8", "tcp", "10.0.0.7", 4000, 8),
    ("10.0.0.7/8:4000", "tcp", "10.0.0.7", 4000, 8),      # the old style: LIMIT before PORT
    ("10.0.0.7/6,lzo", "tcp", "10.0.0.7", 3632, 6),
    ("[::1]:3700/2", "tcp", "::1", 3700, 2),
    ("user@big/16:/opt/bin/distccd", "ssh", "big", 0, 16),
    ("@big", "ssh", "big", 0, 4),
])
def test_distcc_host_syntax(tok: str, kind: str, host: str, port: int, limit: int) -> None:
    (h,) = farm.parse_distcc_hosts(tok)
    assert (h.kind, h.host, h.port, h.limit) == (kind, host, port, limit)


def test_global_options_pass_through_and_bad_entries_fail() -> None:
    hosts = farm.parse_distcc_hosts("--randomize localhost a b:3633/1")
    assert [h.host for h in hosts] == ["localhost", "a", "b"]
    for bad in ("", "--randomize", "a:port", "host/0", "[::1", ":3632", "a:99999"):
        with pytest.raises(BuildError):
            farm.parse_distcc_hosts(bad)


@pytest.mark.parametrize("hosts", ["localhost", "a b c", "localhost/1 a/7 b:4000/3,lzo",
                                   "--randomize a/2 [::1]:3700/5", "@ssh1/9 b"])
def test_slots_are_what_distcc_j_says(hosts: str) -> None:
    """-j sized to the farm: the same count distcc itself derives from DISTCC_HOSTS."""
    require_tool("distcc")
    out = subprocess.run(["distcc", "-j"], env={**os.environ, "DISTCC_HOSTS": hosts},
                         capture_output=True, text=True, check=True).stdout
    assert farm.distcc_slots(farm.parse_distcc_hosts(hosts)) == int(out.strip())


# ------------------------------------------------------------------ what the build gets

def _farm(engine: str = "distcc", jobs: int = 6) -> farm.Farm:
    env = {"DISTCC_HOSTS": "a/3 b/3", "DISTCC_FALLBACK": "0"} if engine == "distcc" else {"ICECC_SCHEDULER": "s"}
    return farm.Farm(engine, engine, jobs, env, "test farm")


def test_rpmbuild_command_defines_the_launcher_and_farm_jobs(tmp_path: Path) -> None:
    cmd = build.rpmbuild_command(tmp_path / "k.src.rpm", tmp_path, 2, 1, farm=_farm(jobs=6))
    joined = " ".join(cmd)
    assert "fsbuild_launcher distcc" in joined and "_smp_mflags -j6" in joined
    local = " ".join(build.rpmbuild_command(tmp_path / "k.src.rpm", tmp_path, 2, 1))
    assert "fsbuild_launcher" not in local and "_smp_mflags -j2" in local


def test_build_env_carries_the_engines_variables() -> None:
    env = build.build_env(1, _farm())
    assert env["DISTCC_HOSTS"] == "a/3 b/3" and env["DISTCC_FALLBACK"] == "0"
    assert "DISTCC_HOSTS" not in build.build_env(1) or os.environ.get("DISTCC_HOSTS")


def _spec_make_lines(tmp_path: Path, *defines: str) -> list[str]:
    from test_spec import _inputs
    path = tmp_path / "kernel.spec"
    path.write_text(spec.render(_inputs("linux-6.1", []), "linux-6.1 6.1.192"))
    args = [a for d in defines for a in ("--define", d)]
    out = subprocess.run(["rpmspec", "-P", *args, str(path)], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.startswith(("make ", "  sed -i"))]


def test_spec_make_uses_the_launcher_only_when_defined(tmp_path: Path) -> None:
    """The SRPM's spec names no launcher; the rebuild's --define puts CC= on the compile
    make only (config and install makes, and HOSTCC, stay as they are) and rewrites the
    CC kconfig records back to gcc."""
    require_tool("rpmspec")
    local = _spec_make_lines(tmp_path)
    assert not any("CC=" in line for line in local) and not any("sed" in line for line in local)
    for launcher in ("distcc", "icecc"):
        lines = _spec_make_lines(tmp_path, f"fsbuild_launcher {launcher}")
        with_cc = [line for line in lines if "CC=" in line and line.startswith("make")]
        assert len(with_cc) == 1 and f'CC="{launcher} gcc"' in with_cc[0] and "bzImage modules" in with_cc[0]
        assert "HOSTCC" not in " ".join(lines)
        # distcc names its compiler x86_64-linux-gnu-gcc: the recorded version text stays gcc's
        assert 'CC_VERSION_TEXT="$(LC_ALL=C gcc --version | head -n 1)"' in with_cc[0]
        assert any(f'"$(CC)" "{launcher} gcc"' in line for line in lines)


def test_spec_pins_build_user_host_and_time() -> None:
    from test_spec import _inputs
    text = spec.render(_inputs("linux-6.1", []), "linux-6.1 6.1.192")
    assert "KBUILD_BUILD_HOST=fsbuild.reproducible" in text and "KBUILD_BUILD_USER=fsbuild" in text
    assert re.search(r"KBUILD_BUILD_TIMESTAMP=.*SOURCE_DATE_EPOCH", text)


def test_mock_config_gets_the_farm() -> None:
    for f in (_farm("distcc", 6), _farm("icecc", 9)):
        opts: dict[str, object] = {"macros": {}, "environment": {},
                                   "plugin_conf": {"bind_mount_opts": {"dirs": []}}}
        exec(build.mock_config(target.load("el6"), "file:///v", 2, farm=f), {"config_opts": opts})
        assert opts["macros"] == {"%_smp_mflags": f"-j{f.jobs}", "%fsbuild_launcher": f.engine}
        assert opts["environment"] == f.env
        assert opts["rpmbuild_networking"] is True  # mock cuts the network off by default
        assert opts["chroot_additional_packages"] == farm.CHROOT_PACKAGES[f.engine]
        dirs = opts["plugin_conf"]["bind_mount_opts"]["dirs"]  # type: ignore[index]
        assert bool(dirs) == (f.engine == "icecc")  # the host iceccd's socket
    local: dict[str, object] = {"macros": {}}
    exec(build.mock_config(target.load("el6"), "file:///v", 2), {"config_opts": local})
    assert "rpmbuild_networking" not in str(local["macros"]) and local.get("rpmbuild_networking") is False


def test_farm_is_not_an_input_and_is_checked_before_the_srpm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same inputs hash with or without a farm (a farm build is the same build); an
    unreachable farm stops `fsbuild rpm` before any SRPM or rpmbuild."""
    require_tool("rpmbuild", "distcc")
    import hashlib

    from fsbuild.upstream import Upstream, _Entry, write_deterministic_tar
    tarball = tmp_path / "linux-6.1.192.tar.gz"  # a Makefile is enough for plan and SRPM
    write_deterministic_tar(tarball, "linux-6.1.192", [_Entry(
        "Makefile", "file", data=b"VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION =\n")])
    up = Upstream("linux-6.1", "6.1.192", tarball, "linux-6.1.192", hashlib.sha256(tarball.read_bytes()).hexdigest())

    def _req(**kw: object) -> build.Request:
        return build.Request(target.load("linux-6.1"), **kw)  # type: ignore[arg-type]

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    port = _free_port()
    local, farmed = build.make_plan(_req(), up), build.make_plan(_req(distcc=f"127.0.0.1:{port}"), up)
    assert local.inputs_hash == farmed.inputs_hash
    with pytest.raises(BuildError, match="unreachable"):
        build.build(_req(distcc=f"127.0.0.1:{port}"), up)
    lay = build.out_layout("linux-6.1")
    assert not lay["srpm"].exists() and not lay["topdir"].exists()


# ------------------------------------------------------------------ checks against real daemons

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_dir() -> Path:
    """A directory the daemons' own users can reach (they drop root; pytest's tmp_path is
    under a 0700 directory); removed by the daemon's stop()."""
    d = Path(tempfile.mkdtemp(prefix="fsbuild-farm-test-"))
    d.chmod(0o777)
    return d


def _end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s: a daemon of the test never outlives it."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Distccd:
    """A distccd of the test, with its own log."""

    def __init__(self, listen: str, port: int = farm.DISTCC_PORT, netns: str | None = None,
                 path: str | None = None) -> None:
        self.dir = daemon_dir()
        self.log = self.dir / "distccd.log"
        self.keep: Path | None = None
        self.addr = f"{listen}:{port}"
        allow = "127.0.0.1" if listen == "127.0.0.1" else "10.97.0.0/24"
        cmd = ["distccd", "--daemon", "--no-detach", "--listen", listen, "--port", str(port),
               "--allow", allow, "--jobs", "2", "--log-file", str(self.log), "--verbose"]
        env = dict(os.environ)
        if path:
            env["DISTCCD_PATH"] = path
        argv = ["ip", "netns", "exec", netns, *cmd] if netns else cmd
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(listen, port)

    def jobs(self) -> list[str]:
        """The compile jobs this daemon ran (distccd's per-job summary lines)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return re.findall(r"COMPILE_OK .* (\S+\.c)$", text, re.M)

    def stop(self) -> None:
        _end(self.proc)
        for d in (self.dir, self.keep):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)


def _wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {host}:{port} after {timeout} s")


@pytest.fixture
def loopback_distccd(tmp_path: Path, servers: list[Distccd]) -> Distccd:
    require_tool("distccd", "distcc", "gcc")
    d = Distccd("127.0.0.1", _free_port())
    servers.append(d)
    return d


def test_reachable_farm_with_the_same_compiler_passes_and_ran_the_probe(loopback_distccd: Distccd) -> None:
    f = farm.resolve(f"{loopback_distccd.addr}/3", False)
    assert f is not None and f.jobs == 3 and f.cc == "distcc gcc"
    assert f.env["DISTCC_FALLBACK"] == "0"  # no silent local compile of a failed job
    assert loopback_distccd.jobs() == ["fsbuild_probe.c"]  # the probe ran on the farm host


def test_unreachable_host_is_one_line_error_unless_fallback(capsys: pytest.CaptureFixture[str]) -> None:
    require_tool("distcc")
    port = _free_port()  # nothing listens there
    with pytest.raises(BuildError, match=rf"^farm: distcc host 127\.0\.0\.1:{port} unreachable "
                                         r"\(Connection refused\); .*--farm-fallback") as exc:
        farm.resolve(f"127.0.0.1:{port}", False)
    assert "\n" not in exc.value.message
    assert farm.resolve(f"127.0.0.1:{port}", False, fallback=True) is None
    assert "building locally (--farm-fallback)" in " ".join(capsys.readouterr().err.split())


def test_host_with_a_different_compiler_is_refused(tmp_path: Path, servers: list[Distccd]) -> None:
    """A farm host whose gcc is another build (here: another .comment identity, as another
    distribution's gcc would have) must stop the build before make starts."""
    require_tool("distccd", "distcc", "gcc", "objcopy")
    where = daemon_dir()
    fake = where / "otherbin"
    fake.mkdir()
    ident = where / "ident"
    ident.write_bytes(b"GCC: (Other 4.4.7-23) 4.4.7\x00")
    real = shutil.which("x86_64-linux-gnu-gcc") or shutil.which("gcc")
    wrapper = (f"#!/bin/sh\n{real} \"$@\" || exit $?\n"
               "for a; do case $prev in -o) out=$a;; esac; prev=$a; done\n"
               f"[ -n \"$out\" ] && objcopy --update-section .comment={ident} \"$out\"\n")
    for name in ("gcc", "x86_64-linux-gnu-gcc"):
        (fake / name).write_text(wrapper)
        (fake / name).chmod(0o755)
    d = Distccd("127.0.0.1", _free_port(), path=f"{fake}:/usr/bin:/bin")
    servers.append(d)
    d.keep = where  # removed with the daemon
    with pytest.raises(BuildError, match=r"compiles with a different compiler \(GCC: \(Other 4\.4\.7-23\) "
                                         r"4\.4\.7, local: GCC: \(Debian"):
        farm.resolve(d.addr, False)


def test_both_engines_at_once_is_refused() -> None:
    with pytest.raises(BuildError, match="choose one"):
        farm.resolve("a", True)


def test_rpm_cli_has_the_farm_flags() -> None:
    out = subprocess.run([sys.executable, "-m", "fsbuild", "rpm", "--help"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    assert "--distcc HOSTS" in out and "--icecc" in out and "--farm-fallback" in out


# ------------------------------------------------------------------ icecream bits

LISTCS = """200-ICECC 1.4.0: 12s uptime, 3 hosts, 0 jobs in queue (0 total).
200 Use 'help' for help and 'quit' to quit.
 farm2 (10.97.0.22:10245) [x86_64] speed=0.00 jobs=0/2 load=907
 big (10.97.0.24:10245) [x86_64] speed=12.50 jobs=3/16 load=120
 client (10.97.0.23:0) [x86_64] speed=0.00 jobs=0/0 load=907
200 done
"""


def test_listcs_and_scheduler_address() -> None:
    hosts = farm.parse_listcs(LISTCS)
    assert [(h.name, h.max_jobs) for h in hosts] == [("farm2", 2), ("big", 16), ("client", 0)]
    assert farm.scheduler_address("sched") == ("sched", 8765)
    assert farm.scheduler_address("sched:9000") == ("sched", 9000)
    assert farm.scheduler_address(None) is None


def test_icecc_without_local_daemon_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("icecc")
    monkeypatch.setenv("ICECC_TEST_SOCKET", str(tmp_path / "none.sock"))
    with pytest.raises(BuildError, match=r"^farm: no local iceccd at .*none\.sock"):
        farm.resolve(None, True)


# ------------------------------------------------------------------ doctor

def test_doctor_reports_the_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTCC_HOSTS", "a/3 b")
    monkeypatch.delenv("ICECC_SCHEDULER", raising=False)
    monkeypatch.setenv("ICECC_TEST_SOCKET", "/nonexistent/iceccd.socket")  # no broadcast from a test
    names = {t.name: t for t in doctor.TOOLS}
    for tool in ("distcc", "icecc"):
        assert names[tool].optional and "rpm --distcc" in " ".join(names["distcc"].needed_by)
    lines = doctor.engine_lines()
    assert any(line.startswith("distcc") and "DISTCC_HOSTS=a/3 b" in line and "7 slots" in line
               for line in lines), lines
    assert any(line.startswith("icecc") for line in lines), lines


# ------------------------------------------------------------------ a real farm in namespaces

class Farmnet:
    """Hosts of a test farm: network namespaces on one bridge (10.97.0.0/24) with this
    host at .1; everything is removed at teardown."""

    def __init__(self) -> None:
        self.tag = f"fsbf{os.getpid() % 100000}"
        self.bridge = f"{self.tag}br"
        self.netns: list[str] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", "10.97.0.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def host(self, n: int) -> tuple[str, str]:
        ns, veth = f"{self.tag}-{n}", f"{self.tag}v{n}"
        addr = f"10.97.0.{n}"
        _ip("netns", "add", ns)
        self.netns.append(ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        for cmd in (["addr", "add", f"{addr}/24", "brd", "10.97.0.255", "dev", "eth0"],
                    ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
            _ip("-n", ns, *cmd)
        return ns, addr

    def stop(self) -> None:
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def farmnet(servers: list[object]) -> Iterator[Farmnet]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces for the farm's hosts need root")
    require_tool("ip", "distccd", "distcc")
    net = Farmnet()
    try:
        yield net
    finally:
        for s in reversed(servers):  # daemons first, then their namespaces
            s.stop()  # type: ignore[attr-defined]
        servers.clear()
        net.stop()


@pytest.mark.slow
def test_module_through_a_distcc_farm_is_bit_identical(farmnet: Farmnet, servers: list[Distccd],
                                                       linux61_kernel_devel: Path, tmp_path: Path) -> None:
    """fastsocket.ko built against the pipeline's kernel-devel through two distccd hosts in
    their own namespaces equals the local build byte for byte; the daemons' logs show the
    compile jobs ran on them."""
    daemons = []
    for n in (11, 12):
        ns, addr = farmnet.host(n)
        daemons.append(Distccd(addr, netns=ns))
    servers.extend(daemons)
    f = farm.resolve(" ".join(f"{d.addr}/1" for d in daemons), False)
    assert f is not None and f.jobs == 2
    kos = _module_local_and_farm(f, linux61_kernel_devel, tmp_path)
    assert kos["farm"] == kos["local"]
    ran = [job for d in daemons for job in d.jobs() if job != "fsbuild_probe.c"]
    assert "fastsocket_main.c" in " ".join(ran), ran
    assert all(d.jobs() for d in daemons)  # every host of the farm compiled


def _module_local_and_farm(f: farm.Farm, kdir: Path, tmp_path: Path) -> dict[str, bytes]:
    """fastsocket.ko built locally and through the farm, from one source directory (WARN_ON/BUG
    records carry the source path, so two directories would differ for that alone)."""
    src = tmp_path / "module"
    shutil.copytree(ROOT / "module", src, ignore=shutil.ignore_patterns("tests"))
    kos = {}
    for label, cc in (("local", []), ("farm", [f"CC={f.cc}"])):
        env = {**os.environ, **(f.env if cc else {}), "LC_ALL": "C"}
        make = ["make", "-C", str(kdir), f"M={src}", *cc]
        subprocess.run([*make, "clean"], env=env, check=True, capture_output=True)
        subprocess.run([*make, f"-j{f.jobs}", "modules"], env=env, check=True, capture_output=True)
        kos[label] = (src / "fastsocket.ko").read_bytes()
    return kos


class Daemon:
    """A daemon started in a test namespace; stop() ends it (and its directory)."""

    def __init__(self, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.dir = workdir
        self.proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        _end(self.proc)


def _wait_listcs(host: str, name: str, timeout: float = 45.0) -> str:
    """The scheduler's listcs once `name` has joined (daemons retry every few seconds)."""
    end = time.monotonic() + timeout
    text = ""
    while time.monotonic() < end:
        try:
            text = farm.query_scheduler(host)
        except BuildError:
            text = ""
        if any(h.name == name for h in farm.parse_listcs(text)):
            return text
        time.sleep(1)
    raise AssertionError(f"{name} never joined the scheduler on {host}: {text!r}")


@pytest.mark.slow
def test_module_through_an_icecream_farm_is_bit_identical(farmnet: Farmnet, servers: list[object],
                                                          linux61_kernel_devel: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """icecc-scheduler and a compile server in their own namespaces, the local iceccd in a
    third: fsbuild finds the scheduler by broadcast (on the test bridge only), sizes -j from
    its listcs, and fastsocket.ko compiled through the farm equals the local build; the
    compile server's log shows the remote compilations.

    The compile server stands for another, idle machine: its /proc/loadavg and /proc/stat
    are frozen idle copies (a private mount namespace), since icecream gives no job to a host
    whose load reads full, which this machine's (shared with every other build) does."""
    require_tool("icecc", "iceccd", "icecc-scheduler", "unshare")
    work = daemon_dir()
    (sched_ns, sched), (cs_ns, _), (cl_ns, _) = farmnet.host(21), farmnet.host(22), farmnet.host(23)
    servers.append(Daemon(["ip", "netns", "exec", sched_ns, "icecc-scheduler", "-l", str(work / "sched.log"), "-vv"],
                          work))
    (work / "loadavg").write_text("0.00 0.00 0.00 1/100 1\n")
    shutil.copyfile("/proc/stat", work / "stat")
    idle = (f"mount --bind {work}/loadavg /proc/loadavg && mount --bind {work}/stat /proc/stat && "
            f"exec iceccd -s {sched} -m 2 -l {work}/cs.log -vv -b {work}/env-cs -N farmcs")
    servers.append(Daemon(["ip", "netns", "exec", cs_ns, "unshare", "-m", "sh", "-c", idle], work,
                          {"ICECC_TEST_SOCKET": str(work / "cs.sock")}))
    local_sock = work / "local.sock"
    servers.append(Daemon(["ip", "netns", "exec", cl_ns, "iceccd", "-s", sched, "-m", "0", "--no-remote",
                           "-l", str(work / "local.log"), "-vv", "-b", str(work / "env-local"), "-N", "client"],
                          work, {"ICECC_TEST_SOCKET": str(local_sock)}))
    _wait_listcs(sched, "farmcs")
    _wait_listcs(sched, "client")
    assert farm.discover_scheduler(["10.97.0.255"]) == sched
    monkeypatch.setenv("ICECC_TEST_SOCKET", str(local_sock))
    monkeypatch.delenv("ICECC_SCHEDULER", raising=False)
    try:
        f = farm.icecc_farm(scheduler=sched)
        assert f.jobs == 2 and f.cc == "icecc gcc" and f.env["ICECC_TEST_SOCKET"] == str(local_sock)
        probe_jobs = _remote_jobs(work)
        assert probe_jobs >= 1  # the probe compiled on the farm
        kos = _module_local_and_farm(f, linux61_kernel_devel, tmp_path)
        assert kos["farm"] == kos["local"]
        assert _remote_jobs(work) >= probe_jobs + 2  # fastsocket_main.c, the backend, the .mod.c
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remote_jobs(work: Path) -> int:
    """Compilations the compile server ran for others (its own log)."""
    log = work / "cs.log"
    return log.read_text(errors="replace").count("Remote compilation completed with exit code 0") if log.exists() else 0


# The header fields of `rpm -qp --dump` that say what a package installs: path, size, digest,
# mode, owner, group, config/doc flags, rdev, link target (the mtime is the build's).
_DUMP_FIELDS = (0, 1, 3, 4, 5, 6, 7, 8, 9, 10)


def _dump(rpm: Path) -> dict[str, tuple[str, ...]]:
    out = subprocess.run(["rpm", "-qp", "--dump", str(rpm)], check=True, capture_output=True, text=True)
    rows = [line.split(" ") for line in out.stdout.splitlines() if line]
    return {r[0]: tuple(r[i] for i in _DUMP_FIELDS) for r in rows}


def _package_key(rpm: Path) -> str:
    """kernel / kernel-devel / kernel-firmware: the name without version and arch."""
    return re.sub(r"-\d.*$", "", rpm.name)


@pytest.mark.slow
def test_kernel_rpms_through_a_distcc_farm_install_what_the_local_build_does(
        farmnet: Farmnet, servers: list[object], linux61_rpms: Path, tmp_path: Path) -> None:
    """Issue 13: RPM contents must not depend on where objects were compiled. The linux-6.1
    mini kernel built through two distccd hosts (own namespaces) gives the same packages as
    the pipeline's local build: `rpm -qp --dump` equal in every file's path, size, digest,
    mode, owner and flags (build host, user and time are pinned by the spec), and the
    daemons' logs show that they compiled the kernel."""
    daemons = []
    for n in (31, 32):
        ns, addr = farmnet.host(n)
        daemons.append(Distccd(addr, netns=ns))
    servers.extend(daemons)
    hosts = " ".join(f"{d.addr}/2" for d in daemons)
    env = {**os.environ, "FSBUILD_OUT": str(tmp_path / "out"), "FSBUILD_STATE": str(ROOT / ".fsbuild")}
    proc = subprocess.run([sys.executable, "-m", "fsbuild", "rpm", "--target", "linux-6.1", "--config",
                           "mini", "--distcc", hosts, "--force"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = {_package_key(p): p for p in linux61_rpms.glob("kernel*.rpm") if ".src." not in p.name}
    farmed = {_package_key(p): p for p in (tmp_path / "out" / "linux-6.1" / "rpms").glob("kernel*.rpm")
              if ".src." not in p.name}
    assert sorted(farmed) == sorted(local) and len(local) == 3, (local, farmed)
    for name, rpm in local.items():
        want, got = _dump(rpm), _dump(farmed[name])
        assert sorted(got) == sorted(want), f"{name}: file lists differ"
        differ = sorted(path for path in want if got[path] != want[path])
        assert not differ, f"{name}: {len(differ)} file(s) differ, first: {differ[:5]}"
    remote = [job for d in daemons for job in d.jobs() if job != "fsbuild_probe.c"]
    assert len(remote) > 500 and all(d.jobs() for d in daemons), len(remote)
