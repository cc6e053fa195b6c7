"""Upstream sources: turn an SRPM, a tarball, a directory or a git ref into one pristine
kernel tarball (plus the SRPM's spec and config-* files), validated against hostile
content (escaping names and links, devices, members or totals over the size ceilings) and
cached under state_dir()/upstream/<kind>-<sha256 of the source as given>/.

The tarball is the original bytes for SRPM/tarball sources and a deterministic tarball
(sorted entries, fixed mtime/owner, gzip mtime 0) for directories and git refs, so the
same content always yields the same digest."""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, BinaryIO

from fsbuild import paths, proc
from fsbuild.errors import ArchiveLimitError, MissingFileError, UnsafePathError, UpstreamError, UpstreamIdentityError
from fsbuild.fileio import atomic_write, walk_sorted
from fsbuild.initramfs import iter_newc_headers
from fsbuild.patch import resolves_inside, safe_relpath
from fsbuild.target import Target
from fsbuild.tario import write_tar_gz

CHUNK = 1 << 20
FIXED_MTIME = 1_000_000_000  # 2001-09-09: deterministic tarballs need *some* constant
META = "meta.json"
_MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
RPM_MAGIC = b"\xed\xab\xee\xdb"
GiB = 1 << 30
# Ceilings well above any kernel tree (~1.5 GiB unpacked, largest file ~30 MiB); a hostile
# archive can claim terabytes in a few hundred bytes (sparse or highly compressed members).
DEFAULT_MAX_MEMBER = 2 * GiB
DEFAULT_MAX_TOTAL = 16 * GiB
MAX_META = 1 << 20  # pax / GNU long-name headers: tarfile reads them whole
MAX_LINK = 4096     # PATH_MAX: a symlink target


@dataclass(frozen=True)
class Upstream:
    target: str
    version: str          # e.g. "2.6.32-431.17.1.el6" (SRPM) or "6.1.170" (Makefile)
    tarball: Path         # pristine tarball inside the cache
    topdir: str           # top-level directory inside the tarball
    digest: str           # sha256 of the tarball
    configs: dict[str, Path] = field(default_factory=dict)
    spec: Path | None = None


# ---------------------------------------------------------------- public entry point

def resolve(target: Target, src: str | None = None, version: str | None = None,
            strict: bool = True) -> Upstream:
    """Resolve `src` (default: the target's default source) into a cached Upstream whose
    `version` is the identity the source states (see `identify`); `version` is the user's
    --upstream-version, required when the source states none. strict=False (the old side
    of a rebase, only reported) settles for the Makefile version instead."""
    src = src or target.default_source()
    kind, path, ref = classify(src)
    if kind == "git":
        up = _from_git(target.name, path, ref or "HEAD")
    elif kind == "dir":
        up = _from_dir(target.name, path)
    elif kind == "srpm":
        up = _from_srpm(target.name, path)
    else:
        up = _from_tarball(target.name, path)
    return replace(up, version=identify(target, up, kind, path, ref, version, strict))


def classify(src: str) -> tuple[str, Path, str | None]:
    """(kind, path, ref) with kind in srpm|tarball|dir|git. Raises Missing/UpstreamError."""
    if src.startswith("git:"):
        spec = src[4:]
        where, _, ref = spec.rpartition("@") if "@" in spec else (spec, "", "HEAD")
        return "git", _existing(Path(where)), ref or "HEAD"
    path = Path(src)
    if not path.exists() and "@" in src:
        repo, _, ref = src.rpartition("@")
        if Path(repo).is_dir():
            return "git", Path(repo).resolve(), ref
    path = _existing(path)
    if path.is_dir():
        return "dir", path, None
    head = _head(path)
    if head.startswith(RPM_MAGIC):
        return "srpm", path, None
    if any(head.startswith(m) for m in _MAGIC) or _is_plain_tar(path):
        return "tarball", path, None
    raise UpstreamError(f"{src}: not an SRPM, a tarball (.tar.gz/.tar.bz2/.tar.xz), "
                        "a directory or a git ref (PATH@REF)")


def _existing(path: Path) -> Path:
    if not path.exists():
        raise MissingFileError(f"upstream source {path} does not exist")
    return path.resolve()


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(8)


