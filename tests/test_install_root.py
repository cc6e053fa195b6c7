"""ci/install-root.sh (the demo's install step): the RPMs' scriptlets really run in the root and
their effect is checked; a scriptlet that fails or a %post that never ran depmod fails it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

try:  # tests/ as rootdir-relative modules (default) or as a package
    from conftest import require_tool
except ImportError:
    from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ci" / "install-root.sh"
KVER = "9.9.9-fake"
# The guard line of specs/kernel.spec.j2's %post, for the tiny package below.
DEPMOD_POST = f"if [ -x /sbin/depmod ]; then /sbin/depmod -a {KVER} >/dev/null 2>&1 || :; fi"


def _install(root: Path, *rpms: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), str(root), *map(str, rpms)],
                          capture_output=True, text=True, timeout=600)


def _tiny_kernel_rpm(tmp: Path, post: str) -> Path:
    """A noarch package shaped like the kernel RPM where it matters here: a fastsocket.ko
    under /lib/modules/KVER, a stale modules.dep, and the given %post."""
    require_tool("rpmbuild")
    spec = tmp / "tiny.spec"
    spec.write_text(f"""Name: tinykernel
Version: 1
Release: 1
Summary: test package
License: GPL
BuildArch: noarch
%description
test
%install
d=%{{buildroot}}/lib/modules/{KVER}
mkdir -p $d/kernel/net/fastsocket
: > $d/kernel/net/fastsocket/fastsocket.ko
echo stale > $d/modules.dep
%post
{post}
%files
/lib/modules/{KVER}
""")
    subprocess.run(["rpmbuild", "-bb", "--define", f"_topdir {tmp / 'top'}", str(spec)],
                   check=True, capture_output=True, timeout=120)
    return next((tmp / "top" / "RPMS" / "noarch").glob("tinykernel-*.rpm"))


def test_scriptlets_run_and_depmod_writes_modules_dep(kernel_rpm: Path, tmp_path: Path) -> None:
    require_tool("rpm", "busybox", "mknod")
    rpms = sorted(kernel_rpm.parent.glob("kernel-*.rpm"))
    res = _install(tmp_path / "root", *rpms)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "%post ran depmod" in res.stdout
    deps = list((tmp_path / "root" / "lib" / "modules").glob("*/modules.dep"))
    assert deps and "fastsocket.ko:" in deps[0].read_text()


def test_a_failing_scriptlet_fails_the_install(tmp_path: Path) -> None:
    require_tool("rpm", "busybox", "mknod")
    rpm = _tiny_kernel_rpm(tmp_path, "echo broken >/dev/null; exit 3")
    res = _install(tmp_path / "root", rpm)
    assert res.returncode == 1
    assert "scriptlet problem" in res.stderr


def test_a_post_that_never_ran_depmod_is_caught(tmp_path: Path) -> None:
    require_tool("rpm", "busybox", "mknod")
    rpm = _tiny_kernel_rpm(tmp_path, "exit 0")
    res = _install(tmp_path / "root", rpm)
    assert res.returncode == 1
    assert "did not run depmod" in res.stderr


def test_the_spec_post_is_what_the_tiny_package_runs() -> None:
    # The negative tests above stand for the real %post only while its depmod guard is this line.
    spec = (ROOT / "specs" / "kernel.spec.j2").read_text()
    assert DEPMOD_POST.replace(KVER, "%{KVERREL}") in spec


@pytest.mark.parametrize("args", [[], ["/tmp/x"]])
def test_usage_errors(args: list[str]) -> None:
    res = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("install-root: usage:")
