"""Read built RPMs with rpmfile and check what users rely on: NEVRA and arch, the kernel
image and its embedded version string (== /lib/modules/KVER == version-release.arch),
fastsocket.ko, a kernel-devel complete enough for out-of-tree modules, kernel-firmware.
rpmlint runs with specs/rpmlint.toml (each filter says why a kernel package draws it):
whatever it still reports fails verification."""

from __future__ import annotations

import re
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rpmfile

from fsbuild import proc
from fsbuild.errors import FsbuildError, MissingFileError, VerifyError
from fsbuild.paths import specs_dir

# kernel-devel must carry these (relative to /usr/src/kernels/KVER); one of each tuple.
DEVEL_REQUIRED: tuple[tuple[str, ...], ...] = (
    ("Makefile",), (".config",), ("Module.symvers",),
    ("include/generated/autoconf.h", "include/linux/autoconf.h"),
    ("scripts/basic/fixdep",), ("scripts/mod/modpost",),
    ("arch/x86/Makefile",),
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "status": "pass" if self.ok else "fail", "detail": self.detail}


@dataclass
class Package:
    path: Path
    name: str
    version: str
    release: str
    arch: str
    files: dict[str, int]          # absolute path -> st_mode
    is_source: bool
    checks: list[Check] = field(default_factory=list)

    @property
    def nevra(self) -> str:
        return f"{self.name}-{self.version}-{self.release}.{self.arch}"

    @property
    def vra(self) -> str:
        return f"{self.version}-{self.release}.{self.arch}"

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, object]:
        return {"path": str(self.path), "nevra": self.nevra, "name": self.name,
                "arch": self.arch, "files": len(self.files), "ok": self.ok,
                "checks": [c.as_dict() for c in self.checks]}


@dataclass
class Report:
    packages: list[Package]
    rpmlint: list[str]
    rpmlint_status: str             # "ran" | "skipped: <why>"

    @property
    def ok(self) -> bool:
        return bool(self.packages) and all(p.ok for p in self.packages) and not self.rpmlint

    def failures(self) -> list[str]:
        lint = [f"rpmlint: {len(self.rpmlint)} finding(s), first: {self.rpmlint[0]}"] if self.rpmlint else []
        return [f"{p.path.name}: {c.name}: {c.detail}" for p in self.packages for c in p.checks if not c.ok] + lint

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "packages": [p.as_dict() for p in self.packages],
                "rpmlint": {"status": self.rpmlint_status, "findings": self.rpmlint,
                            "summary": [{"check": k, "count": n, "example": ex}
                                        for k, n, ex in summarize_lint(self.rpmlint)]}}


# ------------------------------------------------------------------ reading

def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def read_package(path: Path) -> Package:
    if not path.is_file():
        raise MissingFileError(f"RPM {path} does not exist")
    try:
        with rpmfile.open(str(path)) as rpm:
            h = rpm.headers
            names = [_text(b) for b in _list(h.get("basenames"))]
            dirs = [_text(d) for d in _list(h.get("dirnames"))]
            idx = [int(i) for i in _list(h.get("dirindexes"))]
            modes = [int(m) & 0xFFFF for m in _list(h.get("filemodes"))]
            files = {dirs[i] + n: (modes[k] if k < len(modes) else 0)
                     for k, (i, n) in enumerate(zip(idx, names, strict=False))}
            return Package(path, _text(h.get("name")), _text(h.get("version")),
                           _text(h.get("release")), _text(h.get("arch")), files,
                           is_source=not h.get("sourcerpm"))
    except (VerifyError, MissingFileError):
        raise
    except Exception as exc:  # rpmfile raises bare Exceptions on corrupt input
        raise VerifyError(f"{path}: not a readable RPM ({exc})") from exc


def bzimage_version(data: bytes) -> str | None:
    """The kernel_version string of an x86 boot image (boot protocol >= 2.00): a pointer at
    0x20E, relative to 0x200, to "6.1.192-2.fastsocket.x86_64 (user@host) #1 SMP ..."."""
    if len(data) < 0x210 or data[0x202:0x206] != b"HdrS":
        return None
    ptr = int.from_bytes(data[0x20E:0x210], "little")
    if ptr == 0:
        return None
    start = ptr + 0x200
    end = data.find(b"\0", start, start + 512)
    if end < 0:
        return None
    text = data[start:end].decode(errors="replace").strip()
    return text.split()[0] if text else None