def _is_plain_tar(path: Path) -> bool:
    with open(path, "rb") as fh:
        block = fh.read(512)
    return len(block) == 512 and block[257:262] == b"ustar"


# ---------------------------------------------------------------- identity

IDENTITY_FLAG = "--upstream-version"
_KVER = r"(\d+\.\d+(?:\.\d+)?)"
_REL = r"(\d[0-9A-Za-z._+~]*)"            # an RPM Release: no '-', starts with a digit
_NAMED = re.compile(rf"^(?:linux|kernel)-{_KVER}-{_REL}$")    # linux-2.6.32-431.29.2.el6
_TAGGED = re.compile(rf"^(?:v|linux-|kernel-)?{_KVER}-{_REL}$")
_DESCRIBED = re.compile(r"^(.+)-(\d+)-g([0-9a-f]+)$")        # git describe: TAG-N-gSHA
_GIVEN = re.compile(rf"^{_KVER}(?:-([0-9A-Za-z._+~]+))?$")
_TAR_EXT = re.compile(r"\.(tar(\.(gz|bz2|xz|zst))?|tgz|tbz2|txz)$")


def identify(target: Target, up: Upstream, kind: str, path: Path, ref: str | None,
             given: str | None = None, strict: bool = True) -> str:
    """The VERSION-RELEASE this source is, from what it states (SRPM header, tarball top
    directory and file name, directory name, git tag / describe), checked against its
    Makefile; `given` (--upstream-version) must agree with both. A source stating no
    release takes an identity given earlier for the same bytes, else (for targets whose
    release is the distribution's) UpstreamIdentityError: a new upstream never inherits
    the target's old release."""
    mk = _makefile_version(up.version)
    stated = _stated(kind, path, ref, up, mk)
    for where, ident in stated:
        if ident.partition("-")[0] != mk:
            raise UpstreamIdentityError(f"{path}: the {where} says {ident} but its Makefile says {mk}")
    idents = sorted({i for _, i in stated})
    if len(idents) > 1:
        says = ", ".join(f"the {w} says {i}" for w, i in stated)
        raise UpstreamIdentityError(f"{path}: {says}: rename it to match its content")
    if given is not None:
        return _accept_given(target, up, path, mk, idents, given)
    if idents:
        return idents[0]
    if remembered := _remembered(up):
        return remembered
    if strict and target.identity == "version-release":
        raise UpstreamIdentityError(
            f"{path} names no release (Makefile: {mk}; no SRPM spec, release in its name or git "
            f"tag): pass {IDENTITY_FLAG} VERSION-RELEASE, e.g. {mk}-{target.release}")
    return mk


def _accept_given(target: Target, up: Upstream, path: Path, mk: str, idents: list[str],
                  given: str) -> str:
    m = _GIVEN.match(given)
    if not m or (target.identity == "version-release" and not m.group(2)):
        raise UpstreamIdentityError(f"{IDENTITY_FLAG} {given!r}: want VERSION-RELEASE, "
                                    f"e.g. {mk}-{target.release} (release without '-')")
    if m.group(1) != mk:
        raise UpstreamIdentityError(f"{IDENTITY_FLAG} {given}: {path} is {mk} (its Makefile)")
    if idents and idents[0] != given:
        raise UpstreamIdentityError(f"{IDENTITY_FLAG} {given}: {path} says it is {idents[0]}")
    if m.group(2):
        _remember(up, given)
    return given


def _makefile_version(version: str) -> str:
    """The Makefile part of a cached version (a top dir or SRPM may have added -RELEASE)."""
    m = re.match(rf"^{_KVER}-{_REL}$", version)
    return m.group(1) if m else version


def _stated(kind: str, path: Path, ref: str | None, up: Upstream, mk: str) -> list[tuple[str, str]]:
    """(where, VERSION-RELEASE) for every place of the source that names its release."""
    out: list[tuple[str, str]] = []
    if kind == "srpm":
        out += [("SRPM spec", i) for i in [_srpm_identity(path)] if i]
    if kind in ("srpm", "tarball"):
        out += [("top directory", i) for i in [_named(up.topdir)] if i]
    if kind == "tarball":
        out += [("file name", i) for i in [_named(_TAR_EXT.sub("", path.name))] if i]
    if kind == "dir":
        out += [("directory name", i) for i in [_named(path.name)] if i]
    if kind == "git":
        out += [("git ref", i) for i in [_git_identity(path, ref or "HEAD", mk)] if i]
    return out


