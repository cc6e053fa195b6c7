"""Patches in memory: apply one to any Reader (a git tree, a work tree, an overlay) with
GNU patch semantics, nothing written; re-render a refreshed patch keeping its description,
per-file headers and trailer byte for byte; the commit message a patch gets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fsbuild import patch as P
from fsbuild import series as S
from fsbuild.errors import PatchFormatError
from fsbuild.gitio import Content, Reader

TRAILER = "Fsbuild-Patch"


@dataclass
class Applied:
    """The outcome of applying one patch in memory."""

    changes: dict[str, Content]
    offsets: list[tuple[str, int, int, int]]   # (file, hunk, offset, fuzz) when not exact

    @property
    def exact(self) -> bool:
        return not self.offsets


class _ReaderTree(S.Tree):
    """The series engine's overlay (GNU file-name choice, create/delete rules) over a
    Reader instead of a directory: files come from a git tree or another overlay."""

    def __init__(self, read: Reader) -> None:
        super().__init__(Path("/nonexistent"))
        self._read = read

    def _load(self, rel: str) -> S.FileState | None:
        if rel not in self.orig:
            content = self._read(rel)
            self.orig[rel] = None if content is None else S.FileState(
                content[0], content[1] & 0o777, link=content[1] & 0o170000 == S.LINK_TYPE)
        return self.orig[rel]

    def _check_dirs(self, rel: str) -> bool:
        """GNU picks the file name needing the fewest new directories: ask the reader."""
        isdir = getattr(self._read, "isdir", None)
        if isdir is None:
            return True
        parts = rel.split("/")[:-1]
        for k in range(1, len(parts) + 1):
            d = "/".join(parts[:k])
            if d not in self._dirs:
                self._dirs[d] = bool(isdir(d))
            if not self._dirs[d]:
                return False
        return True


def apply_patch(data: bytes, name: str, strip: int, read: Reader, fuzz: int = 0,
                reverse: bool = False) -> Applied:
    """Apply (or reverse-apply) a patch to the files given by `read` with GNU patch
    semantics; nothing is written. Raises PatchApplyError naming patch, file and hunk."""
    parsed = P.parse_patch(data, name)
    for fp in parsed.files:
        if fp.binary:
            raise PatchFormatError(f"{name}: binary diff for {fp.new_name or fp.old_name} is not supported")
    tree = _ReaderTree(read)
    report = S.apply_patch(tree, parsed, strip=strip, fuzz=fuzz, reverse=reverse)
    changes: dict[str, Content] = {
        path: None if st is None else (st.data, S.LINK_TYPE if st.link else
                                       0o100755 if st.mode & 0o100 else 0o100644)
        for path, st in tree.changes().items()}
    offsets = [(r.file, r.hunk, r.offset, r.fuzz) for r in report.hunks if r.offset or r.fuzz]
    return Applied(changes, offsets)


def description(data: bytes, name: str = "<patch>") -> bytes:
    return P.parse_patch(data, name).description


def rerender(original: bytes, new_diff: bytes, name: str) -> bytes:
    """The patch with the original description, per-file headers and trailer kept byte for
    byte, and the hunks taken from `new_diff` (a git diff of the refreshed change)."""
    old = P.parse_patch(original, name)
    new = P.parse_patch(new_diff, name) if new_diff.strip() else P.Patch(name, b"", [])
    by_path = {_key(fp): fp for fp in old.files}
    files: list[P.FilePatch] = []
    leading: list[bytes] = []
    for fp in new.files:
        orig = by_path.get(_key(fp))
        if orig is not None and not (fp.binary or orig.binary):
            fp = P.FilePatch(orig.old_name, orig.new_name, orig.lineno, header=orig.header,
                             hunks=[_like(h, orig.hunks) for h in fp.hunks], git=orig.git)
        files.append(fp)
        idx = old.files.index(orig) if orig is not None else -1
        leading.append(old.leading[idx] if 0 < idx < len(old.leading) else b"")
    out = P.Patch(name, old.description, files, leading, old.trailer)
    return P.format_patch(out)


def _like(h: P.Hunk, olds: Sequence[P.Hunk]) -> P.Hunk:
    """Give a regenerated hunk the `@@` section text the original tool wrote (GNU diff
    without -p writes none; git adds a function name), so only line numbers churn."""
    same = next((o for o in olds if o.lines == h.lines), None)
    if same is not None:
        section = same.section
    elif all(not o.section.strip() for o in olds):
        section = b""
    else:
        return h
    if section != h.section:
        h.section, h.raw = section, None
    return h


def _key(fp: P.FilePatch) -> str:
    name = fp.new_name if fp.new_absent != 2 and fp.new_name else fp.old_name
    return (P.strip_path(name or "", 1) or name or "")


def commit_message(patch_data: bytes, name: str) -> str:
    desc = description(patch_data, name).decode(errors="replace").strip() if patch_data else ""
    return f"{desc or name}\n\n{TRAILER}: {name}\n"
