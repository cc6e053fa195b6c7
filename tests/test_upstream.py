"""Upstream import: SRPM / tarball / directory / git ref, content-digest cache, hostile input.
The helpers at the top build tiny real kernel-like trees; test_workspace/test_rebase reuse them."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import tarfile
import textwrap
from pathlib import Path

import pytest
from conftest import require_tool

from fsbuild import upstream
from fsbuild.errors import MissingFileError, UnsafePathError, UpstreamError
from fsbuild.target import load

# ---------------------------------------------------------------- helpers (shared)

MAKEFILE = "VERSION = {v}\nPATCHLEVEL = {p}\nSUBLEVEL = {s}\nEXTRAVERSION = {e}\nNAME = Test\n\nall:\n\t@true\n"


def makefile(version: str, extra: str = "") -> str:
    v, p, s = ([*version.split("."), "0", "0"])[:3]
    return MAKEFILE.format(v=v, p=p, s=s, e=extra)


def lines(prefix: str, n: int) -> str:
    return "".join(f"{prefix} line {i}\n" for i in range(1, n + 1))


def kernel_files(version: str) -> dict[str, str]:
    return {"Makefile": makefile(version), "net/Makefile": lines("net", 40),
            "net/Kconfig": lines("kconfig", 40), "kernel/sched.c": lines("sched", 120)}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def make_tarball(path: Path, topdir: str, files: dict[str, str], mode: str = "w:gz",
                 extra: list[tuple[tarfile.TarInfo, bytes]] = ()) -> Path:  # type: ignore[assignment]
    """A tarball of `files` under `topdir`, plus raw (possibly hostile) members."""
    with tarfile.open(path, mode) as tf:
        for rel, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"{topdir}/{rel}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info, data in extra:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return path


def git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "HOME": str(repo), "PATH": os.environ["PATH"]}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          env=env, text=True).stdout


def git_repo(root: Path, files: dict[str, str]) -> Path:
    write_tree(root, files)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    return root


def cache_entries() -> list[str]:
    """The cache's entries (the shared object store is not one: see store_trees)."""
    root = upstream.cache_root()
    return sorted(p.name for p in root.iterdir() if p.name != upstream.STORE) if root.exists() else []


def store_trees() -> list[str]:
    """Trees the object store names: a refused import leaves only unreachable objects."""
    if not upstream.store_root().exists():
        return []
    return git(upstream.store_root(), "for-each-ref", "--format=%(refname)").split()


# ---------------------------------------------------------------- tarballs

@pytest.mark.parametrize("mode,suffix", [("w:gz", "tar.gz"), ("w:bz2", "tar.bz2"), ("w:xz", "tar.xz")])
def test_tarball_keeps_original_bytes(tmp_path: Path, mode: str, suffix: str) -> None:
    tb = make_tarball(tmp_path / f"linux-5.4.3.{suffix}", "linux-5.4.3", kernel_files("5.4.3"), mode)
    up = upstream.resolve(load("linux-6.1"), str(tb))
    assert up.version == "5.4.3" and up.topdir == "linux-5.4.3" and up.target == "linux-6.1"
    assert up.tarball.read_bytes() == tb.read_bytes()
    assert up.digest == upstream.sha256_file(tb)
    assert up.tarball.parent.parent == upstream.cache_root()
    assert up.configs == {} and up.spec is None


def test_tarball_cached_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tb = make_tarball(tmp_path / "a.tar.gz", "linux-5.4.3", kernel_files("5.4.3"))
    first = upstream.resolve(load("linux-6.1"), str(tb))
    # unchanged file: neither hashed nor scanned again
    with monkeypatch.context() as m:
        m.setattr(upstream, "scan_tarball", lambda *a, **k: pytest.fail("rescanned"))
        m.setattr(upstream, "scan_import", lambda *a, **k: pytest.fail("rescanned"))
        m.setattr(upstream, "sha256_file", lambda *a: pytest.fail("rehashed"))
        assert upstream.resolve(load("linux-6.1"), str(tb)) == first
    # same bytes under another name: hashed, but the entry is shared
    copy = tmp_path / "b.tar.gz"
    copy.write_bytes(tb.read_bytes())
    assert upstream.resolve(load("linux-6.1"), str(copy)).digest == first.digest
    assert [e for e in cache_entries() if not e.startswith((".", "index"))] == [f"tarball-{first.digest}"]


def test_rhel_style_topdir_names_the_release(tmp_path: Path) -> None:
    tb = make_tarball(tmp_path / "linux-2.6.32-431.17.1.el6.tar.bz2", "linux-2.6.32-431.17.1.el6",
                      kernel_files("2.6.32"), "w:bz2")
    assert upstream.resolve(load("el6"), str(tb)).version == "2.6.32-431.17.1.el6"


def test_makefile_version_with_extraversion() -> None:
    assert upstream.makefile_version(makefile("3.10.0", "-rc2").encode()) == "3.10.0-rc2"
    with pytest.raises(UpstreamError):
        upstream.makefile_version(b"all:\n\ttrue\n")


