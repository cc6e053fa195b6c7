"""Spec rendering: both targets, el6 within RPM 4.8 syntax, changelog from the series."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from conftest import require_tool

from fsbuild import spec, target
from fsbuild.errors import MissingFileError, PatchFormatError, UnsafePathError


def _patch(path: Path, header: str, file: str = "Makefile") -> Path:
    path.write_text(f"{header}\n--- a/{file}\n+++ b/{file}\n@@ -1 +1 @@\n-a\n+b\n")
    return path


def _inputs(name: str, patches: list[spec.SpecPatch], **kw: object) -> spec.SpecInputs:
    t = target.load(name)
    el6 = name == "el6"
    args: dict[str, object] = dict(
        target=name, version=t.version, release=t.release + ".fastsocket",
        tarball="linux-2.6.32-431.17.1.el6.tar.bz2" if el6 else "linux-source-6.1.tar.xz",
        topdir="linux-2.6.32-431.17.1.el6" if el6 else "linux-source-6.1",
        module_tarball="fastsocket-module.tar.gz", config_fragment="fsbuild-fragment.config",
        config_label="mini", config_base_file="fsbuild-base.config" if el6 else None,
        config_base_make=None if el6 else "tinyconfig",
        oldconfig="oldconfig" if el6 else "olddefconfig", firmware_install=el6,
        build_requires=list(t.section("rpm").get("build_requires", ["gcc"])),
        patches=patches, date=dt.date(2024, 5, 1))
    args.update(kw)
    return spec.SpecInputs(**args)  # type: ignore[arg-type]


@pytest.fixture()
def el6_patches() -> list[spec.SpecPatch]:
    t = target.load("el6")
    series = spec.read_series(t.hostcc_series, "hostcc") if t.hostcc_series else []
    series += spec.read_series(t.series, "fastsocket")
    return spec.spec_patches(series)


def test_read_series_options_comments_and_order(tmp_path: Path) -> None:
    _patch(tmp_path / "a.patch", "Subject: [PATCH 1/2] net: first")
    (tmp_path / "sub").mkdir()
    _patch(tmp_path / "sub" / "b.patch", "second patch subject line")
    (tmp_path / "series").write_text("# comment\na.patch\n\nsub/b.patch -p0  # trailing\n")
    got = spec.read_series(tmp_path / "series", "fastsocket")
    assert [(p.name, p.strip) for p in got] == [("a.patch", 1), ("sub/b.patch", 0)]
    subjects = [p.subject for p in spec.spec_patches(got)]
    assert subjects == ["net: first", "second patch subject line"]


def test_read_series_rejects_missing_escaping_and_bad_options(tmp_path: Path) -> None:
    (tmp_path / "series").write_text("nope.patch\n")
    with pytest.raises(MissingFileError):
        spec.read_series(tmp_path / "series", "fastsocket")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.patch"
    _patch(outside, "x")
    (tmp_path / "series").write_text(f"../{outside.name}\n")
    with pytest.raises(UnsafePathError):
        spec.read_series(tmp_path / "series", "fastsocket")
    _patch(tmp_path / "a.patch", "x")
    (tmp_path / "series").write_text("a.patch -X\n")
    with pytest.raises(PatchFormatError):
        spec.read_series(tmp_path / "series", "fastsocket")
    with pytest.raises(MissingFileError):
        spec.read_series(tmp_path / "absent-series", "fastsocket")


def test_reverse_entries_become_patch_minus_R_in_prep(tmp_path: Path) -> None:
    _patch(tmp_path / "a.patch", "Subject: forward")
    _patch(tmp_path / "revert.patch", "Subject: undo an upstream change")
    (tmp_path / "series").write_text("a.patch\nrevert.patch -p0 -R\n")
    got = spec.read_series(tmp_path / "series", "fastsocket")
    assert [(p.strip, p.reverse) for p in got] == [(1, False), (0, True)]
    text = spec.render(_inputs("linux-6.1", spec.spec_patches(got)), "linux-6.1 6.1.192")
    prep = [line for line in text.splitlines() if line.startswith("patch ")]
    assert prep[0].startswith("patch -p1 -F0 ") and prep[1].startswith("patch -p0 -R -F0 ")


def test_duplicate_basenames_get_unique_source_names(tmp_path: Path) -> None:
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        _patch(tmp_path / d / "fix.patch", f"fix in {d}")
    (tmp_path / "series").write_text("x/fix.patch\ny/fix.patch\n")
    files = [p.file for p in spec.spec_patches(spec.read_series(tmp_path / "series", "fastsocket"))]
    assert len(set(files)) == 2


def test_changelog_lists_subjects_in_series_order_and_escapes_macros(tmp_path: Path) -> None:
    _patch(tmp_path / "1.patch", "Subject: [PATCH] tcp: 100% local accept\n folded tail")
    _patch(tmp_path / "2.patch", "From: someone\nSubject: epoll: fast path")
    (tmp_path / "series").write_text("1.patch\n2.patch\n")
    patches = spec.spec_patches(spec.read_series(tmp_path / "series", "fastsocket"))
    entry = spec.changelog(_inputs("linux-6.1", patches), "linux-6.1 6.1.192")[0]
    assert entry["date"] == "Wed May 01 2024"
    assert entry["evr"] == "6.1.192-2.fastsocket"
    lines = entry["lines"]
    assert lines[1:] == ["tcp: 100%% local accept folded tail", "epoll: fast path"]
    assert "2 Fastsocket patch(es)" in lines[0]


def test_empty_series_renders_and_says_so() -> None:
    text = spec.render(_inputs("linux-6.1", []), "linux-6.1 6.1.192")
    assert "Patch1:" not in text and "patch -p" not in text
    assert "with 0 Fastsocket patch(es)" in text


def test_linux61_spec_essentials() -> None:
    text = spec.render(_inputs("linux-6.1", []), "linux-6.1 6.1.192")
    assert "Release: %{pkg_release}" in text and "%define pkg_release 2.fastsocket" in text
    assert "make -s %{?_smp_mflags} ARCH=%{kernel_arch} LOCALVERSION= tinyconfig" in text
    assert "olddefconfig" in text and "oldconfig >/dev/null" not in text
    assert "firmware_install" in text and "%define firmware_install 0" in text
    assert not spec.forbidden_syntax(text)


def test_el6_spec_patches_in_order_at_fuzz0(el6_patches: list[spec.SpecPatch]) -> None:
    text = spec.render(_inputs("el6", el6_patches), "el6 2.6.32-431.17.1.el6")
    applied = [line for line in text.splitlines() if line.startswith("patch -p")]
    assert len(applied) == len(el6_patches)
    for n, (line, p) in enumerate(zip(applied, el6_patches, strict=True), 1):
        assert f'"$RPM_SOURCE_DIR/{p.file}"' in line and "-F0" in line
        assert f"Patch{n}: {p.file}" in text
    assert "yes '' | make -s ARCH=%{kernel_arch} LOCALVERSION= oldconfig" in text
    assert 'cp "$RPM_SOURCE_DIR/fsbuild-base.config" .config' in text


def test_el6_spec_passes_rpmspec_and_rpm48_syntax(tmp_path: Path, el6_patches: list[spec.SpecPatch]) -> None:
    require_tool("rpmspec")
    text = spec.render(_inputs("el6", el6_patches), "el6 2.6.32-431.17.1.el6")
    assert spec.forbidden_syntax(text) == []
    path = tmp_path / "kernel.spec"
    path.write_text(text)
    out = subprocess.run(["rpmspec", "-P", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Release: 431.17.1.el6.fastsocket" in out.stdout
    assert "/boot/vmlinuz-2.6.32-431.17.1.el6.fastsocket.x86_64" in out.stdout
    q = subprocess.run(["rpmspec", "-q", "--qf", "%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}\n", str(path)],
                       capture_output=True, text=True)
    assert sorted(q.stdout.split()) == [
        "kernel-2.6.32-431.17.1.el6.fastsocket.x86_64",
        "kernel-devel-2.6.32-431.17.1.el6.fastsocket.x86_64",
        "kernel-firmware-2.6.32-431.17.1.el6.fastsocket.noarch"]


def test_specfile_library_parses_el6_spec(tmp_path: Path, el6_patches: list[spec.SpecPatch]) -> None:
    specfile = pytest.importorskip("specfile", reason="specfile not installed (pip install specfile)")
    try:
        import rpm  # noqa: F401  (specfile needs the rpm bindings: Debian's python3-rpm via the shim)
    except ImportError:
        pytest.skip("rpm Python bindings unavailable to this interpreter (apt-get install python3-rpm)")
    path = tmp_path / "kernel.spec"
    path.write_text(spec.render(_inputs("el6", el6_patches), "el6 2.6.32-431.17.1.el6"))
    sf = specfile.Specfile(path, sourcedir=tmp_path, force_parse=True)
    assert sf.expanded_version == "2.6.32"
    assert sf.expanded_release == "431.17.1.el6.fastsocket"
    with sf.patches() as patches:
        assert [p.number for p in patches] == [p.number for p in el6_patches]
    with sf.sections() as sections:
        names = {s.id for s in sections}
    assert {"prep", "build", "install", "files devel", "changelog"} <= names


@pytest.mark.parametrize("snippet, name", [
    ("%autosetup -p1\n", "%autosetup"), ("%license COPYING\n", "%license"),
    ("Recommends: linux-firmware\n", "weak dependencies"),
    ("Requires: (a or b)\n", "rich dependencies"), ("%filetriggerin -- /lib\n", "file triggers"),
])
def test_forbidden_syntax_detects_rpm49_constructs(snippet: str, name: str) -> None:
    base = spec.render(_inputs("linux-6.1", []), "linux-6.1 6.1.192")
    assert name in spec.forbidden_syntax(base + snippet)


def test_config_check_script_flags_dropped_options(tmp_path: Path) -> None:
    require_tool("awk")
    script = tmp_path / "check.sh"
    script.write_text(spec.render_config_check())
    frag = tmp_path / "frag"
    frag.write_text("CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=n\nCONFIG_S=\"x\"\n")
    conf = tmp_path / "conf"
    conf.write_text("CONFIG_A=y\nCONFIG_B=m\nCONFIG_S=\"x\"\n# CONFIG_D is not set\n")
    assert subprocess.run(["sh", str(script), str(frag), str(conf)]).returncode == 0
    conf.write_text("CONFIG_A=y\nCONFIG_C=y\nCONFIG_S=\"x\"\n")
    out = subprocess.run(["sh", str(script), str(frag), str(conf)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "CONFIG_B=m" in out.stderr and "CONFIG_C=n" in out.stderr
    assert "2 option(s)" in out.stderr


def test_config_check_script_passes_an_empty_fragment(tmp_path: Path) -> None:
    """--config full ships an empty fragment: nothing is asked for, so nothing can be dropped
    (awk's FNR == NR idiom read the config itself as the fragment and failed every full build)."""
    require_tool("awk")
    script = tmp_path / "check.sh"
    script.write_text(spec.render_config_check())
    frag = tmp_path / "frag"
    frag.write_bytes(b"")
    conf = tmp_path / "conf"
    conf.write_text("CONFIG_64BIT=y\n# CONFIG_X is not set\n")
    out = subprocess.run(["sh", str(script), str(frag), str(conf)], capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (0, "")


@pytest.mark.parametrize("name", ["linux-6.1", "el6"])
def test_host_programs_do_not_record_the_build_directory(name: str) -> None:
    """kernel-devel ships objtool (built with -g, libsubcmd too): the build directory (a random
    tmpfs name) in its debug info made every build's kernel-devel differ (found by the farm
    dump comparison). 6.1 maps it away; 2.6.32 builds no objtool and its HOSTCFLAGS on the
    command line would replace the defaults (-O2), so el6 passes none."""
    flags = str(target.load(name).section("rpm").get("host_cflags", ""))
    text = spec.render(_inputs(name, [], host_cflags=flags), "x")
    make = next(line for line in text.splitlines() if line.startswith("make ") and "bzImage modules" in line)
    if name == "linux-6.1":
        for var in ("HOSTCFLAGS", "EXTRA_CFLAGS"):
            assert f'{var}="-ffile-prefix-map=$PWD=."' in make
    else:
        assert "HOSTCFLAGS" not in make and "EXTRA_CFLAGS" not in make


_FW_MAKEFILE = """\
ifdef CONFIG_D_OMIT_ONE
d-objs := d/two.bin
else
d-objs := d/one.bin d/two.bin
endif
fw-shipped-$(CONFIG_A) += a/one.bin \\
\t\t\t  two.bin
fw-shipped-$(CONFIG_B) += b.fw
fw-shipped-$(CONFIG_C) += c.bin
fw-shipped-$(CONFIG_D) += $(d-objs)
"""


def _fw_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A tree whose firmware/Makefile (continuations, a variable, ifdef) builds blobs for
    CONFIG_A (=m), CONFIG_B and CONFIG_D (=y); two.bin and d/one.bin have no source."""
    tree = tmp_path / "tree"
    (tree / "firmware" / "a").mkdir(parents=True)
    (tree / "firmware" / "d").mkdir()
    (tree / "firmware" / "Makefile").write_text(_FW_MAKEFILE)
    for src in ("a/one.bin.ihex", "b.HEX", "d/two.bin.ihex"):
        (tree / "firmware" / src).write_text(":00000001FF\n")
    conf = tmp_path / "conf"
    conf.write_text("CONFIG_A=m\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=y\n")
    script = tmp_path / "firmware-check.sh"
    script.write_text(spec.render_firmware_check())
    return tree, conf


def _fw_run(tree: Path, mode: str, conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(tree.parent / "firmware-check.sh"), mode, str(conf)], cwd=tree,
                          capture_output=True, text=True)


def test_firmware_check_stops_on_blobs_the_source_lacks(tmp_path: Path) -> None:
    """The full el6 build compiled for an hour, then `make modules` stopped at
    firmware/phanfw-4.0.550.bin (CONFIG_NETXEN_NIC=m, the tarball lacks the .ihex): found now."""
    require_tool("make", "sed")
    tree, conf = _fw_tree(tmp_path)
    before = (tree / "firmware" / "Makefile").read_bytes()
    out = _fw_run(tree, "fail", conf)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsbuild: firmware: ")
    assert "2 blob(s)" in lines[0] and "d/one.bin two.bin" in lines[0] and "--allow-missing-firmware" in lines[0]
    assert "c.bin" not in lines[0]   # CONFIG_C is off: its blob is not built
    assert (tree / "firmware" / "Makefile").read_bytes() == before
    conf.write_text("CONFIG_A=m\n# CONFIG_D is not set\n")
    assert "two.bin" in _fw_run(tree, "fail", conf).stderr
    conf.write_text("CONFIG_B=m\n")
    assert _fw_run(tree, "fail", conf).returncode == 0


def test_firmware_check_drop_leaves_out_only_the_missing_blobs(tmp_path: Path) -> None:
    require_tool("make", "sed")
    tree, conf = _fw_tree(tmp_path)
    out = _fw_run(tree, "drop", conf)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["fsbuild-firmware-dropped: d/one.bin", "fsbuild-firmware-dropped: two.bin"]
    mk = (tree / "firmware" / "Makefile").read_text()
    assert "a/one.bin" in mk and "b.fw" in mk and "d/two.bin" in mk and "c.bin" in mk
    assert " two.bin" not in mk and "d/one.bin" not in mk
    assert _fw_run(tree, "fail", conf).returncode == 0   # nothing missing any more


def test_firmware_check_passes_trees_without_firmware(tmp_path: Path) -> None:
    tree, conf = _fw_tree(tmp_path)
    (tree / "firmware" / "Makefile").unlink()
    assert (_fw_run(tree, "fail", conf).returncode, _fw_run(tree, "bogus", conf).returncode) == (0, 2)


def test_modules_of_a_debug_info_config_are_stripped(tmp_path: Path) -> None:
    """RHEL's full config has DEBUG_INFO=y: its modules go into the package --strip-debug
    (as RHEL's own), only then; the mini profiles' modules are installed as built."""
    text = spec.render(_inputs("el6", []), "test")
    install = text[text.index("%install"):text.index("%clean")]
    snippet = install[install.index("MOD_STRIP="):install.index("modules_install")]
    assert "INSTALL_MOD_STRIP=1" in snippet and "$MOD_STRIP modules_install" in install
    cond = snippet[:snippet.index("make -s")]
    for config, want in (("CONFIG_DEBUG_INFO=y\n", "INSTALL_MOD_STRIP=1"), ("# CONFIG_DEBUG_INFO is not set\n", "")):
        (tmp_path / ".config").write_text(config)
        out = subprocess.run(["sh", "-c", cond + 'printf %s "$MOD_STRIP"'], cwd=tmp_path, capture_output=True, text=True)
        assert out.stdout == want
