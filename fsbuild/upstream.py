"""Upstream sources: turn an SRPM, a tarball, a directory or a git ref into one pristine
kernel tarball (plus the SRPM's spec and config-* files), validated against hostile
content and cached by content digest under state_dir()/upstream/<sha256>/.

The tarball is the original bytes for SRPM/tarball sources and a deterministic tarball
(sorted entries, fixed mtime/owner, gzip mtime 0) for directories and git refs, so the
same content always yields the same digest."""

from __future__ import annotations

import gzip
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO

from fsbuild import paths, proc
from fsbuild.errors import MissingFileError, UnsafePathError, UpstreamError
from fsbuild.target import Target

CHUNK = 1 << 20
FIXED_MTIME = 1_000_000_000  # 2001-09-09: deterministic tarballs need *some* constant
META = "meta.json"
_MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
RPM_MAGIC = b"\xed\xab\xee\xdb"


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

def resolve(target: Target, src: str | None = None) -> Upstream:
    """Resolve `src` (default: the target's default source) into a cached Upstream."""
    src = src or target.default_source()
    kind, path, ref = classify(src)
    if kind == "git":
        return _from_git(target.name, path, ref or "HEAD")
    if kind == "dir":
        return _from_dir(target.name, path)
    if kind == "srpm":
        return _from_srpm(target.name, path)
    return _from_tarball(target.name, path)


def classify(src: str) -> tuple[str, Path, str | None]:
    """(kind, path, ref) with kind in srpm|tarball|dir|git. Raises Missing/UpstreamError."""
    if src.startswith("git:"):
        spec = src[4:]
        path, _, ref = spec.rpartition("@") if "@" in spec else (spec, "", "HEAD")
        return "git", _existing(Path(path)), ref or "HEAD"
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
        return json.loads(_index_path().read_text()).get(key)
    except (OSError, ValueError):
        return None