def _named(name: str) -> str | None:
    m = _NAMED.match(name)
    return f"{m.group(1)}-{m.group(2)}" if m else None


def _srpm_identity(path: Path) -> str | None:
    import rpmfile  # lazy: only SRPM imports need it

    try:
        with rpmfile.open(str(path)) as rpm:
            ver, rel = _hdr(rpm.headers.get("version")), _hdr(rpm.headers.get("release"))
    except Exception as exc:  # rpmfile raises bare Exceptions on corrupt headers
        raise UpstreamError(f"{path}: unreadable SRPM header ({exc})") from exc
    return f"{ver}-{rel}" if ver and rel else None


def _git_identity(repo: Path, ref: str, mk: str) -> str | None:
    """The ref's own name if it is a release tag, else `git describe --tags`: TAG exactly,
    or TAG-N-gSHA as release REL.N.gSHA (N commits on top of that release). A described tag
    of another Makefile version is an ancestor, not this kernel: ignored."""
    if m := _TAGGED.match(ref.removeprefix("refs/tags/")):
        return f"{m.group(1)}-{m.group(2)}"
    cp = proc.run(["git", "-C", str(repo), "describe", "--tags", "--long", f"{ref}^{{commit}}"],
                  check=False, error=UpstreamError)   # exit 128: no tag at all
    d = _DESCRIBED.match(cp.stdout.decode(errors="replace").strip()) if cp.returncode == 0 else None
    if not d or not (m := _TAGGED.match(d.group(1))) or m.group(1) != mk:
        return None
    suffix = "" if d.group(2) == "0" else f".{d.group(2)}.g{d.group(3)}"
    return f"{m.group(1)}-{m.group(2)}{suffix}"


def _identity_file(up: Upstream) -> Path:
    # beside the cached tarball: the entry of exactly these bytes, imported this way
    return up.tarball.parent / "identity"


def _remembered(up: Upstream) -> str | None:
    try:
        return _identity_file(up).read_text().strip() or None
    except OSError:
        return None


def _remember(up: Upstream, ident: str) -> None:
    """The identity a user gave for these exact bytes: later runs (`fsbuild rpm`) reuse it."""
    if _identity_file(up).parent.is_dir():
        atomic_write(_identity_file(up), ident.encode())


# ---------------------------------------------------------------- the cache

def cache_root() -> Path:
    return paths.state_dir() / "upstream"


def _index_path() -> Path:
    return cache_root() / "index.json"


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _index_get(key: str) -> str | None:
    try:
        value = json.loads(_index_path().read_text()).get(key)
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
        return None
    return value if isinstance(value, str) else None


def _index_put(key: str, digest: str) -> None:
    try:
        index = json.loads(_index_path().read_text())
    except (OSError, ValueError):
        index = {}
    index[key] = digest
    atomic_write(_index_path(), json.dumps(index, indent=1, sort_keys=True).encode())


def _entry_key(kind: str, digest: str) -> str:
    """Cache entries are keyed by the source as given: an SRPM holding a tarball is not that
    tarball (it adds configs and a spec); directories and git refs share `tree`."""
    return f"{kind}-{digest}"


def _committed(target: str, key: str) -> Upstream:
    """The entry just written: unreadable now means the cache directory is broken."""
    up = _cached(target, key)
    if up is None:
        raise UpstreamError(f"{cache_root() / key}: the cache entry just written cannot be read back")
    return up


def _cached(target: str, key: str) -> Upstream | None:
    entry = cache_root() / key
    try:
        meta = json.loads((entry / META).read_text())
        tarball = entry / meta["tarball"]
        digest = meta["digest"]  # entries older than per-kind keys lack it: re-imported
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not tarball.is_file():
        return None
    return Upstream(target=target, version=meta["version"], tarball=tarball,
                    topdir=meta["topdir"], digest=digest,
                    configs={n: entry / "configs" / n for n in meta.get("configs", [])},
                    spec=entry / meta["spec"] if meta.get("spec") else None)


def _staging() -> Path:
    """A temp dir inside the cache (same filesystem) so completion is one rename."""
    cache_root().mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".import-", dir=cache_root()))


