"""`fsbuild rpm`: assemble the SRPM inputs (pristine tarball, series patches, module/ tarball,
config), write a reproducible SRPM, rebuild it with rpmbuild (host toolchain) or mock (el6
chroot), and collect the RPMs in out/<target>/rpms/. Inputs are hashed: an unchanged
rebuild is a no-op."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from fsbuild import farm as farms
from fsbuild import lock, paths, proc, progress, spec
from fsbuild.errors import BuildError, FsbuildError, MissingFileError, PatchApplyError, RunInterruptedError, TargetError
from fsbuild.fileio import atomic_write, walk_sorted
from fsbuild.target import Target
from fsbuild.tario import write_tar_gz

if TYPE_CHECKING:  # upstream is imported lazily: only builds need it
    from fsbuild.upstream import Upstream

# Bump when the build recipe changes in a way the hashed inputs do not show.
RECIPE = 3
BUILDERS = ("rpmbuild", "mock")
MODULE_TARBALL = "fastsocket-module.tar.gz"
FRAGMENT = "fsbuild-fragment.config"
BASE_CONFIG = "fsbuild-base.config"
CHECK_SCRIPT = "config-check.sh"
FIRMWARE_SCRIPT = "firmware-check.sh"
DROPPED_FIRMWARE = "fsbuild-firmware-dropped: "   # firmware-check.sh drop mode, one per blob
MANIFEST = "build.json"
# --config profiles by name (anything else is a FILE). debug: mini + the debug fragment;
# its outputs live under out/<target>/debug/ and its release ends in DEBUG_RELEASE, so a
# debug build never replaces or shadows the production RPMs.
DEBUG = "debug"
PROFILES = ("mini", "full", DEBUG)
DEBUG_RELEASE = ".debug"
# Build artefacts an in-place `make -C KDIR M=module` leaves in module/.
_MODULE_JUNK = re.compile(r"(\.o|\.ko|\.mod|\.mod\.c|\.cmd|\.order|\.symvers|\.a|~|\.swp)$")
# tests/ holds host-side tests of the module, not kernel sources: editing them must not
# trigger a kernel rebuild.
_MODULE_JUNK_DIRS = {".tmp_versions", "__pycache__", ".git", "tests"}
DEFAULT_REQUIRES = ["bc", "bison", "flex", "perl", "make", "gcc", "elfutils-libelf-devel",
                    "openssl-devel"]


@dataclass(frozen=True)
class ConfigChoice:
    label: str                    # "mini", "full" or the FILE path
    fragment: bytes               # every option must survive olddefconfig/oldconfig
    base_make: str | None = None  # `make <target>` base (defconfig, tinyconfig, x86_64_defconfig)
    base_file: Path | None = None


@dataclass
class Request:
    target: Target
    source: str | None = None
    config: str = "mini"
    builder: str = "rpmbuild"
    release_suffix: str | None = None
    jobs: int = 2
    force: bool = False
    mock_baseurl: str | None = None
    tmpfs: bool | None = None     # build tree in RAM: None = when there is room
    distcc: str | None = None     # DISTCC_HOSTS of a distcc farm
    icecc: bool = False           # an icecream farm (scheduler: ICECC_SCHEDULER or broadcast)
    farm_fallback: bool = False   # a farm failing its checks means a local build
    allow_missing_firmware: bool = False   # blobs the source lacks are left out, not an error


@dataclass
class Plan:
    """Everything the SRPM is made of, resolved and hashed."""
    req: Request
    upstream: Upstream
    version: str
    release: str
    config: ConfigChoice
    series: list[spec.SeriesPatch]
    module_tar: bytes
    epoch: int                    # SOURCE_DATE_EPOCH
    inputs_hash: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    farm: farms.Farm | None = None  # where objects compile: never hashed, never in the SRPM

    @property
    def kver(self) -> str:
        return f"{self.version}-{self.release}.x86_64"


@dataclass
class Result:
    target: str
    kver: str
    rpms: list[Path]
    srpm: Path
    log: Path
    builder: str
    config: str
    inputs_hash: str
    cached: bool
    duration_s: float
    # seconds per step (inputs, srpm, prep, config, make, install, package, write, clean, collect):
    # where the time beyond `make` goes
    phases: dict[str, float] = field(default_factory=dict)
    firmware_dropped: list[str] = field(default_factory=list)   # --allow-missing-firmware

    def as_dict(self) -> dict[str, object]:
        return {"target": self.target, "kver": self.kver, "rpms": [str(p) for p in self.rpms],
                "srpm": str(self.srpm), "log": str(self.log), "builder": self.builder,
                "config": self.config, "inputs": self.inputs_hash, "cached": self.cached,
                "duration_s": round(self.duration_s, 2), "phases": self.phases,
                "firmware_dropped": self.firmware_dropped}


# ------------------------------------------------------------------ inputs

def resolve_upstream(target: Target, source: str | None) -> Upstream:
    from fsbuild import upstream  # lazy: only builds need it
    return upstream.resolve(target, source)


def split_version(target: Target, upstream_version: str) -> tuple[str, str]:
    """RPM Version/Release of the upstream: "2.6.32-431.17.1.el6" splits; a bare Makefile
    version takes the target's release."""
    version, _, release = upstream_version.partition("-")
    return version, release or target.release


