from __future__ import annotations

import json

import click

from fsbuild import progress
from fsbuild import target as targets
from fsbuild.commands.common import complete_targets


@click.command("rpm")
@click.option("--target", "-t", "target_name", shell_complete=complete_targets,
              metavar="T", help="Target (default el6 / $FSBUILD_TARGET).")
@click.option("--source", metavar="SRC", help="Upstream SRPM, tarball, directory or PATH@REF.")
@click.option("--config", "config", default="mini", show_default=True, metavar="mini|debug|full|FILE",
              help="mini: CI/smoke profile; debug: mini + KASAN/lockdep/... (out/<target>/debug/); "
                   "full: the target's base config; FILE: your config.")
@click.option("--builder", type=click.Choice(["rpmbuild", "mock"]), default="rpmbuild",
              show_default=True, help="rpmbuild: host toolchain; mock: el6 chroot.")
@click.option("--release-suffix", metavar="S", help="Appended to the upstream release "
              "(default: target [rpm] release_suffix, .fastsocket).")
@click.option("--jobs", "-j", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--mock-baseurl", metavar="URL", help="CentOS 6.10 vault/mirror for --builder mock.")
@click.option("--tmpfs/--no-tmpfs", default=None,
              help="Build tree in a tmpfs (/dev/shm). Default: when RAM has room for it.")
@click.option("--distcc", "distcc", metavar="HOSTS",
              help="Compile through distcc on HOSTS (DISTCC_HOSTS syntax: HOST[:PORT][/LIMIT] ...); "
                   "-j becomes the farm's slots.")
@click.option("--icecc", is_flag=True, help="Compile through icecream (local iceccd; scheduler "
              "from $ICECC_SCHEDULER or found by broadcast); -j becomes the farm's slots.")
@click.option("--farm-fallback", is_flag=True, help="Build locally when the farm fails its checks "
              "(unreachable host, different compiler) instead of stopping.")
@click.option("--allow-missing-firmware", is_flag=True, help="Leave out firmware blobs the config "
              "builds but the source lacks (a tarball other than the SRPM's), naming them, instead "
              "of stopping; their drivers then load them from /lib/firmware.")
@click.option("--force", is_flag=True, help="Rebuild even when the inputs are unchanged.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
def cmd(target_name: str | None, source: str | None, config: str, builder: str,
        release_suffix: str | None, jobs: int, mock_baseurl: str | None, tmpfs: bool | None,
        distcc: str | None, icecc: bool, farm_fallback: bool, allow_missing_firmware: bool, force: bool,
        as_json: bool) -> int:
    """Build kernel, kernel-devel and kernel-firmware RPMs (and the SRPM) into out/<target>/."""
    from fsbuild import build  # lazy: keeps `fsbuild --help` fast

    progress.set_quiet(as_json)
    tgt = targets.load(target_name)
    result = build.build(build.Request(tgt, source=source, config=config, builder=builder,
                                       release_suffix=release_suffix, jobs=jobs, force=force,
                                       mock_baseurl=mock_baseurl, tmpfs=tmpfs, distcc=distcc,
                                       icecc=icecc, farm_fallback=farm_fallback,
                                       allow_missing_firmware=allow_missing_firmware))
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return 0
    state = "unchanged inputs, nothing to do" if result.cached else f"built in {result.duration_s:.0f} s"
    click.echo(f"{tgt.name} {result.kver}: {state}")
    click.echo(f"  SRPM: {result.srpm}")
    for p in result.rpms:
        click.echo(f"  RPM:  {p}")
    click.echo(f"  log:  {result.log}")
    if result.firmware_dropped:
        click.echo(f"  firmware left out (not in the source): {' '.join(result.firmware_dropped)}")
    return 0