def _hostile(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("member", [
    _hostile("linux-1.0.0/../../evil"),
    _hostile("linux-1.0.0/a/../b"),   # a `..` that comes back: refused like patches refuse it
    _hostile("/etc/evil"),
    _hostile("linux-1.0.0/x", tarfile.SYMTYPE, "../../etc/passwd"),
    _hostile("linux-1.0.0/abs", tarfile.SYMTYPE, "/etc/passwd"),
    _hostile("linux-1.0.0/hl", tarfile.LNKTYPE, "../outside"),
    _hostile("linux-1.0.0/dev", tarfile.CHRTYPE),
    _hostile("linux-1.0.0/fifo", tarfile.FIFOTYPE),
], ids=["dotdot", "dotdot-back", "absolute", "symlink-escape", "symlink-abs", "hardlink-escape", "chardev", "fifo"])
def test_hostile_tarball_rejected_nothing_written(tmp_path: Path, member: tarfile.TarInfo) -> None:
    tb = make_tarball(tmp_path / "bad.tar.gz", "linux-1.0.0", kernel_files("1.0.0"),
                      extra=[(member, b"x" if member.isfile() else b"")])
    with pytest.raises(UnsafePathError):
        upstream.resolve(load("linux-6.1"), str(tb))
    assert [e for e in cache_entries() if e != "index.json"] == []
    assert store_trees() == [] and not (upstream.store_root() / upstream.BLOB_INDEX).exists()
    assert not (tmp_path.parent / "evil").exists()


def test_inner_symlink_allowed(tmp_path: Path) -> None:
    tb = make_tarball(tmp_path / "ok.tar.gz", "linux-1.0.0", kernel_files("1.0.0"),
                      extra=[(_hostile("linux-1.0.0/net/link", tarfile.SYMTYPE, "../kernel/sched.c"), b"")])
    assert upstream.resolve(load("linux-6.1"), str(tb)).version == "1.0.0"


def test_unknown_and_missing(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello, not a tarball" * 40)
    with pytest.raises(UpstreamError):
        upstream.resolve(load("linux-6.1"), str(junk))
    with pytest.raises(MissingFileError):
        upstream.resolve(load("linux-6.1"), str(tmp_path / "nope.tar.xz"))
    truncated = tmp_path / "trunc.tar.gz"
    good = make_tarball(tmp_path / "g.tar.gz", "linux-1.0.0", kernel_files("1.0.0") | {"big": lines("b", 9000)})
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UpstreamError):
        upstream.resolve(load("linux-6.1"), str(truncated))
    no_kernel = make_tarball(tmp_path / "nk.tar.gz", "foo", {"README": "x"})
    with pytest.raises(UpstreamError):
        upstream.resolve(load("linux-6.1"), str(no_kernel))


# ---------------------------------------------------------------- directories and git refs

def test_directory_deterministic(tmp_path: Path) -> None:
    a = write_tree(tmp_path / "a", kernel_files("4.19.5"))
    b = write_tree(tmp_path / "b", kernel_files("4.19.5"))
    os.utime(b / "Makefile", (12345, 12345))
    ua = upstream.resolve(load("linux-6.1"), str(a))
    ub = upstream.resolve(load("linux-6.1"), str(b))
    assert ua.digest == ub.digest and ua.topdir == "linux-4.19.5" and ua.version == "4.19.5"
    with tarfile.open(ua.tarball) as tf:
        names = tf.getnames()
        assert names == sorted(names) and names[0] == "linux-4.19.5"
        assert {m.mtime for m in tf.getmembers()} == {upstream.FIXED_MTIME}
        assert tf.extractfile("linux-4.19.5/kernel/sched.c").read().decode() == lines("sched", 120)
    (b / "net" / "Kconfig").write_text("changed\n")
    assert upstream.resolve(load("linux-6.1"), str(b)).digest != ua.digest


def test_unchanged_directory_is_found_by_stat_signature(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    a = write_tree(tmp_path / "a", kernel_files("4.19.5"))
    fresh = upstream.resolve(load("linux-6.1"), str(a))  # files just written: racy, not indexed
    index = upstream._index_path()
    assert not index.exists() or not any(k.startswith("dir-stat:") for k in json.loads(index.read_text()))
    monkeypatch.setattr(upstream, "RACY_NS", 0)
    assert upstream.resolve(load("linux-6.1"), str(a)).digest == fresh.digest
    calls: list[str] = []
    real = upstream._from_entries

    def counting(target: str, entries: list, where: str) -> upstream.Upstream:  # type: ignore[type-arg]
        calls.append(where)
        return real(target, entries, where)

    monkeypatch.setattr(upstream, "_from_entries", counting)
    assert upstream.resolve(load("linux-6.1"), str(a)).digest == fresh.digest
    assert calls == []  # from the index: no re-tar
    (a / "net" / "Kconfig").write_text("changed\n")
    changed = upstream.resolve(load("linux-6.1"), str(a))
    assert calls == [f"dir:{a}"] and changed.digest != fresh.digest


def test_directory_symlink_escape(tmp_path: Path) -> None:
    a = write_tree(tmp_path / "a", kernel_files("4.19.5"))
    (a / "net" / "evil").symlink_to("/etc/passwd")
    with pytest.raises(UnsafePathError):
        upstream.resolve(load("linux-6.1"), str(a))


def test_git_ref(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "repo", kernel_files("5.10.1"))
    git(repo, "tag", "v5.10.1")
    (repo / "Makefile").write_text(makefile("5.10.2"))
    git(repo, "commit", "-qam", "bump")
    old = upstream.resolve(load("linux-6.1"), f"{repo}@v5.10.1")
    new = upstream.resolve(load("linux-6.1"), f"git:{repo}@HEAD")
    assert (old.version, new.version) == ("5.10.1", "5.10.2")
    # same content as a plain directory export -> same deterministic bytes
    plain = write_tree(tmp_path / "plain", kernel_files("5.10.1"))
    assert upstream.resolve(load("linux-6.1"), str(plain)).digest == old.digest
    with pytest.raises(UpstreamError):
        upstream.resolve(load("linux-6.1"), f"{repo}@no-such-ref")


# ---------------------------------------------------------------- SRPMs

SPEC = """\
Name: kernel
Version: 2.6.32
Release: 431.17.1.el6
Summary: test kernel
License: GPLv2
Source0: linux-2.6.32-431.17.1.el6.tar.bz2
Source50: config-x86_64-generic
Source51: config-generic
%description
test
%prep
%build
%files
"""


def build_srpm(tmp_path: Path, tarball: Path) -> Path:
    require_tool("rpmbuild")
    top = tmp_path / "rpmbuild"
    (top / "SOURCES").mkdir(parents=True)
    (top / "SPECS").mkdir()
    os.link(tarball, top / "SOURCES" / "linux-2.6.32-431.17.1.el6.tar.bz2")
    (top / "SOURCES" / "config-x86_64-generic").write_text("CONFIG_X86_64=y\n")
    (top / "SOURCES" / "config-generic").write_text("CONFIG_NET=y\n")
    spec = top / "SPECS" / "kernel.spec"
    spec.write_text(SPEC)
    subprocess.run(["rpmbuild", "-bs", "--define", f"_topdir {top}", str(spec)],
                   check=True, capture_output=True)
    (srpm,) = (top / "SRPMS").glob("*.src.rpm")
    return srpm


def test_srpm(tmp_path: Path) -> None:
    tb = make_tarball(tmp_path / "linux.tar.bz2", "linux-2.6.32-431.17.1.el6", kernel_files("2.6.32"), "w:bz2")
    srpm = build_srpm(tmp_path, tb)
    assert srpm.name == "kernel-2.6.32-431.17.1.el6.src.rpm"
    up = upstream.resolve(load("el6"), str(srpm))
    assert up.version == "2.6.32-431.17.1.el6" and up.topdir == "linux-2.6.32-431.17.1.el6"
    assert up.tarball.name == "linux-2.6.32-431.17.1.el6.tar.bz2"
    assert up.tarball.read_bytes() == tb.read_bytes()
    assert sorted(up.configs) == ["config-generic", "config-x86_64-generic"]
    assert up.configs["config-generic"].read_text() == "CONFIG_NET=y\n"
    assert up.spec is not None and "Release: 431.17.1.el6" in up.spec.read_text()
    # the tarball alone has the same digest, but its own entry: no configs, no spec
    alone = upstream.resolve(load("el6"), str(tb))
    assert alone.digest == up.digest and alone.configs == {} and alone.spec is None
    assert upstream.resolve(load("el6"), str(srpm)) == up


def test_srpm_after_its_tarball_keeps_configs_and_spec(tmp_path: Path) -> None:
    """#12.8: the cache was keyed by the tarball digest alone, so an SRPM imported after its
    own tarball came back as the tarball's entry (configs [], spec null)."""
    tb = make_tarball(tmp_path / "linux.tar.bz2", "linux-2.6.32-431.17.1.el6", kernel_files("2.6.32"), "w:bz2")
    srpm = build_srpm(tmp_path, tb)
    alone = upstream.resolve(load("el6"), str(tb))
    assert alone.configs == {} and alone.spec is None
    up = upstream.resolve(load("el6"), str(srpm))
    assert sorted(up.configs) == ["config-generic", "config-x86_64-generic"] and up.spec is not None
    assert up.digest == alone.digest and up.tarball != alone.tarball


def test_srpm_with_tar_slip(tmp_path: Path) -> None:
    tb = make_tarball(tmp_path / "linux.tar.bz2", "linux-2.6.32-431.17.1.el6", kernel_files("2.6.32"), "w:bz2",
                      extra=[(_hostile("linux-2.6.32-431.17.1.el6/../../../tmp/slipped"), b"pwned")])
    srpm = build_srpm(tmp_path, tb)
    with pytest.raises(UnsafePathError):
        upstream.resolve(load("el6"), str(srpm))
    assert [e for e in cache_entries() if e != "index.json"] == []


def test_srpm_without_kernel_tarball(tmp_path: Path) -> None:
    require_tool("rpmbuild")
    top = tmp_path / "rpmbuild"
    (top / "SPECS").mkdir(parents=True)
    spec = top / "SPECS" / "k.spec"
    spec.write_text(textwrap.dedent(SPEC).replace("Source0: linux-2.6.32-431.17.1.el6.tar.bz2\n", "")
                    .replace("Source50: config-x86_64-generic\nSource51: config-generic\n", ""))
    subprocess.run(["rpmbuild", "-bs", "--define", f"_topdir {top}", str(spec)], check=True, capture_output=True)
    (srpm,) = (top / "SRPMS").glob("*.src.rpm")
    with pytest.raises(UpstreamError, match="no linux-"):
        upstream.resolve(load("el6"), str(srpm))


# ---------------------------------------------------------------- hostile archives (#12.6-9)

def _chain_tarball(tmp_path: Path, links: list[tuple[str, str]], name: str = "chain.tar.gz") -> Path:
    return make_tarball(tmp_path / name, "linux-1.0.0", kernel_files("1.0.0"),
                        extra=[(_hostile(f"linux-1.0.0/{n}", tarfile.SYMTYPE, d), b"") for n, d in links])


@pytest.mark.parametrize("links", [
    [("q", "."), ("p", "q/../..")],            # the chain: text stays inside, p leads out
    [("p", "q/../.."), ("q", ".")],            # a later link redirects an earlier one
    [("d", "net"), ("d2", "d/../../..")],
    [("a", "b"), ("b", "a")],                  # a loop
    [("up", "..")],                            # out of the top directory (the workspace root)
])
def test_symlink_chains_resolved_not_read_as_text(tmp_path: Path, links: list[tuple[str, str]]) -> None:
    with pytest.raises(UnsafePathError, match="outside the tree"):
        upstream.resolve(load("linux-6.1"), str(_chain_tarball(tmp_path, links)))
    assert [e for e in cache_entries() if e != "index.json"] == []


def test_member_written_through_a_link_leading_out(tmp_path: Path) -> None:
    tb = make_tarball(tmp_path / "w.tar.gz", "linux-1.0.0", kernel_files("1.0.0"),
                      extra=[(_hostile("linux-1.0.0/q", tarfile.SYMTYPE, "."), b""),
                             (_hostile("linux-1.0.0/q/../../evil"), b"x")])
    with pytest.raises(UnsafePathError):
        upstream.resolve(load("linux-6.1"), str(tb))


def test_inner_symlink_chain_allowed(tmp_path: Path) -> None:
    tb = _chain_tarball(tmp_path, [("here", "."), ("cfg", "here/net/Kconfig"), ("n", "net"),
                                   ("n2", "n/../kernel")])
    assert upstream.resolve(load("linux-6.1"), str(tb)).version == "1.0.0"


def test_symlink_chain_in_directory_and_git_sources(tmp_path: Path) -> None:
    a = write_tree(tmp_path / "a", kernel_files("4.19.5"))
    (a / "net" / "q").symlink_to(".")  # net/q/../.. reads as the root, resolves above it
    (a / "net" / "p").symlink_to("q/../..")
    with pytest.raises(UnsafePathError, match="outside the tree"):
        upstream.resolve(load("linux-6.1"), str(a))
    repo = git_repo(tmp_path / "repo", kernel_files("5.10.1"))
    (repo / "net" / "q").symlink_to(".")
    (repo / "net" / "p").symlink_to("q/../..")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "links")
    with pytest.raises(UnsafePathError, match="outside the tree"):
        upstream.resolve(load("linux-6.1"), f"{repo}@HEAD")


@pytest.mark.parametrize("dest", ["outside/file", "linux-1.0.0/q/../../x"])
def test_hardlink_outside_top_directory_refused(tmp_path: Path, dest: str) -> None:
    """#12.9: a hardlink to a normal-looking path outside the top directory was dropped."""
    tb = make_tarball(tmp_path / "h.tar.gz", "linux-1.0.0", kernel_files("1.0.0"),
                      extra=[(_hostile("linux-1.0.0/q", tarfile.SYMTYPE, "."), b""),
                             (_hostile("linux-1.0.0/hl", tarfile.LNKTYPE, dest), b"")])
    with pytest.raises(UnsafePathError):
        upstream.resolve(load("linux-6.1"), str(tb))


def test_hardlink_inside_is_imported(tmp_path: Path) -> None:
    tb = make_tarball(tmp_path / "h.tar.gz", "linux-1.0.0", kernel_files("1.0.0"),
                      extra=[(_hostile("linux-1.0.0/hl", tarfile.LNKTYPE, "linux-1.0.0/net/Kconfig"), b"")])
    assert upstream.resolve(load("linux-6.1"), str(tb)).version == "1.0.0"


def _claiming(path: Path, size: int) -> Path:
    """A few hundred bytes of gzip whose member header claims `size` bytes (data absent)."""
    import gzip
    info = tarfile.TarInfo("linux-1.0.0/huge")
    info.size = size
    mk = tarfile.TarInfo("linux-1.0.0/Makefile")
    data = makefile("1.0.0").encode()
    mk.size = len(data)
    pad = b"\0" * (-len(data) % 512)
    with gzip.open(path, "wb") as gz:
        gz.write(mk.tobuf(format=tarfile.GNU_FORMAT) + data + pad + info.tobuf(format=tarfile.GNU_FORMAT))
    return path


def test_member_over_the_ceiling_refused_before_reading(tmp_path: Path) -> None:
    from fsbuild.errors import ArchiveLimitError
    tb = _claiming(tmp_path / "huge.tar.gz", 20 << 30)
    assert tb.stat().st_size < 1000
    with pytest.raises(ArchiveLimitError, match="FSBUILD_MAX_MEMBER"):
        upstream.resolve(load("linux-6.1"), str(tb))
    assert [e for e in cache_entries() if e != "index.json"] == []


def test_ceilings_are_configurable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsbuild.errors import ArchiveLimitError
    tb = make_tarball(tmp_path / "a.tar.gz", "linux-5.4.3", kernel_files("5.4.3"))
    monkeypatch.setenv("FSBUILD_MAX_TOTAL", "1K")
    with pytest.raises(ArchiveLimitError, match="FSBUILD_MAX_TOTAL"):
        upstream.resolve(load("linux-6.1"), str(tb))
    monkeypatch.setenv("FSBUILD_MAX_TOTAL", "16G")
    monkeypatch.setenv("FSBUILD_MAX_MEMBER", "1000")
    with pytest.raises(ArchiveLimitError, match="FSBUILD_MAX_MEMBER"):
        upstream.resolve(load("linux-6.1"), str(tb))
    monkeypatch.setenv("FSBUILD_MAX_MEMBER", "lots")
    with pytest.raises(ArchiveLimitError, match="not a size"):
        upstream.resolve(load("linux-6.1"), str(tb))
    monkeypatch.delenv("FSBUILD_MAX_MEMBER")
    assert upstream.resolve(load("linux-6.1"), str(tb)).version == "5.4.3"


def test_huge_pax_header_refused(tmp_path: Path) -> None:
    import gzip

    from fsbuild.errors import ArchiveLimitError
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 1 << 30
    tb = tmp_path / "pax.tar.gz"
    with gzip.open(tb, "wb") as gz:
        gz.write(pax.tobuf(format=tarfile.USTAR_FORMAT))
    with pytest.raises(ArchiveLimitError, match="tar header"):
        upstream.resolve(load("linux-6.1"), str(tb))


def _sparse_tarball(tmp_path: Path, size: str) -> Path:
    require_tool("tar", "truncate")
    top = write_tree(tmp_path / "src" / "linux-1.0.0", kernel_files("1.0.0"))
    subprocess.run(["truncate", "-s", size, str(top / "big")], check=True)
    tb = tmp_path / "sparse.tar.gz"
    subprocess.run(["tar", "--sparse", "-czf", str(tb), "-C", str(top.parent), "linux-1.0.0"], check=True)
    return tb


def test_sparse_member_over_the_ceiling_one_line_exit_15(tmp_path: Path) -> None:
    import sys
    tb = _sparse_tarball(tmp_path, "1G")
    assert tb.stat().st_size < 4096
    env = {**os.environ, "FSBUILD_MAX_MEMBER": "512M", "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "fsbuild", "upstream", "import", str(tb),
                           "--target", "linux-6.1"], capture_output=True, text=True, env=env)
    assert proc.returncode == 15, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fsbuild: error: ")