def release_suffix(target: Target, suffix: str | None) -> str:
    value = target.section("rpm").get("release_suffix", ".fastsocket") if suffix is None else suffix
    if value and not re.fullmatch(r"[A-Za-z0-9._+~]+", value):
        raise TargetError(f"release suffix {value!r}: only letters, digits and . _ + ~ (no '-')")
    return value


def choose_config(target: Target, choice: str, upstream_configs: dict[str, Path]) -> ConfigChoice:
    """mini | debug | full | FILE → base (make target or file) + fragment whose options are
    checked."""
    cfg = target.section("config")
    if choice == DEBUG:
        return _debug_config(target, cfg, upstream_configs)
    if choice == "full":
        base_make, base_file = _full_base(target, cfg, upstream_configs)
        full = _fragment_file(cfg, "full_fragment", "--config full") if cfg.get("full_fragment") else b""
        return ConfigChoice("full", _with_product(cfg, full), base_make, base_file)
    if choice == "mini":
        frag_rel = cfg.get("mini_fragment")
        if not frag_rel:
            raise TargetError(f"target {target.name}: no [config] mini_fragment")
        mini = _with_product(cfg, _fragment_file(cfg, "mini_fragment", "--config mini"))
        if cfg.get("mini_base"):
            return ConfigChoice("mini", mini, base_make=str(cfg["mini_base"]))
        base_make, base_file = _full_base(target, cfg, upstream_configs)
        return ConfigChoice("mini", mini, base_make, base_file)
    path = Path(choice)
    if not path.is_file():
        raise MissingFileError(f"--config {choice}: not mini, full or an existing config file")
    # A user config is the base and is checked as a whole: options the new tree drops
    # (config drift) fail the build instead of vanishing silently.
    return ConfigChoice(str(path), _with_product(cfg, path.read_bytes()), base_file=path.resolve())


def _fragment_file(cfg: dict[str, object], key: str, what: str) -> bytes:
    frag = paths.repo_root() / str(cfg[key])
    if not frag.is_file():
        raise MissingFileError(f"config fragment {frag} does not exist ({what})")
    return frag.read_bytes()


def _with_product(cfg: dict[str, object], fragment: bytes) -> bytes:
    """`fragment` with the target's product options on top: every profile, the operators'
    full config and a user's file included, builds a Fastsocket kernel (a full build
    without CONFIG_FASTSOCKET=m compiled for an hour and shipped no fastsocket.ko)."""
    if not cfg.get("product_fragment"):
        return fragment
    return overlay_fragment(fragment, _fragment_file(cfg, "product_fragment", "every build"))


def _debug_config(target: Target, cfg: dict[str, object],
                  upstream_configs: dict[str, Path]) -> ConfigChoice:
    """mini's base, and mini's fragment with the target's debug fragment on top: the same
    option-survival check covers both."""
    mini = choose_config(target, "mini", upstream_configs)
    frag = paths.repo_root() / str(cfg.get("debug_fragment", f"ci/configs/{target.name}-debug.config"))
    if not frag.is_file():
        raise MissingFileError(f"config fragment {frag} does not exist (--config debug)")
    return ConfigChoice(DEBUG, overlay_fragment(mini.fragment, frag.read_bytes()),
                        mini.base_make, mini.base_file)


_SYM_RE = re.compile(rb"^(?:# )?(CONFIG_[A-Za-z0-9_]+)(?:=| is not set)")


def overlay_fragment(base: bytes, top: bytes) -> bytes:
    """base + top, minus base's lines for the symbols top sets: the config check reads a
    symbol's first occurrence, kconfig its last, so each symbol must appear once."""
    ours = {m.group(1) for line in top.splitlines() if (m := _SYM_RE.match(line))}
    kept = [line for line in base.splitlines()
            if not ((m := _SYM_RE.match(line)) and m.group(1) in ours)]
    return b"\n".join(kept) + b"\n" + top


def _str_list(value: object) -> list[str]:
    """A target.toml list (of anything) as strings; a scalar is a one-element list."""
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def _full_base(target: Target, cfg: dict[str, object],
               upstream_configs: dict[str, Path]) -> tuple[str | None, Path | None]:
    """The first [config] full candidate that exists: configs/<name> from the SRPM, a tree
    defconfig (arch/x86/configs/<name> → `make <name>`), or a bare make target."""
    cands = cfg.get("full", "defconfig")
    for cand in [cands] if isinstance(cands, str) else _str_list(cands):
        cand = str(cand)
        if cand.startswith("configs/"):
            found = upstream_configs.get(Path(cand).name)
            if found is not None and Path(found).is_file():
                return None, Path(found)
            continue
        if "/configs/" in cand:
            return Path(cand).name, None
        return cand, None
    raise TargetError(f"target {target.name}: no usable [config] full base")


