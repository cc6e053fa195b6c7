"""Static checks of the payload: checkpatch.pl on module/ and on the added lines of every
patch, sparse (`make C=2`) on fastsocket.ko against a kernel-devel tree. Each must be clean
or every remaining finding must match a line of ci/static-allowlist.txt, which says why.

The kernel scripts come from a built kernel-devel RPM (out/linux-6.1/rpms or
out/linux-6.1/debug/rpms, or $FSBUILD_KDEVEL_RPM); checkpatch alone falls back to the
Debian linux-source-6.1 tarball (~40 s to decompress, hence slow)."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, require_tool

from fsbuild import initramfs

ALLOWLIST = ROOT / "ci" / "static-allowlist.txt"
SCRIPTS = ("checkpatch.pl", "spelling.txt", "const_structs.checkpatch")
LINUX_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
CP_LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<level>ERROR|WARNING|CHECK):(?P<type>[A-Z0-9_]+): (?P<msg>.*)$")
SPARSE_LINE = re.compile(r"^(?P<file>[^:\s]+):(?P<line>\d+):\d+: (?P<level>warning|error): (?P<msg>.*)$")


@dataclass(frozen=True)
class Finding:
    tool: str
    file: str     # repository-relative
    key: str      # checkpatch TYPE, or the sparse message
    where: str    # file:line, for the failure message


@dataclass(frozen=True)
class Allowed:
    tool: str
    glob: str
    key: str      # checkpatch TYPE, or a regex on the sparse message
    reason: str

    def covers(self, f: Finding) -> bool:
        if f.tool != self.tool or not fnmatch.fnmatch(f.file, self.glob):
            return False
        return f.key == self.key if f.tool == "checkpatch" else re.search(self.key, f.key) is not None


def load_allowlist(path: Path = ALLOWLIST) -> list[Allowed]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|")]
        assert len(parts) == 4 and all(parts), f"{path.name}:{n}: want 'tool | glob | key | reason'"
        out.append(Allowed(*parts))
    return out


def unexplained(findings: list[Finding], allow: list[Allowed]) -> list[str]:
    return [f"{f.tool} {f.where}: {f.key}" for f in findings if not any(a.covers(f) for a in allow)]


# ------------------------------------------------------------------ kernel scripts

def _kdevel_rpm() -> Path | None:
    env = os.environ.get("FSBUILD_KDEVEL_RPM")
    if env:
        return Path(env)
    for d in (ROOT / "out" / "linux-6.1" / "rpms", ROOT / "out" / "linux-6.1" / "debug" / "rpms"):
        found = sorted(d.glob("kernel-devel-*.x86_64.rpm"))
        if found:
            return found[0]
    return None


def _extract_kdevel(rpm: Path, dest: Path) -> Path:
    """/usr/src/kernels/<kver> of the RPM under dest (symlinks kept, modes kept)."""
    require_tool("rpm2cpio")
    proc = subprocess.Popen(["rpm2cpio", str(rpm)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    for name, mode, data in initramfs.iter_newc(proc.stdout):
        rel = name.removeprefix(".").lstrip("/")
        if not rel.startswith("usr/src/kernels/") or ".." in rel.split("/"):
            continue
        p = dest / rel
        kind = mode & 0o170000
        if kind == 0o040000:
            p.mkdir(parents=True, exist_ok=True)
        elif kind == 0o120000:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.symlink_to(data.decode())
        elif kind == 0o100000:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            p.chmod(mode & 0o777)
    assert proc.wait() == 0
    trees = sorted((dest / "usr" / "src" / "kernels").iterdir())
    assert len(trees) == 1, trees
    return trees[0]


@pytest.fixture(scope="module")
def kdevel(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    rpm = _kdevel_rpm()
    return _extract_kdevel(rpm, tmp_path_factory.mktemp("kdevel")) if rpm else None


def _debian_headers() -> Path | None:
    """Debian's linux-headers-6.1.*-amd64: a prepared 6.1 tree for M= builds (no checkpatch)."""
    found = sorted(Path("/usr/src").glob("linux-headers-6.1.*-amd64"))
    return found[-1] if found else None