def test_sparse_gigabyte_member_is_streamed(tmp_path: Path) -> None:
    """#12.6: a ~250-byte tarball with a sparse 1 GiB member took 3.1 GB of RAM to import
    (every member read() whole). The workspace's blob stream must stay small: measured in a
    fresh process (its peak RSS), with git's side replaced by a byte counter."""
    import sys
    tb = _sparse_tarball(tmp_path, "1G")
    code = textwrap.dedent(f"""
        from fsbuild import upstream
        from fsbuild.target import load
        from fsbuild.upstream_import import _stream_blobs
        up = upstream.resolve(load("linux-6.1"), {str(tb)!r})
        total = 0
        def sink(b):
            global total
            total += len(b)
        _stream_blobs(up, sink)
        # VmHWM: this process's own peak. ru_maxrss also carries the parent's peak across
        # exec (the kernel keeps the old mm's high-water mark), i.e. pytest's after many tests.
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        print(total, int(hwm.split()[1]))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    streamed, peak_kib = int(out[0]), int(out[1])
    assert streamed > 1 << 30
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib} KiB while streaming a 1 GiB member"


@pytest.mark.parametrize("extra", [
    [("q", tarfile.SYMTYPE, "."), ("p", tarfile.SYMTYPE, "q/../..")],
    [("hl", tarfile.LNKTYPE, "elsewhere/file")],
], ids=["symlink-chain", "hardlink-outside"])
def test_cli_refuses_escaping_links_exit_4(tmp_path: Path, extra: list[tuple[str, bytes, str]]) -> None:
    import sys
    tb = make_tarball(tmp_path / "bad.tar.gz", "linux-1.0.0", kernel_files("1.0.0"),
                      extra=[(_hostile(f"linux-1.0.0/{n}", k, d), b"") for n, k, d in extra])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "fsbuild", "upstream", "import", str(tb),
                           "--target", "linux-6.1"], capture_output=True, text=True, env=env)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fsbuild: error: ")


# ---------------------------------------------------------------- the shared object store (#14.3)

def _pack_blobs(idx: Path) -> int:
    """How many blobs a pack of the store holds."""
    out = subprocess.run(["git", "-C", str(upstream.store_root()), "verify-pack", "-v", str(idx)],
                         check=True, capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line.split()[1:2] == ["blob"])


@pytest.mark.parametrize("mode,suffix", [("w:xz", "tar.xz"), ("w:gz", "tar.gz"), ("w:bz2", "tar.bz2"),
                                         ("w", "tar")])
def test_second_upstream_sends_git_only_its_changed_files(tmp_path: Path, mode: str, suffix: str) -> None:
    """Cold imports hashed every blob of both kernels with git's SHA-1 (most of a 2-minute
    run); now content already in the store (same SHA-256) is named, never sent again."""
    files = {**kernel_files("1.0.0"), **{f"drivers/d{i}.c": lines(f"d{i}", 30) for i in range(20)}}
    upstream.resolve(load("linux-6.1"), str(make_tarball(tmp_path / f"a.{suffix}", "linux-1.0.0", files, mode)))
    newer = {**files, "Makefile": makefile("1.0.1"), "drivers/d3.c": lines("d3 fixed", 30)}
    before = set(upstream.store_root().glob("objects/pack/pack-*.idx"))
    up = upstream.resolve(load("linux-6.1"), str(make_tarball(tmp_path / f"b.{suffix}", "linux-1.0.1", newer, mode)))
    (idx,) = set(upstream.store_root().glob("objects/pack/pack-*.idx")) - before
    assert _pack_blobs(idx) == 2   # Makefile and drivers/d3.c
    listing = git(upstream.store_root(), "ls-tree", "-r", "--name-only", up.store_tree).split()
    assert listing == sorted(newer)
    assert git(upstream.store_root(), "show", f"{up.store_tree}:drivers/d3.c") == newer["drivers/d3.c"]


def test_workspace_links_the_store_packs_and_commits_the_same_tree(tmp_path: Path) -> None:
    from fsbuild.workspace import Workspace
    up = upstream.resolve(load("linux-6.1"), str(make_tarball(tmp_path / "a.tar.gz", "linux-1.0.0",
                                                               kernel_files("1.0.0"))))
    ws = Workspace(load("linux-6.1"), root=tmp_path / "ws")
    commit = ws.import_upstream(up)
    assert git(ws.root, "rev-parse", f"{commit}^{{tree}}").strip() == up.store_tree
    assert f"Fsbuild-Upstream-Digest: {up.digest}" in git(ws.root, "log", "-1", "--format=%B", commit)
    packs = list((ws.root / ".git" / "objects" / "pack").glob("pack-*.pack"))
    assert packs and all(p.stat().st_nlink == 2 for p in packs)   # linked, not copied
    # the very commit the tarball's own fast-import (no store: older cache entries) makes
    other = Workspace(load("linux-6.1"), root=tmp_path / "ws2")
    assert other.import_upstream(dataclasses.replace(up, store_tree="")) == commit
    # the workspace outlives the store
    import shutil
    shutil.rmtree(upstream.store_root())
    assert git(ws.root, "show", f"{commit}:net/Makefile") == kernel_files("1.0.0")["net/Makefile"]


def test_stale_blob_index_is_dropped_not_trusted(tmp_path: Path) -> None:
    """An index naming a blob the store lacks (packs removed by hand) must not yield a tree
    with a missing blob: fast-import refuses it and the import runs again without it."""
    files = kernel_files("1.0.0")
    upstream.resolve(load("linux-6.1"), str(make_tarball(tmp_path / "a.tar.gz", "linux-1.0.0", files)))
    for pack in upstream.store_root().glob("objects/pack/pack-*"):
        pack.unlink()
    up = upstream.resolve(load("linux-6.1"), str(make_tarball(tmp_path / "b.tar.gz", "linux-1.0.1",
                                                               {**files, "Makefile": makefile("1.0.1")})))
    assert git(upstream.store_root(), "show", f"{up.store_tree}:kernel/sched.c") == files["kernel/sched.c"]


def test_interrupted_import_names_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after every member was sent (the commit not yet): no tree ref, no blob index,
    no cache entry; the next run imports whole."""
    tb = make_tarball(tmp_path / "a.tar.xz", "linux-1.0.0", kernel_files("1.0.0"), "w:xz")
    with monkeypatch.context() as m:
        def stop(self: upstream.ArchiveGuard) -> None:
            raise KeyboardInterrupt
        m.setattr(upstream.ArchiveGuard, "finish", stop)
        with pytest.raises(KeyboardInterrupt):
            upstream.resolve(load("linux-6.1"), str(tb))
    assert store_trees() == [] and not (upstream.store_root() / upstream.BLOB_INDEX).exists()
    assert [e for e in cache_entries() if e != "index.json"] == []
    up = upstream.resolve(load("linux-6.1"), str(tb))
    assert store_trees() == [f"refs/fsbuild/trees/{up.store_tree}"]