def series_for(target: Target, builder: str) -> list[spec.SeriesPatch]:
    """Host-toolchain compat patches first (rpmbuild only: mock has el6's own gcc), then
    the Fastsocket series."""
    out: list[spec.SeriesPatch] = []
    if builder == "rpmbuild" and target.hostcc_series is not None and target.hostcc_series.exists():
        out += spec.read_series(target.hostcc_series, "hostcc")
    out += spec.read_series(target.series, "fastsocket")
    return out


def module_tarball(module_dir: Path, epoch: int) -> bytes:
    """module/ as a deterministic tar.gz (sorted, fixed owner/mtime, gzip mtime 0), build
    artefacts left out, so the same sources give the same bytes."""
    if not module_dir.is_dir():
        raise MissingFileError(f"module sources {module_dir} do not exist")
    raw = io.BytesIO()
    write_tar_gz(raw, (_ModuleFile.of(module_dir, rel) for rel in _module_files(module_dir)),
                 mtime=epoch, level=9)
    return raw.getvalue()


@dataclass
class _ModuleFile:
    """A module/ file or directory as a tario.TarSource."""
    name: str
    kind: str
    mode: int
    path: Path
    link: str = ""

    @classmethod
    def of(cls, root: Path, rel: str) -> _ModuleFile:
        full = root / rel
        if full.is_dir():
            return cls(rel, "dir", 0o755, full)
        return cls(rel, "file", 0o755 if os.access(full, os.X_OK) else 0o644, full)

    def size(self) -> int:
        return self.path.stat().st_size

    def open(self) -> IO[bytes]:
        return open(self.path, "rb")


def _module_files(root: Path) -> list[str]:
    return sorted(rel for rel, full in walk_sorted(root, skip_dirs=_MODULE_JUNK_DIRS)
                  if not (full.is_symlink() or (full.is_file() and _MODULE_JUNK.search(full.name))))


# What an SRPM is made of: a commit touching nothing here must not change its epoch (and so
# force a full kernel rebuild).
EPOCH_PATHS = ("patches", "module", "specs", "ci/configs")


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH, else the time of the last commit that touched the build's inputs
    (EPOCH_PATHS): same inputs → same SRPM."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        try:
            return int(env)
        except ValueError as exc:
            raise BuildError(f"SOURCE_DATE_EPOCH={env!r} is not an integer") from exc
    try:
        out = proc.run(["git", "-C", str(paths.repo_root()), "log", "-1", "--format=%ct", "--", *EPOCH_PATHS],
                       check=False, timeout=10, error=BuildError)
        if out.returncode == 0 and out.stdout.strip():
            return int(out.stdout.strip())
    except (FsbuildError, ValueError):  # no git, no repository (an installed copy): the fixed epoch
        pass
    return 1_000_000_000


def make_plan(req: Request, upstream: Upstream | None = None) -> Plan:
    if req.builder not in BUILDERS:
        raise BuildError(f"unknown builder {req.builder!r} (choose {' or '.join(BUILDERS)})")
    up = upstream if upstream is not None else resolve_upstream(req.target, req.source)
    version, base_release = split_version(req.target, up.version)
    release = base_release + release_suffix(req.target, req.release_suffix)
    if req.config == DEBUG:
        release += DEBUG_RELEASE
    config = choose_config(req.target, req.config, dict(up.configs))
    epoch = source_date_epoch()
    plan = Plan(req, up, version, release, config, series_for(req.target, req.builder),
                module_tarball(paths.repo_root() / "module", epoch), epoch)
    if req.builder == "mock":
        plan.extra["mock_baseurl"] = mock_baseurl(req.target, req.mock_baseurl)
    if req.allow_missing_firmware:
        plan.extra["missing_firmware"] = "drop"
    plan.inputs_hash = inputs_hash(plan)
    return plan


def inputs_hash(plan: Plan) -> str:
    """sha256 over everything that shapes the packages (not -j, not paths, not the farm)."""
    h = hashlib.sha256()

    def add(label: str, data: bytes | str) -> None:
        b = data.encode() if isinstance(data, str) else data
        h.update(f"{label}:{len(b)}:".encode() + b)

    add("recipe", str(RECIPE))
    add("target", plan.req.target.name)
    add("upstream", plan.upstream.digest)
    add("evr", f"{plan.version}-{plan.release}")
    add("builder", plan.req.builder)
    for p in plan.series:
        add("patch", f"{p.origin}/{p.name}/-p{p.strip}" + (" -R" if p.reverse else ""))
        add("patch-data", p.path.read_bytes())
    for tmpl in spec.template_files():
        add(f"spec/{tmpl.name}", tmpl.read_bytes())
    add("module", plan.module_tar)
    add("config", plan.config.label if plan.config.label in PROFILES else "file")
    add("fragment", plan.config.fragment)
    add("base-make", plan.config.base_make or "")
    add("base-file", plan.config.base_file.read_bytes() if plan.config.base_file else b"")
    add("epoch", str(plan.epoch))
    add("rpm-section", json.dumps(plan.req.target.section("rpm"), sort_keys=True))
    for k, v in sorted(plan.extra.items()):
        add(k, v)
    return h.hexdigest()