def iter_payload(path: Path) -> Iterator[tuple[str, int, bytes]]:
    """Stream (name, mode, data) of every payload member, without rpm2cpio: rpmfile finds
    and decompresses the payload (gzip, xz, bzip2, zstd), initramfs.iter_newc walks it."""
    from fsbuild.initramfs import iter_newc  # lazy: verify does not need it

    try:
        with rpmfile.open(str(path)) as rpm:
            yield from iter_newc(rpm.data_file)
    except (FsbuildError, GeneratorExit):
        raise
    except Exception as exc:  # rpmfile raises bare Exceptions on corrupt input
        raise MissingFileError(f"{path}: unreadable payload ({exc})") from exc


def read_member(path: Path, name: str, limit: int = 64 * 1024) -> bytes:
    """The first `limit` bytes of a payload member (e.g. "/boot/vmlinuz-KVER")."""
    with rpmfile.open(str(path)) as rpm:
        for cand in ("." + name, name.lstrip("/")):
            try:
                head: bytes = rpm.extractfile(cand).read(limit)
                return head
            except KeyError:
                continue
    raise KeyError(name)


# ------------------------------------------------------------------ checks

def classify(pkg: Package) -> str:
    if pkg.is_source:
        return "srpm"
    if pkg.name.endswith("-devel"):
        return "devel"
    if pkg.name.endswith("-firmware"):
        return "firmware"
    if pkg.name.endswith(("-headers", "-debuginfo", "-doc")):
        return "other"
    return "kernel"


def check_kernel(pkg: Package, has_fastsocket: bool) -> None:
    kver = pkg.vra
    c = pkg.checks
    c.append(Check("arch", pkg.arch == "x86_64", f"arch {pkg.arch}"))
    image = f"/boot/vmlinuz-{kver}"
    c.append(Check("image", image in pkg.files, image if image in pkg.files else f"{image} missing"))
    for f in (f"/boot/System.map-{kver}", f"/boot/config-{kver}", f"/boot/symvers-{kver}.gz"):
        c.append(Check(Path(f).name.split("-")[0], f in pkg.files, f if f in pkg.files else f"{f} missing"))
    moddirs = sorted({m.group(1) for f in pkg.files if (m := re.match(r"^/lib/modules/([^/]+)", f))})
    c.append(Check("modules dir", moddirs == [kver], f"/lib/modules/{{{', '.join(moddirs)}}} "
                   f"(want {kver})"))
    if image in pkg.files:
        try:
            found = bzimage_version(read_member(pkg.path, image))
        except KeyError:
            found = None
        c.append(Check("image version", found == kver,
                       f"bzImage says {found!r}, package {kver!r}" if found != kver
                       else f"bzImage version {found}"))
    c.append(_modules_complete(pkg, kver))
    if has_fastsocket:
        ko = [f for f in pkg.files if f.startswith(f"/lib/modules/{kver}/") and f.endswith("/fastsocket.ko")]
        c.append(Check("fastsocket.ko", bool(ko), ko[0] if ko else "no fastsocket.ko under "
                       f"/lib/modules/{kver}"))


_MODULE_SUFFIXES = ("", ".xz", ".gz", ".zst")


def _modules_complete(pkg: Package, kver: str) -> Check:
    """Every module kbuild built for the config (its modules.order) is in the package: a
    spec step that loses one fails here, not on an operator's server at modprobe time."""
    order = f"/lib/modules/{kver}/modules.order"
    try:
        text = read_member(pkg.path, order, limit=64 * 1024 * 1024).decode(errors="replace")
    except KeyError:
        return Check("modules complete", False, f"{order} missing")
    want = [line.strip() for line in text.splitlines() if line.strip()]
    missing = [m for m in want
               if not any(f"/lib/modules/{kver}/{m}{z}" in pkg.files for z in _MODULE_SUFFIXES)]
    if missing:
        return Check("modules complete", False, f"{len(missing)} of the {len(want)} modules in "
                     f"modules.order missing: {', '.join(missing[:3])}")
    return Check("modules complete", True, f"{len(want)} modules of modules.order present")


