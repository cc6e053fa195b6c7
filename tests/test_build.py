"""fsbuild rpm: config choice, input hashing, deterministic module tarball, reproducible
SRPM, mock config/command line, incremental no-op; slow: a real linux-6.1 mini build."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, require_tool

from fsbuild import build, spec, target
from fsbuild.errors import MissingFileError, TargetError, ToolMissingError
from fsbuild.upstream import Upstream, _Entry, write_deterministic_tar


@pytest.fixture()
def tiny_upstream(tmp_path: Path) -> Upstream:
    """A small 'kernel' tarball: enough for spec rendering and rpmbuild -bs."""
    tarball = tmp_path / "up" / "linux-6.1.192.tar.gz"
    tarball.parent.mkdir()
    mk = b"VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION =\n"
    write_deterministic_tar(tarball, "linux-6.1.192", [_Entry("Makefile", "file", data=mk)])
    import hashlib
    return Upstream("linux-6.1", "6.1.192", tarball, "linux-6.1.192",
                    hashlib.sha256(tarball.read_bytes()).hexdigest())


def _req(**kw: object) -> build.Request:
    return build.Request(target.load(str(kw.pop("target", "linux-6.1"))), **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ configs / release

def test_config_choices_linux61(tmp_path: Path) -> None:
    t = target.load("linux-6.1")
    mini = build.choose_config(t, "mini", {})
    assert mini.base_make == "tinyconfig" and b"CONFIG_FASTSOCKET=m" in mini.fragment
    full = build.choose_config(t, "full", {})
    assert (full.base_make, full.base_file) == ("defconfig", None)
    mine = tmp_path / "my.config"
    mine.write_text("CONFIG_SMP=y\n")
    own = build.choose_config(t, str(mine), {})
    assert own.base_file == mine.resolve() and own.fragment.startswith(b"CONFIG_SMP=y\n")
    with pytest.raises(MissingFileError):
        build.choose_config(t, str(tmp_path / "absent.config"), {})


@pytest.mark.parametrize("name", ["linux-6.1", "el6"])
def test_every_profile_builds_fastsocket(name: str, tmp_path: Path) -> None:
    # A full build without it compiled for an hour and shipped no fastsocket.ko; a user's
    # config that turns it off gets it back (the package is a Fastsocket kernel).
    t = target.load(name)
    mine = tmp_path / "my.config"
    mine.write_text("CONFIG_SMP=y\n# CONFIG_FASTSOCKET is not set\n")
    for profile in ("mini", "debug", "full", str(mine)):
        frag = build.choose_config(t, profile, {}).fragment
        assert re.findall(rb"^(?:# )?CONFIG_FASTSOCKET\b.*$", frag, re.M) == [b"CONFIG_FASTSOCKET=m"], profile


def test_el6_full_drops_the_duplicate_winbond_cir_module() -> None:
    # Two modules named winbond-cir: kbuild links one, modules.order lists both.
    frag = build.choose_config(target.load("el6"), "full", {}).fragment
    assert b"# CONFIG_INPUT_WINBOND_CIR is not set" in frag and b"CONFIG_IR_WINBOND_CIR" not in frag


def test_config_choices_el6_prefer_srpm_config(tmp_path: Path) -> None:
    t = target.load("el6")
    srpm_cfg = tmp_path / "config-2.6.32-x86_64"
    srpm_cfg.write_text("CONFIG_X86_64=y\n")
    full = build.choose_config(t, "full", {"config-2.6.32-x86_64": srpm_cfg})
    assert full.base_file == srpm_cfg and full.base_make is None
    # No SRPM configs (tarball/dir/git source): the tree's RHEL defconfig via make.
    assert build.choose_config(t, "full", {}).base_make == "x86_64_defconfig"
    mini = build.choose_config(t, "mini", {})
    assert mini.base_make == "x86_64_defconfig" and b"CONFIG_FASTSOCKET=m" in mini.fragment


@pytest.mark.parametrize("name", ["linux-6.1", "el6"])
def test_debug_config_is_mini_plus_the_debug_fragment(name: str) -> None:
    t = target.load(name)
    mini = build.choose_config(t, "mini", {})
    debug = build.choose_config(t, "debug", {})
    assert debug.label == "debug" and (debug.base_make, debug.base_file) == (mini.base_make, mini.base_file)
    assert b"CONFIG_FASTSOCKET=m" in debug.fragment and b"CONFIG_PROVE_LOCKING=y" in debug.fragment
    assert b"CONFIG_DEBUG_LIST=y" in debug.fragment and b"CONFIG_DEBUG_OBJECTS=y" in debug.fragment
    wanted = {"linux-6.1": [b"CONFIG_KASAN_INLINE=y", b"CONFIG_KFENCE=y", b"CONFIG_PROVE_RCU_LIST=y",
                            b"CONFIG_DEBUG_ATOMIC_SLEEP=y", b"CONFIG_SLUB_DEBUG_ON=y"],
              "el6": [b"CONFIG_DEBUG_SPINLOCK_SLEEP=y", b"CONFIG_DEBUG_SLAB=y", b"CONFIG_DEBUG_KMEMLEAK=y"]}[name]
    assert all(w in debug.fragment for w in wanted)


def test_debug_fragment_overrides_mini_once() -> None:
    # The config check reads a symbol's first line, kconfig its last: one line per symbol.
    merged = build.overlay_fragment(b"# c\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=m\n",
                                    b"CONFIG_B=y\n# CONFIG_C is not set\n")
    assert merged == b"# c\nCONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n"


def test_debug_outputs_never_replace_production(tiny_upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")

    def fake_srpm(plan: build.Plan, srcdir: Path, srpm_dir: Path, log: Path) -> Path:
        srpm_dir.mkdir(parents=True, exist_ok=True)
        (srpm_dir / "k.src.rpm").write_text("srpm")
        return srpm_dir / "k.src.rpm"

    def fake_builder(plan: build.Plan, srpm: Path, lay: dict[str, Path],
                     phases: dict[str, float]) -> list[Path]:
        built = lay["out"] / f"kernel-{plan.release}.rpm"
        built.write_text(plan.config.label)
        return build._collect([built], lay["rpms"])

    monkeypatch.setattr(build, "make_srpm", fake_srpm)
    monkeypatch.setattr(build, "_run_builder", fake_builder)
    prod = build.build(_req(), tiny_upstream)
    debug = build.build(_req(config="debug"), tiny_upstream)
    assert debug.kver.endswith(".fastsocket.debug.x86_64") and not prod.kver.endswith(".debug.x86_64")
    out = build.paths.out_dir("linux-6.1")
    assert [p.parent for p in debug.rpms] == [out / "debug" / "rpms"]
    assert [p.parent for p in prod.rpms] == [out / "rpms"] and all(p.is_file() for p in prod.rpms)
    assert (out / "debug" / "build.json").is_file() and (out / "build.json").is_file()
    assert build.build(_req(), tiny_upstream).cached  # the debug build left production's no-op intact


def test_release_suffix_default_and_validation() -> None:
    t = target.load("linux-6.1")
    assert build.release_suffix(t, None) == ".fastsocket"
    assert build.release_suffix(t, "") == ""
    with pytest.raises(TargetError):
        build.release_suffix(t, "-bad")
    assert build.split_version(t, "6.1.192") == ("6.1.192", "2")
    assert build.split_version(target.load("el6"), "2.6.32-431.17.1.el6") == ("2.6.32", "431.17.1.el6")


def test_hostcc_series_only_with_rpmbuild() -> None:
    t = target.load("el6")
    host = build.series_for(t, "rpmbuild")
    chroot = build.series_for(t, "mock")
    assert {p.origin for p in chroot} <= {"fastsocket"}
    assert [p.origin for p in host[:len(host) - len(chroot)]] == ["hostcc"] * (len(host) - len(chroot))
    if t.hostcc_series and t.hostcc_series.exists() and build.spec.read_series(t.hostcc_series, "hostcc"):
        assert len(host) > len(chroot)


# ------------------------------------------------------------------ module tarball / hashing

def test_module_tarball_deterministic_and_clean(tmp_path: Path) -> None:
    mod = tmp_path / "module"
    (mod / "sub").mkdir(parents=True)
    (mod / "Kconfig").write_text("config FASTSOCKET\n")
    (mod / "fastsocket.c").write_text("int x;\n")
    (mod / "sub" / "h.h").write_text("\n")
    for junk in ("fastsocket.o", "fastsocket.ko", ".fastsocket.o.cmd", "modules.order", "Module.symvers"):
        (mod / junk).write_text("junk")
    a = build.module_tarball(mod, 1_700_000_000)
    os.utime(mod / "fastsocket.c", (1, 1))
    b = build.module_tarball(mod, 1_700_000_000)
    assert a == b
    with tarfile.open(fileobj=io.BytesIO(a)) as tf:
        names = tf.getnames()
        assert {m.mtime for m in tf.getmembers()} == {1_700_000_000}
    assert names == ["Kconfig", "fastsocket.c", "sub", "sub/h.h"]
    (mod / "fastsocket.c").write_text("int y;\n")
    assert build.module_tarball(mod, 1_700_000_000) != a


def test_inputs_hash_tracks_every_input(tiny_upstream: Upstream, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    base = build.make_plan(_req(), tiny_upstream).inputs_hash
    assert build.make_plan(_req(jobs=7), tiny_upstream).inputs_hash == base  # -j is not an input
    assert build.make_plan(_req(config="full"), tiny_upstream).inputs_hash != base
    assert build.make_plan(_req(release_suffix=".x"), tiny_upstream).inputs_hash != base
    assert build.make_plan(_req(allow_missing_firmware=True), tiny_upstream).inputs_hash != base
    other = Upstream(**{**tiny_upstream.__dict__, "digest": "0" * 64})
    assert build.make_plan(_req(), other).inputs_hash != base
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000001")
    assert build.make_plan(_req(), tiny_upstream).inputs_hash != base


def test_inputs_hash_tracks_patch_content(tiny_upstream: Upstream, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _scratch_repo(tmp_path, monkeypatch)
    p = repo / "patches" / "linux-6.1" / "0001-x.patch"
    p.write_text("x: one\n--- a/Makefile\n+++ b/Makefile\n@@ -1 +1 @@\n-a\n+b\n")
    (repo / "patches" / "linux-6.1" / "series").write_text("0001-x.patch\n")
    one = build.make_plan(_req(), tiny_upstream)
    assert [sp.name for sp in one.series] == ["0001-x.patch"]
    p.write_text(p.read_text().replace("+b", "+c"))
    assert build.make_plan(_req(), tiny_upstream).inputs_hash != one.inputs_hash


def _scratch_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the repo's inputs (patches, specs, module, configs) under FSBUILD_ROOT."""
    repo = tmp_path / "repo"
    for d in ("patches", "specs", "module", "ci/configs"):
        shutil.copytree(ROOT / d, repo / d, ignore=shutil.ignore_patterns("*.o", "*.ko", ".*.cmd"))
    monkeypatch.setenv("FSBUILD_ROOT", str(repo))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    return repo