def test_corrupt_xz_is_one_upstream_error(tmp_path: Path) -> None:
    """The external decompressor's verdict (xz checks every block's CRC) is an UpstreamError."""
    require_tool("xz")
    good = make_tarball(tmp_path / "good.tar.xz", "linux-1.0.0",
                        {**kernel_files("1.0.0"), "big.c": lines("big", 20000)}, "w:xz")
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "bad.tar.xz"
    bad.write_bytes(bytes(data))
    with pytest.raises(UpstreamError):
        upstream.resolve(load("linux-6.1"), str(bad))
    assert store_trees() == []


@pytest.mark.parametrize("small", [upstream.SMALL, 64], ids=["read-whole", "streamed"])
def test_directory_read_once_for_tarball_and_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   small: int) -> None:
    """A directory upstream goes to the store while its deterministic tarball is written
    (it was re-read from the .tar.gz by the workspace); files over SMALL are streamed."""
    monkeypatch.setattr(upstream, "SMALL", small)
    files = {**kernel_files("1.0.0"), **{f"drivers/d{i}.c": lines(f"d{i}", 30) for i in range(20)}}
    first = upstream.resolve(load("linux-6.1"), str(write_tree(tmp_path / "a" / "linux", files)))
    newer = {**files, "Makefile": makefile("1.0.1"), "drivers/d3.c": lines("d3 fixed", 30)}
    before = set(upstream.store_root().glob("objects/pack/pack-*.idx"))
    up = upstream.resolve(load("linux-6.1"), str(write_tree(tmp_path / "b" / "linux", newer)))
    (idx,) = set(upstream.store_root().glob("objects/pack/pack-*.idx")) - before
    assert _pack_blobs(idx) == 2 and first.store_tree and up.store_tree != first.store_tree
    with tarfile.open(up.tarball) as tf:
        for rel, text in newer.items():
            assert tf.extractfile(f"linux-1.0.1/{rel}").read().decode() == text  # type: ignore[union-attr]
            assert git(upstream.store_root(), "show", f"{up.store_tree}:{rel}") == text