@pytest.fixture(scope="module")
def module_kdir(kdevel: Path | None) -> Path:
    kdir = kdevel or _debian_headers()
    if kdir is None:
        pytest.skip("no kernel-devel RPM (fsbuild rpm -t linux-6.1) and no Debian linux-headers-6.1.*-amd64")
    return kdir


def run_sparse(kdir: Path, mod: Path) -> list[Finding]:
    """`make C=2` (sparse on every file, built or not) of the module copy at `mod`; findings
    in the module's own files (kernel headers are not ours to fix)."""
    r = subprocess.run(["make", "-C", str(kdir), f"M={mod}", "C=2", "CHECK=sparse", "modules"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    findings = []
    for line in (r.stdout + r.stderr).splitlines():
        m = SPARSE_LINE.match(line.strip())
        if m and Path(m["file"]).resolve().parent == mod.resolve():
            rel = "module/" + Path(m["file"]).name
            findings.append(Finding("sparse", rel, m["msg"], f"{rel}:{m['line']}"))
    return findings


def _module_copy(dest: Path) -> Path:
    shutil.copytree(ROOT / "module", dest, ignore=shutil.ignore_patterns("tests", "*.o", "*.ko", ".*"))
    return dest


@pytest.fixture(scope="module")
def checkpatch(kdevel: Path | None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("perl")
    if kdevel is not None and (kdevel / "scripts" / "checkpatch.pl").is_file():
        return kdevel / "scripts" / "checkpatch.pl"
    if not LINUX_SOURCE.is_file():
        pytest.skip(f"no kernel-devel RPM built and no {LINUX_SOURCE} (apt-get install linux-source-6.1)")
    dest = tmp_path_factory.mktemp("checkpatch")
    require_tool("xz")
    xz = subprocess.Popen(["xz", "-T0", "-dc", str(LINUX_SOURCE)], stdout=subprocess.PIPE)
    with tarfile.open(fileobj=xz.stdout, mode="r|") as tar:
        for m in tar:
            if m.isfile() and Path(m.name).parent.name == "scripts" and Path(m.name).name in SCRIPTS:
                f = tar.extractfile(m)
                assert f is not None
                (dest / Path(m.name).name).write_bytes(f.read())
    xz.wait()
    return dest / "checkpatch.pl"


def run_checkpatch(cp: Path, name: str, path: Path, is_patch: bool) -> list[Finding]:
    """Findings of one file (`--file`: a source) or one patch (its added lines)."""
    args = ["perl", str(cp), "--no-tree", "--terse", "--show-types", "--no-signoff", "--no-summary"]
    r = subprocess.run(args + ([] if is_patch else ["--file"]) + [str(path)], capture_output=True,
                       text=True, timeout=300)
    out = []
    for line in r.stdout.splitlines():
        m = CP_LINE.match(line)
        if m:
            out.append(Finding("checkpatch", name, m["type"], f"{name}:{m['line']}"))
        elif line.strip():
            out.append(Finding("checkpatch", name, "UNPARSED", f"{name}: {line.strip()[:120]}"))
    return out


def check_patch(cp: Path, patch: Path, tmp: Path) -> list[Finding]:
    fixed = tmp / patch.name
    fixed.write_text(as_git_patch(patch.read_text()))
    return run_checkpatch(cp, str(patch.relative_to(ROOT)), fixed, True)


def as_git_patch(text: str) -> str:
    """Quilt patches have no `diff --git` line; checkpatch then takes the whole diff for the
    commit message and checks nothing. One header per file makes it see the added lines."""
    out = []
    for line in text.splitlines():
        m = re.match(r"--- (?:a/)?(\S+)", line)
        if m and m[1] != "/dev/null":
            out.append(f"diff --git a/{m[1]} b/{m[1]}")
        out.append(line)
    return "\n".join(out) + "\n"


def module_sources() -> list[Path]:
    return sorted(p for p in (ROOT / "module").iterdir() if p.suffix in (".c", ".h"))


def series_patches() -> list[Path]:
    out = []
    for series in sorted((ROOT / "patches").glob("*/series")):
        for line in series.read_text().splitlines():
            name = line.split("#")[0].split()
            if name:
                out.append(series.parent / name[0])
    return out


# ------------------------------------------------------------------ tests

def test_allowlist_matching_and_format(tmp_path: Path) -> None:
    allow = [Allowed("checkpatch", "module/*.c", "LINUX_VERSION_CODE", "r"),
             Allowed("sparse", "module/*", r"context imbalance", "r")]
    hit = Finding("checkpatch", "module/a.c", "LINUX_VERSION_CODE", "module/a.c:3")
    miss = Finding("checkpatch", "module/a.h", "LINUX_VERSION_CODE", "module/a.h:3")
    sp = Finding("sparse", "module/b.c", "context imbalance in 'f' - wrong count at exit", "module/b.c:9")
    assert unexplained([hit, sp], allow) == []
    assert unexplained([miss], allow) == ["checkpatch module/a.h:3: LINUX_VERSION_CODE"]
    bad = tmp_path / "allow.txt"
    bad.write_text("checkpatch | module/* | TYPE\n")  # no reason
    with pytest.raises(AssertionError):
        load_allowlist(bad)
    assert load_allowlist()  # the repository's own list parses


@pytest.mark.slow
def test_quilt_patches_are_checked_line_by_line(checkpatch: Path, tmp_path: Path) -> None:
    # Without `diff --git` checkpatch takes the diff for part of the commit message
    # (DIFF_IN_COMMIT_MSG, and on our real patches nothing else); with it, every added
    # line is checked.
    raw = tmp_path / "raw.patch"
    raw.write_text("subject\n\nbody\n--- a/net/x.c\n+++ b/net/x.c\n@@ -1,1 +1,2 @@\n int a;\n"
                   "+int  *b = (int*)0 ;   \n")
    assert "DIFF_IN_COMMIT_MSG" in {f.key for f in run_checkpatch(checkpatch, "p", raw, True)}
    fixed = tmp_path / "fixed.patch"
    fixed.write_text(as_git_patch(raw.read_text()))
    found = {f.key for f in run_checkpatch(checkpatch, "p", fixed, True)}
    assert "TRAILING_WHITESPACE" in found and "DIFF_IN_COMMIT_MSG" not in found


@pytest.mark.slow
def test_checkpatch_module_and_patches_clean_or_explained(checkpatch: Path, tmp_path: Path) -> None:
    findings: list[Finding] = []
    for src in module_sources():
        findings += run_checkpatch(checkpatch, str(src.relative_to(ROOT)), src, False)
    for patch in series_patches():
        findings += check_patch(checkpatch, patch, tmp_path)
    left = unexplained(findings, load_allowlist())
    assert not left, "checkpatch findings not in ci/static-allowlist.txt:\n" + "\n".join(left)


@pytest.mark.slow
def test_sparse_module_clean_or_explained(module_kdir: Path, tmp_path: Path) -> None:
    require_tool("sparse", "make", "gcc")
    left = unexplained(run_sparse(module_kdir, _module_copy(tmp_path / "module")), load_allowlist())
    assert not left, "sparse findings not in ci/static-allowlist.txt:\n" + "\n".join(left)


@pytest.mark.slow
def test_sparse_reports_a_user_pointer_dereference(module_kdir: Path, tmp_path: Path) -> None:
    require_tool("sparse", "make", "gcc")
    mod = _module_copy(tmp_path / "module")
    with open(mod / "fastsocket_main.c", "a") as f:
        f.write("\nint fsk_static_probe(int __user *p);\nint fsk_static_probe(int __user *p) { return *p; }\n")
    found = run_sparse(module_kdir, mod)
    assert any("noderef" in f.key and f.file == "module/fastsocket_main.c" for f in found), found