# ------------------------------------------------------------------ spec + SRPM

def spec_inputs(plan: Plan) -> spec.SpecInputs:
    target = plan.req.target
    rpm = target.section("rpm")
    cfg = target.section("config")
    up = plan.upstream
    return spec.SpecInputs(
        target=target.name, version=plan.version, release=plan.release,
        tarball=Path(up.tarball).name, topdir=up.topdir,
        module_tarball=MODULE_TARBALL, config_fragment=FRAGMENT,
        config_label=_config_label(plan.config),
        config_base_file=BASE_CONFIG if plan.config.base_file else None,
        config_base_make=plan.config.base_make,
        oldconfig=str(cfg.get("resolve", "olddefconfig")),
        with_firmware=bool(rpm.get("with_firmware", True)),
        firmware_noarch=bool(rpm.get("firmware_noarch", True)),
        firmware_install=bool(rpm.get("firmware_install", False)),
        missing_firmware="drop" if plan.req.allow_missing_firmware else "fail",
        host_cflags=str(rpm.get("host_cflags", "")),
        has_fastsocket=bool(rpm.get("has_fastsocket", True)),
        build_requires=[str(r) for r in rpm.get("build_requires", DEFAULT_REQUIRES)],
        patches=spec.spec_patches(plan.series),
        date=dt.datetime.fromtimestamp(plan.epoch, dt.UTC).date(),
        author=str(rpm.get("packager", spec.DEFAULT_AUTHOR)),
    )


def _config_label(c: ConfigChoice) -> str:
    base = f"make {c.base_make}" if c.base_make or c.base_file is None else f"{BASE_CONFIG} ({c.base_file.name})"
    return f"{c.label}: {base} + {FRAGMENT}"


def upstream_desc(plan: Plan) -> str:
    return f"{plan.req.target.name} {plan.upstream.version}"


def write_sources(plan: Plan, srcdir: Path) -> Path:
    """SOURCES + spec for `rpmbuild -bs`, every file's mtime set to the epoch."""
    if srcdir.exists():
        shutil.rmtree(srcdir)
    srcdir.mkdir(parents=True)
    inputs = spec_inputs(plan)
    # A copy, not a hard link: setting the mtime must not touch the upstream cache.
    shutil.copyfile(plan.upstream.tarball, srcdir / inputs.tarball)
    (srcdir / MODULE_TARBALL).write_bytes(plan.module_tar)
    (srcdir / FRAGMENT).write_bytes(plan.config.fragment)
    if plan.config.base_file:
        shutil.copyfile(plan.config.base_file, srcdir / BASE_CONFIG)
    (srcdir / CHECK_SCRIPT).write_text(spec.render_config_check())
    (srcdir / FIRMWARE_SCRIPT).write_text(spec.render_firmware_check())
    for sp, p in zip(inputs.patches, plan.series, strict=True):
        shutil.copyfile(p.path, srcdir / sp.file)
    spec_path = srcdir / "kernel.spec"
    spec_path.write_text(spec.render(inputs, upstream_desc(plan)))
    for f in srcdir.iterdir():
        os.utime(f, (plan.epoch, plan.epoch))
    return spec_path


def repro_defines(epoch: int) -> list[str]:
    """rpmbuild options making SRPM/RPM headers depend on inputs only."""
    return ["--define", "use_source_date_epoch_as_buildtime 1",
            "--define", "clamp_mtime_to_source_date_epoch 1",
            "--define", "_buildhost fsbuild.reproducible",
            "--define", "_source_filedigest_algorithm 8",
            "--define", "_binary_filedigest_algorithm 8"]


def build_env(epoch: int, farm: farms.Farm | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SOURCE_DATE_EPOCH=str(epoch), LC_ALL="C", TZ="UTC")
    if farm is not None:
        env.update(farm.env)  # DISTCC_HOSTS, ICECC_SCHEDULER...: what the launcher reads
    env.pop("MAKEFLAGS", None)
    env.pop("MFLAGS", None)
    return env


def make_srpm(plan: Plan, srcdir: Path, srpm_dir: Path, log: Path) -> Path:
    spec_path = write_sources(plan, srcdir)
    if srpm_dir.exists():
        shutil.rmtree(srpm_dir)
    srpm_dir.mkdir(parents=True)
    proc.run(["rpmbuild", "-bs", "--nodeps",
              "--define", f"_topdir {srcdir}", "--define", f"_sourcedir {srcdir}",
              "--define", f"_specdir {srcdir}", "--define", f"_srcrpmdir {srpm_dir}",
              # the SRPM stores the expanded spec: keep -j out of it
              "--define", "_smp_mflags -j2",
              *repro_defines(plan.epoch), str(spec_path)],
             env=build_env(plan.epoch), log=log, error=BuildError)
    found = sorted(srpm_dir.glob("*.src.rpm"))
    if len(found) != 1:
        raise BuildError(f"rpmbuild -bs produced {len(found)} SRPMs in {srpm_dir}")
    return found[0]


