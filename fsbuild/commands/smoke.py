from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fsbuild import progress
from fsbuild.commands.common import complete_targets
from fsbuild.errors import SmokeBootError, SmokeCheckError, SmokePanicError, SmokeTimeoutError

if TYPE_CHECKING:
    from fsbuild import smoke


@click.command("smoke")
@click.option("--target", "-t", "target_name", shell_complete=complete_targets,
              default=None, help="Target (default: el6 or $FSBUILD_TARGET).")
@click.option("--rpms", "rpm_dir", type=click.Path(path_type=Path), default=None,
              help="Directory with the built kernel RPM (default: out/<target>/rpms).")
@click.option("--timeout", type=float, default=None,
              help="Hard limit for the boot, seconds (default 120; 1500 with --suite stress).")
@click.option("--config", "config", type=click.Choice(["mini", "debug"]), default="mini",
              show_default=True, help="Which build to boot: debug reads and writes out/<target>/debug/.")
@click.option("--suite", type=click.Choice(["smoke", "stress"]), default="smoke", show_default=True,
              help="stress: the smoke checks, then the guest stress scenarios (stress_* checks); "
              "on the mini RPMs the verdict goes to out/<target>/stress/.")
@click.option("--json", "as_json", is_flag=True, help="Print smoke.json on stdout.")
def cmd(target_name: str | None, rpm_dir: Path | None, timeout: float | None, config: str,
        suite: str, as_json: bool) -> int:
    """Boot the built kernel RPM in QEMU (igb + multiqueue virtio-net) and check Fastsocket."""
    from fsbuild import smoke, stress, target

    progress.set_quiet(as_json)
    tgt = target.load(target_name)
    opts = smoke.BootOptions(suite=suite, config=config)
    if timeout is not None:
        opts.timeout = timeout
    elif suite == "stress":
        opts.timeout = stress.DEFAULT_TIMEOUT_S
    try:
        verdict = smoke.run(tgt.name, rpm_dir, opts)
    except (SmokeBootError, SmokePanicError, SmokeTimeoutError, SmokeCheckError):
        _echo_verdict(tgt.name, config, suite, as_json)  # the checks that failed, before the one-line error
        raise
    if as_json:
        click.echo(json.dumps(verdict.as_json(), indent=2))
    else:
        _print(verdict)
    return 0


def _echo_verdict(target_name: str, config: str, suite: str, as_json: bool) -> None:
    from fsbuild import build, stress

    path = stress.verdict_dir(build.profile_out(target_name, config), suite, config) / "smoke.json"
    if not path.is_file():
        return
    if as_json:
        click.echo(path.read_text().rstrip())
    else:
        data = json.loads(path.read_text())
        _table(data["checks"], data["verdict"], data["duration_s"])


def _print(verdict: smoke.Verdict) -> None:
    checks = [{"name": c.name, "status": c.status, "detail": c.detail} for c in verdict.checks]
    _table(checks, verdict.verdict, verdict.duration_s)


def _table(checks: list[dict[str, str]], verdict: str, duration: float) -> None:
    for c in checks:
        click.echo(f"{c['status']:4} {c['name']:22} {c['detail']}")
    click.echo(f"\nverdict: {verdict} in {duration:.1f}s")