@pytest.mark.parametrize("payload", [
    b"070701" + b"ZZZZZZZZ" * 13,                 # header fields that are not hex
    b"070701" + b"00000000" * 13,                 # truncated: no name, no trailer
    b"0707",                                      # cut inside the magic
], ids=["not-hex", "truncated", "short"])
def test_corrupt_srpm_payload_is_an_upstream_error(payload: bytes) -> None:
    """The shared newc reader's ValueError reaches the user as UpstreamError (one line,
    its exit code), never as an internal error."""
    with pytest.raises(UpstreamError, match="corrupt cpio payload"):
        list(upstream.iter_cpio(io.BytesIO(payload), "x.src.rpm"))


@pytest.mark.parametrize("small", [upstream.SMALL, 64], ids=["read-whole", "streamed"])
def test_deterministic_tar_same_bytes_with_and_without_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  small: int) -> None:
    """One tar writer (tario) for both: feeding the store while writing (whole blobs or a
    streamed tee) changes no byte of the tarball, and the store gets every file and link."""
    monkeypatch.setattr(upstream, "SMALL", small)
    entries = [upstream._Entry("Makefile", "file", data=makefile("1.0.0").encode()),
               upstream._Entry("scripts", "dir", mode=0o755),
               upstream._Entry("scripts/run.sh", "file", mode=0o755, data=lines("run", 40).encode()),
               upstream._Entry("scripts/link", "symlink", link="run.sh")]
    plain, fed = tmp_path / "plain.tar.gz", tmp_path / "fed.tar.gz"
    assert upstream.write_deterministic_tar(plain, "linux-1.0.0", entries) == {}
    seen: dict[str, tuple[int, str]] = {}

    def feed(blobs):  # type: ignore[no-untyped-def]
        seen.update(upstream.write_deterministic_tar(fed, "linux-1.0.0", entries, blobs))
        return seen

    tree = upstream.store_import("test", feed)
    assert fed.read_bytes() == plain.read_bytes()
    assert {p: m for p, (m, _) in seen.items()} == {"Makefile": 0o100644, "scripts/run.sh": 0o100755,
                                                     "scripts/link": 0o120000}
    assert git(upstream.store_root(), "show", f"{tree}:scripts/run.sh") == lines("run", 40)