# ------------------------------------------------------------------ SRPM

def test_srpm_reproducible_and_self_contained(tiny_upstream: Upstream, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("rpmbuild", "rpm")
    repo = _scratch_repo(tmp_path, monkeypatch)
    (repo / "patches" / "linux-6.1" / "0001-x.patch").write_text(
        "Subject: [PATCH] net: wire fastsocket\n---\n--- a/Makefile\n+++ b/Makefile\n@@ -1 +1 @@\n-a\n+b\n")
    (repo / "patches" / "linux-6.1" / "series").write_text("0001-x.patch\n")
    plan = build.make_plan(_req(), tiny_upstream)
    log = tmp_path / "log"
    a = build.make_srpm(plan, tmp_path / "s1", tmp_path / "o1", log)
    time.sleep(1.1)  # a wall-clock leak (buildtime, mtimes) would show now
    b = build.make_srpm(plan, tmp_path / "s2", tmp_path / "o2", log)
    assert a.name == "kernel-6.1.192-2.fastsocket.src.rpm"
    assert a.read_bytes() == b.read_bytes()
    files = subprocess.run(["rpm", "-qpl", str(a)], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(files) == sorted(["0001-x.patch", "config-check.sh", "fastsocket-module.tar.gz",
                                    "firmware-check.sh", "fsbuild-fragment.config", "kernel.spec",
                                    "linux-6.1.192.tar.gz"])
    # Source0 is the pristine tarball, byte for byte.
    extract = tmp_path / "x"
    extract.mkdir()
    subprocess.run(f"rpm2cpio {a} | cpio -idm --quiet linux-6.1.192.tar.gz", shell=True, cwd=extract, check=True)
    assert (extract / "linux-6.1.192.tar.gz").read_bytes() == tiny_upstream.tarball.read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700086400")
    c = build.make_srpm(build.make_plan(_req(), tiny_upstream), tmp_path / "s3", tmp_path / "o3", log)
    assert c.read_bytes() != a.read_bytes()


# ------------------------------------------------------------------ mock

def test_mock_config_and_command_line(tmp_path: Path) -> None:
    t = target.load("el6")
    url = "file:///srv/centos-vault/6.10"
    cfg = build.mock_config(t, url, 2)
    opts: dict[str, object] = {"macros": {}}
    exec(cfg, {"config_opts": opts})  # mock configs are Python: it must at least run
    assert opts["root"] == "fsbuild-el6-x86_64" and opts["releasever"] == "6"
    assert "plugin_conf" not in opts  # tmpfs_mb=0: no tmpfs plugin
    assert opts["macros"] == {"%_smp_mflags": "-j2"}
    repo_conf = str(opts["yum.conf"])
    assert f"baseurl={url}/os/x86_64/" in repo_conf and f"baseurl={url}/updates/x86_64/" in repo_conf
    assert "vault.centos.org" not in cfg  # the URL given wins over the target default
    assert build.mock_command(tmp_path / "m.cfg", tmp_path / "k.src.rpm", tmp_path / "res") == [
        "mock", "-r", str(tmp_path / "m.cfg"), "--rebuild", str(tmp_path / "k.src.rpm"),
        "--resultdir", str(tmp_path / "res")]
    with pytest.raises(TargetError):
        build.mock_config(target.load("linux-6.1"), url, 2)


def test_mock_config_enables_the_tmpfs_plugin_with_the_tree_size() -> None:
    opts: dict[str, object] = {"macros": {}, "plugin_conf": {}}
    exec(build.mock_config(target.load("el6"), "file:///v", 2, tmpfs_mb=3000), {"config_opts": opts})
    plugin = opts["plugin_conf"]
    assert plugin["tmpfs_enable"] is True  # type: ignore[index]
    # the el6 chroot itself lives there too: 2 GiB on top of the build tree
    assert plugin["tmpfs_opts"]["required_ram_mb"] == 5048  # type: ignore[index]
    assert plugin["tmpfs_opts"]["max_fs_size"] == "5048m"  # type: ignore[index]


def test_mock_baseurl_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    t = target.load("el6")
    monkeypatch.setenv("FSBUILD_MOCK_BASEURL", "http://127.0.0.1:8080/vault/")
    assert build.mock_baseurl(t, None) == "http://127.0.0.1:8080/vault"
    assert build.mock_baseurl(t, "file:///m") == "file:///m"


def test_mock_missing_is_tool_missing_exit_9(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path))  # no mock (nor anything else) on PATH
    out = subprocess.run([sys.executable, "-m", "fsbuild", "rpm", "--target", "el6", "--builder", "mock"],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == ToolMissingError.exit_code
    assert out.stderr.startswith("fsbuild: error: mock not found") and len(out.stderr.splitlines()) == 1


# ------------------------------------------------------------------ build tree in RAM

def test_tmpfs_dir_only_a_mounted_tmpfs_with_room(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    expect = shm if str(shm) in build._tmpfs_mounts() and os.access(shm, os.W_OK) else None
    assert build.tmpfs_dir(1, (shm,)) == expect
    assert build.tmpfs_dir(1 << 60, (shm,)) is None      # no RAM that large
    assert build.tmpfs_dir(1, (tmp_path,)) is None or str(tmp_path) in build._tmpfs_mounts()


def test_choose_scratch_honours_tmpfs_flag(tiny_upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsbuild.errors import BuildError
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert build.choose_scratch(build.make_plan(_req(tmpfs=False), tiny_upstream)) is None
    monkeypatch.setattr(build, "tree_bytes_needed", lambda plan: 1 << 60)
    assert build.choose_scratch(build.make_plan(_req(), tiny_upstream)) is None  # auto: the disk
    with pytest.raises(BuildError, match="--tmpfs: no tmpfs"):
        build.choose_scratch(build.make_plan(_req(tmpfs=True), tiny_upstream))


def test_ram_scratch_reaps_dirs_of_dead_runs_only(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live, foreign = (tmp_path / "fsbuild-el6-old", tmp_path / "fsbuild-el6-live", tmp_path / "fsbuild-x")
    for d, pid in ((stale, dead.pid), (live, os.getpid())):
        d.mkdir()
        (d / "fsbuild.pid").write_text(str(pid))
    foreign.mkdir()
    new = build._ram_scratch(tmp_path, "linux-6.1")
    assert not stale.exists() and live.exists() and foreign.exists()
    assert new.name.startswith("fsbuild-linux-6.1-") and (new / "fsbuild.pid").read_text() == str(os.getpid())


def test_full_tmpfs_says_rerun_with_no_tmpfs(tiny_upstream: Upstream, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from fsbuild.errors import BuildError
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setattr(build, "choose_scratch", lambda plan: tmp_path)
    enospc = ["sh", "-c", "echo 'cc1: fatal error: .tmp_foo.o: No space left on device'; exit 1"]
    monkeypatch.setattr(build, "rpmbuild_command", lambda *a: enospc)
    lay = build.out_layout("linux-6.1")
    lay["out"].mkdir(parents=True, exist_ok=True)
    lay["log"].write_text("")
    with pytest.raises(BuildError, match="ran out of space .* rerun with --no-tmpfs"):
        build._run_rpmbuild(build.make_plan(_req(), tiny_upstream), tmp_path / "k.src.rpm", lay, {})
    assert not list(tmp_path.glob("fsbuild-*"))  # the RAM is given back


def test_rpmbuild_command_puts_tree_and_buildroot_in_scratch(tmp_path: Path) -> None:
    cmd = build.rpmbuild_command(tmp_path / "k.src.rpm", tmp_path / "top", 2, 1700000000, Path("/dev/shm/x"))
    assert "_builddir /dev/shm/x/BUILD" in cmd and "_buildrootdir /dev/shm/x/BUILDROOT" in cmd
    assert "_topdir " + str(tmp_path / "top") in cmd  # RPMS/ stay under out/
    assert not any("_builddir" in c for c in build.rpmbuild_command(tmp_path / "k", tmp_path, 2, 1))


# ------------------------------------------------------------------ %prep, phases

def _compress(tar: Path, suffix: str) -> Path:
    tool = {"xz": ["xz", "-T2", "--block-size=4096"], "bz2": ["bzip2"], "gz": ["gzip", "-n"]}[suffix]
    subprocess.run([*tool, "-k", "-f", str(tar)], check=True)
    return tar.with_name(f"{tar.name}.{suffix}")


@pytest.mark.parametrize("suffix", ["xz", "bz2", "gz"])
def test_prep_unpacks_each_compression_and_names_a_corrupt_tarball(
        suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """%prep's parallel-decompressor unpack: the tree appears, patched and versioned; a
    truncated tarball stops it with one `fsbuild:` line naming the file."""
    require_tool("rpmbuild", {"xz": "xz", "bz2": "bzip2", "gz": "gzip"}[suffix])
    import hashlib
    repo = _scratch_repo(tmp_path, monkeypatch)
    (repo / "patches" / "linux-6.1" / "series").write_text("")
    mk = b"VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION =\n" + b"# filler\n" * 20000
    tar = tmp_path / "up" / "linux-6.1.192.tar"
    tar.parent.mkdir()
    write_deterministic_tar(tar.with_suffix(".tgz"), "linux-6.1.192", [_Entry("Makefile", "file", data=mk)])
    tar.write_bytes(gzip.decompress(tar.with_suffix(".tgz").read_bytes()))  # plain tar
    packed = _compress(tar, suffix)

    def prep(tarball: Path) -> subprocess.CompletedProcess[str]:
        up = Upstream("linux-6.1", "6.1.192", tarball, "linux-6.1.192",
                      hashlib.sha256(tarball.read_bytes()).hexdigest())
        plan = build.make_plan(_req(), up)
        src = tmp_path / "src"
        spec_path = build.write_sources(plan, src)
        top = tmp_path / "top"
        shutil.rmtree(top, ignore_errors=True)
        return subprocess.run(["rpmbuild", "-bp", "--nodeps", "--define", f"_topdir {top}",
                               "--define", f"_sourcedir {src}", str(spec_path)],
                              capture_output=True, text=True)

    ok = prep(packed)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    tree = tmp_path / "top" / "BUILD" / "linux-6.1.192"
    assert (tree / "Makefile").read_bytes().startswith(
        b"VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION = -2.fastsocket.x86_64\n")
    assert (tree / "net" / "fastsocket" / "fastsocket_main.c").is_file()

    broken = tmp_path / "broken" / packed.name
    broken.parent.mkdir()
    broken.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    bad = prep(broken)
    assert bad.returncode != 0
    assert f"fsbuild: cannot decompress {tmp_path}/src/{packed.name}" in bad.stderr


def test_run_logged_times_each_phase(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    script = ("echo 'Executing(%prep)'; sleep 1.2; echo 'Executing(%build)'; sleep 1.2; "
              "echo 'fsbuild-phase: make'; sleep 1.2; echo 'Wrote: x'")
    start = time.monotonic()
    phases = build.run_logged(["sh", "-c", script], log, dict(os.environ), "t")
    total = time.monotonic() - start
    assert list(phases) == ["start", "prep", "config", "make", "write"]
    assert min(phases["prep"], phases["config"], phases["make"]) >= 0.9  # 0.25 s polling
    assert sum(phases.values()) <= total + 0.1
    assert "Executing(%build)" in log.read_text()


# ------------------------------------------------------------------ incremental

def test_unchanged_inputs_are_a_noop(tiny_upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    calls: list[str] = []

    def fake_srpm(plan: build.Plan, srcdir: Path, srpm_dir: Path, log: Path) -> Path:
        srpm_dir.mkdir(parents=True, exist_ok=True)
        (srpm_dir / "k.src.rpm").write_text("srpm")
        return srpm_dir / "k.src.rpm"

    def fake_builder(plan: build.Plan, srpm: Path, lay: dict[str, Path],
                     phases: dict[str, float]) -> list[Path]:
        calls.append(plan.inputs_hash)
        built = lay["out"] / "tmp-kernel.rpm"
        built.write_text("rpm")
        return build._collect([built], lay["rpms"])

    monkeypatch.setattr(build, "make_srpm", fake_srpm)
    monkeypatch.setattr(build, "_run_builder", fake_builder)
    first = build.build(_req(), tiny_upstream)
    assert not first.cached and len(calls) == 1
    second = build.build(_req(), tiny_upstream)
    assert second.cached and len(calls) == 1 and second.rpms == first.rpms
    assert second.duration_s < 2
    build.build(_req(release_suffix=".other"), tiny_upstream)
    assert len(calls) == 2
    build.build(_req(release_suffix=".other", force=True), tiny_upstream)
    assert len(calls) == 3
    # A vanished RPM is not "unchanged": rebuild.
    for p in build.cached_result(build.make_plan(_req(release_suffix=".other"), tiny_upstream)).rpms:  # type: ignore[union-attr]
        p.unlink()
    build.build(_req(release_suffix=".other"), tiny_upstream)
    assert len(calls) == 4


# ------------------------------------------------------------------ end to end (slow)

@pytest.mark.slow
def test_linux61_mini_rpms_build_verify_install_and_build_a_module(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The real thing: `fsbuild rpm --target linux-6.1 --config mini` with rpmbuild, then
    verify, install into an empty root, and build an out-of-tree module against the
    installed kernel-devel. Uses the checkout's out/ and .fsbuild/ (not tmp) so that
    `make demo` after `make test` finds the same inputs and does not build twice."""
    if not Path(target.load("linux-6.1").default_source()).exists():
        pytest.skip("linux-6.1 source missing: apt-get install linux-source-6.1 (make deps)")
    _end_to_end("linux-6.1", "6.1.192-2.fastsocket.x86_64", tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.el6
def test_el6_mini_rpms_with_host_toolchain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same for el6 (hostcc compat series + Fastsocket series, host gcc), when the pristine
    el6 source is at hand."""
    from conftest import el6_source
    el6_source()
    _end_to_end("el6", "2.6.32-431.17.1.el6.fastsocket.x86_64", tmp_path, monkeypatch)


def _end_to_end(name: str, kver: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("rpmbuild", "rpm", "make", "gcc", "patch", "bc", "bison", "flex", "modinfo")
    monkeypatch.setenv("FSBUILD_OUT", str(ROOT / "out"))
    monkeypatch.setenv("FSBUILD_STATE", str(ROOT / ".fsbuild"))
    out = subprocess.run([sys.executable, "-m", "fsbuild", "rpm", "--target", name,
                          "--config", "mini", "--json"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    rpms = [Path(p) for p in res["rpms"]]
    assert res["kver"] == kver
    from fsbuild import artifacts
    report = artifacts.verify(rpms, lint=False)
    assert report.ok, report.failures()

    root = tmp_path / "root"
    # As the demo installs: a root whose scriptlets run (ci/install-root.sh checks depmod ran).
    inst = subprocess.run(["bash", str(ROOT / "ci" / "install-root.sh"), str(root), *map(str, rpms)],
                          capture_output=True, text=True)
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]
    q = subprocess.run(["rpm", "--root", str(root), "-qa", "--qf", "%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}\n"],
                       capture_output=True, text=True, check=True).stdout.split()
    assert sorted(q) == sorted([f"kernel-{kver}", f"kernel-devel-{kver}",
                                f"kernel-firmware-{kver.rsplit('.', 1)[0]}.noarch"])
    assert (root / "boot" / f"vmlinuz-{kver}").is_file()
    assert list((root / "lib" / "modules" / kver).rglob("fastsocket.ko"))

    kdir = root / "usr" / "src" / "kernels" / kver
    mod = tmp_path / "hello"
    mod.mkdir()
    (mod / "Makefile").write_text("obj-m += hello.o\n")
    (mod / "hello.c").write_text(
        '#include <linux/module.h>\n#include <linux/init.h>\n'
        'static int __init h_init(void) { return 0; }\nstatic void __exit h_exit(void) { }\n'
        'module_init(h_init);\nmodule_exit(h_exit);\nMODULE_LICENSE("GPL");\n')
    mk = subprocess.run(["make", "-C", str(kdir), f"M={mod}", "modules"], capture_output=True, text=True)
    assert mk.returncode == 0, mk.stdout[-2000:] + mk.stderr[-2000:]
    info = subprocess.run(["modinfo", "-F", "vermagic", str(mod / "hello.ko")],
                          capture_output=True, text=True, check=True).stdout
    assert info.split()[0] == kver


def test_failure_messages_name_the_cause(tmp_path: Path) -> None:
    from fsbuild.errors import BuildError, PatchApplyError
    log = tmp_path / "build.log"
    log.write_text("+ patch -p1 -F0 -s -f -E --no-backup-if-mismatch -i /s/0002-epoll.patch\n"
                   "1 out of 2 hunks FAILED -- saving rejects to file fs/eventpoll.c.rej\n"
                   "Hunk #2 FAILED at 120.\nerror: Bad exit status from /var/tmp/rpm-tmp (%prep)\n")
    err = build._failure(["rpmbuild", "--rebuild"], 1, log)
    assert isinstance(err, PatchApplyError) and "0002-epoll.patch" in err.message
    log.write_text("fsbuild: config: CONFIG_FASTSOCKET=m from frag did not survive (resolved: not set)\n"
                   "fsbuild: config: 1 option(s) of the fragment were dropped: a dependency is missing\n")
    err = build._failure(["rpmbuild", "--rebuild"], 1, log)
    assert isinstance(err, BuildError)
    assert "CONFIG_FASTSOCKET=m" in err.message and "dropped" in err.message


def test_build_holds_the_out_dir_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two `fsbuild rpm` of one target and profile never run rpmbuild into the same out dir
    at once (seen: a test fixture and a second run both building linux-6.1): the build
    runs under the out dir's flock, so a second one waits for it."""
    import fcntl

    seen: list[bool] = []

    def probe(req: build.Request, upstream: object | None = None) -> build.Result:
        lockfile = build.out_layout(req.target.name, req.config)["out"] / ".lock"
        fd = os.open(lockfile, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(False)
        except BlockingIOError:
            seen.append(True)
        finally:
            os.close(fd)
        return None  # type: ignore[return-value]

    monkeypatch.setattr(build, "_build", probe)
    build.build(_req())
    assert seen == [True]


def test_epoch_follows_only_commits_that_touch_build_inputs(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A README-only commit must not change SOURCE_DATE_EPOCH (it would force a full kernel
    rebuild); a module commit must."""
    require_tool("git")
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    monkeypatch.setenv("FSBUILD_ROOT", str(tmp_path))

    def commit(rel: str, when: int) -> None:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"{when}\n")
        env = {**os.environ, "GIT_AUTHOR_DATE": f"@{when} +0000", "GIT_COMMITTER_DATE": f"@{when} +0000",
               "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t"}
        subprocess.run(["git", "-C", str(tmp_path), "add", rel], check=True, env=env)
        subprocess.run(["git", "-C", str(tmp_path), "commit", "-qm", rel], check=True, env=env)

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    commit("module/fastsocket_main.c", 1_700_000_000)
    commit("README.md", 1_700_000_500)
    assert build.source_date_epoch() == 1_700_000_000
    commit("module/fastsocket_main.c", 1_700_001_000)
    assert build.source_date_epoch() == 1_700_001_000


def test_missing_firmware_is_an_error_unless_allowed(tiny_upstream: Upstream, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The spec runs firmware-check.sh after the config: `fail` by default (a tarball without
    some blobs stops before the compile, not an hour into it), `drop` only when asked."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    for allow, mode in ((False, "fail"), (True, "drop")):
        inputs = build.spec_inputs(build.make_plan(_req(allow_missing_firmware=allow), tiny_upstream))
        text = spec.render(inputs, "test")
        assert f'firmware-check.sh" {mode} .config' in text
        assert "Source5: firmware-check.sh" in text


def test_dropped_firmware_is_read_from_the_build_log(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_bytes(b"+ sh /x/firmware-check.sh drop .config\nfsbuild-firmware-dropped: phanfw-4.0.550.bin\n"
                    b"  CC      init/main.o\nfsbuild-firmware-dropped: a/b.fw\n")
    assert build.dropped_firmware(log) == ["a/b.fw", "phanfw-4.0.550.bin"]
    log.write_bytes(b"  CC      init/main.o\n")
    assert build.dropped_firmware(log) == []