def check_devel(pkg: Package) -> None:
    kver = pkg.vra
    root = f"/usr/src/kernels/{kver}"
    c = pkg.checks
    c.append(Check("arch", pkg.arch == "x86_64", f"arch {pkg.arch}"))
    missing = [" or ".join(alts) for alts in DEVEL_REQUIRED
               if not any(f"{root}/{a}" in pkg.files for a in alts)]
    c.append(Check("devel complete", not missing,
                   f"missing in {root}: {', '.join(missing)}" if missing else root))
    host = [f"{root}/scripts/basic/fixdep", f"{root}/scripts/mod/modpost"]
    not_exec = [h for h in host if h in pkg.files and not pkg.files[h] & stat.S_IXUSR]
    c.append(Check("host tools executable", not not_exec, ", ".join(not_exec) or "fixdep, modpost"))


def check_firmware(pkg: Package, noarch: bool) -> None:
    want = "noarch" if noarch else "x86_64"
    pkg.checks.append(Check("arch", pkg.arch == want, f"arch {pkg.arch} (want {want})"))
    bad = [f for f in pkg.files if not f.startswith("/lib/firmware")]
    pkg.checks.append(Check("firmware paths", "/lib/firmware" in pkg.files and not bad,
                            f"outside /lib/firmware: {bad[:3]}" if bad else "/lib/firmware"))


def check_set(pkgs: list[Package]) -> list[Check]:
    """All binary packages of one build share version-release."""
    evrs = {f"{p.version}-{p.release}" for p in pkgs if classify(p) != "srpm"}
    kinds = {classify(p) for p in pkgs}
    out = [Check("same version-release", len(evrs) <= 1, ", ".join(sorted(evrs)))]
    for kind in ("kernel", "devel", "firmware"):
        out.append(Check(f"{kind} package present", kind in kinds, "" if kind in kinds else "missing"))
    return out


# ------------------------------------------------------------------ rpmlint

def rpmlint_config() -> Path:
    return specs_dir() / "rpmlint.toml"


def run_rpmlint(paths: list[Path], timeout: float = 600) -> tuple[str, list[str]]:
    exe = shutil.which("rpmlint")
    if exe is None:
        return "skipped: rpmlint not installed", []
    config = rpmlint_config()
    if not config.is_file():
        raise MissingFileError(f"rpmlint configuration {config} does not exist")
    try:
        out = proc.run([exe, "-c", str(config), *map(str, paths)], check=False, timeout=timeout, error=VerifyError)
    except VerifyError as exc:  # timed out or could not start
        return f"skipped: {exc.message}", []
    lines = (out.stdout + out.stderr).decode(errors="replace").splitlines()
    findings = [line for line in lines if re.search(r": [EW]: ", line)]
    return "ran", findings


def summarize_lint(findings: list[str]) -> list[tuple[str, int, str]]:
    """(check, count, first example) per rpmlint check, most frequent first: a kernel-devel
    draws hundreds of identical findings (zero-length include/config/* stamps)."""
    groups: dict[str, list[str]] = {}
    for line in findings:
        m = re.search(r": ([EW]): (\S+)", line)
        key = f"{m.group(1)}: {m.group(2)}" if m else line
        groups.setdefault(key, []).append(line)
    return sorted(((k, len(v), v[0]) for k, v in groups.items()), key=lambda t: (-t[1], t[0]))


# ------------------------------------------------------------------ entry point

def verify(paths: list[Path], *, has_fastsocket: bool = True, firmware_noarch: bool = True,
           lint: bool = True, require_set: bool = True) -> Report:
    """Check every RPM; `require_set` also wants one kernel, devel and firmware package."""
    if not paths:
        raise MissingFileError("no RPMs to verify")
    pkgs = [read_package(p) for p in paths]
    for pkg in pkgs:
        kind = classify(pkg)
        if kind == "kernel":
            check_kernel(pkg, has_fastsocket)
        elif kind == "devel":
            check_devel(pkg)
        elif kind == "firmware":
            check_firmware(pkg, firmware_noarch)
    if require_set and pkgs:
        pkgs[0].checks.extend(check_set(pkgs))
    status, findings = run_rpmlint(paths) if lint else ("skipped: --no-rpmlint", [])
    return Report(pkgs, findings, status)