# ---------------------------------------------------------------- partial imports (#14.3)

PARTIAL_FILES = {**kernel_files("1.0.0"), "kernel/fork.c": lines("fork", 9), "drivers/a/b.c": lines("b", 3),
                 "drivers/a/c.c": lines("c", 3), "fs/x.c": lines("fs", 7)}


def _partial_tarball(tmp: Path, name: str = "linux-1.0.0.tar.xz") -> Path:
    link = tarfile.TarInfo("linux-1.0.0/scripts/dtc")   # a directory symlink
    link.type, link.linkname = tarfile.SYMTYPE, "../fs"
    return make_tarball(tmp / name, "linux-1.0.0", PARTIAL_FILES, "w:xz", extra=[(link, b"")])


def _listing(tree: str) -> list[str]:
    return git(upstream.store_root(), "ls-tree", "-r", "--name-only", tree).split()


def _no_import(*args: object, **kw: object) -> object:
    raise AssertionError("imported again")


def test_partial_tree_answers_every_question_on_its_paths_as_the_whole_tree(tmp_path: Path) -> None:
    """What a rebase's applier asks (a named file's content and mode, whether each parent
    directory exists) comes out as on the whole tree: a parent directory holding no named
    file is kept by one file under it; a named directory brings its subtree."""
    tb = _partial_tarball(tmp_path)
    paths = upstream.PathSet({"net/Kconfig", "net/Kconfig/sub.c", "kernel", "drivers/a/new.c",
                              "include/net/x.h", "scripts/dtc/x.c", "scripts/dtc"})
    part = upstream.resolve(load("linux-6.1"), str(tb), paths=paths)
    assert part.partial_tree and not part.store_tree
    whole = upstream.resolve(load("linux-6.1"), str(tb))
    assert whole.store_tree and not whole.partial_tree
    assert "fs/x.c" not in _listing(part.partial_tree) and "fs/x.c" in _listing(whole.store_tree)
    _assert_answers_as_whole(part, whole, paths)


def _assert_answers_as_whole(part: upstream.Upstream, whole: upstream.Upstream, paths: upstream.PathSet) -> None:
    """The partial tree answers every question about `paths` (contents, "is D a directory")
    as the whole tree does."""
    from fsbuild.gitio import GitCat
    with GitCat(upstream.store_root()) as cat:
        p, w = cat.reader(part.partial_tree), cat.reader(whole.store_tree)
        assert [p(x) for x in sorted(paths.paths)] == [w(x) for x in sorted(paths.paths)]
        asked = sorted(paths.dirs | paths.paths)
        assert [p.isdir(d) for d in asked] == [w.isdir(d) for d in asked]
        assert p.isdir("drivers/a") and not p.isdir("include") and not p.isdir("scripts/dtc")


