"""The el6 patch series (patches/el6), its host-compiler compat series (patches/el6/hostcc)
and the el6 mini config fragment (ci/configs/el6-mini.config).

Without FSBUILD_EL6_SRC only the repository side is checked (series files, patch headers,
the two series touching disjoint files, the fragment); with it (a pristine 2.6.32-431.17.1
tree, as a directory or a tarball) the series are applied at fuzz 0 with GNU patch, quilt and
`fsbuild apply`, and (slow) the patched tree's net/ipv4 and fs/eventpoll.o are compiled with
the mini config.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, el6_source, require_tool

EL6 = ROOT / "patches" / "el6"
HOSTCC = EL6 / "hostcc"
FRAGMENT = ROOT / "ci" / "configs" / "el6-mini.config"
# Modules the mini config keeps (besides fastsocket): enough for igb/e1000e/virtio guests.
MINI_MODULES = {"E1000", "E1000E", "IGB", "PPS", "PTP_1588_CLOCK", "I2C", "I2C_ALGOBIT"}


def series_patches(series_dir: Path) -> list[Path]:
    lines = (series_dir / "series").read_text().splitlines()
    names = [ln.split("#", 1)[0].split()[0] for ln in lines if ln.split("#", 1)[0].strip()]
    return [series_dir / n for n in names]


def touched_files(patch: Path) -> set[str]:
    """Files a -p1 patch changes (its +++ side; new files included)."""
    out = set()
    for ln in patch.read_text().splitlines():
        if ln.startswith("+++ "):
            out.add(ln[4:].split("\t")[0].split("/", 1)[1])
    return out


def all_patches() -> list[Path]:
    return series_patches(HOSTCC) + series_patches(EL6)


# ---- repository side (always runs) ------------------------------------------------------

def test_series_list_existing_patches_in_order() -> None:
    for d in (EL6, HOSTCC):
        patches = series_patches(d)
        assert patches, f"{d}/series is empty"
        assert [p.name for p in patches] == sorted(p.name for p in patches), "numbered in order"
        for p in patches:
            assert p.is_file(), f"{p} listed in {d}/series but missing"
    assert len(series_patches(EL6)) >= 4


@pytest.mark.parametrize("patch", all_patches(), ids=lambda p: p.name)
def test_patch_has_subject_and_description(patch: Path) -> None:
    text = patch.read_text()
    header = text[: text.index("\n--- ")]
    lines = header.strip().splitlines()
    assert lines and len(lines[0]) <= 80, "first line: a subject of at most 80 columns"
    body = [ln for ln in lines[1:] if ln.strip()]
    assert len(body) >= 2, "a description (what and why) under the subject"
    assert "\n+++ b/" in text and "\n@@ " in text


def test_hostcc_and_el6_series_touch_disjoint_files() -> None:
    """Mock builds apply patches/el6 alone: it must not depend on hostcc hunks."""
    el6 = set().union(*(touched_files(p) for p in series_patches(EL6)))
    hostcc = set().union(*(touched_files(p) for p in series_patches(HOSTCC)))
    assert not el6 & hostcc


def test_el6_series_provides_the_module_contract() -> None:
    """net/Kconfig sources net/fastsocket, net/Makefile builds it, fastsocket.h exists."""
    text = "".join(p.read_text() for p in series_patches(EL6))
    assert '+source "net/fastsocket/Kconfig"' in text
    assert re.search(r"^\+obj-\$\(CONFIG_FASTSOCKET\)\s+\+= fastsocket/$", text, re.M)
    assert "+++ b/include/net/fastsocket.h" in text
    header = re.search(r"\+\+\+ b/include/net/fastsocket.h\n@@ [^\n]*\n((?:\+[^\n]*\n)+)", text)
    assert header and "#define FASTSOCKET_KERNEL_API" in header.group(1)


def fragment_options() -> dict[str, str]:
    opts: dict[str, str] = {}
    for ln in FRAGMENT.read_text().splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", ln) or re.match(r"^# (CONFIG_\w+) is not set$", ln)
        if m:
            opts[m.group(1)] = m.group(2) if m.lastindex == 2 else "n"
    return opts


def test_mini_fragment_keeps_what_the_smoke_boot_needs() -> None:
    opts = fragment_options()
    assert opts["CONFIG_FASTSOCKET"] == "m"
    assert opts["CONFIG_NR_CPUS"] == "64"
    assert opts["CONFIG_PM_RUNTIME"] == "y"
    assert opts["CONFIG_I2C"] == "m" and opts["CONFIG_I2C_ALGOBIT"] == "m"
    for off in ("MODULE_SIG", "MODULE_VERIFY", "CRYPTO_SIGNATURE", "DEBUG_INFO", "MAXSMP",
                "FUNCTION_TRACER", "I2C_HELPER_AUTO",
                # boot time under TCG: syscall trace events, serial IRQ probing
                "FTRACE_SYSCALLS", "SERIAL_8250_DETECT_IRQ"):
        assert opts[f"CONFIG_{off}"] == "n", off
    for keep in MINI_MODULES | {"VIRTIO_NET", "VIRTIO_PCI"}:
        assert opts.get(f"CONFIG_{keep}") != "n", f"{keep} must not be switched off"
    # RHEL's slab_def.h does not compile without CONFIG_TRACING (a build found out), and the
    # el6 guest's lsm scenario defines kprobe events (tests/el6_guest/scenarios.c)
    for need in ("FTRACE", "TRACING", "KPROBES", "KPROBE_EVENT"):
        assert opts.get(f"CONFIG_{need}") != "n", need


# ---- with the pristine el6 source ------------------------------------------------------

def _extract_subset(src: Path, dest: Path, files: set[str]) -> None:
    """Copy just the files the series touch (fast: the whole tree is ~500 MB)."""
    if src.is_dir():
        for f in files:
            if (src / f).is_file():
                (dest / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src / f, dest / f)
        return
    if src.name.endswith(".src.rpm"):
        pytest.skip("FSBUILD_EL6_SRC is an SRPM: these tests need a tree or a tarball")
    with tarfile.open(src) as tar:
        for m in tar:
            parts = m.name.split("/", 1)
            if len(parts) == 2 and parts[1] in files and m.isfile():
                m.name = parts[1]
                tar.extract(m, dest, filter="data")


@pytest.fixture(scope="module")
def pristine_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = el6_source()
    files = set().union(*(touched_files(p) for p in all_patches()))
    dest = tmp_path_factory.mktemp("el6-subset")
    _extract_subset(src, dest, files)
    if not (dest / "net" / "Kconfig").is_file():
        pytest.skip(f"FSBUILD_EL6_SRC={src} has no net/Kconfig: not a kernel tree")
    return dest


def _gnu_patch(tree: Path, patches: list[Path]) -> None:
    for p in patches:
        r = subprocess.run(["patch", "-p1", "-F0", "--no-backup-if-mismatch", "-i", str(p)],
                           cwd=tree, capture_output=True, text=True)
        assert r.returncode == 0, f"{p.name}: {r.stdout}{r.stderr}"
        assert not re.search(r"offset|fuzz", r.stdout, re.I), f"{p.name}: {r.stdout}"


@pytest.mark.parametrize("with_hostcc", [False, True], ids=["el6-alone", "hostcc-then-el6"])
def test_series_apply_with_gnu_patch_at_fuzz0(pristine_subset: Path, tmp_path: Path,
                                              with_hostcc: bool) -> None:
    require_tool("patch")
    tree = tmp_path / "tree"
    shutil.copytree(pristine_subset, tree)
    if with_hostcc:
        _gnu_patch(tree, series_patches(HOSTCC))
    _gnu_patch(tree, series_patches(EL6))
    assert (tree / "include" / "net" / "fastsocket.h").is_file()
    assert 'source "net/fastsocket/Kconfig"' in (tree / "net" / "Kconfig").read_text()


def test_mkcompile_h_takes_the_builder_from_the_build(pristine_subset: Path, tmp_path: Path) -> None:
    """With the hostcc series, the banner's user@host (and compile.h's domain and time) come
    from the build's KBUILD_BUILD_* on every host; unset, the build host's as before."""
    require_tool("patch")
    tree = tmp_path / "tree"
    shutil.copytree(pristine_subset, tree)
    _gnu_patch(tree, series_patches(HOSTCC))
    (tree / "include" / "linux").mkdir(parents=True, exist_ok=True)
    (tree / "include" / "linux" / "autoconf.h").write_text("")

    def compile_h(**env: str) -> str:
        out = tree / "include" / "linux" / "compile.h"
        out.unlink(missing_ok=True)
        run_env = {k: v for k, v in os.environ.items() if not k.startswith("KBUILD_BUILD_")} | env
        subprocess.run(["sh", "scripts/mkcompile_h", str(out), "x86_64", "y", "", "gcc"],
                       cwd=tree, env=run_env, check=True, capture_output=True)
        return out.read_text()

    fixed = compile_h(KBUILD_BUILD_USER="fsbuild", KBUILD_BUILD_HOST="fsbuild.reproducible",
                      KBUILD_BUILD_TIMESTAMP="Thu Jan  1 00:00:00 UTC 2026", KBUILD_BUILD_VERSION="1")
    assert '#define LINUX_COMPILE_BY "fsbuild"' in fixed
    assert '#define LINUX_COMPILE_HOST "fsbuild.reproducible"' in fixed
    assert '#define LINUX_COMPILE_DOMAIN\n' in fixed
    assert '#define LINUX_COMPILE_TIME "00:00:00"' in fixed
    assert '"#1 SMP Thu Jan 1 00:00:00 UTC 2026"' in fixed   # (echo folds the spaces, as ever)
    host = compile_h()
    assert f'#define LINUX_COMPILE_HOST "{socket.gethostname()[:64]}"' in host


def test_quilt_push_all(pristine_subset: Path, tmp_path: Path) -> None:
    """`quilt push -a` on the patches folder as is (both series, hostcc first)."""
    require_tool("quilt")
    tree = tmp_path / "tree"
    shutil.copytree(pristine_subset, tree)
    for series_dir, pc in ((HOSTCC, ".pc-hostcc"), (EL6, ".pc")):
        env = dict(os.environ, QUILT_PATCHES=str(series_dir), QUILT_PC=pc)
        r = subprocess.run(["quilt", "--quiltrc", "/dev/null", "push", "-a", "--fuzz=0"],
                           cwd=tree, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert not re.search(r"offset|fuzz", r.stdout, re.I), r.stdout


def test_fsbuild_apply_both_series(pristine_subset: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(pristine_subset, tree)
    for series_dir in (HOSTCC, EL6):
        r = subprocess.run(["python3", "-m", "fsbuild", "apply", "--series",
                            str(series_dir / "series"), "--fuzz", "0", str(tree)],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "0 with offset, 0 with fuzz" in r.stdout + r.stderr
    assert (tree / "include" / "net" / "fastsocket.h").is_file()


def _full_tree(src: Path, dest: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dest, symlinks=True)
        return dest
    if src.name.endswith(".src.rpm"):
        pytest.skip("FSBUILD_EL6_SRC is an SRPM: the build test needs a tree or a tarball")
    dest.mkdir()
    subprocess.run(["tar", "-xf", str(src), "-C", str(dest), "--strip-components=1"], check=True)
    return dest


def merge_config(base: Path, fragment: Path, out: Path) -> None:
    """Fragment options win over the base; options only in the fragment are appended."""
    pat = re.compile(r"^(?:# )?(CONFIG_\w+)(?:=| is not set)")
    frag = {m.group(1): ln for ln in fragment.read_text().splitlines()
            if (m := pat.match(ln))}
    lines = []
    for ln in base.read_text().splitlines():
        m = pat.match(ln)
        lines.append(frag.pop(m.group(1)) if m and m.group(1) in frag else ln)
    out.write_text("\n".join(lines + list(frag.values())) + "\n")


@pytest.mark.slow
def test_patched_tree_compiles_net_ipv4_and_eventpoll(tmp_path: Path) -> None:
    """Both series + module/ as net/fastsocket, mini config, then the hooked objects build."""
    require_tool("make", "gcc", "patch", "perl")
    tree = _full_tree(el6_source(), tmp_path / "linux")
    _gnu_patch(tree, series_patches(HOSTCC) + series_patches(EL6))
    shutil.copytree(ROOT / "module", tree / "net" / "fastsocket",
                    ignore=shutil.ignore_patterns("tests", "*.md"))
    merge_config(tree / "arch/x86/configs/x86_64_defconfig", FRAGMENT, tree / ".config")
    subprocess.run("yes '' | make oldconfig", shell=True, cwd=tree, check=True,
                   capture_output=True)
    config = (tree / ".config").read_text()
    assert "CONFIG_FASTSOCKET=m" in config
    modules = set(re.findall(r"^CONFIG_(\w+)=m$", config, re.M))
    assert MINI_MODULES | {"FASTSOCKET"} <= modules
    assert len(modules) < 30, f"mini config builds {len(modules)} modules"
    r = subprocess.run(["make", "-j2", "net/ipv4/", "net/core/", "fs/eventpoll.o",
                        "net/fastsocket/"], cwd=tree, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for obj in ("net/ipv4/inet_hashtables.o", "net/core/fastsocket.o", "fs/eventpoll.o",
                "net/fastsocket/backend_el6.o"):
        assert (tree / obj).is_file(), obj


def test_target_keep_rule_matches_the_fragment() -> None:
    """target.toml's mini_keep_modules and the fragment agree on what stays a module."""
    import fnmatch

    from fsbuild import target

    keep = target.load("el6").section("config")["mini_keep_modules"]
    opts = fragment_options()
    for sym, val in opts.items():
        name = sym.removeprefix("CONFIG_")
        kept = any(fnmatch.fnmatchcase(name, k) for k in keep)
        if val == "m":
            assert kept, f"{sym}=m in the fragment but not in mini_keep_modules"
        if val == "n":
            assert not kept, f"{sym} is switched off but mini_keep_modules keeps it"
    assert all(opts.get(f"CONFIG_{k}") != "n" for k in keep if "*" not in k)
