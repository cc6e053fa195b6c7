"""fsbuild verify on small synthetic kernel RPMs built with the real rpmbuild in tmp."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, require_tool

from fsbuild import artifacts
from fsbuild.errors import MissingFileError, VerifyError

KVER = "6.1.9-3.fastsocket.x86_64"

SPEC = """\
%define debug_package %{nil}
%define __os_install_post %{nil}
%define _build_id_links none
Name: kernel
Version: 6.1.9
Release: 3.fastsocket
Summary: synthetic kernel for verify tests
License: GPLv2
ExclusiveArch: x86_64
AutoReqProv: no
%description
synthetic
%package devel
Summary: synthetic devel
AutoReqProv: no
%description devel
synthetic
%package firmware
Summary: synthetic firmware
BuildArch: noarch
AutoReqProv: no
%description firmware
synthetic
%install
cp -a %{payload}/. %{buildroot}/
%files
/boot
/lib/modules
%files devel
/usr/src/kernels
%files firmware
/lib/firmware
"""


def fake_bzimage(version_string: str) -> bytes:
    """Enough of an x86 boot sector: "HdrS" at 0x202, kernel_version pointer at 0x20E."""
    data = bytearray(0x800)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    s = version_string.encode() + b"\0"
    data[0x400:0x400 + len(s)] = s
    return bytes(data)


def build_rpms(tmp: Path, image_version: str = KVER, with_ko: bool = True,
               devel_skip: tuple[str, ...] = (), moddir: str = KVER,
               extra_order: tuple[str, ...] = ()) -> list[Path]:
    require_tool("rpmbuild")
    pay = tmp / "payload"
    files = {
        f"boot/vmlinuz-{KVER}": fake_bzimage(f"{image_version} (builder@host) #1 SMP"),
        f"boot/System.map-{KVER}": b"ffffffff81000000 T _text\n",
        f"boot/config-{KVER}": b"CONFIG_FASTSOCKET=m\n",
        f"boot/symvers-{KVER}.gz": b"\x1f\x8b",
        f"lib/modules/{moddir}/modules.order": "".join(
            f"{m}\n" for m in (*(["kernel/net/fastsocket/fastsocket.ko"] if with_ko else []),
                               *extra_order)).encode(),
        "lib/firmware/test.bin": b"\0\1",
    }
    if with_ko:
        files[f"lib/modules/{moddir}/kernel/net/fastsocket/fastsocket.ko"] = b"\x7fELF"
    devel = {"Makefile": b"", ".config": b"", "Module.symvers": b"",
             "include/generated/autoconf.h": b"", "scripts/basic/fixdep": b"#!/bin/sh\n",
             "scripts/mod/modpost": b"#!/bin/sh\n", "arch/x86/Makefile": b""}
    for rel, data in devel.items():
        if rel not in devel_skip:
            files[f"usr/src/kernels/{KVER}/{rel}"] = data
    for rel, data in files.items():
        p = pay / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if "/scripts/" in rel:
            p.chmod(0o755)
    (tmp / "k.spec").write_text(SPEC)
    top = tmp / "top"
    subprocess.run(["rpmbuild", "-bb", "--define", f"_topdir {top}", "--define", f"payload {pay}",
                    str(tmp / "k.spec")], check=True, capture_output=True)
    return sorted(top.glob("RPMS/*/*.rpm"))


def _by_name(report: artifacts.Report) -> dict[str, artifacts.Package]:
    return {p.name: p for p in report.packages}


def _failed(pkg: artifacts.Package) -> set[str]:
    return {c.name for c in pkg.checks if not c.ok}


def test_bzimage_version_parses_header() -> None:
    assert artifacts.bzimage_version(fake_bzimage("2.6.32-431.el6.x86_64 (a@b) #1")) == "2.6.32-431.el6.x86_64"
    assert artifacts.bzimage_version(b"\0" * 0x800) is None
    assert artifacts.bzimage_version(b"short") is None


def test_good_set_passes_with_nevra_and_arches(tmp_path: Path) -> None:
    rpms = build_rpms(tmp_path)
    report = artifacts.verify(rpms, lint=False)
    assert report.ok, report.failures()
    pk = _by_name(report)
    assert pk["kernel"].nevra == f"kernel-{KVER}"
    assert pk["kernel-devel"].arch == "x86_64" and pk["kernel-firmware"].arch == "noarch"
    assert f"/boot/vmlinuz-{KVER}" in pk["kernel"].files
    image = next(c for c in pk["kernel"].checks if c.name == "image version")
    assert KVER in image.detail


def test_image_version_mismatch_fails(tmp_path: Path) -> None:
    report = artifacts.verify(build_rpms(tmp_path, image_version="6.1.9+"), lint=False)
    assert not report.ok
    assert _failed(_by_name(report)["kernel"]) == {"image version"}


def test_modules_dir_mismatch_and_missing_fastsocket_fail(tmp_path: Path) -> None:
    report = artifacts.verify(build_rpms(tmp_path, with_ko=False, moddir="6.1.9"), lint=False)
    assert _failed(_by_name(report)["kernel"]) == {"modules dir", "modules complete", "fastsocket.ko"}
    # A target without Fastsocket does not want the module.
    report = artifacts.verify([p for p in build_rpms(tmp_path / "b", with_ko=False)],
                              has_fastsocket=False, lint=False)
    assert report.ok, report.failures()


def test_incomplete_devel_fails(tmp_path: Path) -> None:
    rpms = build_rpms(tmp_path, devel_skip=("scripts/mod/modpost", "include/generated/autoconf.h"))
    devel = _by_name(artifacts.verify(rpms, lint=False))["kernel-devel"]
    check = next(c for c in devel.checks if c.name == "devel complete")
    assert not check.ok
    assert "scripts/mod/modpost" in check.detail and "autoconf.h" in check.detail


def test_missing_package_of_the_set_fails(tmp_path: Path) -> None:
    rpms = [p for p in build_rpms(tmp_path) if "firmware" not in p.name]
    report = artifacts.verify(rpms, lint=False)
    assert "firmware package present" in {c.name for p in report.packages for c in p.checks if not c.ok}


def test_unreadable_and_missing_rpm(tmp_path: Path) -> None:
    bad = tmp_path / "bad.rpm"
    bad.write_bytes(b"not an rpm at all" * 10)
    with pytest.raises(VerifyError):
        artifacts.verify([bad], lint=False)
    with pytest.raises(MissingFileError):
        artifacts.verify([tmp_path / "absent.rpm"], lint=False)


def test_rpmlint_findings_left_after_the_filters_fail_verify(tmp_path: Path) -> None:
    """specs/rpmlint.toml filters what a kernel package is expected to draw; the rest (here a
    synthetic kernel's missing changelog and the like) is a real finding and fails."""
    require_tool("rpmlint")
    report = artifacts.verify(build_rpms(tmp_path), lint=True)
    assert report.rpmlint_status == "ran"
    assert report.rpmlint, "a synthetic kernel without changelog must draw rpmlint findings"
    assert not report.ok and report.failures()[-1].startswith(f"rpmlint: {len(report.rpmlint)} finding(s)")
    summary = artifacts.summarize_lint(report.rpmlint)
    assert sum(n for _, n, _ in summary) == len(report.rpmlint)
    assert all(k.startswith(("E: ", "W: ")) for k, _, _ in summary)


def test_rpmlint_filters_each_have_a_reason() -> None:
    import tomllib

    text = artifacts.rpmlint_config().read_text()
    filters = tomllib.loads(text)["Filters"]
    lines = [line.strip() for line in text.splitlines()]
    entries = [k for k, line in enumerate(lines) if line.startswith("'")]
    assert len(entries) == len(filters) > 0
    for k in entries:   # a comment right above, or above the filters of the same group
        above = lines[k - 1]
        assert above.startswith("#") or (above.startswith("'") and k - 1 in entries), lines[k]


@pytest.mark.slow
def test_built_rpms_have_no_rpmlint_findings(linux61_rpms: Path) -> None:
    """The real linux-6.1 packages pass rpmlint with the kernel filters: zero findings."""
    require_tool("rpmlint")
    status, findings = artifacts.run_rpmlint(sorted(linux61_rpms.glob("*.rpm")), timeout=1800)
    assert status == "ran" and findings == []


def test_cli_verify_json_and_exit_codes(tmp_path: Path) -> None:
    good = build_rpms(tmp_path / "g")
    cmd = [sys.executable, "-m", "fsbuild", "verify", "--no-rpmlint", "--json", *map(str, good)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["ok"] and {p["name"] for p in data["packages"]} == {"kernel", "kernel-devel", "kernel-firmware"}
    bad = build_rpms(tmp_path / "b", image_version="9.9.9")
    out = subprocess.run([sys.executable, "-m", "fsbuild", "verify", "--no-rpmlint", *map(str, bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == VerifyError.exit_code
    assert out.stderr.startswith("fsbuild: error:") and len(out.stderr.strip().splitlines()) == 1


def test_a_module_of_modules_order_missing_from_the_package_fails(tmp_path: Path) -> None:
    """Every module kbuild built for the config (modules.order) must be in the kernel RPM."""
    report = artifacts.verify(build_rpms(tmp_path, extra_order=("kernel/drivers/scsi/lpfc/lpfc.ko",)),
                              lint=False)
    assert _failed(_by_name(report)["kernel"]) == {"modules complete"}
    check = next(c for c in _by_name(report)["kernel"].checks if c.name == "modules complete")
    assert "1 of the 2 modules" in check.detail and "lpfc.ko" in check.detail