def _index_put(key: str, digest: str) -> None:
    try:
        index = json.loads(_index_path().read_text())
    except (OSError, ValueError):
        index = {}
    index[key] = digest
    _atomic_write(_index_path(), json.dumps(index, indent=1, sort_keys=True).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _cached(target: str, digest: str) -> Upstream | None:
    entry = cache_root() / digest
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return None
    tarball = entry / meta["tarball"]
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


def _commit_entry(stage: Path, digest: str, meta: dict[str, object]) -> Path:
    (stage / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    final = cache_root() / digest
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
    digest = _index_get(key)
    if digest and (up := _cached(target, digest)):
        return up
    digest = sha256_file(path)
    if up := _cached(target, digest):
        _index_put(key, digest)
        return up
    topdir, version = scan_tarball(path)
    stage = _staging()
    try:
        _link_or_copy(path, stage / path.name)
        _commit_entry(stage, digest, {"version": version, "topdir": topdir, "tarball": path.name,
                                      "source": str(path)})
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _index_put(key, digest)
    return _cached(target, digest)  # type: ignore[return-value]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def scan_tarball(path: Path | None = None, fileobj: IO[bytes] | None = None) -> tuple[str, str]:
    """Validate every member (no tar slip, no escaping links, no device nodes, one top
    directory) and return (topdir, version from the top Makefile)."""
    try:
        with tarfile.open(name=path, fileobj=fileobj, mode="r:*") as tf:
            topdir, makefile = _scan_members(tf, str(path or "tarball"))
    except tarfile.TarError as exc:
        raise UpstreamError(f"{path or 'tarball'}: not a readable tarball ({exc})") from exc
    except (EOFError, OSError, ValueError) as exc:  # truncated / corrupt compression
        raise UpstreamError(f"{path or 'tarball'}: corrupt tarball ({exc})") from exc
    if makefile is None:
        raise UpstreamError(f"{path or 'tarball'}: no {topdir}/Makefile: not a kernel tree")
    version = makefile_version(makefile)
    # RHEL-style tarballs name their release in the top dir: linux-2.6.32-431.17.1.el6
    if topdir.startswith(f"linux-{version}-"):
        version = topdir[len("linux-"):]
    return topdir, version


def _scan_members(tf: tarfile.TarFile, where: str) -> tuple[str, bytes | None]:
    topdir: str | None = None
    makefile: bytes | None = None
    for m in tf:
        name = check_member(m, where)
        top = name.split("/", 1)[0]
        if topdir is None:
            topdir = top
        elif top != topdir:
            raise UpstreamError(f"{where}: more than one top-level directory ({topdir}, {top})")
        if name == f"{topdir}/Makefile" and m.isfile():
            fh = tf.extractfile(m)
            makefile = fh.read() if fh else None
    if topdir is None:
        raise UpstreamError(f"{where}: empty tarball")
    return topdir, makefile


def check_member(m: tarfile.TarInfo, where: str) -> str:
    """The member's normalized name, or UnsafePathError when extracting it could write
    outside the tree or create something other than files, dirs and inner links."""
    name = safe_relpath(m.name, where)
    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        raise UnsafePathError(f"{where}: member {m.name!r} is a device node or fifo")
    if m.issym():
        dest = m.linkname
        if posixpath.isabs(dest) or _escapes(posixpath.join(posixpath.dirname(name), dest)):
            raise UnsafePathError(f"{where}: symlink {m.name!r} -> {dest!r} leads outside the tree")
    if m.islnk():
        safe_relpath(m.linkname, where, what="hardlink target")
    return name


def safe_relpath(name: str, where: str, what: str = "member") -> str:
    if name.startswith("/") or posixpath.isabs(name):
        raise UnsafePathError(f"{where}: {what} {name!r} is an absolute path")
    norm = posixpath.normpath(name)
    if norm in (".", "") or _escapes(name):
        raise UnsafePathError(f"{where}: {what} {name!r} escapes the tree (`..`)")
    return norm


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
    digest = _index_get(key)
    if digest and (up := _cached(target, digest)):
        return up
    stage = _staging()
    try:
        digest, meta = _extract_srpm(path, stage)
        if _cached(target, digest) is None:
            _commit_entry(stage, digest, meta)
        else:
            shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _index_put(key, digest)
    return _cached(target, digest)  # type: ignore[return-value]


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
    for name, mode, size in iter_cpio(stream, where):
        safe_relpath(name, where)
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            raise UnsafePathError(f"{where}: member {name!r} is a device node or fifo")
        base = posixpath.basename(name)
        keep = kind == stat.S_IFREG and (re.match(r"linux-.*\.tar", base) or base.startswith("config-")
                                         or base.endswith(".spec"))
        if kind == stat.S_IFLNK:
            target = stream.read(size).decode(errors="replace")
            if posixpath.isabs(target) or _escapes(posixpath.join(posixpath.dirname(name), target)):
                raise UnsafePathError(f"{where}: symlink {name!r} -> {target!r} leads outside")
        elif keep:
            with open(stage / base, "wb") as out:
                _copy_n(stream, out, size)
            wanted.append(base)
        else:
            _copy_n(stream, None, size)
        _skip_pad(stream, size)
    return wanted


def iter_cpio(stream: BinaryIO, where: str) -> Iterator[tuple[str, int, int]]:
    """newc cpio headers: yields (name, mode, size) with the stream at the member data."""
    while True:
        hdr = stream.read(110)
        if len(hdr) < 110 or hdr[:6] not in (b"070701", b"070702"):
            raise UpstreamError(f"{where}: corrupt cpio payload")
        mode = int(hdr[14:22], 16)
        size = int(hdr[54:62], 16)
        namesize = int(hdr[94:102], 16)
        name = stream.read(namesize)[:-1].decode(errors="replace")
        _skip_pad(stream, 110 + namesize)
        if name == "TRAILER!!!":
            return
        yield name.removeprefix("./") if name != "./" else ".", mode, size


def _skip_pad(stream: BinaryIO, n: int) -> None:
    pad = (4 - n % 4) % 4
    if pad:
        stream.read(pad)


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
    data: bytes | None = None   # file content (git) ...
    path: Path | None = None    # ... or where to read it (dir)
    link: str = ""
    stamp: tuple[int, ...] = ()  # (size, mtime_ns, ctime_ns, inode) of a dir source's file


# A file changed within this window of its last stat may not show in mtime/ctime yet (coarse
# timestamps): such a tree is not indexed by stat (git's "racy" rule).
RACY_NS = 2_000_000_000


def _from_dir(target: str, root: Path) -> Upstream:
    """A directory: re-tarring 80k files costs ~15 s, so an unchanged tree (every name, mode,
    size, mtime, ctime and inode as before) is found in the index by its stat signature."""
    entries = list(_walk_dir(root))
    key, settled = _dir_key(root, entries)
    digest = _index_get(key)
    if digest and (up := _cached(target, digest)):
        return up
    up = _from_entries(target, entries, f"dir:{root}")
    if settled:
        _index_put(key, up.digest)
    return up


def _dir_key(root: Path, entries: list[_Entry]) -> tuple[str, bool]:
    h = hashlib.sha256()
    newest = 0
    for e in entries:
        newest = max([newest, *e.stamp[1:3]])
        h.update(f"{e.name}\0{e.kind}\0{e.mode:o}\0{e.stamp}\0{e.link}\n".encode(errors="surrogateescape"))
    return f"dir-stat:{root.resolve()}:{h.hexdigest()}", newest < time.time_ns() - RACY_NS


def _walk_dir(root: Path) -> Iterator[_Entry]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".git")
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                dest = os.readlink(full)
                if os.path.isabs(dest) or _escapes(posixpath.join(posixpath.dirname(rel), dest)):
                    raise UnsafePathError(f"{root}: symlink {rel} -> {dest} leads outside the tree")
                yield _Entry(rel, "symlink", link=dest)
            elif stat.S_ISDIR(st.st_mode):
                yield _Entry(rel, "dir", mode=0o755)
            elif stat.S_ISREG(st.st_mode):
                yield _Entry(rel, "file", mode=0o755 if st.st_mode & 0o100 else 0o644, path=full,
                             stamp=(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
            else:
                raise UnsafePathError(f"{root}: {rel} is a device node, fifo or socket")


def _from_git(target: str, repo: Path, ref: str) -> Upstream:
    """A git ref: its tree id keys the cache, so an unchanged ref costs one rev-parse."""
    tree = proc.run(["git", "-C", repo, "rev-parse", "--verify", f"{ref}^{{tree}}"],
                    error=UpstreamError).stdout.decode().strip()
    key = f"git-tree:{tree}"
    digest = _index_get(key)
    if digest and (up := _cached(target, digest)):
        return up
    archive = proc.run(["git", "-C", repo, "archive", "--format=tar", tree], error=UpstreamError)
    entries = list(_tar_entries(archive.stdout, f"{repo}@{ref}"))
    up = _from_entries(target, entries, f"git:{repo}@{ref}")
    _index_put(key, up.digest)
    return up


def _tar_entries(data: bytes, where: str) -> Iterator[_Entry]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            name = check_member(m, where)
            if m.isdir():
                yield _Entry(name, "dir", mode=0o755)
            elif m.issym():
                yield _Entry(name, "symlink", link=m.linkname)
            elif m.isfile():
                fh = tf.extractfile(m)
                yield _Entry(name, "file", mode=0o755 if m.mode & 0o100 else 0o644,
                             data=fh.read() if fh else b"")


def _from_entries(target: str, entries: list[_Entry], where: str) -> Upstream:
    entries.sort(key=lambda e: e.name)
    makefile = next((e for e in entries if e.name == "Makefile" and e.kind == "file"), None)
    if makefile is None:
        raise UpstreamError(f"{where}: no top-level Makefile: not a kernel tree")
    mk = makefile.data if makefile.data is not None else makefile.path.read_bytes()  # type: ignore[union-attr]
    version = makefile_version(mk)
    topdir = f"linux-{version}"
    stage = _staging()
    try:
        tmp = stage / f"{topdir}.tar.gz"
        write_deterministic_tar(tmp, topdir, entries)
        digest = sha256_file(tmp)
        if _cached(target, digest) is None:
            _commit_entry(stage, digest, {"version": version, "topdir": topdir,
                                          "tarball": tmp.name, "source": where})
        else:
            shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return _cached(target, digest)  # type: ignore[return-value]


def write_deterministic_tar(out: Path, topdir: str, entries: list[_Entry]) -> None:
    """Same entries -> same bytes: sorted names, fixed mtime/owner, gzip header mtime 0."""
    with open(out, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(_info(topdir, tarfile.DIRTYPE, 0o755))
        for e in entries:
            name = f"{topdir}/{e.name}"
            if e.kind == "dir":
                tf.addfile(_info(name, tarfile.DIRTYPE, 0o755))
            elif e.kind == "symlink":
                info = _info(name, tarfile.SYMTYPE, 0o777)
                info.linkname = e.link
                tf.addfile(info)
            else:
                data = e.data if e.data is not None else e.path.read_bytes()  # type: ignore[union-attr]
                info = _info(name, tarfile.REGTYPE, e.mode)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info