def _commit_entry(stage: Path, key: str, meta: dict[str, object]) -> Path:
    (stage / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    final = cache_root() / key
    if final.exists():  # a concurrent/previous import of the same bytes won
        shutil.rmtree(stage, ignore_errors=True)
        if (final / META).is_file():
            return final
        shutil.rmtree(final)
    os.rename(stage, final)
    return final


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- tarball sources

def _from_tarball(target: str, path: Path) -> Upstream:
    key = _fingerprint(path)
    entry = _index_get(key)
    if entry and (up := _cached(target, entry)):
        return up
    digest = sha256_file(path)
    entry = _entry_key("tarball", digest)
    if up := _cached(target, entry):
        _index_put(key, entry)
        return up
    topdir, version = scan_tarball(path)
    stage = _staging()
    try:
        _link_or_copy(path, stage / path.name)
        _commit_entry(stage, entry, {"kind": "tarball", "digest": digest, "version": version,
                                     "topdir": topdir, "tarball": path.name, "source": str(path)})
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _index_put(key, entry)
    return _committed(target, entry)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def scan_tarball(path: Path | None = None, fileobj: IO[bytes] | None = None) -> tuple[str, str]:
    """Validate every member (no tar slip, no link leading out of the top directory, no
    device nodes, one top directory, sizes under the ceilings) and return (topdir, version
    from the top Makefile)."""
    where = str(path or "tarball")
    try:
        with open_tar(path, fileobj) as tf:
            topdir, makefile = _scan_members(tf, where)
    except tarfile.TarError as exc:
        raise UpstreamError(f"{where}: not a readable tarball ({exc})") from exc
    except (EOFError, OSError, ValueError) as exc:  # truncated / corrupt compression
        raise UpstreamError(f"{where}: corrupt tarball ({exc})") from exc
    if makefile is None:
        raise UpstreamError(f"{where}: no {topdir}/Makefile: not a kernel tree")
    version = makefile_version(makefile)
    # RHEL-style tarballs name their release in the top dir: linux-2.6.32-431.17.1.el6
    if topdir.startswith(f"linux-{version}-"):
        version = topdir[len("linux-"):]
    return topdir, version


class _BoundedInfo(tarfile.TarInfo):
    """tarfile reads pax and GNU long-name headers into memory whole: refuse huge ones
    before it does."""

    def _proc_gnulong(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        _meta_size(self)
        info: tarfile.TarInfo = super()._proc_gnulong(tf)  # type: ignore[misc]  # private in typeshed
        return info

    def _proc_pax(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        _meta_size(self)
        info: tarfile.TarInfo = super()._proc_pax(tf)  # type: ignore[misc]  # private in typeshed
        return info


def _meta_size(info: tarfile.TarInfo) -> None:
    if info.size > MAX_META:
        raise ArchiveLimitError(f"tar header of {info.size} bytes for {info.name!r} is over "
                                f"the {MAX_META}-byte ceiling")


def open_tar(path: Path | None = None, fileobj: IO[bytes] | None = None) -> tarfile.TarFile:
    return tarfile.open(name=path, fileobj=fileobj, mode="r:*", tarinfo=_BoundedInfo)


def _scan_members(tf: tarfile.TarFile, where: str) -> tuple[str, bytes | None]:
    guard = ArchiveGuard(where, single_top=True)
    makefile: bytes | None = None
    for m in tf:
        name = guard.member(m)
        if name == f"{guard.topdir}/Makefile" and m.isfile():
            fh = tf.extractfile(m)
            makefile = fh.read(MAX_LINK * 256) if fh else None
    guard.finish()
    if guard.topdir is None:
        raise UpstreamError(f"{where}: empty tarball")
    return guard.topdir, makefile


def limits() -> tuple[int, int]:
    """(member, total) ceilings in bytes: FSBUILD_MAX_MEMBER / FSBUILD_MAX_TOTAL (bytes, or
    with a K/M/G/T suffix), 2 GiB / 16 GiB by default."""
    return (_size_env("FSBUILD_MAX_MEMBER", DEFAULT_MAX_MEMBER),
            _size_env("FSBUILD_MAX_TOTAL", DEFAULT_MAX_TOTAL))


def _size_env(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)i?B?", text, re.I)
    if not m:
        raise ArchiveLimitError(f"{name}={text!r} is not a size (bytes, or with K/M/G/T)")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


class ArchiveGuard:
    """Checks an archive's members in order, the way extracting them would see them: names
    and link targets must stay inside the tree (the top directory when single_top), resolved
    through every earlier symlink rather than by their text; member and total sizes stay
    under the ceilings. finish() re-checks every link against the final set of links."""

    def __init__(self, where: str, single_top: bool = False) -> None:
        self.where = where
        self.single_top = single_top
        self.topdir: str | None = None
        self.links: dict[str, str] = {}
        self.files: set[str] = set()
        self.total = 0
        self.max_member, self.max_total = limits()

    def member(self, m: tarfile.TarInfo) -> str:
        """The member's normalized name; raises UnsafePathError / ArchiveLimitError."""
        name = safe_relpath(m.name, self.where, "member")
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            raise UnsafePathError(f"{self.where}: member {m.name!r} is a device node or fifo")
        self.parent_inside(m.name)  # as written: `q/..` is not `.` when q is a link
        self._top(name)
        if self.single_top and name == self.topdir and (m.issym() or m.islnk()):
            raise UnsafePathError(f"{self.where}: the top directory {name!r} is a link")
        if name in self.links:
            raise UnsafePathError(f"{self.where}: member {m.name!r} replaces a symlink")
        if m.issym():
            self.link(name, m.linkname)
        elif m.islnk():
            self._hardlink(name, m.linkname)
        elif m.isfile():
            self.size(name, m.size)
            self.files.add(name)
        return name

    def size(self, name: str, size: int) -> None:
        if size > self.max_member:
            raise ArchiveLimitError(f"{self.where}: member {name} is {size} bytes, over the "
                                    f"{self.max_member}-byte ceiling (FSBUILD_MAX_MEMBER)")
        self.total += size
        if self.total > self.max_total:
            raise ArchiveLimitError(f"{self.where}: members total over the {self.max_total}-byte "
                                    "ceiling (FSBUILD_MAX_TOTAL)")

    def link(self, name: str, dest: str) -> None:
        if len(dest) > MAX_LINK or "\0" in dest:
            raise UnsafePathError(f"{self.where}: symlink {name!r} has an invalid target")
        if posixpath.isabs(dest) or not self._inside(name, dest):
            raise UnsafePathError(f"{self.where}: symlink {name!r} -> {dest!r} leads outside the tree")
        self.links[name] = dest

    def finish(self) -> None:
        """Links are followed after extraction: a later link may redirect an earlier one."""
        for name, dest in self.links.items():
            if not self._inside(name, dest):
                raise UnsafePathError(f"{self.where}: symlink {name!r} -> {dest!r} leads "
                                      "outside the tree (through another link)")

    def _top(self, name: str) -> None:
        if not self.single_top:
            return
        top = name.split("/", 1)[0]
        if self.topdir is None:
            self.topdir = top
        elif top != self.topdir:
            raise UpstreamError(f"{self.where}: more than one top-level directory "
                                f"({self.topdir}, {top})")

    def _floor(self) -> int:
        return 1 if self.single_top else 0

    def _inside(self, name: str, dest: str) -> bool:
        return resolves_inside(name.split("/")[:-1], dest, self.links.get, self._floor())

    def parent_inside(self, name: str) -> None:
        """A member written through an earlier symlink lands where that link points."""
        if not self.links and ".." not in name.split("/"):
            return
        parent = posixpath.dirname(name)
        if parent and not resolves_inside([], parent, self.links.get, self._floor()):
            raise UnsafePathError(f"{self.where}: member {name!r} is written through a "
                                  "symlink leading outside the tree")

    def _hardlink(self, name: str, dest: str) -> None:
        target = safe_relpath(dest, self.where, what="hardlink target")
        self.parent_inside(dest)
        if self.single_top and target.split("/", 1)[0] != self.topdir:
            raise UnsafePathError(f"{self.where}: hardlink {name!r} -> {dest!r} points outside "
                                  f"the top directory {self.topdir}")
        if target in self.links:  # a hard link to a symlink is that symlink at a new place
            self.link(name, self.links[target])
        elif target not in self.files:
            raise UpstreamError(f"{self.where}: hardlink {name!r} -> {dest!r} names no "
                                "earlier file of the archive")


def check_member(m: tarfile.TarInfo, where: str) -> str:
    """The member's normalized name, or UnsafePathError when it is a device node or its name
    leaves the tree; link texts are checked alone. Where links resolve needs the whole
    archive: ArchiveGuard (scan_tarball) checks that."""
    name = safe_relpath(m.name, where, "member")
    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        raise UnsafePathError(f"{where}: member {m.name!r} is a device node or fifo")
    if m.issym():
        dest = m.linkname
        if posixpath.isabs(dest) or _escapes(posixpath.join(posixpath.dirname(name), dest)):
            raise UnsafePathError(f"{where}: symlink {m.name!r} -> {dest!r} leads outside the tree")
    if m.islnk():
        safe_relpath(m.linkname, where, what="hardlink target")
    return name


def stream_member(src: IO[bytes], write: Callable[[bytes], object], size: int, where: str) -> None:
    """Copy exactly `size` bytes in CHUNK pieces: a member is never held whole in memory."""
    while size > 0:
        chunk = src.read(min(CHUNK, size))
        if not chunk:
            raise UpstreamError(f"{where}: truncated member data")
        write(chunk)
        size -= len(chunk)


def _escapes(rel: str) -> bool:
    norm = posixpath.normpath(rel)
    return posixpath.isabs(norm) or norm == ".." or norm.startswith("../")


_MK_VAR = re.compile(rb"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=[ \t]*(\S*)[ \t]*$", re.M)


def makefile_version(makefile: bytes) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL + EXTRAVERSION of a kernel's top Makefile."""
    found: dict[str, str] = {}
    for key, value in _MK_VAR.findall(makefile[:4096]):
        found.setdefault(key.decode(), value.decode())
    if "VERSION" not in found or "PATCHLEVEL" not in found:
        raise UpstreamError("top Makefile has no VERSION/PATCHLEVEL: not a kernel tree")
    version = f"{found['VERSION']}.{found['PATCHLEVEL']}"
    if found.get("SUBLEVEL"):
        version += f".{found['SUBLEVEL']}"
    return version + found.get("EXTRAVERSION", "")


# ---------------------------------------------------------------- SRPM sources

def _from_srpm(target: str, path: Path) -> Upstream:
    key = _fingerprint(path)
    entry = _index_get(key)
    if entry and (up := _cached(target, entry)):
        return up
    entry = _entry_key("srpm", sha256_file(path))
    if up := _cached(target, entry):
        _index_put(key, entry)
        return up
    stage = _staging()
    try:
        digest, meta = _extract_srpm(path, stage)
        _commit_entry(stage, entry, {**meta, "kind": "srpm", "digest": digest})
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _index_put(key, entry)
    return _committed(target, entry)


def _extract_srpm(path: Path, stage: Path) -> tuple[str, dict[str, object]]:
    import rpmfile  # lazy: only SRPM imports need it

    try:
        with rpmfile.open(str(path)) as rpm:
            headers = rpm.headers
            ver = _hdr(headers.get("version"))
            rel = _hdr(headers.get("release"))
            wanted = _copy_srpm_members(rpm.data_file, stage, str(path))
    except (UnsafePathError, UpstreamError):
        raise
    except Exception as exc:  # rpmfile raises bare Exceptions on corrupt headers/payloads
        raw = exc.args[0] if exc.args else None  # e.g. b'8e543c': the magic it did not find
        why = f"bad magic {raw.hex()}" if isinstance(raw, bytes) else str(exc).strip()
        raise UpstreamError(f"{path}: not an RPM, or a corrupt one "
                            f"({why or type(exc).__name__})") from exc
    tarballs = sorted(n for n in wanted if re.match(r"linux-.*\.tar(\.(gz|bz2|xz))?$", n))
    if not tarballs:
        raise UpstreamError(f"{path}: no linux-*.tar.* source inside the SRPM")
    tarball = stage / tarballs[0]
    topdir, mk_version = scan_tarball(tarball)
    version = f"{ver}-{rel}" if ver and rel else mk_version
    digest = sha256_file(tarball)
    (stage / "configs").mkdir(exist_ok=True)
    configs = sorted(n for n in wanted if n.startswith("config-"))
    for n in configs:
        os.rename(stage / n, stage / "configs" / n)
    specs = sorted(n for n in wanted if n.endswith(".spec"))
    return digest, {"version": version, "topdir": topdir, "tarball": tarballs[0],
                    "configs": configs, "spec": specs[0] if specs else None,
                    "source": str(path)}


def _hdr(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value) if value is not None else ""


def _copy_srpm_members(stream: BinaryIO, stage: Path, where: str) -> list[str]:
    """One pass over the cpio payload: validate every member, copy the tarball, spec and
    config-* files (by basename, flat) into `stage`."""
    wanted: list[str] = []
    guard = ArchiveGuard(where)
    for name, mode, size in iter_cpio(stream, where):
        name = safe_relpath(name, where, "member")
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            raise UnsafePathError(f"{where}: member {name!r} is a device node or fifo")
        guard.parent_inside(name)
        base = posixpath.basename(name)
        keep = kind == stat.S_IFREG and (re.match(r"linux-.*\.tar", base) or base.startswith("config-")
                                         or base.endswith(".spec"))
        if kind == stat.S_IFLNK:
            if size > MAX_LINK:
                raise UnsafePathError(f"{where}: symlink {name!r} has a {size}-byte target")
            guard.link(name, stream.read(size).decode(errors="replace"))
        else:
            if kind == stat.S_IFREG:
                guard.size(name, size)
            if keep:
                with open(stage / base, "wb") as out:
                    _copy_n(stream, out, size)
                wanted.append(base)
            else:
                _copy_n(stream, None, size)
    guard.finish()
    return wanted


def iter_cpio(stream: BinaryIO, where: str) -> Iterator[tuple[str, int, int]]:
    """newc cpio headers (initramfs.iter_newc_headers): yields (name, mode, size) with the
    stream at the member data; the caller reads exactly `size` bytes."""
    try:
        for name, mode, size in iter_newc_headers(stream):
            yield name.removeprefix("./") if name != "./" else ".", mode, size
    except ValueError as exc:
        raise UpstreamError(f"{where}: corrupt cpio payload ({exc})") from None


def _copy_n(src: BinaryIO, dst: IO[bytes] | None, n: int) -> None:
    while n > 0:
        chunk = src.read(min(CHUNK, n))
        if not chunk:
            raise UpstreamError("truncated SRPM payload")
        if dst is not None:
            dst.write(chunk)
        n -= len(chunk)


# ---------------------------------------------------------------- directory and git sources

@dataclass
class _Entry:
    name: str            # relative to the tree root
    kind: str            # file | dir | symlink
    mode: int = 0o644
    data: bytes | None = None   # file content ...
    path: Path | None = None    # ... or where to read it (dir) ...
    member: tuple[tarfile.TarFile, tarfile.TarInfo] | None = None  # ... or a tar member (git)
    link: str = ""
    stamp: tuple[int, ...] = ()  # (size, mtime_ns, ctime_ns, inode) of a dir source's file

    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        if self.member is not None:
            return self.member[1].size
        assert self.path is not None  # an entry has data, a member or a path
        return self.stamp[0] if self.stamp else os.stat(self.path).st_size

    def open(self) -> IO[bytes]:
        """The content as a stream: files are copied in chunks, never read whole."""
        if self.data is not None:
            return io.BytesIO(self.data)
        if self.member is not None:
            fh = self.member[0].extractfile(self.member[1])
            return fh if fh is not None else io.BytesIO(b"")
        assert self.path is not None  # an entry has data, a member or a path
        return open(self.path, "rb")


# A file changed within this window of its last stat may not show in mtime/ctime yet (coarse
# timestamps): such a tree is not indexed by stat (git's "racy" rule).
RACY_NS = 2_000_000_000


def _from_dir(target: str, root: Path) -> Upstream:
    """A directory: re-tarring 80k files costs ~15 s, so an unchanged tree (every name, mode,
    size, mtime, ctime and inode as before) is found in the index by its stat signature."""
    entries = list(_walk_dir(root))
    key, settled = _dir_key(root, entries)
    entry = _index_get(key)
    if entry and (up := _cached(target, entry)):
        return up
    up = _from_entries(target, entries, f"dir:{root}")
    if settled:
        _index_put(key, _entry_key("tree", up.digest))
    return up


def _dir_key(root: Path, entries: list[_Entry]) -> tuple[str, bool]:
    h = hashlib.sha256()
    newest = 0
    for e in entries:
        newest = max([newest, *e.stamp[1:3]])
        h.update(f"{e.name}\0{e.kind}\0{e.mode:o}\0{e.stamp}\0{e.link}\n".encode(errors="surrogateescape"))
    return f"dir-stat:{root.resolve()}:{h.hexdigest()}", newest < time.time_ns() - RACY_NS


def _walk_dir(root: Path) -> Iterator[_Entry]:
    guard = ArchiveGuard(str(root))
    for rel, full in walk_sorted(root, skip_dirs={".git"}):
        st = full.lstat()
        if stat.S_ISLNK(st.st_mode):
            dest = os.readlink(full)
            guard.link(rel, dest)
            yield _Entry(rel, "symlink", link=dest)
        elif stat.S_ISDIR(st.st_mode):
            yield _Entry(rel, "dir", mode=0o755)
        elif stat.S_ISREG(st.st_mode):
            guard.size(rel, st.st_size)
            yield _Entry(rel, "file", mode=0o755 if st.st_mode & 0o100 else 0o644, path=full,
                         stamp=(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        else:
            raise UnsafePathError(f"{root}: {rel} is a device node, fifo or socket")
    guard.finish()


def _from_git(target: str, repo: Path, ref: str) -> Upstream:
    """A git ref: its tree id keys the cache, so an unchanged ref costs one rev-parse."""
    tree = proc.run(["git", "-C", repo, "rev-parse", "--verify", f"{ref}^{{tree}}"],
                    error=UpstreamError).stdout.decode().strip()
    key = f"git-tree:{tree}"
    entry = _index_get(key)
    if entry and (up := _cached(target, entry)):
        return up
    stage = _staging()
    try:  # the archive goes to a file, not into memory: a kernel tree is ~1.5 GiB
        archive = stage / "tree.tar"
        proc.run(["git", "-C", repo, "archive", "--format=tar", "-o", archive, tree],
                 error=UpstreamError)
        with open_tar(archive) as tf:
            entries = list(_tar_entries(tf, f"{repo}@{ref}"))
            up = _from_entries(target, entries, f"git:{repo}@{ref}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _index_put(key, _entry_key("tree", up.digest))
    return up


def _tar_entries(tf: tarfile.TarFile, where: str) -> Iterator[_Entry]:
    guard = ArchiveGuard(where)
    for m in tf:
        name = guard.member(m)
        if m.isdir():
            yield _Entry(name, "dir", mode=0o755)
        elif m.issym():
            yield _Entry(name, "symlink", link=m.linkname)
        elif m.isfile():
            yield _Entry(name, "file", mode=0o755 if m.mode & 0o100 else 0o644, member=(tf, m))
    guard.finish()


def _from_entries(target: str, entries: list[_Entry], where: str) -> Upstream:
    entries.sort(key=lambda e: e.name)
    makefile = next((e for e in entries if e.name == "Makefile" and e.kind == "file"), None)
    if makefile is None:
        raise UpstreamError(f"{where}: no top-level Makefile: not a kernel tree")
    with makefile.open() as fh:
        version = makefile_version(fh.read(MAX_LINK * 256))
    topdir = f"linux-{version}"
    stage = _staging()
    try:
        tmp = stage / f"{topdir}.tar.gz"
        write_deterministic_tar(tmp, topdir, entries)
        digest = sha256_file(tmp)
        entry = _entry_key("tree", digest)
        if _cached(target, entry) is None:
            _commit_entry(stage, entry, {"kind": "tree", "digest": digest, "version": version,
                                         "topdir": topdir, "tarball": tmp.name, "source": where})
        else:
            shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return _committed(target, entry)


def write_deterministic_tar(out: Path, topdir: str, entries: list[_Entry]) -> None:
    """Same entries -> same bytes: sorted names, fixed mtime/owner, gzip header mtime 0."""
    with open(out, "wb") as raw:
        write_tar_gz(raw, entries, mtime=FIXED_MTIME, level=6, topdir=topdir)