def test_partial_import_keyed_by_path_set_never_serves_a_whole_import(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tb = _partial_tarball(tmp_path)
    a, b = upstream.PathSet({"net/Kconfig"}), upstream.PathSet({"kernel/sched.c"})
    ua = upstream.resolve(load("linux-6.1"), str(tb), paths=a)
    ub = upstream.resolve(load("linux-6.1"), str(tb), paths=b)
    assert "kernel/sched.c" in _listing(ub.partial_tree) and "kernel/sched.c" not in _listing(ua.partial_tree)
    record = ua.tarball.parent / upstream.PARTIAL / f"{a.key}.json"
    with monkeypatch.context() as m:
        m.setattr(upstream, "scan_import", _no_import)
        assert upstream.resolve(load("linux-6.1"), str(tb), paths=a).partial_tree == ua.partial_tree
        # a record listing other paths than its key says is not trusted
        record.write_text(json.dumps({"tree": ub.partial_tree, "paths": sorted(b.paths)}))
        with pytest.raises(AssertionError, match="imported again"):
            upstream.resolve(load("linux-6.1"), str(tb), paths=a)
    full = upstream.resolve(load("linux-6.1"), str(tb))   # no path set: a whole import
    assert not full.partial_tree and _listing(full.store_tree) == sorted([*PARTIAL_FILES, "scripts/dtc"])
    with monkeypatch.context() as m:   # from now on the whole tree serves every path set
        m.setattr(upstream, "scan_import", _no_import)
        again = upstream.resolve(load("linux-6.1"), str(tb), paths=upstream.PathSet({"fs/x.c"}))
        assert again.store_tree == full.store_tree and not again.partial_tree


def test_interrupted_partial_import_leaves_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12 for partial trees: killed after every member was read, before the commit."""
    tb = _partial_tarball(tmp_path)
    paths = upstream.PathSet({"net/Kconfig"})
    with monkeypatch.context() as m:
        def stop(self: upstream.ArchiveGuard) -> None:
            raise KeyboardInterrupt
        m.setattr(upstream.ArchiveGuard, "finish", stop)
        with pytest.raises(KeyboardInterrupt):
            upstream.resolve(load("linux-6.1"), str(tb), paths=paths)
    assert store_trees() == [] and [e for e in cache_entries() if e != "index.json"] == []
    up = upstream.resolve(load("linux-6.1"), str(tb), paths=paths)
    assert store_trees() == [f"refs/fsbuild/trees/{up.partial_tree}"]
    assert (up.tarball.parent / upstream.PARTIAL / f"{paths.key}.json").is_file()


def test_partial_import_of_a_hardlink_to_a_skipped_file_imports_whole(tmp_path: Path) -> None:
    """A hard link is stored as its target's blob; a target the partial import skipped
    cannot be, so the archive is imported whole rather than the link left out."""
    hard = tarfile.TarInfo("linux-1.0.0/kernel/k.lnk")
    hard.type, hard.linkname = tarfile.LNKTYPE, "linux-1.0.0/fs/x.c"
    tb = make_tarball(tmp_path / "linux-1.0.0.tar.gz", "linux-1.0.0", PARTIAL_FILES, extra=[(hard, b"")])
    up = upstream.resolve(load("linux-6.1"), str(tb), paths=upstream.PathSet({"kernel/k.lnk"}))
    assert up.store_tree and not up.partial_tree
    assert git(upstream.store_root(), "show", f"{up.store_tree}:kernel/k.lnk") == PARTIAL_FILES["fs/x.c"]


def test_partial_import_refuses_hostile_members_it_does_not_store(tmp_path: Path) -> None:
    """Every member is still checked: an escaping link outside the path set is refused."""
    bad = tarfile.TarInfo("linux-1.0.0/fs/evil")
    bad.type, bad.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
    tb = make_tarball(tmp_path / "linux-1.0.0.tar.gz", "linux-1.0.0", PARTIAL_FILES, extra=[(bad, b"")])
    with pytest.raises(UnsafePathError):
        upstream.resolve(load("linux-6.1"), str(tb), paths=upstream.PathSet({"net/Kconfig"}))
    assert store_trees() == []


def _header_fields(info: tarfile.TarInfo) -> tuple[object, ...]:
    return (info.name, info.mode, info.uid, info.gid, info.size, info.mtime, info.chksum, info.type,
            info.linkname, info.uname, info.gname, info.devmajor, info.devminor, type(info))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_header_parse_is_tarfiles_own(tmp_path: Path, fmt: int) -> None:
    """Every block the fast header parser accepts, tarfile's parser reads the same way
    (headers of every kind, data blocks, and headers with random bytes flipped); the rest
    goes to tarfile's parser."""
    import random
    tb = tmp_path / "t.tar"
    with tarfile.open(tb, "w", format=fmt) as tf:
        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **kw: object) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            for k, v in kw.items():
                setattr(info, k, v)
            tf.addfile(info, io.BytesIO(data) if data else None)
        add("linux/Makefile", data=makefile("1.0.0").encode(), mode=0o755, uname="dev", gname="dev")
        add("linux/" + "d" * 90 + "/" + "f" * 60 + ".c", data=b"x\n")           # ustar prefix / long name
        add("linux/dir", tarfile.DIRTYPE)
        add("linux/link", tarfile.SYMTYPE, linkname="Makefile")
        add("linux/hard", tarfile.LNKTYPE, linkname="linux/Makefile")
        add("linux/caf\u00e9.c", data=b"\xff" * 700, mtime=2**33 if fmt != tarfile.USTAR_FORMAT else 7)
        if fmt != tarfile.USTAR_FORMAT:
            add("linux/big-uid", uid=2**40)                                  # base-256 / pax number
    raw = tb.read_bytes()
    blocks = [raw[i:i + 512] for i in range(0, len(raw), 512)]
    rng = random.Random(14)
    for k in range(3000):
        b = bytearray(blocks[k % 8])
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(512)] = rng.randrange(256)
        blocks.append(bytes(b))
    accepted = 0
    for blk in blocks:
        try:
            fast = upstream._fast_header(tarfile.TarInfo, blk, "utf-8", "surrogateescape")
        except ValueError:
            fast = None
        if fast is not None:
            accepted += 1
            assert _header_fields(fast) == _header_fields(tarfile.TarInfo.frombuf(blk, "utf-8", "surrogateescape"))
    assert accepted >= 8


def _put_keys(n: int) -> None:
    for k in range(20):
        upstream._index_put(f"key-{n}-{k}", f"tarball-{n}")


def test_index_puts_side_by_side_keep_every_key() -> None:
    """A plain rebase imports OLD and NEW in two processes: the fingerprint index is read,
    changed and replaced by both, and an unlocked pair dropped keys (the next warm run
    then hashed a whole tarball again)."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_put_keys, args=(n,)) for n in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    index = json.loads((upstream.cache_root() / "index.json").read_text())
    assert sorted(index) == sorted(f"key-{n}-{k}" for n in range(6) for k in range(20))


# ---------------------------------------------------------------- partial directory imports (#14.3)

def _partial_dir(tmp: Path, name: str = "tree") -> Path:
    """PARTIAL_FILES as a directory, with the same directory symlink as _partial_tarball."""
    root = write_tree(tmp / name, PARTIAL_FILES)
    (root / "scripts").mkdir()
    (root / "scripts" / "dtc").symlink_to("../fs")
    return root


def _dir_partial_records() -> list[Path]:
    return sorted(upstream.cache_root().glob(f"{upstream.DIR_PARTIAL}*/{upstream.PARTIAL}/*.json"))


def test_partial_directory_answers_every_question_on_its_paths_as_the_whole_tree(tmp_path: Path) -> None:
    """A directory with a path set is stored as a partial tree, as a tarball is: the same
    answers for every named path and parent directory, and no whole-tree tarball written."""
    root = _partial_dir(tmp_path)
    paths = upstream.PathSet({"net/Kconfig", "net/Kconfig/sub.c", "kernel", "drivers/a/new.c",
                              "include/net/x.h", "scripts/dtc/x.c", "scripts/dtc"})
    part = upstream.resolve(load("linux-6.1"), str(root), paths=paths)
    assert part.partial_tree and not part.store_tree and part.version == "1.0.0"
    assert not part.tarball.exists() and not list(upstream.cache_root().glob("tree-*"))
    assert "fs/x.c" not in _listing(part.partial_tree)
    whole = upstream.resolve(load("linux-6.1"), str(root))
    assert whole.store_tree and not whole.partial_tree and whole.tarball.is_file()
    _assert_answers_as_whole(part, whole, paths)


def test_partial_directory_keyed_by_stat_signature_and_path_set(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A record serves only the same path set of the unchanged directory; a racy tree is
    imported but not recorded; a changed tree is re-read; a partial tree never serves a
    whole import, and once the whole tree is indexed it serves every path set."""
    root = _partial_dir(tmp_path)
    a, b = upstream.PathSet({"net/Kconfig"}), upstream.PathSet({"kernel/sched.c"})
    upstream.resolve(load("linux-6.1"), str(root), paths=a)   # files just written: racy
    assert _dir_partial_records() == []
    monkeypatch.setattr(upstream, "RACY_NS", 0)
    ua = upstream.resolve(load("linux-6.1"), str(root), paths=a)
    assert len(_dir_partial_records()) == 1
    with monkeypatch.context() as m:
        m.setattr(upstream, "store_import", _no_import)
        assert upstream.resolve(load("linux-6.1"), str(root), paths=a).partial_tree == ua.partial_tree
        with pytest.raises(AssertionError, match="imported again"):
            upstream.resolve(load("linux-6.1"), str(root), paths=b)
        (root / "net" / "Kconfig").write_text("changed\n")
        with pytest.raises(AssertionError, match="imported again"):
            upstream.resolve(load("linux-6.1"), str(root), paths=a)
    changed = upstream.resolve(load("linux-6.1"), str(root), paths=a)
    assert git(upstream.store_root(), "show", f"{changed.partial_tree}:net/Kconfig") == "changed\n"
    full = upstream.resolve(load("linux-6.1"), str(root))   # no path set: a whole import
    assert not full.partial_tree and "fs/x.c" in _listing(full.store_tree)
    with monkeypatch.context() as m:
        m.setattr(upstream, "store_import", _no_import)
        again = upstream.resolve(load("linux-6.1"), str(root), paths=b)
        assert again.store_tree == full.store_tree and not again.partial_tree


