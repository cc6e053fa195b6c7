"""The smoke guest's initramfs: a pure-Python newc cpio writer (deterministic, no root needed
for device nodes) and the assembly of the guest: busybox, the init from ci/guest/, NIC
modules plus their modules.dep closure, fastsocket.ko, the musl userspace and its loader."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import shlex
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from fsbuild import proc
from fsbuild.errors import MissingFileError, ToolMissingError, UnsafePathError
from fsbuild.fileio import atomic_open

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
# Loaded in this order; each pulls its own dependencies from modules.dep first.
# virtio_pci is the transport: a module on el6, so it is not a modules.dep dependency of virtio_net.
NIC_MODULES = ("igb", "e1000e", "virtio_pci", "virtio_net")
MUSL_LOADER = "/lib/ld-musl-x86_64.so.1"
# Bump when the archive layout changes: a cached image built by older code is not reused.
LAYOUT_VERSION = "2"
# The image's first entry: the hash of its inputs. Inside the archive, so the key and the
# bytes it vouches for are replaced together (two smokes in one out dir cannot mix them).
KEY_ENTRY = "fsbuild-image.key"


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _archive_path(path: str) -> str:
    """Normalise an in-archive path; reject anything that could land outside the root."""
    p = PurePosixPath(path.lstrip("/"))
    if not p.parts or any(part in ("..", "") for part in p.parts):
        raise UnsafePathError(f"initramfs path {path!r} escapes the archive root")
    return str(p)


class CpioWriter:
    """Writes a newc ("070701") archive. mtime 0 and sequential inodes make the output a
    pure function of the entries, so identical guests produce identical images."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh
        self._ino = 0
        self._dirs: set[str] = set()
        self._closed = False

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        self._fh.write(header + encoded + _pad4(len(header) + len(encoded)))
        self._fh.write(data + _pad4(len(data)))

    def _parents(self, name: str) -> None:
        # The kernel's unpacker does not create missing parents: emit them first.
        parts = PurePosixPath(name).parts[:-1]
        for i in range(1, len(parts) + 1):
            self.add_dir("/".join(parts[:i]))

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = _archive_path(path)
        if name in self._dirs:
            return
        self._parents(name)
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        name = _archive_path(path)
        self._parents(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        name = _archive_path(path)
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_node(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = _archive_path(path)
        self._parents(name)
        fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[kind]
        self._entry(name, fmt | mode, rdev=(major, minor))

    def close(self) -> None:
        if not self._closed:
            self._entry(TRAILER, 0, nlink=1)
            self._closed = True


def iter_newc_headers(fh: IO[bytes]) -> Iterator[tuple[str, int, int]]:
    """The one newc reader: yields (name, mode, size) with `fh` at the member's data; the
    caller reads exactly `size` bytes before the next step (the padding is skipped here),
    so members of any size stream through. Raises ValueError on a corrupt archive."""
    offset = 0

    def take(n: int) -> bytes:
        nonlocal offset
        chunk = fh.read(n)
        if len(chunk) != n:
            raise ValueError(f"truncated cpio archive at offset {offset}")
        offset += n
        return chunk

    while True:
        header = take(110)
        if header[:6] not in (NEWC_MAGIC, b"070702"):
            raise ValueError(f"bad cpio magic {header[:6]!r} at offset {offset - 110}")
        fields = [int(header[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = take(namesize)[:-1].decode("utf-8", "surrogateescape")
        take(-(110 + namesize) % 4)
        if name == TRAILER:
            return
        yield name, mode, size
        offset += size
        take(-size % 4)


def iter_newc(fh: IO[bytes]) -> Iterator[tuple[str, int, bytes]]:
    """Stream (name, mode, data) out of a newc archive (ours, or an RPM payload) without
    holding the whole archive in memory."""
    for name, mode, size in iter_newc_headers(fh):
        data = fh.read(size)
        if len(data) != size:
            raise ValueError(f"truncated cpio archive: {name} has {len(data)} of {size} bytes")
        yield name, mode, data


def read_newc(data: bytes) -> list[tuple[str, int, bytes]]:
    return list(iter_newc(io.BytesIO(data)))


# ---------------------------------------------------------------- modules.dep closure

def module_name(path: str) -> str:
    """kernel/drivers/i2c/i2c-core.ko.xz -> i2c_core (modprobe treats - and _ alike)."""
    base = PurePosixPath(path).name
    for suffix in (".xz", ".gz", ".zst"):
        base = base.removesuffix(suffix)
    return base.removesuffix(".ko").replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """modules.dep -> {relative .ko path: [dependency paths]}. Old depmods (the 2.6.32
    era) wrote absolute /lib/modules/<kver>/... paths: made relative here."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[_relative(mod.strip())] = [_relative(d) for d in rest.split()]
    return deps


def _relative(path: str) -> str:
    parts = PurePosixPath(path).parts
    if path.startswith("/") and len(parts) > 4 and parts[1:3] == ("lib", "modules"):
        return "/".join(parts[4:])
    return path


def closure(deps: Mapping[str, list[str]], wanted: Iterable[str]) -> list[str]:
    """Module paths for `wanted` (module names) with every dependency placed before its
    user: the order insmod needs. Raises MissingFileError naming an unknown module."""
    by_name = {module_name(p): p for p in deps}
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if path in seen:
            return
        if path in chain:  # depmod refuses cycles; a hand-edited file must not loop us
            raise MissingFileError(f"modules.dep: dependency cycle {' -> '.join((*chain, path))}")
        # modules.dep lists a module's deps so that the last one is loaded first.
        for dep in reversed(deps.get(path, [])):
            visit(dep, (*chain, path))
        seen.add(path)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key not in by_name:
            raise MissingFileError(f"module {name} is not in modules.dep")
        visit(by_name[key], ())
    return order


def _module_bytes(path: Path) -> bytes:
    """Decompress .ko.xz/.ko.gz on the host: busybox insmod on el6 cannot."""
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    return raw


def _plain(path: str) -> str:
    for suffix in (".xz", ".gz"):
        path = path.removesuffix(suffix)
    return path


def lanes_disjoint(deps: Mapping[str, list[str]], wanted: list[str]) -> bool:
    """Whether the init may load the virtio modules beside the others (its two NIC lanes):
    only when their modules.dep closures share no module, since two modprobes racing for
    one dependency can fail (2.6.32 refuses a user of a module still initialising)."""
    virtio = [m for m in wanted if m.startswith("virtio")]
    other = [m for m in wanted if not m.startswith("virtio")]
    return not set(closure(deps, virtio)) & set(closure(deps, other))


# ---------------------------------------------------------------- guest assembly

@dataclass
class Userspace:
    """Guest programs built with musl; any may be None when not built (checks then skip)."""
    libsocket: Path | None = None
    server: Path | None = None
    loadgen: Path | None = None
    nic_sh: Path | None = None
    missing: list[str] = field(default_factory=list)  # why some are absent, for skip details


@dataclass
class GuestSpec:
    kver: str
    modules_dir: Path               # <staging root>/lib/modules/<kver>
    init: Path                      # ci/guest/init (or a test's own init)
    busybox: Path
    helpers: list[Path] = field(default_factory=list)  # static musl helpers -> /bin
    userspace: Userspace = field(default_factory=Userspace)
    musl_loader: Path | None = None
    nic_modules: tuple[str, ...] = NIC_MODULES
    config: dict[str, str] = field(default_factory=dict)  # -> /etc/fsmoke.conf


@dataclass
class GuestImage:
    path: Path
    modules: list[str]              # load order (relative paths inside lib/modules/<kver>)
    fastsocket: bool
    entries: int


def busybox_applets(busybox: Path) -> list[str]:
    out = proc.run([busybox, "--list"], error=ToolMissingError, timeout=10,
                   timeout_message="not a usable busybox")
    # The list names `busybox` itself: a symlink over the binary would loop (ELOOP).
    return [a for a in out.stdout.decode().split() if a and "/" not in a and a != "busybox"]


def _fastsocket_module(deps: Mapping[str, list[str]]) -> str | None:
    return next((p for p in deps if module_name(p) == "fastsocket"), None)


def build(spec: GuestSpec, out: Path) -> GuestImage:
    """Write the newc initramfs for `spec` to `out`: gzip'd when `out` ends in .gz, else a
    plain cpio (the kernel unpacks it without inflating: ~1 s less per boot under TCG).
    An image whose inputs (content hash, its first entry) did not change is reused as is."""
    for need in (spec.init, spec.busybox, spec.modules_dir / "modules.dep"):
        if not need.exists():
            raise MissingFileError(f"guest input missing: {need}")
    deps = parse_modules_dep((spec.modules_dir / "modules.dep").read_text())
    fs_mod = _fastsocket_module(deps)
    wanted = [m for m in spec.nic_modules if m.replace("-", "_") in {module_name(p) for p in deps}]
    mods = closure(deps, wanted + (["fastsocket"] if fs_mod else []))
    key = _input_key(spec, mods, out.name)
    cached = _cached(out, key)
    if cached is not None:
        return GuestImage(out, mods, fs_mod is not None, cached)
    entries = _write(spec, out, key, deps, fs_mod, wanted, mods)
    return GuestImage(out, mods, fs_mod is not None, entries)


def _input_key(spec: GuestSpec, mods: list[str], out_name: str) -> str:
    """Hash of everything the image is made of (file contents, not mtimes)."""
    h = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        h.update(b"%s %d\n" % (label.encode(), len(data)))
        h.update(data)

    add("layout", f"{LAYOUT_VERSION} {out_name} {spec.kver} {spec.nic_modules}".encode())
    add("config", json.dumps(spec.config, sort_keys=True).encode())
    add("modules.dep", (spec.modules_dir / "modules.dep").read_bytes())
    for rel in mods:
        src = spec.modules_dir / rel
        add(f"module {rel}", src.read_bytes() if src.is_file() else b"<missing>")
    us = spec.userspace
    files = [("init", spec.init), ("busybox", spec.busybox), *((f"helper {p.name}", p) for p in spec.helpers),
             ("libsocket", us.libsocket), ("server", us.server), ("loadgen", us.loadgen),
             ("nic.sh", us.nic_sh), ("musl", spec.musl_loader.resolve() if spec.musl_loader else None)]
    for label, path in files:
        add(label, path.read_bytes() if path else b"<none>")
    return h.hexdigest()


def _cached(out: Path, key: str) -> int | None:
    """Entry count of the image at `out` when it was built from `key`, else None."""
    opener = gzip.open if out.name.endswith(".gz") else open
    try:
        with opener(out, "rb") as fh:
            entries = iter_newc(fh)  # type: ignore[arg-type]
            name, _mode, data = next(entries)
            if name != KEY_ENTRY or data != key.encode():
                return None
            return 1 + sum(1 for _ in entries)
    except (OSError, EOFError, ValueError, StopIteration, gzip.BadGzipFile):
        return None


def _write(spec: GuestSpec, out: Path, key: str, deps: Mapping[str, list[str]], fs_mod: str | None,
           wanted: list[str], mods: list[str]) -> int:
    """Assemble and write the archive; the number of entries."""
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_file(KEY_ENTRY, key.encode())
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "lib", "run", "root"):
        w.add_dir(d)
    w.add_node("dev/console", "c", 5, 1)
    w.add_node("dev/null", "c", 1, 3, 0o666)
    # The checks channel must exist even where devtmpfs is not configured.
    w.add_node("dev/ttyS0", "c", 4, 64)
    w.add_node("dev/ttyS1", "c", 4, 65)
    w.add_file("bin/busybox", spec.busybox.read_bytes(), 0o755)
    for applet in busybox_applets(spec.busybox):
        w.add_symlink(f"bin/{applet}", "busybox")
    w.add_file("init", spec.init.read_bytes(), 0o755)
    for helper in spec.helpers:
        w.add_file(f"bin/{helper.name}", helper.read_bytes(), 0o755)
    _add_modules(w, spec, deps, mods)
    _add_userspace(w, spec)
    conf = dict(spec.config, KVER=spec.kver,
                NIC_MODULES=" ".join(module_name(m) for m in wanted),
                FASTSOCKET_KO="1" if fs_mod else "0")
    conf["NIC_PARALLEL"] = "1" if lanes_disjoint(deps, wanted) else "0"
    # Per-module insmod chains (deps first): the init's fallback when busybox modprobe
    # misbehaves on an old kernel.
    for name in wanted + (["fastsocket"] if fs_mod else []):
        chain = closure(deps, [name])
        conf[f"MODCHAIN_{name.replace('-', '_')}"] = " ".join(_plain(p) for p in chain)
    w.add_file("etc/fsmoke.conf", "".join(f"{k}={shlex.quote(v)}\n" for k, v in sorted(conf.items()))
               .encode())
    w.close()
    # mtime=0 keeps the gzip stream deterministic; level 1 because TCG boot time, not size, matters.
    # No fsync: the image is rebuilt whenever it is missing, and boot time is what counts.
    with atomic_open(out, fsync=False) as raw:
        if out.name.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz:
                gz.write(buf.getvalue())
        else:
            raw.write(buf.getvalue())
    return w._ino - 1


def _add_modules(w: CpioWriter, spec: GuestSpec, deps: Mapping[str, list[str]],
                 mods: list[str]) -> None:
    base = f"lib/modules/{spec.kver}"
    for rel in mods:
        src = spec.modules_dir / rel
        if not src.is_file():
            raise MissingFileError(f"module listed in modules.dep is missing: {src}")
        w.add_file(f"{base}/{_plain(rel)}", _module_bytes(src))
    # A modules.dep limited to what we ship, so the guest's modprobe resolves the same order.
    lines = [f"{_plain(m)}: {' '.join(_plain(d) for d in deps.get(m, []))}".rstrip() for m in mods]
    w.add_file(f"{base}/modules.dep", ("\n".join(lines) + "\n").encode())


def _add_userspace(w: CpioWriter, spec: GuestSpec) -> None:
    us = spec.userspace
    if us.libsocket:
        w.add_file("lib/libsocket.so", us.libsocket.read_bytes(), 0o755)
    for prog in (us.server, us.loadgen):
        if prog:
            w.add_file(f"bin/{prog.name}", prog.read_bytes(), 0o755)
    if us.nic_sh:
        w.add_file("bin/nic.sh", us.nic_sh.read_bytes(), 0o755)
    if spec.musl_loader:
        # The host path is a symlink to libc.so; the guest needs the real bytes.
        w.add_file(MUSL_LOADER.lstrip("/"), spec.musl_loader.resolve().read_bytes(), 0o755)
