from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fsbuild import paths, progress
from fsbuild import target as targets
from fsbuild.commands.common import complete_targets
from fsbuild.errors import MissingFileError, VerifyError

if TYPE_CHECKING:  # artifacts (rpmfile) is imported lazily by the command
    from fsbuild.artifacts import Report


@click.command("verify")
@click.argument("rpms", nargs=-1, type=click.Path(path_type=Path))
@click.option("--target", "-t", "target_name", shell_complete=complete_targets,
              metavar="T",
              help="Verify every RPM in out/<T>/rpms/ (also gives the target's [rpm] facts).")
@click.option("--no-rpmlint", is_flag=True, help="Skip rpmlint (findings left after specs/rpmlint.toml fail).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
def cmd(rpms: tuple[Path, ...], target_name: str | None, no_rpmlint: bool, as_json: bool) -> int:
    """Check kernel/kernel-devel/kernel-firmware RPMs: NEVRA, image version, fastsocket.ko,
    kernel-devel completeness; rpmlint findings left after specs/rpmlint.toml fail."""
    from fsbuild import artifacts  # lazy: rpmfile import

    progress.set_quiet(as_json)
    tgt = targets.load(target_name) if target_name or not rpms else None
    files = list(rpms)
    if not files:
        assert tgt is not None
        rpm_dir = paths.out_dir(tgt.name) / "rpms"
        files = sorted(rpm_dir.glob("*.rpm"))
        if not files:
            raise MissingFileError(f"no RPMs in {rpm_dir}; run `fsbuild rpm --target {tgt.name}` first")
    rpm_facts = tgt.section("rpm") if tgt else {}
    report = artifacts.verify(files, has_fastsocket=bool(rpm_facts.get("has_fastsocket", True)),
                              firmware_noarch=bool(rpm_facts.get("firmware_noarch", True)),
                              lint=not no_rpmlint, require_set=not rpms or tgt is not None)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print(report)
    if not report.ok:
        if as_json:
            return VerifyError.exit_code
        raise VerifyError(f"{len(report.failures())} check(s) failed: {'; '.join(report.failures()[:3])}")
    return 0


def _print(report: Report) -> None:
    for pkg in report.packages:
        click.echo(f"{'ok  ' if pkg.ok else 'FAIL'} {pkg.nevra}  ({len(pkg.files)} files)")
        for c in pkg.checks:
            click.echo(f"     {'pass' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    from fsbuild.artifacts import summarize_lint

    findings = report.rpmlint
    click.echo(f"rpmlint ({report.rpmlint_status}, filters: specs/rpmlint.toml): {len(findings)} finding(s)")
    for check, count, example in summarize_lint(findings):
        click.echo(f"     {count:5d} x {check}   e.g. {example}")
