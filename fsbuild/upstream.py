"""Upstream sources: turn an SRPM, a tarball, a directory or a git ref into one pristine
kernel tarball (plus the SRPM's spec and config-* files), validated against hostile
content (escaping names and links, devices, members or totals over the size ceilings) and
cached under state_dir()/upstream/<kind>-<sha256 of the source as given>/.

The tarball is the original bytes for SRPM/tarball sources and a deterministic tarball
(sorted entries, fixed mtime/owner, gzip mtime 0) for directories and git refs, so the
same content always yields the same digest."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import IO, BinaryIO, Self, TypeVar

from fsbuild import paths, proc, progress
from fsbuild.errors import ArchiveLimitError, MissingFileError, UnsafePathError, UpstreamError, UpstreamIdentityError
from fsbuild.fileio import atomic_write, sha256_file
from fsbuild.initramfs import iter_newc_headers
from fsbuild.patch import resolves_inside, safe_relpath
from fsbuild.target import Target
from fsbuild.tario import Readable, write_tar_gz

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
    store_tree: str = ""  # its git tree in the shared object store ("" when not imported there)
    # a tree of only some paths (see PathSet), for plain-mode rebases; never a full tree
    partial_tree: str = ""


# ---------------------------------------------------------------- public entry point

def resolve(target: Target, src: str | None = None, version: str | None = None,
            strict: bool = True, paths: PathSet | None = None) -> Upstream:
    """Resolve `src` (default: the target's default source) into a cached Upstream whose
    `version` is the identity the source states (see `identify`); `version` is the user's
    --upstream-version, required when the source states none. strict=False (the old side
    of a rebase, only reported) settles for the Makefile version instead.

    `paths`: the caller reads only these paths (a plain-mode rebase): a tarball, directory
    or git ref not yet in the store is then imported as `partial_tree` only (every member
    still checked), which skips hashing and storing the rest. A full tree, when stored,
    always serves."""
    src = src or target.default_source()
    kind, path, ref = classify(src)
    if kind == "git":
        up = _from_git(target.name, path, ref or "HEAD", paths, given_release(version))
    elif kind == "dir":
        up = _from_dir(target.name, path, paths, given_release(version))
    elif kind == "srpm":
        up = _from_srpm(target.name, path)
    else:
        up = _from_tarball(target.name, path, paths)
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


def given_release(given: str | None) -> bool:
    """Whether `_accept_given` would remember `given` (it names a release) for the source's
    bytes: a directory or git ref is then imported whole, its digest known."""
    m = _GIVEN.match(given) if given is not None else None
    return bool(m and m.group(2))


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
    # locked: two imports side by side (a plain rebase's OLD and NEW) must not drop each
    # other's key, or the next warm run hashes a whole tarball again
    # (the lock is on the cache directory itself: index.json is replaced, not rewritten)
    cache_root().mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_root(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            index = json.loads(_index_path().read_text())
        except (OSError, ValueError):
            index = {}
        index[key] = digest
        atomic_write(_index_path(), json.dumps(index, indent=1, sort_keys=True).encode())
    finally:
        os.close(fd)


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
                    spec=entry / meta["spec"] if meta.get("spec") else None,
                    store_tree=_stored_tree(meta.get("store_tree")))


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


# ---------------------------------------------------------------- tarball sources

def _from_tarball(target: str, path: Path, paths: PathSet | None = None) -> Upstream:
    key = _fingerprint(path)
    entry = _index_get(key)
    up = _cached(target, entry) if entry else None
    if up is None:
        entry = _entry_key("tarball", sha256_file(path))
        up = _cached(target, entry)
        if up is not None:
            _index_put(key, entry)
    if up is not None and store_has_tree(up.store_tree):
        return up
    if up is not None and paths is not None and (tree := _partial_get(up, paths)):
        return replace(up, partial_tree=tree)
    assert entry is not None   # set above whenever up is None
    topdir, version, tree, partial = _import_tarball(path, paths)
    if up is None:
        up = _new_tarball_entry(target, path, key, entry, topdir, version, "" if partial else tree)
    elif not partial:   # an entry made by partial imports becomes a full one
        _set_store_tree(up, tree)
        up = replace(up, store_tree=tree)
    if partial:
        _partial_put(up, paths, tree)   # type: ignore[arg-type]  # partial implies paths
        return replace(up, partial_tree=tree)
    return up


def _import_tarball(path: Path, paths: PathSet | None) -> tuple[str, str, str, bool]:
    """(topdir, version, tree, partial): only `paths` when given and the archive allows it."""
    if paths is not None:
        try:
            return (*scan_import(path, paths), True)
        except _NotPartial:
            pass
    return (*scan_import(path), False)


def _new_tarball_entry(target: str, path: Path, key: str, entry: str, topdir: str, version: str,
                       tree: str) -> Upstream:
    stage = _staging()
    try:
        _link_or_copy(path, stage / path.name)
        _commit_entry(stage, entry, {"kind": "tarball", "digest": entry.partition("-")[2],
                                     "version": version, "topdir": topdir, "tarball": path.name,
                                     "source": str(path), "store_tree": tree})
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _index_put(key, entry)
    return _committed(target, entry)


def _set_store_tree(up: Upstream, tree: str) -> None:
    """Record the full tree in an existing entry (one atomic rewrite of its meta)."""
    meta_path = up.tarball.parent / META
    meta = json.loads(meta_path.read_text())
    meta["store_tree"] = tree
    atomic_write(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())


# ---------------------------------------------------------------- partial trees
#
# A plain-mode rebase reads only the paths its patches name. Importing just those (plus
# what makes every directory question come out as on the whole tree) skips the hashing,
# compressing and storing of ~80k other files: the decompressor's work is what remains.

PARTIAL = "partial"   # in a cache entry: one record per path set


class PathSet:
    """The paths a reader will ask about. Its partial tree holds, from the whole tree:
    every member at one of `paths` or below one (a path that is a directory brings its
    subtree), every file or link at one of their parent directories, and one file or link
    under each existing parent directory, so that "is D a directory" is answered as the
    whole tree would. The top Makefile is always in (the version comes from it)."""

    def __init__(self, paths: set[str] | frozenset[str]) -> None:
        self.paths = frozenset(paths) | {"Makefile"}
        self.dirs = frozenset(d for p in self.paths for d in _ancestors(p))
        body = "\0".join(sorted(self.paths)).encode(errors="surrogateescape")
        self.key = hashlib.sha256(body).hexdigest()

    def wanted(self, rel: str) -> bool:
        """A member of the partial tree by its own name (not as a witness)."""
        return rel in self.paths or rel in self.dirs or any(a in self.paths for a in _ancestors(rel))


def _ancestors(rel: str) -> Iterator[str]:
    """Every proper parent directory of `rel`, deepest first."""
    while "/" in rel:
        rel = rel.rpartition("/")[0]
        yield rel


class _Selection:
    """One import's choice of members for a PathSet: wanted ones, and the first file or
    link under each parent directory not yet witnessed."""

    def __init__(self, paths: PathSet) -> None:
        self.paths = paths
        self.unwitnessed = set(paths.dirs)

    def take(self, rel: str) -> bool:
        witness = False
        if self.unwitnessed:
            for d in _ancestors(rel):
                if d in self.unwitnessed:
                    self.unwitnessed.discard(d)
                    witness = True
        return self.paths.wanted(rel) or witness


class _NotPartial(Exception):
    """Internal: the archive has a hard link the partial tree would need the target of
    (which was skipped): the import is done whole instead."""


def _partial_dir(up: Upstream) -> Path:
    return up.tarball.parent / PARTIAL


def _partial_get(up: Upstream, paths: PathSet) -> str:
    """The stored partial tree of exactly this path set, or "" (absent, unreadable, for
    another path set, or its tree missing from the store)."""
    try:
        rec = json.loads((_partial_dir(up) / f"{paths.key}.json").read_text())
        tree, listed = _stored_tree(rec.get("tree")), rec.get("paths")
    except (OSError, ValueError, AttributeError):
        return ""
    if listed != sorted(paths.paths) or not store_has_tree(tree):
        return ""
    return tree


def _partial_put(up: Upstream, paths: PathSet, tree: str) -> None:
    """Written after the tree is in the store (under its ref): a record never names a tree
    that is not complete."""
    _partial_dir(up).mkdir(parents=True, exist_ok=True)
    atomic_write(_partial_dir(up) / f"{paths.key}.json",
                 json.dumps({"tree": tree, "paths": sorted(paths.paths)}, indent=1).encode())


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
    with _tar_errors(where), open_tar(path, fileobj) as tf:
        topdir, makefile = _scan_members(tf, where)
    version = makefile_version(_kernel_makefile(makefile, where, topdir))
    # RHEL-style tarballs name their release in the top dir: linux-2.6.32-431.17.1.el6
    if topdir.startswith(f"linux-{version}-"):
        version = topdir[len("linux-"):]
    return topdir, version


class _BoundedInfo(tarfile.TarInfo):
    """tarfile reads pax and GNU long-name headers into memory whole: refuse huge ones
    before it does. Headers are parsed by _fast_header where it can (see there)."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        try:
            fast = _fast_header(cls, buf, encoding, errors)
        except ValueError:   # a malformed field: tarfile's own parser names the error
            fast = None
        return fast if fast is not None else super().frombuf(buf, encoding, errors)

    def _proc_gnulong(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        _meta_size(self)
        info: tarfile.TarInfo = super()._proc_gnulong(tf)  # type: ignore[misc]  # private in typeshed
        return info

    def _proc_pax(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        _meta_size(self)
        info: tarfile.TarInfo = super()._proc_pax(tf)  # type: ignore[misc]  # private in typeshed
        return info


_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)
_Info = TypeVar("_Info", bound=tarfile.TarInfo)


def _fast_header(cls: type[_Info], buf: bytes | bytearray, encoding: str, errors: str) -> _Info | None:
    """tarfile.TarInfo.frombuf for the common header (plain octal numbers, unsigned
    checksum, not GNU sparse) in about half its time: its header parsing was most of a
    partial import's own CPU (84k members). Anything else (None): tarfile's parser."""
    if len(buf) != tarfile.BLOCKSIZE or buf == _ZERO_BLOCK or buf[156:157] == tarfile.GNUTYPE_SPARSE:
        return None
    chksum = _octal(buf[148:156])
    if chksum != 256 + sum(buf) - sum(buf[148:156]):
        return None
    obj = cls()
    obj.name = _nts(buf[0:100], encoding, errors)
    obj.mode, obj.uid, obj.gid = _octal(buf[100:108]), _octal(buf[108:116]), _octal(buf[116:124])
    obj.size, obj.mtime, obj.chksum = _octal(buf[124:136]), _octal(buf[136:148]), chksum
    obj.type = bytes(buf[156:157])
    obj.linkname = _nts(buf[157:257], encoding, errors)
    obj.uname, obj.gname = _nts(buf[265:297], encoding, errors), _nts(buf[297:329], encoding, errors)
    obj.devmajor, obj.devminor = _octal(buf[329:337]), _octal(buf[337:345])
    prefix = _nts(buf[345:500], encoding, errors)
    if obj.type == tarfile.AREGTYPE and obj.name.endswith("/"):   # V7 directory
        obj.type = tarfile.DIRTYPE
    if obj.isdir():
        obj.name = obj.name.rstrip("/")
    if prefix and obj.type not in tarfile.GNU_TYPES:
        obj.name = prefix + "/" + obj.name
    return obj


def _nts(field: bytes | bytearray, encoding: str, errors: str) -> str:
    end = field.find(0)
    return (field if end < 0 else field[:end]).decode(encoding, errors)


def _octal(field: bytes | bytearray) -> int:
    """tarfile's nti for an octal field; a base-256 one raises ValueError (slow path)."""
    if field[0] in (0o200, 0o377):
        raise ValueError("base-256 number")
    end = field.find(0)
    return int((field if end < 0 else field[:end]).decode("ascii").strip() or "0", 8)


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
    topdir, mk_version, tree = scan_import(tarball)
    version = f"{ver}-{rel}" if ver and rel else mk_version
    digest = sha256_file(tarball)
    (stage / "configs").mkdir(exist_ok=True)
    configs = sorted(n for n in wanted if n.startswith("config-"))
    for n in configs:
        os.rename(stage / n, stage / "configs" / n)
    specs = sorted(n for n in wanted if n.endswith(".spec"))
    return digest, {"version": version, "topdir": topdir, "tarball": tarballs[0],
                    "configs": configs, "spec": specs[0] if specs else None,
                    "source": str(path), "store_tree": tree}


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
    path: Path | str | None = None   # ... or where to read it (dir; a str: no Path per file) ...
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


def _from_dir(target: str, root: Path, paths: PathSet | None = None, given: bool = False) -> Upstream:
    """A directory: re-tarring 80k files costs ~15 s, so an unchanged tree (every name, mode,
    size, mtime, ctime and inode as before) is found in the index by its stat signature.
    With `paths` and no whole tree indexed, only those paths are stored (`_dir_partial`)
    when the result cannot depend on the whole tree's digest: `given` (a release the user
    gave, remembered for these bytes by that digest) always imports whole."""
    entries = list(_walk_dir(root))
    key, settled = _dir_key(root, entries)
    entry = _index_get(key)
    if entry and (up := _cached(target, entry)):
        return up
    if paths is not None and not given and not _identity_by_digest(bool(_named(root.name)),
                                                                   lambda: _dir_makefile(entries, "")):
        return _dir_partial(target, root, entries, key if settled else "", paths)
    up = _from_entries(target, entries, f"dir:{root}")
    if settled:
        _index_put(key, _entry_key("tree", up.digest))
    return up


def _dir_key(root: Path, entries: list[_Entry]) -> tuple[str, bool]:
    # one line per entry, hashed in one call (per-entry updates cost 0.3 s a tree)
    text = "".join([f"{e.name}\0{e.kind}\0{e.mode:o}\0{e.stamp}\0{e.link}\n" for e in entries])
    digest = hashlib.sha256(text.encode(errors="surrogateescape")).hexdigest()
    newest = max((t for e in entries for t in e.stamp[1:3]), default=0)
    return f"dir-stat:{root.resolve()}:{digest}", newest < time.time_ns() - RACY_NS


def _walk_dir(root: Path) -> Iterator[_Entry]:
    guard = ArchiveGuard(str(root))
    for rel, full, st in _scan_sorted(root):
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


def _scan_sorted(root: Path) -> Iterator[tuple[str, str, os.stat_result]]:
    """fileio.walk_sorted's order and skipping (each directory's names sorted, then its
    subdirectories entered in order; `.git` neither listed nor entered; links not followed)
    with each entry's lstat, from scandir: one system call per entry and no Path objects,
    a third of the time on a kernel tree (84k entries: 0.8 s, was 2.7 s)."""
    stack = [("", str(root))]
    while stack:
        rel_dir, full = stack.pop()
        try:
            with os.scandir(full) as it:
                items = sorted(it, key=lambda d: d.name)
            subdirs = []
            for d in items:
                st = d.stat(follow_symlinks=False)
                isdir = stat.S_ISDIR(st.st_mode)
                if d.name == ".git" and (isdir or (stat.S_ISLNK(st.st_mode) and d.is_dir())):
                    continue
                rel = f"{rel_dir}/{d.name}" if rel_dir else d.name
                yield rel, d.path, st
                if isdir:
                    subdirs.append((rel, d.path))
        except OSError as exc:   # an unreadable directory would be a tree missing files
            raise UpstreamError(f"{root}: cannot read {rel_dir or '.'} ({exc.strerror or exc})") from exc
        stack.extend(reversed(subdirs))


# ---------------------------------------------------------------- partial directory and git trees
#
# A directory's or git tree's partial tree is a tarball's (PathSet/_Selection): every
# entry is still listed and checked, only the selected files are read. No deterministic
# tarball is written, so no digest exists: the record is keyed by the stat signature (a
# changed directory is re-read) or the git tree id, and the path set, under a cache
# directory of its own that no whole-tree lookup (`_cached`, the index) ever reads.

DIR_PARTIAL = "dir-partial-"   # + sha256 of the stat signature or "git-tree:ID"


def _identity_by_digest(named: bool, makefile: Callable[[], bytes]) -> bool:
    """Whether identify() could answer from an identity remembered for the whole tree's
    digest (which only a whole import knows): the source's name states none and some
    tree entry of the same Makefile version remembers one."""
    if named:
        return False
    try:
        mk = makefile_version(makefile())
    except UpstreamError:
        return True   # not a kernel tree: the whole import says so, as before
    for ident in cache_root().glob("tree-*/identity"):
        try:
            meta = json.loads((ident.parent / META).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("version") == mk:
            return True
    return False


def _dir_makefile(entries: list[_Entry], where: str) -> bytes:
    makefile = next((e for e in entries if e.name == "Makefile" and e.kind == "file"), None)
    if makefile is None:
        raise UpstreamError(f"{where}: no top-level Makefile: not a kernel tree")
    with makefile.open() as fh:
        return fh.read(MAX_LINK * 256)


def _dir_partial(target: str, root: Path, entries: list[_Entry], key: str, paths: PathSet) -> Upstream:
    """The directory as a partial tree of `paths`. `key` is its stat signature ("" when
    racy: imported, never recorded). The Upstream has no tarball (`tarball` names where
    none is) and its `digest` is the signature's: it only ever serves a plain rebase."""
    where = f"dir:{root}"
    up = _partial_upstream(target, key, makefile_version(_dir_makefile(entries, where)))
    if key and (tree := _partial_get(up, paths)):
        return replace(up, partial_tree=tree)
    select = _Selection(paths)
    chosen = [e for e in entries if e.kind != "dir" and select.take(e.name)]
    tree = store_import(where, lambda blobs: _feed_entries(chosen, blobs))
    if key:
        _partial_put(up, paths, tree)
    return replace(up, partial_tree=tree)


def _partial_upstream(target: str, key: str, version: str) -> Upstream:
    sig = hashlib.sha256(key.encode(errors="surrogateescape")).hexdigest()
    home = cache_root() / f"{DIR_PARTIAL}{sig}"
    return Upstream(target=target, version=version, tarball=home / f"linux-{version}.tar.gz",
                    topdir=f"linux-{version}", digest=sig)


# `git archive TREE -- PATH...` takes the selected paths as arguments: past this many bytes
# of them (a series naming whole subsystems) the tree is imported whole instead
MAX_PATHSPEC = 256 << 10


def _git_partial(target: str, repo: Path, ref: str, tree: str, paths: PathSet) -> Upstream | None:
    """The git tree as a partial tree of `paths`: every entry listed (`ls-tree`) and
    checked, the selected ones read by `git archive` (the same attributes and conversions
    as the whole import's archive). None: import it whole (no Makefile blob, too many
    paths, or an identity remembered for a whole tree's digest may apply)."""
    where = f"{repo}@{ref}"
    cp = proc.run(["git", "-C", repo, "cat-file", "blob", f"{tree}:Makefile"], check=False)
    if cp.returncode != 0 or _identity_by_digest(False, lambda: cp.stdout):
        return None
    up = _partial_upstream(target, f"git-tree:{tree}", makefile_version(cp.stdout))
    # a record names this very tree id: its entries were listed and checked when it was made
    if stored := _partial_get(up, paths):
        return replace(up, partial_tree=stored)
    listing = _git_listing(repo, tree, where)
    if listing.get("Makefile") != "file":
        return None
    select = _Selection(paths)
    chosen = [n for n, kind in listing.items() if kind != "commit" and select.take(n)]
    if sum(len(n) + 1 for n in chosen) > MAX_PATHSPEC:
        return None
    stage = _staging()
    try:
        archive = stage / "part.tar"
        proc.run(["git", "--literal-pathspecs", "-C", repo, "archive", "--format=tar",
                  f"--prefix={up.topdir}/", "-o", archive, tree, "--", *chosen], error=UpstreamError)

        def feed(blobs: _Blobs) -> dict[str, tuple[int, str]]:
            with _tar_errors(where), open_tar(archive) as tf:
                return _feed(tf, where, blobs)[2]
        stored = store_import(where, feed)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _partial_put(up, paths, stored)
    return replace(up, partial_tree=stored)


_LS_KIND = {b"100644": "file", b"100755": "file", b"120000": "symlink", b"160000": "commit"}


def _git_listing(repo: Path, tree: str, where: str) -> dict[str, str]:
    """Every entry of the tree (path -> file | symlink | commit), in git's order, checked as
    the whole import's archive members are (ArchiveGuard: names, link targets, sizes)."""
    out = proc.run(["git", "-C", repo, "ls-tree", "-r", "-l", "-z", "--full-tree", tree],
                   error=UpstreamError).stdout
    rows = []
    for rec in out.split(b"\0"):
        if rec:
            meta, _, raw = rec.partition(b"\t")
            mode, _, blob, size = meta.split()
            if mode not in _LS_KIND:
                raise UpstreamError(f"{where}: {raw!r} has git mode {mode.decode()}: not a file, link or submodule")
            rows.append((raw.decode(errors="surrogateescape"), _LS_KIND[mode], blob.decode(), size))
    targets = _git_blobs(repo, [oid for _, kind, oid, _ in rows if kind == "symlink"])
    guard = ArchiveGuard(where)
    listing: dict[str, str] = {}
    for name, kind, oid, size in rows:
        info = tarfile.TarInfo(name)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, targets[oid].decode(errors="surrogateescape")
        elif kind == "commit":   # a submodule: an empty directory in the archive
            info.type = tarfile.DIRTYPE
        else:
            info.size = int(size)
        listing[guard.member(info)] = kind
    guard.finish()
    return listing


def _git_blobs(repo: Path, oids: list[str]) -> dict[str, bytes]:
    """The content of each (small) blob: symlink targets, in one `cat-file --batch`."""
    if not oids:
        return {}
    out = proc.run(["git", "-C", repo, "cat-file", "--batch"], input="".join(f"{o}\n" for o in oids).encode(),
                   error=UpstreamError).stdout
    found, pos = {}, 0
    while pos < len(out):
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        if len(header) != 3:   # "<oid> missing": a partial clone or a broken repository
            raise UpstreamError(f"{repo}: git cat-file: {out[pos:end].decode(errors='replace')}")
        size = int(header[2])
        found[header[0].decode()] = out[end + 1:end + 1 + size]
        pos = end + 2 + size
    return found


def _feed_entries(entries: list[_Entry], blobs: _Blobs) -> dict[str, tuple[int, str]]:
    """Send the entries' content as _StoreFeed does for a whole tree (same modes, same
    blobs): path -> (mode, blob ref)."""
    files: dict[str, tuple[int, str]] = {}
    for e in entries:
        if e.kind == "symlink":
            files[e.name] = (0o120000, blobs.small(e.link.encode(errors="surrogateescape")))
            continue
        size = e.size()
        with e.open() as fh:
            if size > SMALL:
                ref = blobs.stream(fh, size, e.name)[0]
            else:
                data = fh.read(size)
                if len(data) != size:
                    raise UpstreamError(f"{e.name}: changed while it was read")
                ref = blobs.small(data)
        files[e.name] = (0o100000 | e.mode, ref)
    return files


def _from_git(target: str, repo: Path, ref: str, paths: PathSet | None = None, given: bool = False) -> Upstream:
    """A git ref: its tree id keys the cache, so an unchanged ref costs one rev-parse.
    With `paths` and no whole tree cached: a partial tree when it can be (`_git_partial`;
    `given`, a release remembered by the whole tree's digest, means whole)."""
    tree = proc.run(["git", "-C", repo, "rev-parse", "--verify", f"{ref}^{{tree}}"],
                    error=UpstreamError).stdout.decode().strip()
    key = f"git-tree:{tree}"
    entry = _index_get(key)
    if entry and (up := _cached(target, entry)):
        return up
    if paths is not None and not given and (part := _git_partial(target, repo, ref, tree, paths)):
        return part
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
    version = makefile_version(_dir_makefile(entries, where))
    topdir = f"linux-{version}"
    stage = _staging()
    try:
        tmp = stage / f"{topdir}.tar.gz"
        # each file is read once, for the tarball and the store alike
        tree = store_import(where, lambda blobs: write_deterministic_tar(tmp, topdir, entries, blobs))
        digest = sha256_file(tmp)
        entry = _entry_key("tree", digest)
        if _cached(target, entry) is None:
            _commit_entry(stage, entry, {"kind": "tree", "digest": digest, "version": version,
                                         "topdir": topdir, "tarball": tmp.name, "source": where,
                                         "store_tree": tree})
        else:
            shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return _committed(target, entry)


def write_deterministic_tar(out: Path, topdir: str, entries: list[_Entry],
                            blobs: _Blobs | None = None) -> dict[str, tuple[int, str]]:
    """Same entries -> same bytes (tario's writer). With `blobs`, every file and link also
    goes to the store as it is read: path -> (mode, blob ref)."""
    files: dict[str, tuple[int, str]] = {}
    sources = entries if blobs is None else (_StoreFeed(e, blobs, files) for e in entries)
    with open(out, "wb") as raw:
        write_tar_gz(raw, sources, mtime=FIXED_MTIME, topdir=topdir)
    return files


class _StoreFeed:
    """An entry whose bytes also go to the store while tario reads them: links and small
    files as whole blobs, large files streamed (never held whole)."""

    def __init__(self, e: _Entry, blobs: _Blobs, files: dict[str, tuple[int, str]]) -> None:
        self.e, self.blobs, self.files = e, blobs, files
        self.name, self.kind, self.mode, self.link = e.name, e.kind, e.mode, e.link
        if e.kind == "symlink":
            files[e.name] = (0o120000, blobs.small(e.link.encode()))

    def size(self) -> int:
        return self.e.size()

    def open(self) -> Readable:
        size = self.e.size()
        fh = self.e.open()
        if size > SMALL:
            return _Tee(fh, self.blobs, size, lambda ref: self._add(ref))
        with fh:
            data = fh.read(size)
        if len(data) != size:
            raise UpstreamError(f"{self.e.name}: changed while it was read")
        self._add(self.blobs.small(data))
        return io.BytesIO(data)

    def _add(self, ref: str) -> None:
        self.files[self.e.name] = (0o100000 | self.e.mode, ref)


class _Tee:
    """A large file read by tarfile.addfile whose bytes also stream to fast-import as one
    blob (never held whole); `added` hears the blob's ref once the file is read."""

    def __init__(self, fh: IO[bytes], blobs: _Blobs, size: int, added: Callable[[str], None]) -> None:
        self.fh, self.blobs, self.h, self.left, self.added = fh, blobs, hashlib.sha256(), size, added
        self.mark = len(blobs.fresh) + 1
        blobs.write(b"blob\nmark :%d\ndata %d\n" % (self.mark, size))

    def __enter__(self) -> _Tee:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None, /) -> None:
        self.fh.close()
        if t is None:
            self.added(self.done())

    def read(self, n: int = -1, /) -> bytes:
        chunk = self.fh.read(min(n, self.left) if n >= 0 else self.left)
        self.h.update(chunk)
        self.blobs.write(chunk)
        self.left -= len(chunk)
        return chunk

    def done(self) -> str:
        if self.left:
            raise UpstreamError("a file shrank while it was read")
        self.blobs.write(b"\n")
        return self.blobs._added(self.mark, self.h.digest())


# ---------------------------------------------------------------- the shared object store
#
# A cold import used to decompress each tarball twice in Python (scan, then the workspace's
# fast-import) and hash every blob with git's collision-detecting SHA-1 (~250 MB/s). Now one
# pass validates and imports into one object store shared by every upstream of this cache
# (decompressed by xz -T0 / pigz on other cores); a blob whose SHA-256 is already in the
# store is named by its blob id instead of sent, so the second kernel of a rebase costs git
# only its changed files. Workspaces hard-link the store's packs (immutable) and make their
# commit from the tree: no object is copied.

STORE = "objects.git"
BLOB_INDEX = "fsbuild-blobs"   # in the store: sha256 (32 bytes) + blob id (20 bytes) per blob
SMALL = 8 << 20                # members up to this are read whole (dedup); larger ones stream
STORE_IDENT = "fsbuild <fsbuild@localhost> 1000000000 +0000"
# external decompressors, preferred first: multi-threaded where the format allows it
_TOOLS = {"xz": [["xz", "-T0", "-dc"]], "gz": [["pigz", "-dc"], ["gzip", "-dc"]],
          "bz2": [["lbzip2", "-dc"], ["pbzip2", "-dc"], ["bzip2", "-dc"]]}
_HEX40 = re.compile(r"^[0-9a-f]{40}$")


def store_root() -> Path:
    return cache_root() / STORE


def _stored_tree(value: object) -> str:
    return value if isinstance(value, str) and _HEX40.match(value) else ""


def _store_git(*args: str, input: bytes | None = None,
               check: bool = True) -> subprocess.CompletedProcess[bytes]:
    cp = subprocess.run(["git", "-C", str(store_root()), *args], input=input, capture_output=True,
                        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"})
    if check and cp.returncode != 0:
        raise UpstreamError(f"git {args[0]} in {store_root()} failed: "
                            f"{cp.stderr.decode(errors='replace').strip()[-300:]}")
    return cp


def _ensure_store() -> Path:
    """The bare store repository, created whole (in a temp dir, then one rename)."""
    root = store_root()
    if (root / "HEAD").is_file():
        return root
    cache_root().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".store-", dir=cache_root()))
    try:
        proc.run(["git", "init", "-q", "--bare", tmp], error=UpstreamError)
        proc.run(["git", "-C", tmp, "config", "gc.auto", "0"], error=UpstreamError)
        os.rename(tmp, root)
    except OSError:   # another run created it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def store_has_tree(tree: str) -> bool:
    return bool(tree) and (store_root() / "HEAD").is_file() and \
        _store_git("cat-file", "-e", f"{tree}^{{tree}}", check=False).returncode == 0


def link_packs(gitdir: Path) -> None:
    """Hard-link (copy across filesystems) every pack of the store into the repository at
    `gitdir`: packs are immutable and named by their checksum, and a link outlives the store."""
    src, dst = store_root() / "objects" / "pack", gitdir / "objects" / "pack"
    dst.mkdir(parents=True, exist_ok=True)
    for idx in sorted(src.glob("pack-*.idx")):
        pack = idx.with_suffix(".pack")
        if not pack.is_file() or (dst / idx.name).exists():
            continue
        for f in (pack, idx):   # the index last: git uses a pack once its index exists
            _place(f, dst / f.name)


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except FileExistsError:
        pass
    except OSError:
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _load_blob_index() -> dict[bytes, str]:
    try:
        data = (store_root() / BLOB_INDEX).read_bytes()
    except OSError:
        return {}
    return {data[i:i + 32]: data[i + 32:i + 52].hex() for i in range(0, len(data) - 51, 52)}


def _save_blob_index(known: dict[bytes, str]) -> None:
    out = b"".join(k + bytes.fromhex(v) for k, v in known.items() if _HEX40.match(v))
    atomic_write(store_root() / BLOB_INDEX, out)


@contextmanager
def _tar_stream(path: Path) -> Iterator[tarfile.TarFile]:
    """The archive's members in order, decompressed by an external tool in its own process
    (xz -T0 decodes the blocks of a multi-block .xz on every core); Python's decompressors,
    which would share our core, only when no tool is installed. A tool's failure (corrupt
    data, bad checksum) is UpstreamError, after the members were read."""
    kind = next((k for magic, k in _MAGIC.items() if _head(path).startswith(magic)), None)
    argv = next((a for a in _TOOLS.get(kind or "", []) if shutil.which(a[0])), None)
    if argv is None:
        with open_tar(path) as tf:
            yield tf
        return
    dec = subprocess.Popen([*argv, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           bufsize=CHUNK)
    assert dec.stdout is not None and dec.stderr is not None
    try:
        with tarfile.TarFile(fileobj=_Forward(dec.stdout), mode="r", tarinfo=_BoundedInfo) as tf:
            yield tf
        while dec.stdout.read(CHUNK):   # the tail after the end-of-archive blocks: the tool
            pass                        # checks the whole stream's integrity
    except BaseException:
        dec.kill()
        dec.wait()
        raise
    finally:
        dec.stdout.close()
    err = dec.stderr.read().decode(errors="replace").strip()
    dec.stderr.close()
    if dec.wait() != 0:
        raise UpstreamError(f"{path}: corrupt tarball ({argv[0]}: {err[-200:] or 'failed'})")


class _Forward:
    """A pipe as the seekable file tarfile's random-access mode wants, seeking forward
    only: skipping a member reads past its data in large pieces. (Stream mode, "r|",
    copies its whole buffer on every header read: seconds per kernel tarball.)"""

    def __init__(self, pipe: IO[bytes]) -> None:
        self.pipe, self.pos = pipe, 0
        self.scratch = bytearray(CHUNK)

    def read(self, n: int = -1, /) -> bytes:
        data = self.pipe.read() if n is None or n < 0 else self.pipe.read(n)
        self.pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0, /) -> int:
        if whence != 0 or pos < self.pos:
            raise OSError(f"cannot seek back in a pipe (at {self.pos}, asked {pos})")
        view = memoryview(self.scratch)
        while self.pos < pos:
            got = self.pipe.readinto(view[:min(CHUNK, pos - self.pos)])  # type: ignore[attr-defined]
            if not got:
                break   # end of data: the next read says so
            self.pos += got
        return self.pos

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return True

    def write(self, data: bytes, /) -> int:
        raise OSError("a decompressor's pipe is read-only")

    def close(self) -> None:
        """The pipe is the caller's to close."""


@dataclass
class _Blobs:
    """Blobs sent to fast-import in one run: content already in the store is named by its
    blob id (its SHA-256 matched), new content gets a mark."""

    write: Callable[[bytes], object]
    known: dict[bytes, str]                                  # sha256 -> blob id or ":mark"
    fresh: dict[int, bytes] = field(default_factory=dict)    # mark -> sha256

    def small(self, data: bytes) -> str:
        key = hashlib.sha256(data).digest()
        if (ref := self.known.get(key)) is not None:
            return ref
        mark = len(self.fresh) + 1
        self.write(b"blob\nmark :%d\ndata %d\n" % (mark, len(data)))
        self.write(data)
        self.write(b"\n")
        return self._added(mark, key)

    def stream(self, src: IO[bytes], size: int, where: str) -> tuple[str, bytes]:
        """A large member, streamed (never held whole); returns (ref, its first bytes)."""
        h, head = hashlib.sha256(), bytearray()
        mark = len(self.fresh) + 1
        self.write(b"blob\nmark :%d\ndata %d\n" % (mark, size))

        def both(chunk: bytes) -> None:
            h.update(chunk)
            if len(head) < MAX_LINK * 256:
                head.extend(chunk[:MAX_LINK * 256])
            self.write(chunk)
        stream_member(src, both, size, where)
        self.write(b"\n")
        return self._added(mark, h.digest()), bytes(head)

    def _added(self, mark: int, key: bytes) -> str:
        self.fresh[mark] = key
        self.known.setdefault(key, f":{mark}")
        return f":{mark}"


Feed = Callable[["_Blobs"], dict[str, tuple[int, str]]]   # sends blobs, returns path -> (mode, ref)


@contextmanager
def _tar_errors(where: str) -> Iterator[None]:
    """A tarball that cannot be read is one UpstreamError, whatever layer noticed."""
    try:
        yield
    except BrokenPipeError:
        raise    # fast-import died: _store_import reports git's error
    except tarfile.TarError as exc:
        raise UpstreamError(f"{where}: not a readable tarball ({exc})") from exc
    except (EOFError, OSError, ValueError) as exc:   # truncated / corrupt compression
        raise UpstreamError(f"{where}: corrupt tarball ({exc})") from exc


def _kernel_makefile(makefile: bytes | None, where: str, topdir: str) -> bytes:
    if makefile is None:
        raise UpstreamError(f"{where}: no {topdir}/Makefile: not a kernel tree")
    return makefile


def scan_import(path: Path, paths: PathSet | None = None) -> tuple[str, str, str]:
    """scan_tarball and the import into the store in one pass: (topdir, version, tree).
    With `paths`, every member is checked but only the PathSet's part is stored."""
    where = str(path)
    found: dict[str, str] = {}

    def feed(blobs: _Blobs) -> dict[str, tuple[int, str]]:
        with _tar_errors(where), _tar_stream(path) as tf:
            topdir, makefile, files = _feed(tf, where, blobs, _Selection(paths) if paths else None)
        found.update(topdir=topdir, version=makefile_version(_kernel_makefile(makefile, where, topdir)))
        return files

    tree = store_import(path.name, feed)
    topdir, version = found["topdir"], found["version"]
    if topdir.startswith(f"linux-{version}-"):   # RHEL style: linux-2.6.32-431.17.1.el6
        version = topdir[len("linux-"):]
    return topdir, version, tree


def store_import(what: str, feed: Feed) -> str:
    """Run `feed` into one fast-import of the store; returns the tree it made. Nothing names
    the tree before `feed` returned (every member checked); a failed or killed run leaves
    only unreferenced objects. A stale blob index (fast-import misses a blob it names) is
    dropped and `feed` run once more without it."""
    _ensure_store()
    try:
        return _store_import(what, feed, _load_blob_index())
    except _StaleIndex:
        (store_root() / BLOB_INDEX).unlink(missing_ok=True)
        return _store_import(what, feed, {})


class _StaleIndex(Exception):
    """Internal: fast-import refused a blob id taken from the blob index."""


def _store_import(what: str, feed: Feed, known: dict[bytes, str]) -> str:
    root = store_root()
    marks = root / f"fsbuild-marks.{os.getpid()}"
    ref = f"refs/fsbuild/importing-{os.getpid()}"
    used_index = bool(known)
    # always a pack (workspaces link packs; small imports would go loose); zlib level 1:
    # the store is a cache, level 6 costs several times the CPU
    fi = subprocess.Popen(["git", "-C", str(root), "-c", "pack.compression=1", "-c", "core.compression=1",
                           "-c", "fastimport.unpackLimit=0", "fast-import", "--quiet", "--done", "--depth=0",
                           "--force", f"--export-marks={marks}"],
                          stdin=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=CHUNK,
                          env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"})
    assert fi.stdin is not None and fi.stderr is not None
    try:
        blobs = _Blobs(fi.stdin.write, known)
        try:
            files = feed(blobs)
            fi.stdin.write(f"commit {ref}\nauthor {STORE_IDENT}\ncommitter {STORE_IDENT}\n"
                           "data 0\n".encode())
            fi.stdin.write(b"".join(b"M %o %s %s\n" % (mode, r.encode(), _fi_path(p))
                                    for p, (mode, r) in sorted(files.items())))
            fi.stdin.write(b"\ndone\n")
            fi.stdin.close()
        except BrokenPipeError:   # fast-import died: its stderr says why
            pass
        err = fi.stderr.read().decode(errors="replace")
        if fi.wait() != 0 or not fi.stdin.closed:
            if used_index and "not found" in err:
                raise _StaleIndex()
            raise UpstreamError(f"git fast-import of {what} into {root} failed: {err.strip()[-300:]}")
    except BaseException:
        fi.kill()
        fi.wait()
        marks.unlink(missing_ok=True)
        raise
    commit = _store_git("rev-parse", ref).stdout.decode().strip()
    tree = _store_git("rev-parse", f"{ref}^{{tree}}").stdout.decode().strip()
    # the tree stays reachable under its own name; the index then learns the new blobs
    _store_git("update-ref", "--stdin", input=f"update refs/fsbuild/trees/{tree} {commit}\n"
               f"delete {ref}\n".encode())
    by_mark = dict(line.split() for line in marks.read_text().splitlines() if line)
    marks.unlink(missing_ok=True)
    for mark, key in blobs.fresh.items():
        known[key] = by_mark[f":{mark}"]
    _save_blob_index(known)
    return tree


def _feed(tf: tarfile.TarFile, where: str, blobs: _Blobs,
          select: _Selection | None = None) -> tuple[str, bytes | None, dict[str, tuple[int, str]]]:
    """Check every member (ArchiveGuard, as scan_tarball) while sending its content (only
    the members `select` takes, when given; the others' data is skipped unread by us):
    (topdir, head of the top Makefile, path -> (mode, blob ref))."""
    guard = ArchiveGuard(where, single_top=True)
    files: dict[str, tuple[int, str]] = {}
    makefile: bytes | None = None
    seen = 0
    with progress.bar(f"importing {Path(where).name}") as bar:
        for m in tf:
            name = guard.member(m)
            rel = name.partition("/")[2]
            seen += 1
            if seen % 512 == 0:   # a live bar redrawn per member costs seconds
                bar.advance(512)
            if not rel or m.isdir() or (select is not None and not _selected(select, m, rel, files)):
                continue
            if m.isfile():
                src = tf.extractfile(m) or io.BytesIO()
                if m.size <= SMALL:
                    data = src.read(m.size)
                    if len(data) != m.size:
                        raise UpstreamError(f"{where}: truncated member data")
                    ref, head = blobs.small(data), data
                else:
                    ref, head = blobs.stream(src, m.size, where)
                files[rel] = (0o100755 if m.mode & 0o100 else 0o100644, ref)
                if rel == "Makefile":
                    makefile = head[:MAX_LINK * 256]
            elif m.issym():
                files[rel] = (0o120000, blobs.small(m.linkname.encode()))
            elif m.islnk():
                target = files.get(safe_relpath(m.linkname, where).partition("/")[2])
                if target is not None:
                    files[rel] = target
    guard.finish()
    if guard.topdir is None:
        raise UpstreamError(f"{where}: empty tarball")
    return guard.topdir, makefile, files


def _selected(select: _Selection, m: tarfile.TarInfo, rel: str, files: dict[str, tuple[int, str]]) -> bool:
    """Whether a partial import stores member `rel`. A hard link is stored as its target's
    blob: a skipped target cannot be, so such an archive is imported whole."""
    if not select.take(rel):
        return False
    if m.islnk() and safe_relpath(m.linkname, "").partition("/")[2] not in files:
        raise _NotPartial()
    return True


def _fi_path(path: str) -> bytes:
    """fast-import path: C-quote when it could be misread."""
    if any(c in path for c in '"\n\\') or path.startswith(" "):
        return json.dumps(path).encode()
    return path.encode()
