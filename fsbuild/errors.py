"""One exception type per failure class; the CLI catches FsbuildError once and exits
with the class's code, so scripts can tell failures apart."""

from __future__ import annotations


class FsbuildError(Exception):
    """Base class. `exit_code` is distinct per failure class (1 is reserved for bugs)."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MissingFileError(FsbuildError):
    """An input file or directory (series, patch, source, RPM) does not exist."""

    exit_code = 3


class UnsafePathError(FsbuildError):
    """A path escapes its tree: `../`, absolute, symlink escape, tar slip."""

    exit_code = 4


class PatchFormatError(FsbuildError):
    """A patch or series file is malformed (truncated hunk, bad header, binary diff)."""

    exit_code = 5


class PatchApplyError(FsbuildError):
    """A well-formed patch does not apply to the tree."""

    exit_code = 6


class RebaseConflictError(FsbuildError):
    """A rebase stopped with conflicts left to resolve."""

    exit_code = 7


class UpstreamError(FsbuildError):
    """An upstream source cannot be imported (unknown format, no kernel tarball inside)."""

    exit_code = 8


class ToolMissingError(FsbuildError):
    """A host tool the command needs is not installed (mock, rpmbuild, qemu...)."""

    exit_code = 9


class BuildError(FsbuildError):
    """rpmbuild / mock / make failed."""

    exit_code = 10


class VerifyError(FsbuildError):
    """Built RPMs fail verification."""

    exit_code = 11


class WorkspaceError(FsbuildError):
    """The workspace is in a state that does not allow the command (no rebase in progress...)."""

    exit_code = 12


class TargetError(FsbuildError):
    """Unknown target or malformed target.toml."""

    exit_code = 13


class LockHeldError(FsbuildError):
    """Another fsbuild holds the lock of this tree or workspace."""

    exit_code = 14


class ArchiveLimitError(FsbuildError):
    """An archive member, or the archive in total, is over the size ceiling."""

    exit_code = 15


class UpstreamIdentityError(FsbuildError):
    """An upstream source does not say which kernel version-release it is."""

    exit_code = 16


class RecoveryError(FsbuildError):
    """An interrupted run left a journal that must be (or could not be) recovered."""

    exit_code = 17


class SmokeBootError(FsbuildError):
    """The guest did not boot to init."""

    exit_code = 20


class SmokePanicError(FsbuildError):
    """The guest kernel panicked."""

    exit_code = 21


class SmokeTimeoutError(FsbuildError):
    """The guest hung past the hard timeout."""

    exit_code = 22


class SmokeCheckError(FsbuildError):
    """The guest booted but one or more checks failed."""

    exit_code = 23


class RunInterruptedError(FsbuildError):
    """The run was interrupted (Ctrl-C); trees were restored."""

    exit_code = 130