# ------------------------------------------------------------------ builders

def rpmbuild_command(srpm: Path, topdir: Path, jobs: int, epoch: int,
                     scratch: Path | None = None, farm: farms.Farm | None = None) -> list[str]:
    """`scratch`: where the build tree and build root go instead of topdir (a tmpfs).
    `farm`: make's CC through its launcher and -j sized to the farm's slots."""
    # --nodeps: Debian's rpm database knows no BuildRequires; the host tools are checked
    # by `fsbuild doctor` instead.
    where = ["--define", f"_builddir {scratch}/BUILD", "--define", f"_buildrootdir {scratch}/BUILDROOT"] \
        if scratch else []
    launcher = ["--define", f"fsbuild_launcher {farm.launcher}"] if farm else []
    return ["rpmbuild", "--rebuild", "--nodeps", "--define", f"_topdir {topdir}", *where, *launcher,
            "--define", f"_smp_mflags -j{farm.jobs if farm else jobs}", *repro_defines(epoch), str(srpm)]


# ------------------------------------------------------------------ build tree in RAM

TMPFS_DIRS = (Path("/dev/shm"),)
GIB = 1 << 30


def tree_bytes_needed(plan: Plan) -> int:
    """Room for source tree + objects + build root: the compressed tarball is ~1/10 of the
    tree; objects of the mini profile fit in 2 GiB; a full distro config with DEBUG_INFO
    (el6's) can reach ~20 GiB, so it builds in RAM only on a big host."""
    tarball = Path(plan.upstream.tarball).stat().st_size
    return 12 * tarball + {"mini": 2, DEBUG: 4}.get(plan.config.label, 20) * GIB


def tmpfs_dir(need: int, dirs: tuple[Path, ...] = TMPFS_DIRS) -> Path | None:
    """A mounted tmpfs with `need` bytes free, leaving 2 GiB of RAM for the compilers
    (tmpfs pages are RAM; the same rule as mock's tmpfs plugin's required_ram_mb)."""
    mounts = _tmpfs_mounts()
    for d in dirs:
        if str(d) not in mounts or not os.access(d, os.W_OK):
            continue
        st = os.statvfs(d)
        if st.f_bavail * st.f_frsize >= need and _mem_available() >= need + 2 * GIB:
            return d
    return None


def _tmpfs_mounts() -> set[str]:
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return set()
    return {f[1] for f in (line.split() for line in lines) if len(f) > 2 and f[2] == "tmpfs"}


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _ram_scratch(ram: Path, target: str) -> Path:
    """A fresh build dir in the tmpfs, tagged with our pid; dirs of runs that were killed
    (SIGKILL, power loss: no `finally`) would hold RAM forever, so they go first."""
    for old in ram.glob("fsbuild-*"):
        try:
            pid = int((old / "fsbuild.pid").read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if not _alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"fsbuild-{target}-", dir=ram))
    (scratch / "fsbuild.pid").write_text(str(os.getpid()))
    return scratch


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    return True


def choose_scratch(plan: Plan) -> Path | None:
    """The tmpfs to build in, or None for the disk. --tmpfs insists, --no-tmpfs refuses."""
    if plan.req.tmpfs is False:
        return None
    need = tree_bytes_needed(plan)
    found = tmpfs_dir(need)
    if found is None and plan.req.tmpfs:
        raise BuildError(f"--tmpfs: no tmpfs among {', '.join(map(str, TMPFS_DIRS))} has "
                         f"{need // GIB + 1} GiB free with as much RAM available")
    return found


def mock_baseurl(target: Target, override: str | None) -> str:
    url = override or os.environ.get("FSBUILD_MOCK_BASEURL") or target.section("rpm").get("mock_baseurl")
    if not url:
        raise TargetError(f"target {target.name}: mock needs a base URL "
                          "(--mock-baseurl, FSBUILD_MOCK_BASEURL or [rpm] mock_baseurl)")
    return str(url).rstrip("/")


