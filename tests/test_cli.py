from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import proc_children, proc_state

from fsbuild.cli import cli
from fsbuild.errors import RunInterruptedError

ROOT = Path(__file__).resolve().parent.parent


def run_fsbuild(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsbuild", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_help_lists_commands() -> None:
    out = CliRunner().invoke(cli, ["--help"])
    assert out.exit_code == 0
    assert "targets" in out.output and "doctor" in out.output


def test_targets_json_has_both_targets_and_el6_default() -> None:
    proc = run_fsbuild("targets", "--json")
    assert proc.returncode == 0, proc.stderr
    data = {t["name"]: t for t in json.loads(proc.stdout)}
    assert data["el6"]["default"] is True
    assert data["el6"]["version"] == "2.6.32-431.17.1.el6"
    assert "linux-6.1" in data


# ---------------------------------------------------------------- hostile inputs


def hostile_inputs(d: Path) -> list[tuple[str, list[str], dict[str, str], int]]:
    """(case, argv, extra env, expected exit code): every one must fail with one line."""
    from fsbuild import errors as E

    tree = d / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src/a.c").write_bytes(b"one\ntwo\n")
    (d / "bad.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"not gzip data" * 8)
    (d / "fake.src.rpm").write_bytes(b"\xed\xab\xee\xdb\x03\x00\x00\x01" + bytes(300))
    rpms = d / "rpms"
    rpms.mkdir()
    (rpms / "kernel-9.9-1.x86_64.rpm").write_bytes(b"\xed\xab\xee\xdb" + bytes(200))
    series = {
        "garbage": ("1.patch\n", b"--- a/src/a.c\n+++ b/src/a.c\n@@ -1,2 +1,2 @@\n-one\n"),
        "badopt": ("1.patch -x\n", b""),
        "escape": ("../../etc/passwd\n", b""),
        "nofile": ("missing.patch\n", b""),
        "fails": ("1.patch\n", b"--- a/src/a.c\n+++ b/src/a.c\n@@ -1 +1 @@\n-zzz\n+y\n"),
        "binary": ("1.patch\n", b"diff --git a/x b/x\nGIT binary patch\nliteral 1\n"),
    }
    for name, (text, body) in series.items():
        (d / name).mkdir()
        (d / name / "series").write_text(text)
        (d / name / "1.patch").write_bytes(body)
    (d / "notutf8").mkdir()
    (d / "notutf8" / "series").write_bytes(b"\xff\xfe.patch\n")
    broken = d / "broken-tree"
    (broken / ".fsbuild-journal").mkdir(parents=True)
    (broken / ".fsbuild-journal" / "manifest.json").write_text("{trunc")
    empty_path = d / "nobin"
    empty_path.mkdir()
    s = lambda name: ["apply", "--series", str(d / name / "series"), str(tree)]  # noqa: E731
    return [
        ("corrupt gzip", ["upstream", "import", str(d / "bad.tar.gz")], {}, E.UpstreamError.exit_code),
        ("fake rpm", ["upstream", "import", str(d / "fake.src.rpm")], {}, E.UpstreamError.exit_code),
        ("fake kernel rpm", ["smoke", "--target", "linux-6.1", "--rpms", str(rpms)], {},
         E.MissingFileError.exit_code),
        ("garbage patch", s("garbage"), {}, E.PatchFormatError.exit_code),
        ("bad series option", s("badopt"), {}, E.PatchFormatError.exit_code),
        ("series escapes", s("escape"), {}, E.UnsafePathError.exit_code),
        ("missing patch", s("nofile"), {}, E.MissingFileError.exit_code),
        ("undecodable patch name", s("notutf8"), {}, E.MissingFileError.exit_code),
        ("hunk fails", s("fails"), {}, E.PatchApplyError.exit_code),
        ("binary diff", s("binary"), {}, E.PatchFormatError.exit_code),
        ("missing series", ["apply", "--series", str(d / "none" / "series"), str(tree)], {},
         E.MissingFileError.exit_code),
        ("missing tree", ["apply", "--series", str(d / "fails" / "series"), str(d / "none")], {},
         E.MissingFileError.exit_code),
        ("corrupt journal", ["apply", "--recover", str(broken)], {}, E.RecoveryError.exit_code),
        ("unknown target", ["upstream", "import", str(d / "bad.tar.gz")],
         {"FSBUILD_TARGET": "no-such-target"}, E.TargetError.exit_code),
        ("no tools", ["doctor"], {"PATH": str(empty_path)}, E.ToolMissingError.exit_code),
        ("bad flag", ["apply", "--bogus", str(tree)], {}, 2),
        ("bad fuzz", ["apply", "--fuzz", "99", "--series", str(d / "fails" / "series"), str(tree)],
         {}, 2),
        ("no series", ["apply", str(tree)], {}, 2),
        ("unknown command", ["frobnicate"], {}, 2),
    ]


def test_hostile_inputs_fail_with_one_line_and_class_code(tmp_path: Path) -> None:
    failures = []
    for case, argv, env, code in hostile_inputs(tmp_path):
        proc = subprocess.run([sys.executable, "-m", "fsbuild", *argv], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
        lines = proc.stderr.splitlines()
        ok = (proc.returncode == code and "Traceback" not in proc.stderr and len(lines) == 1
              and lines[0].startswith("fsbuild: error: "))
        if not ok:
            failures.append(f"{case}: rc {proc.returncode} (want {code}): {proc.stderr!r}")
    assert not failures, "\n".join(failures)


def bad_inputs(d: Path) -> dict[str, str]:
    """Paths a user may hand any command by mistake, by kind."""
    (d / "adir").mkdir()
    (d / "empty").write_bytes(b"")
    (d / "garbage").write_bytes(bytes(range(256)) * 4)
    (d / "we\nird").write_bytes(b"\xff\x00--- a/x\n+++ b/x\n@@ -1 +1 @@\n")
    (d / os.fsdecode(b"\xff\xfe")).write_bytes(b"\x1f\x8b")
    return {"missing": str(d / "none"), "dir": str(d / "adir"), "empty": str(d / "empty"),
            "garbage": str(d / "garbage"), "newline": str(d / "we\nird"),
            "non-utf8": str(d / os.fsdecode(b"\xff\xfe")), "dash-x": "-x"}


def command_templates(d: Path) -> dict[str, list[str]]:
    """One argv per input-taking command; "X" is where the bad input goes. None of them can
    reach a kernel build or touch patches/: state and out are the test's own."""
    tree = d / "tree"
    tree.mkdir()
    return {
        "apply series": ["apply", "--series", "X", str(tree)],
        "apply tree": ["apply", "--series", str(ROOT / "patches/linux-6.1/series"), "X"],
        "apply recover": ["apply", "--recover", "X"],
        "upstream import": ["upstream", "import", "-t", "linux-6.1", "X"],
        "rebase plain": ["rebase", "-t", "linux-6.1", "--series", "X", "--from", "X", "--onto", "X",
                         "--out", str(d / "out"), "--upstream-version", "1.0-1"],
        "rpm source": ["rpm", "-t", "linux-6.1", "--source", "X"],
        "verify": ["verify", "X"],
        "smoke rpms": ["smoke", "-t", "linux-6.1", "--rpms", "X"],
        "series target": ["series", "list", "-t", "X"],
    }


def _scan_one(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fsbuild", *argv], capture_output=True, text=True,
                          errors="replace", timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_no_command_ever_shows_a_traceback(tmp_path: Path) -> None:
    """Every input-taking command x every kind of bad input, through the real CLI: the run
    fails (or succeeds) with one error line and a class exit code, never a traceback or
    fsbuild's internal-error code 1."""
    from concurrent.futures import ThreadPoolExecutor

    from fsbuild import errors as E

    codes = {c.exit_code for c in vars(E).values() if isinstance(c, type) and issubclass(c, E.FsbuildError)}
    inputs = bad_inputs(tmp_path)
    runs = {f"{cmd} <- {kind}": [bad if a == "X" else a for a in argv]
            for cmd, argv in command_templates(tmp_path).items() for kind, bad in inputs.items()}
    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(runs, pool.map(_scan_one, runs.values()), strict=True))
    failures = []
    for case, proc in done.items():
        lines = proc.stderr.splitlines()
        errors = [line for line in lines if line.startswith("fsbuild: error: ")]
        if proc.returncode == 0:
            ok = "Traceback" not in proc.stderr and not errors
        else:
            ok = (proc.returncode in codes | {2} and "Traceback" not in proc.stderr
                  and len(errors) == 1 and lines[-1] == errors[0])
        if not ok:
            failures.append(f"{case}: rc {proc.returncode}: {proc.stderr[-400:]!r}")
    assert not failures, f"{len(failures)} of {len(runs)} runs:\n" + "\n".join(failures)


def main_with_callback(callback: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`fsbuild [ARGS] targets` in a fresh interpreter, the command's callback replaced by
    the function `cb` that `callback` (Python source) defines."""
    code = ("import sys, fsbuild.commands.targets as t\n" + callback +
            "t.cmd.callback = cb\n"
            "from fsbuild.cli import main\n"
            "sys.argv = ['fsbuild', *sys.argv[1:], 'targets']\n"
            "main()\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_unexpected_exception_is_one_line_and_debug_shows_traceback(tmp_path: Path) -> None:
    """A bug (any non-fsbuild exception) still reaches the user as one line, exit 1, and
    --debug adds the traceback for a bug report without changing the exit code."""
    boom = "def cb(*a, **k): raise ValueError('bad\\nvalue')\n"
    plain = main_with_callback(boom)
    assert plain.returncode == 1
    assert plain.stderr.splitlines() == [
        "fsbuild: error: internal error ValueError: bad; value (rerun with `fsbuild --debug "
        "...` for the traceback and report it)"]
    debug = main_with_callback(boom, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert debug.stderr.splitlines()[-1] == plain.stderr.splitlines()[0]


def test_a_library_error_in_del_after_ctrl_c_prints_no_traceback() -> None:
    """Ctrl-C inside a library constructor leaves a half-built object whose __del__ fails
    later (seen: GitConfigParser); Python would print that as "Exception ignored in ...":
    the user sees the one interrupted line, --debug still shows it."""
    half = ("class Half:\n"
            "    def __init__(self): raise KeyboardInterrupt\n"
            "    def __del__(self): return self._read_only\n"
            "def cb(*a, **k):\n"
            "    Half()\n")
    plain = main_with_callback(half)
    assert (plain.returncode, plain.stderr.strip()) == (RunInterruptedError.exit_code, "fsbuild: interrupted")
    debug = main_with_callback(half, "--debug")
    assert "Exception ignored in" in debug.stderr and "_read_only" in debug.stderr


def test_doctor_reports_then_fails_with_tool_missing(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fsbuild", "doctor", "--json"],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": str(tmp_path)})
    from fsbuild.errors import ToolMissingError
    assert proc.returncode == ToolMissingError.exit_code
    report = json.loads(proc.stdout)
    assert report["ok"] is False and report["install"].startswith("apt-get install")
    assert proc.stderr.startswith("fsbuild: error: missing ") and proc.stderr.count("\n") == 1


def test_distinct_exit_codes() -> None:
    from fsbuild import errors
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.FsbuildError) and c is not errors.FsbuildError]
    codes = [c.exit_code for c in classes]
    assert len(codes) == len(set(codes)), "two failure classes share an exit code"
    assert 1 not in codes and 2 not in codes  # 1: bugs, 2: click usage errors


NAPPER = """
import sys, click
from fsbuild import cli, proc
@click.command()
def nap() -> None:
    print("napping", flush=True)
    proc.run(["sleep", "60"])
cli.LazyGroup.get_command = lambda self, ctx, name: nap if name == "nap" else None
sys.argv = ["fsbuild", "nap"]
cli.main()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_ends_the_run_and_its_children(sig: signal.Signals) -> None:
    """SIGTERM/SIGHUP act as Ctrl-C: one line, exit 130, and the command's child is gone
    (before, Python died at once and left e.g. rpmbuild running orphaned)."""
    import time

    # default dispositions, as a terminal gives them: under `nohup` SIGHUP arrives ignored, and
    # fsbuild rightly leaves an ignored signal ignored
    p = subprocess.Popen([sys.executable, "-c", NAPPER], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)},
                         preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    assert p.stdout is not None and p.stdout.readline().strip() == "napping"
    deadline = time.monotonic() + 10
    # signal once the child runs `sleep` (exec'd: proc.run is waiting on it)
    while not _sleeping_child(p.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    kids = proc_children(p.pid)
    assert kids, "the command's child never started"
    p.send_signal(sig)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 130, err
    assert err.strip() == "fsbuild: interrupted"
    alive = [k for k in kids if proc_state(k) not in ("Z", "gone")]
    assert not alive, f"the child outlived fsbuild: {[(k, proc_state(k)) for k in alive]}"


def _sleeping_child(pid: int) -> bool:
    for k in proc_children(pid):
        try:
            if Path(f"/proc/{k}/comm").read_text().strip() == "sleep":
                return True
        except OSError:
            pass
    return False


def test_bare_fsbuild_prints_help_and_succeeds() -> None:
    proc = run_fsbuild()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage:") and "Commands:" in proc.stdout and proc.stderr == ""


def test_help_lists_every_exit_code_and_environment_variable() -> None:
    """The epilog is built from errors.py and names every FSBUILD_* the package reads."""
    import re

    from fsbuild import errors

    out = run_fsbuild("--help").stdout
    codes = {c.exit_code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.FsbuildError)}
    listed = {int(m) for m in re.findall(r"^\s+(\d+) ", out.split("Exit codes:")[1], re.M)}
    assert codes | {0, 2} <= listed
    used = set(re.findall(r"(?<!_)FSBUILD_[A-Z0-9_]+", "".join(p.read_text() for p in (ROOT / "fsbuild").rglob("*.py"))))
    assert used <= set(re.findall(r"FSBUILD_[A-Z0-9_]+", out.split("Environment:")[1]))


def test_target_completion_lists_target_toml_names() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "_FSBUILD_COMPLETE": "bash_complete",
           "COMP_WORDS": "fsbuild rpm --target ", "COMP_CWORD": "3"}
    proc = subprocess.run([sys.executable, "-c", "from fsbuild.cli import main; main()"], env=env,
                          capture_output=True, text=True)
    names = sorted(p.parent.name for p in (ROOT / "patches").glob("*/target.toml"))
    assert names and proc.stdout.split() == [f"plain,{n}" for n in names], proc.stderr


def test_verbose_logs_commands_and_quiet_survives_json(tmp_path: Path) -> None:
    """-v shows each external command; -q is not undone by a command's own choice."""
    from fsbuild.commands.common import FUZZ

    assert (FUZZ.min, FUZZ.max) == (0, 10)
    repo = tmp_path / "r"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    proc = run_fsbuild("-v", "upstream", "import", "-t", "linux-6.1", f"git:{repo}@HEAD")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert any(line.startswith("fsbuild: $ git ") for line in proc.stderr.splitlines()), proc.stderr
