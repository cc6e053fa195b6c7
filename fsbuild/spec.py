"""Render specs/kernel.spec.j2 for a target: patches from the series (host-toolchain compat
series first when asked), an rpm changelog made of the patch subjects, el6-compatible
(RPM 4.8) syntax only."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from fsbuild import paths
from fsbuild.series import parse_series

TEMPLATE = "kernel.spec.j2"
CHECK_TEMPLATE = "config-check.sh.j2"
FIRMWARE_TEMPLATE = "firmware-check.sh.j2"
DEFAULT_AUTHOR = "fsbuild <fsbuild@localhost>"

# RPM >= 4.9-only constructs the el6 toolchain (rpm 4.8) rejects or misreads.
FORBIDDEN_SYNTAX: dict[str, re.Pattern[str]] = {
    "%autosetup": re.compile(r"^\s*%autosetup\b", re.M),
    "%autopatch": re.compile(r"^\s*%autopatch\b", re.M),
    "%license": re.compile(r"^\s*%license\b", re.M),
    "weak dependencies": re.compile(r"^(Recommends|Suggests|Supplements|Enhances):", re.M | re.I),
    "rich dependencies": re.compile(r"^(Build)?(Requires|Conflicts|Obsoletes|Provides)(\([^)]*\))?:\s*\(", re.M),
    "file triggers": re.compile(r"^\s*%(trans)?filetrigger", re.M),
    "%patchlist/%sourcelist": re.compile(r"^\s*%(patch|source)list\b", re.M),
    "%elif": re.compile(r"^\s*%elif", re.M),
    "%generate_buildrequires": re.compile(r"^\s*%generate_buildrequires", re.M),
}


@dataclass(frozen=True)
class SeriesPatch:
    name: str        # as written in the series (relative to the series' directory)
    path: Path
    strip: int       # -pN of the series line
    origin: str      # which series: "fastsocket" | "hostcc"
    reverse: bool = False  # -R: applied reversed (quilt semantics)


@dataclass(frozen=True)
class SpecPatch:
    number: int
    file: str        # basename inside SOURCES
    name: str
    strip: int
    origin: str
    subject: str
    reverse: bool = False


@dataclass
class SpecInputs:
    target: str
    version: str                 # RPM Version, e.g. 2.6.32
    release: str                 # RPM Release incl. suffix, e.g. 431.17.1.el6.fastsocket
    tarball: str                 # Source0 basename (pristine upstream bytes)
    topdir: str
    module_tarball: str
    config_fragment: str         # Source2 basename (possibly empty file)
    config_label: str            # human description for the spec comment
    config_base_file: str | None = None   # Source4 basename, else...
    config_base_make: str | None = None   # ...a make target (defconfig/tinyconfig)
    oldconfig: str = "olddefconfig"       # or "oldconfig" (2.6.32: `yes '' | make oldconfig`)
    with_firmware: bool = True
    firmware_noarch: bool = True
    firmware_install: bool = False
    missing_firmware: str = "fail"        # or "drop" (--allow-missing-firmware): firmware-check.sh
    host_cflags: str = ""                 # HOSTCFLAGS/EXTRA_CFLAGS of the build (6.1: additive)
    has_fastsocket: bool = True
    build_requires: list[str] = field(default_factory=list)
    patches: list[SpecPatch] = field(default_factory=list)
    date: dt.date = dt.date(1970, 1, 1)
    author: str = DEFAULT_AUTHOR

    @property
    def kver(self) -> str:
        return f"{self.version}-{self.release}.x86_64"


def read_series(series: Path, origin: str) -> list[SeriesPatch]:
    """The patches of a quilt series (the series engine's parser: comments, `-pN`, `-R`,
    no path escaping the series folder, every file present)."""
    parsed = parse_series(series)
    return [SeriesPatch(e.name, parsed.patch_path(e).resolve(), e.strip, origin, e.reverse)
            for e in parsed.entries]


_SUBJECT = re.compile(r"^Subject:\s*(.*)$", re.M | re.I)


def patch_subject(path: Path) -> str:
    """`Subject:` header without the [PATCH n/m] tag, else the first description line,
    else the file name."""
    text = path.read_bytes()[:16384].decode(errors="replace")
    head = re.split(r"^(?:---\s*$|diff |Index: |--- )", text, maxsplit=1, flags=re.M)[0]
    m = _SUBJECT.search(head)
    if m:
        subject = m.group(1)
        # RFC 2822 folded header continuation lines
        rest = head[m.end():].splitlines()[1:]
        for cont in rest:
            if not cont.startswith((" ", "\t")):
                break
            subject += " " + cont.strip()
        subject = re.sub(r"^\[[^\]]*\]\s*", "", subject.strip())
        if subject:
            return subject
    for line in head.splitlines():
        line = line.strip()
        if line and not re.match(r"^(From|Date|Signed-off-by|Cc|Acked-by)\b", line):
            return line
    return path.name


def spec_patches(series: Iterable[SeriesPatch]) -> list[SpecPatch]:
    """Number the patches (Patch1..N) and give each a unique SOURCES basename."""
    out: list[SpecPatch] = []
    seen: set[str] = set()
    for n, p in enumerate(series, 1):
        file = p.path.name
        if file in seen or file.startswith(("linux-", "config-", "fastsocket-module")):
            file = f"{p.origin}-{n:04d}-{p.path.name}"
        seen.add(file)
        out.append(SpecPatch(n, file, p.name, p.strip, p.origin, patch_subject(p.path), p.reverse))
    return out


def changelog(inputs: SpecInputs, upstream_desc: str) -> list[dict[str, object]]:
    """One entry for this build: every patch subject in series order."""
    lines: list[str] = []
    fs = [p for p in inputs.patches if p.origin == "fastsocket"]
    cc = [p for p in inputs.patches if p.origin != "fastsocket"]
    lines.append(f"Rebuild of {upstream_desc} with {len(fs)} Fastsocket patch(es)"
                 + (f" and {len(cc)} host-toolchain compat patch(es)" if cc else ""))
    lines += [p.subject for p in fs]
    lines += [f"[hostcc] {p.subject}" for p in cc]
    return [{
        "date": inputs.date.strftime("%a %b %d %Y"),
        "author": inputs.author,
        "evr": f"{inputs.version}-{inputs.release}",
        "lines": [_spec_escape(line) for line in lines],
    }]


def _spec_escape(text: str) -> str:
    # `%` would start a macro in the changelog; keep one line per entry.
    return " ".join(text.replace("%", "%%").split())


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(paths.specs_dir())),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True, autoescape=False)


def render(inputs: SpecInputs, upstream_desc: str) -> str:
    tmpl = _env().get_template(TEMPLATE)
    return tmpl.render(
        target=inputs.target, version=inputs.version, release=inputs.release,
        tarball=inputs.tarball, topdir=inputs.topdir, module_tarball=inputs.module_tarball,
        config_fragment=inputs.config_fragment, config_label=inputs.config_label,
        config_base_file=inputs.config_base_file, config_base_make=inputs.config_base_make,
        oldconfig=inputs.oldconfig, with_firmware=inputs.with_firmware,
        firmware_noarch=inputs.firmware_noarch, firmware_install=inputs.firmware_install,
        missing_firmware=inputs.missing_firmware,
        host_cflags=inputs.host_cflags, has_fastsocket=inputs.has_fastsocket, build_requires=inputs.build_requires,
        patches=inputs.patches, packager=inputs.author,
        changelog=changelog(inputs, upstream_desc))


def render_config_check() -> str:
    return _env().get_template(CHECK_TEMPLATE).render()


def render_firmware_check() -> str:
    return _env().get_template(FIRMWARE_TEMPLATE).render()


def forbidden_syntax(spec_text: str) -> list[str]:
    """Names of RPM >= 4.9-only constructs present in a rendered spec."""
    return [name for name, rx in FORBIDDEN_SYNTAX.items() if rx.search(spec_text)]


def template_files() -> list[Path]:
    return sorted(paths.specs_dir().glob("*.j2"))