def mock_config(target: Target, baseurl: str, jobs: int, tmpfs_mb: int = 0,
                farm: farms.Farm | None = None) -> str:
    """A mock chroot config for CentOS 6.10 (EOL: packages from the vault at baseurl)."""
    rpm = target.section("rpm")
    if not rpm.get("mock_chroot"):
        raise TargetError(f"target {target.name}: no [rpm] mock_chroot; mock builds are for el6 "
                          "(use --builder rpmbuild)")
    root = f"fsbuild-{target.name}-x86_64"
    repos = "\n".join(
        f"[{name}]\nname=CentOS-6.10 - {name}\nbaseurl={baseurl}/{sub}/x86_64/\nenabled=1\n"
        for name, sub in (("base", "os"), ("updates", "updates")))
    conf = ("[main]\nkeepcache=1\ndebuglevel=2\nreposdir=/dev/null\nlogfile=/var/log/yum.log\n"
            "retries=20\nobsoletes=1\ngpgcheck=0\nassumeyes=1\nsyslog_ident=mock\n"
            "syslog_device=\nmdpolicy=group:primary\n\n" + repos)
    lines = [
        "# generated by fsbuild: mock chroot for " + str(rpm["mock_chroot"]),
        f"config_opts['root'] = {root!r}",
        "config_opts['target_arch'] = 'x86_64'",
        "config_opts['legal_host_arches'] = ('x86_64',)",
        "config_opts['chroot_setup_cmd'] = 'install @buildsys-build'",
        "config_opts['dist'] = 'el6'",
        "config_opts['releasever'] = '6'",
        "config_opts['package_manager'] = 'yum'",
        # el6 is EOL: no bootstrap image exists; build the chroot with the host's yum/dnf.
        "config_opts['use_bootstrap'] = False",
        "config_opts['use_bootstrap_image'] = False",
        "config_opts['rpmbuild_networking'] = False",
        f"config_opts['macros']['%_smp_mflags'] = '-j{farm.jobs if farm else jobs}'",
        f"config_opts['yum.conf'] = {conf!r}",
        f"config_opts['dnf.conf'] = {conf!r}",
    ]
    if farm is not None:
        lines += mock_farm_lines(farm)
    if tmpfs_mb:
        # mock's tmpfs plugin: chroot (~2 GiB of el6 build deps) and build tree in RAM;
        # mock itself skips it when the host has less than required_ram_mb.
        lines += ["config_opts['plugin_conf']['tmpfs_enable'] = True",
                  f"config_opts['plugin_conf']['tmpfs_opts'] = {{'required_ram_mb': {tmpfs_mb + 2048}, "
                  f"'max_fs_size': '{tmpfs_mb + 2048}m', 'mode': '0755', 'keep_mounted': False}}"]
    return "\n".join(lines) + "\n"


def mock_farm_lines(farm: farms.Farm) -> list[str]:
    """The farm inside mock's chroot: the same launcher macro and environment as rpmbuild
    gets, the engine's el6 client package, the network (mock cuts it off by default) and,
    for icecream, the host iceccd's socket."""
    lines = [f"config_opts['macros']['%fsbuild_launcher'] = {farm.launcher!r}",
             "config_opts['rpmbuild_networking'] = True",
             "config_opts['use_host_resolv'] = True",
             f"config_opts['chroot_additional_packages'] = {farms.CHROOT_PACKAGES[farm.engine]!r}"]
    lines += [f"config_opts['environment'][{k!r}] = {v!r}" for k, v in sorted(farm.env.items())]
    if farm.engine == "icecc":
        sock = str(farms.iceccd_socket().parent)
        lines += ["config_opts['plugin_conf']['bind_mount_enable'] = True",
                  f"config_opts['plugin_conf']['bind_mount_opts']['dirs'].append(({sock!r}, {sock!r}))"]
    return lines


def mock_command(cfg: Path, srpm: Path, resultdir: Path) -> list[str]:
    return ["mock", "-r", str(cfg), "--rebuild", str(srpm), "--resultdir", str(resultdir)]


# log marker -> phase shown on the progress line; the word before ":" keys the timings.
_PHASES = [(b"Executing(%prep)", "prep: unpack + patches"), (b"Executing(%build)", "config: base + fragment"),
           (b"fsbuild-phase: make", "make: bzImage + modules"),
           (b"Executing(%install)", "install: modules + kernel-devel"),
           (b"Processing files:", "package: file lists"), (b"Wrote:", "write: RPM payloads"),
           (b"Executing(%clean)", "clean: remove build root"),
           (b"Start: chroot init", "chroot: mock init"), (b"Start: build phase", "mock: build")]
_OBJ = re.compile(rb"^\s+(CC|AS|LD)(\s|\s\[M\]\s)", re.M)


def run_logged(cmd: list[str], log: Path, env: dict[str, str], what: str) -> dict[str, float]:
    """Run a long build with output to `log` and a spinner showing phase, objects, elapsed;
    returns seconds per phase (as the log's markers show them, 0.25 s resolution).
    (proc.run cannot watch the log while the command runs, hence Popen here.)"""
    proc.which(cmd[0])
    log.parent.mkdir(parents=True, exist_ok=True)
    watch = _LogWatch(log, what)
    with open(log, "ab") as fh, progress.bar(what, total=None) as bar:
        fh.write(f"$ {shlex.join(cmd)}\n".encode())
        fh.flush()
        watch.offset = log.stat().st_size
        child = subprocess.Popen(_line_buffered(cmd), stdout=fh, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)
        try:
            while child.poll() is None:
                time.sleep(0.25)
                watch.poll(bar)
        except KeyboardInterrupt:
            _kill(child)
            raise RunInterruptedError(f"{what} interrupted; partial log in {log}") from None
    if child.returncode != 0:
        raise _failure(cmd, child.returncode, log)
    return watch.durations()