def test_interrupted_partial_directory_import_leaves_no_record(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after every selected file was sent, before the commit: nothing names it."""
    root = _partial_dir(tmp_path)
    paths = upstream.PathSet({"net/Kconfig"})
    monkeypatch.setattr(upstream, "RACY_NS", 0)
    real = upstream._feed_entries

    def killed(entries: list[upstream._Entry], blobs: upstream._Blobs) -> dict[str, tuple[int, str]]:
        real(entries, blobs)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(upstream, "_feed_entries", killed)
        with pytest.raises(KeyboardInterrupt):
            upstream.resolve(load("linux-6.1"), str(root), paths=paths)
    assert store_trees() == [] and _dir_partial_records() == []
    up = upstream.resolve(load("linux-6.1"), str(root), paths=paths)
    assert store_trees() == [f"refs/fsbuild/trees/{up.partial_tree}"] and len(_dir_partial_records()) == 1


def test_partial_directory_refuses_hostile_entries_it_does_not_store(tmp_path: Path) -> None:
    """Every entry is still walked and checked: an escaping link or a fifo outside the path
    set is refused before anything is stored."""
    paths = upstream.PathSet({"net/Kconfig"})
    root = _partial_dir(tmp_path, "a")
    (root / "fs" / "evil").symlink_to("../../../etc/passwd")
    with pytest.raises(UnsafePathError):
        upstream.resolve(load("linux-6.1"), str(root), paths=paths)
    fifo = _partial_dir(tmp_path, "b")
    os.mkfifo(fifo / "fs" / "pipe")
    with pytest.raises(UnsafePathError):
        upstream.resolve(load("linux-6.1"), str(fifo), paths=paths)
    assert store_trees() == []


def test_partial_directory_keeps_every_identity_rule(tmp_path: Path) -> None:
    """identify() answers as after a whole import: a release given is remembered for the
    whole tree's bytes (so that import is whole), a copy of those bytes finds it (its
    digest is needed: whole again), a name stating the release or an unrelated Makefile
    version needs no digest (partial)."""
    paths = upstream.PathSet({"net/Kconfig"})
    t = load("linux-6.1")
    a = _partial_dir(tmp_path, "a")
    given = upstream.resolve(t, str(a), "1.0.0-7", paths=paths)
    assert given.version == "1.0.0-7" and given.store_tree and not given.partial_tree
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(a), str(copy)], check=True)
    found = upstream.resolve(t, str(copy), paths=paths, strict=False)
    assert found.version == "1.0.0-7" and found.store_tree == given.store_tree
    named = tmp_path / "linux-1.0.0-9"
    subprocess.run(["cp", "-a", str(a), str(named)], check=True)
    up = upstream.resolve(t, str(named), paths=paths)
    assert up.version == "1.0.0-9" and up.partial_tree and not up.store_tree
    other = write_tree(tmp_path / "other", kernel_files("1.0.1"))
    up = upstream.resolve(t, str(other), paths=paths, strict=False)
    assert up.version == "1.0.1" and up.partial_tree


def _partial_repo(tmp: Path) -> Path:
    """PARTIAL_FILES committed, with the directory symlink and an export-ignored file
    (git archive, whole or partial, leaves it out)."""
    root = git_repo(tmp / "repo", {**PARTIAL_FILES, ".gitattributes": "net/Makefile export-ignore\n"})
    (root / "scripts").mkdir()
    (root / "scripts" / "dtc").symlink_to("../fs")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "link")
    return root


def test_partial_git_ref_answers_as_the_whole_tree_keyed_by_tree_and_path_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A git ref with a path set: `git archive` of the selected paths (same attributes as
    the whole archive), the same answers as the whole tree, a record per tree id and path
    set, never serving a whole import; once the whole tree is cached it serves."""
    from fsbuild.gitio import GitCat
    repo = _partial_repo(tmp_path)
    t = load("linux-6.1")
    paths = upstream.PathSet({"net/Kconfig", "net/Makefile", "kernel", "drivers/a/new.c", "include/net/x.h",
                              "scripts/dtc/x.c", "scripts/dtc"})
    part = upstream.resolve(t, f"{repo}@HEAD", paths=paths)
    assert part.partial_tree and not part.store_tree and part.version == "1.0.0"
    assert "fs/x.c" not in _listing(part.partial_tree) and not list(upstream.cache_root().glob("tree-*"))
    with monkeypatch.context() as m:   # the record of this tree id: not even listed again
        m.setattr(upstream, "store_import", _no_import)
        m.setattr(upstream, "_git_listing", _no_import)
        assert upstream.resolve(t, f"{repo}@HEAD", paths=paths).partial_tree == part.partial_tree
        with pytest.raises(AssertionError, match="imported again"):
            upstream.resolve(t, f"{repo}@HEAD", paths=upstream.PathSet({"fs/x.c"}))
    whole = upstream.resolve(t, f"{repo}@HEAD")
    assert whole.store_tree and not whole.partial_tree
    with GitCat(upstream.store_root()) as cat:
        p, w = cat.reader(part.partial_tree), cat.reader(whole.store_tree)
        assert [p(x) for x in sorted(paths.paths)] == [w(x) for x in sorted(paths.paths)]
        assert p("net/Makefile") is None and p("net/Kconfig") is not None
        asked = sorted(paths.dirs | paths.paths)
        assert [p.isdir(d) for d in asked] == [w.isdir(d) for d in asked]
    with monkeypatch.context() as m:
        m.setattr(upstream, "store_import", _no_import)
        again = upstream.resolve(t, f"{repo}@HEAD", paths=upstream.PathSet({"fs/x.c"}))
        assert again.store_tree == whole.store_tree and not again.partial_tree


def test_partial_git_ref_refuses_hostile_entries_it_does_not_store(tmp_path: Path) -> None:
    repo = _partial_repo(tmp_path)
    (repo / "fs" / "evil").symlink_to("../../../etc/passwd")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "evil")
    with pytest.raises(UnsafePathError):
        upstream.resolve(load("linux-6.1"), f"{repo}@HEAD", paths=upstream.PathSet({"net/Kconfig"}))
    assert store_trees() == []