def _line_buffered(cmd: list[str]) -> list[str]:
    """rpmbuild's own messages (the phase markers) are block-buffered into a file; stdbuf
    makes them arrive when they happen, so phase times are right."""
    stdbuf = shutil.which("stdbuf")
    return [stdbuf, "-oL", "-eL", *cmd] if stdbuf else cmd


class _LogWatch:
    """Follows a growing build log: current phase, compiled objects, phase start times."""

    def __init__(self, log: Path, what: str) -> None:
        self.log, self.what = log, what
        self.offset, self.objects = 0, 0
        self.start = time.monotonic()
        self.marks: list[tuple[str, float]] = [("start", self.start)]

    @property
    def phase(self) -> str:
        return self.marks[-1][0]

    def poll(self, bar: progress.Bar) -> None:
        with open(self.log, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        # Keep a partial last line for the next round.
        cut = chunk.rfind(b"\n") + 1
        chunk, self.offset = chunk[:cut], self.offset + cut
        self.objects += len(_OBJ.findall(chunk))
        for marker, name in _PHASES:
            if marker in chunk and name != self.phase:
                self.marks.append((name, time.monotonic()))
                if not progress.enabled():
                    progress.info(f"{self.what}: {name} ({time.monotonic() - self.start:.0f} s)")
        bar.update(f"{self.what}: {self.phase}" + (f" · {self.objects} objects" if self.objects else ""))

    def durations(self) -> dict[str, float]:
        ends = [t for _, t in self.marks[1:]] + [time.monotonic()]
        out: dict[str, float] = {}
        for (name, begin), end in zip(self.marks, ends, strict=True):
            key = name.split(":")[0]
            out[key] = round(out.get(key, 0.0) + end - begin, 2)
        return out


def _kill(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def _failure(cmd: list[str], rc: int, log: Path) -> FsbuildError:
    """The most telling line of the log: a full filesystem, a config drop, a patch that does
    not apply, else the tail."""
    text = log.read_bytes()[-2_000_000:].decode(errors="replace").splitlines()
    if any("No space left on device" in line for line in text[-200:]):
        return BuildError(f"{cmd[0]} ran out of space for the build tree: free some, or if it "
                          f"was in a tmpfs rerun with --no-tmpfs (full log: {log})")
    ours = [line[len("fsbuild: "):] for line in text if line.startswith("fsbuild: ")]
    if ours:
        # the first names the option/patch, the last the verdict
        detail = ours[0] if len(ours) == 1 else f"{ours[0]}; {ours[-1]}"
        return BuildError(f"{cmd[0]} failed: {detail} (full log: {log})")
    if any("FAILED" in line and "Hunk" in line for line in text[-200:]):
        patch = next((line for line in reversed(text) if line.startswith("+ patch ")), "")
        name = Path(patch.split()[-1]).name if patch else "a series patch"
        return PatchApplyError(f"{name} does not apply at fuzz 0 in %prep (full log: {log})")
    return BuildError(f"`{' '.join(cmd[:2])}` failed (exit {rc}); last lines of {log}: "
                      f"{proc.tail(log)}")


# ------------------------------------------------------------------ orchestration

def profile_out(target: str, config: str = "mini") -> Path:
    """out/<target>, or out/<target>/debug for the debug profile (RPMs and smoke verdict)."""
    out = paths.out_dir(target)
    return out / DEBUG if config == DEBUG else out


def out_layout(target: str, config: str = "mini") -> dict[str, Path]:
    out = profile_out(target, config)
    return {"out": out, "rpms": out / "rpms", "srpm": out / "srpm", "log": out / "build.log",
            "manifest": out / MANIFEST, "topdir": out / "rpmbuild", "srcdir": out / "srpm-src",
            "mock": out / "mock"}


def cached_result(plan: Plan) -> Result | None:
    lay = out_layout(plan.req.target.name, plan.req.config)
    try:
        data = json.loads(lay["manifest"].read_text())
    except (OSError, ValueError):
        return None
    rpms = [Path(p) for p in data.get("rpms", [])]
    srpm = Path(data.get("srpm", ""))
    if data.get("inputs") != plan.inputs_hash or not rpms or not all(p.is_file() for p in [*rpms, srpm]):
        return None
    return Result(plan.req.target.name, data["kver"], rpms, srpm, lay["log"], data["builder"],
                  data["config"], plan.inputs_hash, True, 0.0,
                  firmware_dropped=[str(n) for n in data.get("firmware_dropped", [])])


def build(req: Request, upstream: Upstream | None = None) -> Result:
    """Build under the out dir's lock: a second `fsbuild rpm` of the same target and
    profile waits, then finds the first one's result (no two rpmbuilds writing one out dir)."""
    lay = out_layout(req.target.name, req.config)
    with lock.hold(lay["out"] / ".lock", f"{lay['out']}", wait=True):
        return _build(req, upstream)


def _build(req: Request, upstream: Upstream | None = None) -> Result:
    start = time.monotonic()
    if req.builder == "mock":
        proc.which("mock")  # fail fast (exit 9) before resolving sources
    plan = make_plan(req, upstream)
    if not req.force and (hit := cached_result(plan)) is not None:
        hit.duration_s = time.monotonic() - start
        return hit
    proc.which("rpmbuild")
    # After the cache check: an unchanged build needs no farm. Before anything long: an
    # unreachable host or a different compiler fails now, not an hour into make.
    plan.farm = farm = farms.resolve(req.distcc, req.icecc, fallback=req.farm_fallback)
    phases = {"inputs": round(time.monotonic() - start, 2)}  # resolve upstream, hash inputs
    lay = out_layout(req.target.name, req.config)
    lay["out"].mkdir(parents=True, exist_ok=True)
    lay["manifest"].unlink(missing_ok=True)  # never a stale no-op after a failed build
    lay["log"].write_text(f"fsbuild rpm {req.target.name} inputs={plan.inputs_hash}\n")
    progress.info(f"rpm: {req.target.name} {plan.kver} (config {plan.config.label}, "
                  f"{len(plan.series)} patches, builder {req.builder}); log: {lay['log']}")
    if farm is not None:
        progress.info(f"rpm: compiling through {farm.where}: make -j{farm.jobs}")
    begin = time.monotonic()
    srpm = make_srpm(plan, lay["srcdir"], lay["srpm"], lay["log"])
    shutil.rmtree(lay["srcdir"], ignore_errors=True)
    phases["srpm"] = round(time.monotonic() - begin, 2)
    progress.info(f"rpm: SRPM {srpm}")
    rpms = _run_builder(plan, srpm, lay, phases)
    result = Result(req.target.name, plan.kver, rpms, srpm, lay["log"], req.builder,
                    plan.config.label, plan.inputs_hash, False, time.monotonic() - start, phases,
                    dropped_firmware(lay["log"]))
    atomic_write(lay["manifest"], (json.dumps(result.as_dict(), indent=2) + "\n").encode())
    return result


def dropped_firmware(log: Path) -> list[str]:
    """The blobs firmware-check.sh left out (--allow-missing-firmware), from the build log."""
    with open(log, "rb") as fh:
        return sorted({line[len(DROPPED_FIRMWARE):].decode(errors="replace").strip()
                       for line in fh if line.startswith(DROPPED_FIRMWARE.encode())})


def _run_builder(plan: Plan, srpm: Path, lay: dict[str, Path], phases: dict[str, float]) -> list[Path]:
    if plan.req.builder == "mock":
        return _run_mock(plan, srpm, lay, phases)
    return _run_rpmbuild(plan, srpm, lay, phases)


def _run_mock(plan: Plan, srpm: Path, lay: dict[str, Path], phases: dict[str, float]) -> list[Path]:
    cfg = lay["out"] / "mock.cfg"
    tmpfs_mb = 0 if plan.req.tmpfs is False else tree_bytes_needed(plan) // (1 << 20)
    cfg.write_text(mock_config(plan.req.target, plan.extra["mock_baseurl"], plan.req.jobs, tmpfs_mb,
                               plan.farm))
    shutil.rmtree(lay["mock"], ignore_errors=True)
    phases.update(run_logged(mock_command(cfg, srpm, lay["mock"]), lay["log"],
                             build_env(plan.epoch), "mock"))
    return _collect(sorted(p for p in lay["mock"].glob("*.rpm") if not p.name.endswith(".src.rpm")),
                    lay["rpms"])


def _run_rpmbuild(plan: Plan, srpm: Path, lay: dict[str, Path], phases: dict[str, float]) -> list[Path]:
    topdir = lay["topdir"]
    shutil.rmtree(topdir, ignore_errors=True)
    ram = choose_scratch(plan)
    # The build tree (~1.5 GB for 6.1) lives in RAM when there is room: unpacking, compiling
    # and removing it then never wait for the disk. Always removed: tmpfs pages are RAM.
    scratch = _ram_scratch(ram, plan.req.target.name) if ram else None
    try:
        if scratch:
            progress.info(f"rpm: build tree in {scratch} (tmpfs; --no-tmpfs for the disk)")
        cmd = rpmbuild_command(srpm, topdir, plan.req.jobs, plan.epoch, scratch, plan.farm)
        phases.update(run_logged(cmd, lay["log"], build_env(plan.epoch, plan.farm), "rpmbuild"))
        start = time.monotonic()
        rpms = _collect(sorted(topdir.glob("RPMS/*/*.rpm")), lay["rpms"])
    finally:
        shutil.rmtree(topdir, ignore_errors=True)  # the build tree; the SRPM rebuilds it
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    phases["collect"] = round(time.monotonic() - start, 2)
    return rpms


def _collect(built: list[Path], rpms_dir: Path) -> list[Path]:
    if not built:
        raise BuildError("the builder finished without producing RPMs")
    if rpms_dir.exists():
        shutil.rmtree(rpms_dir)
    rpms_dir.mkdir(parents=True)
    out = []
    for p in built:
        dst = rpms_dir / p.name
        shutil.move(str(p), dst)
        out.append(dst)
    return sorted(out)
