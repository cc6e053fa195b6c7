"""Unified diffs: parse (incl. git extended headers), format back byte-identically, and apply
in memory with GNU patch 2.7 semantics (exact position, nearest offset, then fuzz).

The parser keeps every byte of the input (description, headers, garbage between files,
hunks) so `format_patch(parse_patch(b)) == b`; a hunk whose lines were edited is
re-rendered from its fields. The applier mirrors GNU patch's locate_hunk/apply_hunk so that
the bytes it produces are the ones `quilt push` (patch -p1 -f) would write.
"""

from __future__ import annotations

import io
import os
import re
import weakref
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, MutableSequence, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from itertools import accumulate, islice, repeat
from operator import add, itemgetter, le, sub
from pathlib import Path
from typing import overload

from fsbuild.errors import PatchFormatError, UnsafePathError

# Line numbers are bounded (GNU's LINENUM is a long): longer digit runs are malformed.
_HUNK_RE = re.compile(rb"^@@ -(\d{1,18})(?:,(\d{1,18}))? \+(\d{1,18})(?:,(\d{1,18}))? @@(.*?)(\r?\n)?$",
                      re.S)
# A hunk header plus the run of ' '/'-'/'+' lines after it, matched in the whole patch: when
# the run's counts are exactly the header's, the run is the body (the fast, common case).
_PLAIN_RE = re.compile(rb"@@ -(\d{1,18})(?:,(\d{1,18}))? \+(\d{1,18})(?:,(\d{1,18}))? @@[^\n]*\n"
                       rb"((?:[ +\-][^\n]*\n)*)")
_OLD_START_RE = re.compile(rb"@@ -(\d+)(?:,(\d+))? [^\n]*\n")
# The usual plain hunk: context, removed lines, added lines, context (a linear match).
_SIMPLE_RE = re.compile(rb"@@ -(\d+)(?:,(\d+))? [^\n]*\n((?: [^\n]*\n)*)((?:-[^\n]*\n)*)"
                        rb"((?:\+[^\n]*\n)*)((?: [^\n]*\n)*)")
_MODE_RE = re.compile(rb"[0-7]{1,7}")
# A timestamp within a day of the epoch marks a nonexistent file (GNU patch's rule).
_EPOCH_RE = re.compile(rb"19(70-01-01|69-12-31)|(Jan  1|Dec 31) [0-9:]+ 19(70|69)")


@dataclass(slots=True)  # big patches hold hundreds of thousands of hunks
class Hunk:
    """One `@@` hunk. `lines` are (tag, content) with tag in ' -+' and content including its
    newline, unless the line was marked `\\ No newline at end of file`."""

    old_start: int
    old_len: int
    new_start: int
    new_len: int
    section: bytes = b""
    lines: list[tuple[str, bytes]] = field(default_factory=list)
    lineno: int = 0
    raw: bytes | None = None  # original bytes; re-rendered when the fields no longer match
    cr: bool = False  # the lines were read with their CRs stripped (GNU's CRLF rule)

    def old_lines(self) -> list[bytes]:
        return [c for t, c in self.lines if t != "+"]

    def context(self) -> tuple[int, int]:
        """(prefix, suffix) context line counts as GNU patch computes them."""
        prefix = -1
        run = 0
        for tag, _ in self.lines:
            if tag == " ":
                run += 1
            else:
                if prefix == -1:
                    prefix = run
                run = 0
        return (run if prefix == -1 else prefix), run

    def render(self) -> bytes:
        if self.raw is not None and self._matches_raw():
            return self.raw
        return render_hunk(self)

    def _matches_raw(self) -> bool:
        """Whether the fields still say what `raw` says: edits are detected by reparsing at
        render time rather than by a fingerprint copy of every line kept per hunk."""
        raw = self.raw or b""
        try:
            h, end, _ = _hunk_at(raw, 0, 1, "<hunk>", self.cr)
        except PatchFormatError:
            return False
        return end == len(raw) and \
            (h.old_start, h.old_len, h.new_start, h.new_len, h.section, h.lines) == \
            (self.old_start, self.old_len, self.new_start, self.new_len, self.section, self.lines)


class Hunks(MutableSequence[Hunk]):
    """A parsed file's hunks, kept as offsets into the patch bytes: a big patch costs a few
    bytes per hunk instead of hundreds of small objects. A Hunk is made on first access and
    kept (so edits to it stick); any insert/delete/assignment turns this into a plain list."""

    def __init__(self, buf: bytes, cr: bool, lineno: int) -> None:
        self._buf = buf
        self._file: PatchFile | None = None  # set when the text is read back (read_patch)
        self._cr = cr  # the lines lose their CRs (GNU's CRLF rule)
        # Where each hunk's header begins (hunk k ends where k+1 begins); 4 bytes each when
        # the patch is under 4 GiB.
        self._starts = array("I" if len(buf) < 1 << 32 else "q")
        self._end = 0  # where the last hunk ends
        # Hunks with more than ' '/'-'/'+' lines (markers, CRLF rule): not applied from bytes.
        self._slow: set[int] = set()
        # Per hunk: 0 sends it through the per-hunk applier; otherwise it was validated in
        # bulk and its shape lets the applier place it with one search (see _plain_window):
        # 1, or 2 + the index of its line tags in _shape_tags (runs of one shape are split
        # into sides by list slicing, see _same_shape_sides).
        self._fast = bytearray()
        self._shape_tags: list[bytes] = []
        self._shape_ids: dict[bytes, int] = {}
        self._first = array("q")  # each hunk's old start line (the applier's fast path)
        self._cursor = (0, lineno)  # (hunk, its line number): sequential access stays O(n)
        self._made: dict[int, Hunk] = {}
        self._list: list[Hunk] | None = None

    def _shape_id(self, tags: bytes) -> int:
        """The _fast value of a fast hunk whose body's line tags are `tags`."""
        got = self._shape_ids.get(tags)
        if got is None:
            if len(self._shape_tags) >= 254:
                return 1  # a byte per hunk: further shapes are not recorded
            got = self._shape_ids[tags] = len(self._shape_tags) + 2
            self._shape_tags.append(tags)
        return got

    def same_shape(self, k: int, j: int) -> bytes | None:
        """The line tags shared by fast hunks k..j-1 when they all have one recorded shape."""
        first = self._fast[k]
        if first < 2 or self._fast.count(first, k, j) != j - k:
            return None
        return self._shape_tags[first - 2]

    def _span(self, k: int) -> tuple[int, int]:
        end = self._starts[k + 1] if k + 1 < len(self._starts) else self._end
        return self._starts[k], end

    def text(self, start: int, end: int) -> bytes:
        """The patch's bytes [start, end) (offsets as in _starts)."""
        if self._file is not None:
            return self._file.read(start, end)
        return self._buf[start:end]

    def _newlines(self, start: int, end: int) -> int:
        if self._file is not None:
            return self._file.newlines(start, end)
        return self._buf.count(b"\n", start, end)

    def _detach(self, source: PatchFile) -> None:
        """Read the text back from the patch file from now on: the whole patch's bytes
        need not stay in memory while the tree is patched."""
        self._file, self._buf = source, b""

    def _lineno(self, k: int) -> int:
        at, lineno = self._cursor
        if k < at:
            at, lineno = 0, self._cursor[1] - self._newlines(self._starts[0], self._starts[at])
        lineno += self._newlines(self._starts[at], self._starts[k])
        self._cursor = (k, lineno)
        return lineno

    def _peek(self, k: int) -> Hunk:
        """Hunk k without keeping it (apply reads every hunk once; keeping all would cost
        what this class saves)."""
        if self._list is not None:
            return self._list[k]
        made = self._made.get(k)
        if made is None:
            lineno = self._lineno(k)
            made = _hunk_at(self.text(*self._span(k)), 0, lineno, "<hunk>", self._cr)[0]
        return made

    def plain_body(self, k: int) -> tuple[int, int] | None:
        """(start, end) of hunk k in `buf` when it may be applied straight from the bytes."""
        if self._list is not None or k in self._slow or k in self._made:
            return None
        return self._span(k)

    def all_plain(self) -> bool:
        """Whether every hunk may be applied straight from the patch bytes."""
        return self._list is None and not self._made and not self._slow

    def render(self) -> bytes:
        """The hunks' bytes: the original slice when no hunk was handed out."""
        if self._list is not None:
            return b"".join(h.render() for h in self._list)
        if not self._made:
            return self.text(self._starts[0], self._end) if self._starts else b""
        out = []
        for k in range(len(self._starts)):
            made = self._made.get(k)
            if made is not None:
                out.append(made.render())
            else:
                out.append(self.text(*self._span(k)))
        return b"".join(out)

    def __len__(self) -> int:
        return len(self._list) if self._list is not None else len(self._starts)

    @overload
    def __getitem__(self, k: int) -> Hunk: ...

    @overload
    def __getitem__(self, k: slice) -> list[Hunk]: ...

    def __getitem__(self, k: int | slice) -> Hunk | list[Hunk]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if self._list is not None:
            return self._list[k]
        if k < 0:
            k += len(self._starts)
        if not 0 <= k < len(self._starts):
            raise IndexError("hunk index out of range")
        if k not in self._made:
            self._made[k] = self._peek(k)
        return self._made[k]

    def _thaw(self) -> list[Hunk]:
        if self._list is None:
            self._list = [self[k] for k in range(len(self._starts))]
            self._made.clear()
        return self._list

    @overload
    def __setitem__(self, k: int, v: Hunk) -> None: ...

    @overload
    def __setitem__(self, k: slice, v: Iterable[Hunk]) -> None: ...

    def __setitem__(self, k: int | slice, v: Hunk | Iterable[Hunk]) -> None:
        self._thaw()[k] = v  # type: ignore[index,assignment]

    def __delitem__(self, k: int | slice) -> None:
        del self._thaw()[k]

    def insert(self, k: int, v: Hunk) -> None:
        self._thaw().insert(k, v)

    def __iter__(self) -> Iterator[Hunk]:
        for k in range(len(self)):
            yield self[k]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))


@dataclass
class FilePatch:
    """The changes to one file: names as written (unstripped), git metadata, hunks."""

    old_name: str | None
    new_name: str | None
    lineno: int
    header: bytes = b""  # raw bytes from the file's first header line up to its first hunk
    hunks: MutableSequence[Hunk] = field(default_factory=list)  # Hunks when parsed
    git: bool = False
    old_mode: int | None = None
    new_mode: int | None = None
    rename: bool = False
    copy: bool = False
    binary: bool = False
    # GNU's p_says_nonexistent: 0 exists, 1 maybe nonexistent, 2 certainly nonexistent.
    old_absent: int = 0
    new_absent: int = 0
    index_name: str | None = None


@dataclass
class Patch:
    """A patch file: description text above the first diff, the files, trailing text."""

    name: str
    description: bytes
    files: list[FilePatch]
    leading: list[bytes] = field(default_factory=list)  # garbage before each file's header
    trailer: bytes = b""


# ---------------------------------------------------------------- parsing


class _Malformed(Exception):
    """Internal: a header line is malformed; parse_patch adds the patch name and line."""


def _split_lines(data: bytes) -> list[bytes]:
    """Split after each b"\\n" only (GNU patch ignores a lone \\r); BytesIO's C readlines
    does exactly that, ~3x faster than split-and-append."""
    return io.BytesIO(data).readlines()


def _fetchname(text: bytes) -> tuple[str | None, bool]:
    """Name and whether the header says 'nonexistent' (/dev/null or epoch timestamp)."""
    at = text.lstrip(b" \t")
    if at.startswith(b'"'):
        name, rest = _c_string(at)
    else:
        end = len(at)
        for i, ch in enumerate(at):
            if ch in b" \t\r\n":
                # Internal spaces are allowed only when a tab separates name and date.
                if ch != 0x09 and b"\t" in at[i + 1:]:
                    continue
                end = i
                break
        name, rest = at[:end].decode("utf-8", "surrogateescape"), at[end:]
    if name == "/dev/null":
        return None, True
    return name, bool(_EPOCH_RE.search(rest))


def _c_string(at: bytes) -> tuple[str, bytes]:
    """A git C-quoted name ("a/b\\tc"); returns the unquoted name and the rest."""
    out = bytearray()
    i = 1
    while i < len(at) and at[i] != 0x22:
        c = at[i]
        if c == 0x5C and i + 1 < len(at):
            nxt = at[i + 1]
            if 0x30 <= nxt <= 0x37:
                digits = at[i + 1:i + 4]
                # git writes exactly three octal digits for one byte (\000-\377)
                if not re.fullmatch(rb"[0-3][0-7][0-7]", digits):
                    raise _Malformed(f"bad octal escape {at[i:i + 4]!r} in quoted name")
                out.append(int(digits, 8))
                i += 4
                continue
            out.append({ord("n"): 10, ord("t"): 9, ord("a"): 7, ord("b"): 8, ord("f"): 12,
                        ord("r"): 13, ord("v"): 11}.get(nxt, nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return bytes(out).decode("utf-8", "surrogateescape"), at[i + 1:]


def _git_names(rest: bytes) -> tuple[str | None, str | None]:
    rest = rest.rstrip(b"\r\n")
    if rest.startswith(b'"'):
        a, tail = _c_string(rest)
        tail = tail.lstrip(b" ")
        return a, _c_string(tail)[0] if tail.startswith(b'"') else tail.decode("utf-8", "surrogateescape")
    # Unquoted names may contain spaces: split where " b/" begins when both halves match.
    parts = rest.split(b" ")
    if len(parts) == 2:
        return (parts[0].decode("utf-8", "surrogateescape"),
                parts[1].decode("utf-8", "surrogateescape"))
    half = (len(rest) - 1) // 2
    return rest[:half].decode("utf-8", "surrogateescape"), rest[half + 1:].decode("utf-8", "surrogateescape")


def _next_line(data: bytes, pos: int) -> int:
    """Where the line starting at pos ends (after its b"\\n", or the end of data)."""
    end = data.find(b"\n", pos)
    return len(data) if end < 0 else end + 1


def parse_patch(data: bytes, name: str = "<patch>") -> Patch:
    """Parse a patch file. Raises PatchFormatError (naming patch and line) on truncated or
    malformed hunks and on binary diffs. Walks byte offsets, never a list of every line:
    hunks stay offsets into `data` (see Hunks)."""
    data = bytes(data)
    files: list[FilePatch] = []
    leading: list[bytes] = []
    description: bytes | None = None
    cur: FilePatch | None = None
    cur_start = 0  # offset of cur's first header line
    consumed = 0  # bytes [0, consumed) belong to earlier files / description
    recent: list[int] = []  # starts of the lines since `consumed` (for _header_start)
    strip_cr = False
    pos = 0
    lineno = 1  # line number of the line at pos

    def finish(end: int) -> None:
        """Close cur: bytes [consumed, cur_start) are leading text, [cur_start, end) header."""
        nonlocal cur, consumed, description
        assert cur is not None
        pre = data[consumed:cur_start]
        if description is None:
            description = pre
            leading.append(b"")
        else:
            leading.append(pre)
        if not cur.hunks:
            cur.header = data[cur_start:end]
        files.append(cur)
        consumed = end
        recent.clear()
        cur = None

    n = len(data)
    try:
        while pos < n:
            nxt = _next_line(data, pos)
            line = data[pos:nxt]
            if line.startswith(b"diff --git "):
                if cur is not None and cur.git:
                    finish(pos)  # a hunkless git diff (mode change, pure rename) ends here
                a, b = _git_names(line[11:])
                cur, cur_start = FilePatch(old_name=a, new_name=b, lineno=lineno, git=True), pos
            elif cur is not None and cur.git and cur_start < pos and \
                    _git_ext(cur, line, name, lineno):
                pass
            elif line.startswith(b"--- ") and data.startswith(b"+++ ", nxt):
                nxt2 = _next_line(data, nxt)
                plus = data[nxt:nxt2]
                old, old_absent = _fetchname(line[4:])
                new, new_absent = _fetchname(plus[4:])
                if cur is None or not cur.git:
                    # Like GNU, a ---/+++ pair without hunks (e.g. quoted in the description)
                    # is superseded by the next one; its lines stay in the leading text.
                    cur, cur_start = FilePatch(None, None, lineno=lineno), \
                        _header_start(data, recent, pos)
                # A git header's /dev/null keeps the name from the `diff --git` line.
                if old is not None or not cur.git:
                    cur.old_name = old
                if new is not None or not cur.git:
                    cur.new_name = new
                cur.old_absent = max(cur.old_absent, 2 if old_absent else 0)
                cur.new_absent = max(cur.new_absent, 2 if new_absent else 0)
                # GNU: a `+++` line ending in CRLF makes the file's hunk lines lose their CRs.
                strip_cr = plus.endswith(b"\r\n")
                recent.append(pos)
                recent.append(nxt)
                pos, lineno = nxt2, lineno + 2
                continue
            elif line.startswith(b"Binary files ") and line.rstrip().endswith(b" differ"):
                raise PatchFormatError(f"{name}:{lineno}: binary diff not supported")
            elif line.startswith(b"@@ -") and cur is not None and not cur.hunks:
                cur.header = data[cur_start:pos]
                pos, lineno, first = _parse_hunks(data, pos, lineno, cur, name, strip_cr)
                # GNU: "@@ -0,0" says the old file does not exist (2 when /dev/null or epoch).
                if first[0] == 0 and first[1] == 0 and not cur.old_absent:
                    cur.old_absent = 1
                if first[2] == 0 and first[3] == 0 and not cur.new_absent:
                    cur.new_absent = 1
                finish(pos)
                continue
            recent.append(pos)
            pos, lineno = nxt, lineno + 1
    except _Malformed as exc:
        raise PatchFormatError(f"{name}:{lineno}: {exc}") from None
    if cur is not None and cur.git:
        finish(n)
    trailer = data[consumed:]
    if description is None:
        description, trailer = trailer, b""
    _check_names(files, name)
    return Patch(name=name, description=description, files=files, leading=leading, trailer=trailer)


# Patches from this size on are read back from their file while applied (read_patch).
_DETACH_AT = 8 << 20
_BLOCK = 1 << 20  # the unit read back and checked


class PatchFile:
    """A patch file's bytes read back in blocks, each checked against the CRC taken when
    the patch was parsed: a patch changed on disk meanwhile is an error, never a tree
    patched with bytes that were not validated. The file stays open (a rename or unlink
    does not matter); the last two blocks are kept."""

    def __init__(self, fd: int, name: str, data: bytes) -> None:
        self._fd, self.name, self._size, self._unit = fd, name, len(data), _BLOCK
        view = memoryview(data)
        self._crcs = [zlib.crc32(view[at:at + _BLOCK]) for at in range(0, len(data), _BLOCK)]
        view.release()
        self._cache: dict[int, bytes] = {}
        weakref.finalize(self, os.close, fd)

    def _block(self, i: int) -> bytes:
        got = self._cache.get(i)
        if got is None:
            want = min(self._unit, self._size - i * self._unit)
            got = os.pread(self._fd, want, i * self._unit) if want > 0 else b""
            if want <= 0 or len(got) != want or zlib.crc32(got) != self._crcs[i]:
                raise PatchFormatError(f"{self.name}: the patch file changed on disk while it "
                                       "was being applied; nothing was written")
            if len(self._cache) >= 2:
                del self._cache[next(iter(self._cache))]
            self._cache[i] = got
        return got

    def _pieces(self, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
        """(block, from, to) covering [start, end)."""
        at = start
        while at < end:
            i = at // self._unit
            base = i * self._unit
            stop = min(end, base + self._unit)
            yield self._block(i), at - base, stop - base
            at = stop

    def read(self, start: int, end: int) -> bytes:
        parts = [block[a:b] for block, a, b in self._pieces(start, end)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def newlines(self, start: int, end: int) -> int:
        return sum(block.count(b"\n", a, b) for block, a, b in self._pieces(start, end))


def read_patch(path: Path | str, name: str) -> Patch:
    """parse_patch of a file. The hunks of a big one (issue 12.14) read their text back
    from the file when applied, so the patch is not held whole in memory beside the files
    it patches."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with open(fd, "rb", closefd=False) as fh:
            data = fh.read()
        patch = parse_patch(data, name)
    except BaseException:
        os.close(fd)
        raise
    if len(data) < _DETACH_AT:
        os.close(fd)
        return patch
    source = PatchFile(fd, name, data)
    for fp in patch.files:
        if isinstance(fp.hunks, Hunks):
            fp.hunks._detach(source)
    return patch


def _header_start(data: bytes, recent: list[int], pos: int) -> int:
    """Walk back over `Index:`/`===`/`diff ` lines directly above the `---` line at pos."""
    k = len(recent)
    while k and data.startswith((b"Index: ", b"====", b"diff "), recent[k - 1]):
        k -= 1
        pos = recent[k]
    return pos


def _git_ext(fp: FilePatch, line: bytes, name: str, lineno: int) -> bool:
    """Consume one git extended header line; False when the line is not one."""
    text = line.rstrip(b"\r\n")
    if text.startswith(b"old mode "):
        fp.old_mode = _mode(text[9:])
    elif text.startswith(b"new mode "):
        fp.new_mode = _mode(text[9:])
    elif text.startswith(b"deleted file mode "):
        fp.old_mode = _mode(text[18:])
        fp.new_absent = 2
    elif text.startswith(b"new file mode "):
        fp.new_mode = _mode(text[14:])
        fp.old_absent = 2
    elif text.startswith(b"rename from ") or text.startswith(b"rename to "):
        fp.rename = True
    elif text.startswith(b"copy from ") or text.startswith(b"copy to "):
        fp.copy = True
    elif text.startswith((b"similarity index ", b"dissimilarity index ")):
        pass
    elif text.startswith(b"index "):
        m = re.match(rb"index ([0-9a-f]+)\.\.([0-9a-f]+)(?: (\S+))?$", text)
        if m:
            if set(m.group(1)) == {0x30}:
                fp.old_absent = 2
            if set(m.group(2)) == {0x30}:
                fp.new_absent = 2
            if m.group(3):
                fp.old_mode = fp.new_mode = _mode(m.group(3))
    elif text.startswith(b"GIT binary patch") or (
            text.startswith(b"Binary files ") and text.endswith(b" differ")):
        raise PatchFormatError(f"{name}:{lineno}: binary diff not supported")
    else:
        return False
    return True


def _mode(text: bytes) -> int:
    """A git file mode: plain octal digits only (int() would also take '_', '+', spaces)."""
    if not _MODE_RE.fullmatch(text):
        raise _Malformed(f"bad file mode {text[:20]!r} in git header")
    return int(text, 8)


def _parse_hunks(data: bytes, pos: int, lineno: int, fp: FilePatch, name: str,
                 strip_cr: bool) -> tuple[int, int, tuple[int, int, int, int]]:
    """Parse the consecutive hunks at data[pos:] into fp.hunks (a Hunks); return the offset
    and line number after the last one and the first hunk's header numbers. With strip_cr,
    hunk lines ending in CRLF are read as ending in LF (the raw bytes stay)."""
    hunks = Hunks(data, strip_cr, lineno)
    first: tuple[int, int, int, int] | None = None
    # The hot loop of big patches: locals for every method, no helper calls; finditer
    # walks consecutive plain hunks (one at pos) with less overhead than match() per hunk.
    count, startswith = data.count, data.startswith
    add_start, add_fast, add_first = hunks._starts.append, hunks._fast.append, hunks._first.append
    quota, window = _BULK_AFTER, _WINDOW_MIN  # a short run never pays for a window
    while startswith(b"@@ -", pos):
        if quota <= 0 and not strip_cr:
            got = _plain_window(data, pos, window, hunks)
            if got:
                pos, lineno = got[0], lineno + got[1]
                window = min(window * 2, _WINDOW_MAX)
                continue
            quota, window = _BULK_AFTER, _WINDOW_MIN  # back off: odd lines here
        for m in () if strip_cr else _PLAIN_RE.finditer(data, pos):
            if m.start() != pos or quota <= 0:
                break
            old_len, new_len = m.group(2, 4)
            old_len = 1 if old_len is None else int(old_len)
            new_len = 1 if new_len is None else int(new_len)
            body, end = m.span(5)
            total = count(b"\n", body, end)
            # Lines starting with '-' / '+': each follows a b"\n" (the header's ends it).
            if total - count(b"\n+", body - 1, end - 1) != old_len or \
                    total - count(b"\n-", body - 1, end - 1) != new_len or \
                    startswith(b"\\", end):
                break
            if first is None:
                first = (int(m.group(1)), old_len, int(m.group(3)), new_len)
            add_start(pos)
            add_fast(0)
            add_first(int(m.group(1)))
            pos, lineno, quota = end, lineno + 1 + total, quota - 1
        if not startswith(b"@@ -", pos) or quota <= 0:
            continue
        add_start(pos)
        add_fast(0)
        quota -= 1
        hunks._slow.add(len(hunks._starts) - 1)
        h, pos, lineno = _hunk_at(data, pos, lineno, name, strip_cr)
        add_first(h.old_start)
        if first is None:
            first = (h.old_start, h.old_len, h.new_start, h.new_len)
    hunks._end = pos
    fp.hunks = hunks
    assert first is not None  # the caller saw "@@ -"
    return pos, lineno, first


# Bulk validation of long runs of plain hunks (issue 12.14: 640k hunks): a window of the
# run is split into lines once and checked with C-level operations on whole lists, so the
# Python work per hunk is a few list entries, not a regex match and a dozen calls.
_BULK_AFTER = 256  # hunks parsed one by one before (and after any odd line) trying a window
_WINDOW_MIN, _WINDOW_MAX = 1 << 13, 1 << 16
_BAD_TAG_RE = re.compile(rb"[^@ +\-]")
# One row per header line: (old start, old length, new length), the start b"" for a line
# starting with '@' that is not a hunk header.
_HEADS_RE = re.compile(rb"\n@(?:@ -(\d{1,18})(?:,(\d{1,18}))? \+\d{1,18}(?:,(\d{1,18}))? @@)?")
_TAG = itemgetter(0)
# length(text, text): a hunk header's length digits, b"1" when omitted
_length: Callable[[bytes, bytes], bytes] = {b"": b"1"}.get


@lru_cache(maxsize=4096)
def _shape(tags: bytes) -> tuple[int, int, int, tuple[bytes, bytes]]:
    """(old lines, new lines, fast, the lengths as diff writes them in the header) of a
    hunk body whose line tags are `tags`; fast = 1 when
    GNU's search at fuzz 0 tries the hunk's own place first and nothing else could match
    before it: old lines exist and the context is symmetric (see _locate)."""
    ctx = tags.count(b" ")
    old, new = ctx + tags.count(b"-"), ctx + tags.count(b"+")
    prefix = len(tags) - len(tags.lstrip(b" "))
    suffix = prefix if prefix == len(tags) else len(tags) - len(tags.rstrip(b" "))
    def spelled(n: int) -> bytes:
        return b"" if n == 1 else b"%d" % n  # diff omits a length of 1: "@@ -5 +5 @@"
    return old, new, int(old > 0 and prefix == suffix), (spelled(old), spelled(new))


def _plain_window(data: bytes, pos: int, window: int, hunks: Hunks) -> tuple[int, int] | None:
    """Validate and record the plain hunks in about `window` bytes from pos (a hunk header):
    exactly the hunks the per-hunk loop of _parse_hunks would accept, in order, stopping
    before the first other one. Returns (offset after them, lines consumed), None when none."""
    n = len(data)
    end = data.find(b"\n@@ -", pos + window) + 1 or n
    same = _same_shape_window(data, pos, end, hunks)
    if same:
        return same
    cut = data.find(b"\n\n", pos, end)  # an empty line: GNU reads it as context
    if cut >= 0:
        end = cut + 1
    region = data[pos:end]
    lines = region.split(b"\n")
    lines.pop()  # b"", or a last line without newline (its hunk is cut: dropped below)
    tags = bytes(map(_TAG, lines))
    bad = _BAD_TAG_RE.search(tags)
    if bad:  # a marker or another file's line: the hunk holding it is left to the loop
        tags = tags[:tags.rfind(b"@", 0, bad.start() + 1)]
    shapes = tags.split(b"@")[1:]
    if len(shapes) < 2:
        return None
    shapes.pop()  # the last hunk may be cut (the patch's end without newline)
    at_line = accumulate(map(add, map(len, shapes), repeat(1)), initial=0)
    heads = _HEADS_RE.findall(b"\n" + b"\n".join(map(lines.__getitem__, at_line)))
    del heads[len(shapes):]
    firsts = list(map(itemgetter(0), heads))
    if b"" in firsts:  # a line starting with '@' that is no hunk header
        del shapes[firsts.index(b""):], heads[len(shapes):]
    table = {s: _shape(s) for s in set(shapes)}  # a few distinct shapes
    spelled = {s: row[3] for s, row in table.items()}
    # The headers' lengths as diff spells them (the common case: compared as text), else
    # as numbers.
    if list(map(itemgetter(1, 2), heads)) != list(map(spelled.__getitem__, shapes)):
        olds, news = list(map(itemgetter(1), heads)), list(map(itemgetter(2), heads))
        want = list(zip(map(int, map(_length, olds, olds)), map(int, map(_length, news, news)),
                        strict=True))
        got = [table[s][:2] for s in shapes]
        if got != want:
            k = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
            del shapes[k:]
    if not shapes:
        return None
    count = len(shapes)
    pieces = region.split(b"\n@", count)  # hunk k's text is pieces[k] (its '@' gone)
    size = list(accumulate(map(len, islice(pieces, count))))
    # hunk k + 1 starts after pieces 0..k and k separators "\n@" (the first '@' is kept)
    hunks._starts.append(pos)
    hunks._starts.extend(map(add, islice(size, count - 1), range(pos + 1, n + 2 * count, 2)))
    fast = {s: hunks._shape_id(s) if row[2] else 0 for s, row in table.items()}
    hunks._fast.extend(map(fast.__getitem__, shapes))
    hunks._first.fromlist(list(map(int, islice(firsts, count))))  # faster than extend(map)
    return pos + size[-1] + 2 * count - 1, sum(map(len, shapes)) + count


# A run of hunks of one shape is validated by one regex match (no object per line or per
# hunk): worth it from this many hunks on, else the window is left to _plain_window's lists;
# only for shapes of up to _SAME_SHAPE_LINES lines (a regex is compiled per shape).
_SAME_SHAPE_MIN = 32
_SAME_SHAPE_LINES = 64
_RUN_FIRSTS_RE = re.compile(rb"\n@@ -(\d{1,18})")


def _same_shape_window(data: bytes, pos: int, end: int, hunks: Hunks) -> tuple[int, int] | None:
    """_plain_window for a run of hunks from pos on whose bodies all have the first one's
    line tags and whose headers spell the lengths as diff does: each hunk is followed by a
    next header (so no marker or other line belongs to it) and lies before end (plus that
    header). Returns None when fewer than _SAME_SHAPE_MIN hunks qualify."""
    region = data[pos:end + 4]
    shape = _leading_shape(region)
    if shape is None or len(shape) > _SAME_SHAPE_LINES:
        return None
    _, _, fast, spelled = _shape(shape)
    run = _run_re(shape, *spelled).match(region)
    stop = run.end() if run else 0
    firsts = _RUN_FIRSTS_RE.findall(b"\n" + region[:stop])
    count = len(firsts)
    if count < _SAME_SHAPE_MIN:
        return None
    pieces = region.split(b"\n@", count)  # hunk k's text is pieces[k] (its '@' gone)
    size = list(accumulate(map(len, islice(pieces, count))))
    hunks._starts.append(pos)
    hunks._starts.extend(map(add, islice(size, count - 1), range(pos + 1, pos + 2 * count, 2)))
    hunks._fast.extend(bytes([hunks._shape_id(shape) if fast else 0]) * count)
    hunks._first.fromlist(list(map(int, firsts)))
    return pos + stop, count * (len(shape) + 1)


def _leading_shape(region: bytes) -> bytes | None:
    """The line tags of the first hunk's body in region (up to the next line starting with
    '@'), None unless all are ' ', '-' or '+'."""
    start = region.find(b"\n") + 1
    stop = region.find(b"\n@", start - 1)
    if start == 0 or stop < start:
        return None
    lines = region[start:stop].split(b"\n")
    if not all(lines):
        return None
    shape = bytes(line[0] for line in lines)
    return None if shape.strip(b" -+") else shape


@lru_cache(maxsize=64)
def _run_re(shape: bytes, old: bytes, new: bytes) -> re.Pattern[bytes]:
    """Matches a run of hunks with body line tags `shape` and header lengths spelled
    `old`/`new` (digits, b"" when omitted), each followed by a next header."""
    def length(digits: bytes) -> bytes:  # b"" for an omitted length of 1
        return b"," + digits if digits else b""
    body = b"".join(re.escape(bytes([tag])) + rb"[^\n]*\n" for tag in shape)
    return re.compile(rb"(?:@@ -\d{1,18}" + length(old) + rb" \+\d{1,18}" + length(new)
                      + rb" @@[^\n]*\n" + body + rb"(?=@@ -))*+")


def _hunk_at(data: bytes, pos: int, lineno: int, name: str,
             strip_cr: bool) -> tuple[Hunk, int, int]:
    """The hunk whose header is the line at data[pos:] (line number lineno), the offset and
    line number after it."""
    start = pos
    pos = _next_line(data, pos)
    m = _HUNK_RE.match(data[start:pos])
    if not m:
        raise PatchFormatError(f"{name}:{lineno}: malformed hunk header")
    old_len = 1 if m.group(2) is None else int(m.group(2))
    new_len = 1 if m.group(4) is None else int(m.group(4))
    hunk = Hunk(int(m.group(1)), old_len, int(m.group(3)), new_len,
                section=m.group(5), lineno=lineno, cr=strip_cr)
    hunk.lines, pos, lineno = _hunk_lines(data, pos, lineno + 1, old_len, new_len, strip_cr,
                                          name, hunk.lineno)
    hunk.raw = data[start:pos]
    return hunk, pos, lineno


def _hunk_lines(data: bytes, pos: int, lineno: int, old_left: int, new_left: int,
                strip_cr: bool, name: str,
                hunk_lineno: int) -> tuple[list[tuple[str, bytes]], int, int]:
    """The (tag, content) lines of one hunk body starting at data[pos:] (line number lineno),
    and the offset and line number after it."""
    n = len(data)
    out: list[tuple[str, bytes]] = []
    append = out.append
    while old_left > 0 or new_left > 0:
        if pos >= n:
            # GNU assumes up to two chopped blank context lines at end of file.
            if new_left < 3 and old_left == new_left:
                out.extend([(" ", b"\n")] * old_left)
                break
            raise PatchFormatError(
                f"{name}:{lineno - 1}: truncated hunk at end of patch "
                f"(hunk at line {hunk_lineno} lacks {old_left} old/{new_left} new lines)")
        nxt = _next_line(data, pos)
        line = data[pos:nxt]
        if strip_cr and line.endswith(b"\r\n"):
            line = line[:-2] + b"\n"
        c = line[0]
        if c == 0x20 or c == 0x09 or c == 0x0A or line == b"\r\n":
            if old_left == 0:
                raise PatchFormatError(f"{name}:{lineno}: hunk has more old lines than its "
                                       "header says")
            if new_left == 0:
                raise PatchFormatError(f"{name}:{lineno}: hunk has more new lines than its "
                                       "header says")
            old_left -= 1
            new_left -= 1
            tag, content = " ", (line[1:] if c == 0x20 else line)  # else: leading space eaten
            last = old_left == 0 or new_left == 0
        elif c == 0x2D:
            if old_left == 0:
                raise PatchFormatError(f"{name}:{lineno}: hunk has more old lines than its "
                                       "header says")
            old_left -= 1
            tag, content, last = "-", line[1:], old_left == 0
        elif c == 0x2B:
            if new_left == 0:
                raise PatchFormatError(f"{name}:{lineno}: hunk has more new lines than its "
                                       "header says")
            new_left -= 1
            tag, content, last = "+", line[1:], new_left == 0
        else:
            raise PatchFormatError(f"{name}:{lineno}: malformed hunk line "
                                   f"(hunk at line {hunk_lineno} is truncated or corrupt)")
        pos, lineno = nxt, lineno + 1
        if last and pos < n and data[pos] == 0x5C:
            if content.endswith(b"\n"):
                content = content[:-1]
            pos, lineno = _next_line(data, pos), lineno + 1
        append((tag, content))
    return out, pos, lineno


def _check_names(files: list[FilePatch], name: str) -> None:
    for fp in files:
        for n in (fp.old_name, fp.new_name):
            if n is not None and n.startswith("/"):
                raise UnsafePathError(f"{name}:{fp.lineno}: absolute path {n!r} in diff")


# ---------------------------------------------------------------- formatting


def render_hunk(h: Hunk) -> bytes:
    def rng(start: int, length: int) -> bytes:
        return f"{start}".encode() if length == 1 else f"{start},{length}".encode()

    out = [b"@@ -" + rng(h.old_start, h.old_len) + b" +" + rng(h.new_start, h.new_len)
           + b" @@" + h.section + b"\n"]
    for tag, content in h.lines:
        if content.endswith(b"\n"):
            out.append(tag.encode() + content)
        else:
            out.append(tag.encode() + content + b"\n\\ No newline at end of file\n")
    return b"".join(out)


def format_patch(p: Patch) -> bytes:
    """Bytes of the patch; identical to the parsed input when nothing was changed."""
    out = [p.description]
    for k, fp in enumerate(p.files):
        if k:
            out.append(p.leading[k] if k < len(p.leading) else b"")
        out.append(fp.header)
        if isinstance(fp.hunks, Hunks):
            out.append(fp.hunks.render())  # one slice of the input when untouched
        else:
            out.extend(h.render() for h in fp.hunks)
    out.append(p.trailer)
    return b"".join(out)


# ---------------------------------------------------------------- paths


def strip_path(name: str, strip: int) -> str | None:
    """GNU strip_leading_slashes: drop `strip` leading components; None when too few."""
    slashes = 0
    cut = 0
    for idx, ch in enumerate(name):
        if ch == "/" and (idx + 1 >= len(name) or name[idx + 1] != "/"):
            slashes += 1
            if slashes <= strip:
                cut = idx + 1
    if slashes < strip:
        return None
    rest = name[cut:]
    return rest or None


def safe_relpath(name: str, where: str, what: str = "path") -> str:
    """The one path check for names from patches, archives and users: reject absolute
    names and any `..` (even one that would come back), return the normalised relative
    path. `where` names the source ("x.patch:12", "linux.tar.gz")."""
    if name.startswith("/"):
        raise UnsafePathError(f"{where}: {what} {name!r} is an absolute path")
    parts = [c for c in name.split("/") if c not in ("", ".")]
    if ".." in parts or not parts:
        raise UnsafePathError(f"{where}: {what} {name!r} escapes the tree")
    return "/".join(parts)


def resolves_inside(start: list[str], target: str, readlink: Callable[[str], str | None],
                    floor: int = 0, max_hops: int = 40) -> bool:
    """Whether `target`, taken relative to the directory `start` (components), stays at or
    below the first `floor` components when every symlink met on the way is followed;
    readlink(path) gives a link's text or None. Absolute links and loops count as escapes."""
    stack = list(start)
    todo = target.split("/")[::-1]  # reversed: pop() takes the next component
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if len(stack) <= floor:
                return False
            stack.pop()
            continue
        stack.append(part)
        dest = readlink("/".join(stack))
        if dest is None:
            continue
        stack.pop()
        hops += 1
        if hops > max_hops or dest.startswith("/"):
            return False
        todo.extend(dest.split("/")[::-1])
    return True


# ---------------------------------------------------------------- applying


@dataclass
class HunkResult:
    file: str
    hunk: int
    offset: int
    fuzz: int


class HunkFailed(Exception):
    """Internal: hunk `index` (1-based) did not apply; `line` is where GNU expected it."""

    def __init__(self, index: int, line: int, why: str = "does not match") -> None:
        super().__init__(index, line, why)
        self.index, self.line, self.why = index, line, why


class HunkResults(Sequence[HunkResult]):
    """One file's hunk results, stored as runs of equal (offset, fuzz): a big patch has
    hundreds of thousands of hunks; a HunkResult is made on access."""

    def __init__(self, file: str) -> None:
        self.file = file
        self._n = 0
        self._run_at = array("q")  # first hunk index of each run
        self._runs: list[tuple[int, int]] = []

    def add(self, offset: int, fuzz: int) -> None:
        if not self._runs or self._runs[-1] != (offset, fuzz):
            self.mark(self._n, offset, fuzz)
        self._n += 1

    def mark(self, k: int, offset: int, fuzz: int) -> None:
        """Hunks from index k on have this offset and fuzz (until the next mark); hunks
        before the first mark have none."""
        if not self._runs and k:
            self._run_at.append(0)
            self._runs.append((0, 0))
        self._run_at.append(k)
        self._runs.append((offset, fuzz))

    def close(self, n: int) -> None:
        """There are n hunks in all (after marks)."""
        if not self._runs and n:
            self.mark(0, 0, 0)
        self._n = n

    def counts(self) -> tuple[int, int, int]:
        """(hunks, hunks with an offset and no fuzz, hunks with fuzz), without a HunkResult
        per hunk."""
        moved = fuzzed = 0
        for r, (offset, fuzz) in enumerate(self._runs):
            end = self._run_at[r + 1] if r + 1 < len(self._runs) else self._n
            size = end - self._run_at[r]
            fuzzed += size if fuzz else 0
            moved += size if offset and not fuzz else 0
        return self._n, moved, fuzzed

    def fuzzed(self) -> Iterator[HunkResult]:
        """Only the hunks applied with fuzz."""
        for r, (offset, fuzz) in enumerate(self._runs):
            if fuzz:
                end = self._run_at[r + 1] if r + 1 < len(self._runs) else self._n
                for k in range(self._run_at[r], end):
                    yield HunkResult(self.file, k + 1, offset, fuzz)

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, k: int) -> HunkResult: ...

    @overload
    def __getitem__(self, k: slice) -> list[HunkResult]: ...

    def __getitem__(self, k: int | slice) -> HunkResult | list[HunkResult]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(self._n))]
        if k < 0:
            k += self._n
        if not 0 <= k < self._n:
            raise IndexError("hunk result index out of range")
        offset, fuzz = self._runs[bisect_right(self._run_at, k) - 1]
        return HunkResult(self.file, k + 1, offset, fuzz)

    def __iter__(self) -> Iterator[HunkResult]:
        runs = self._runs
        for r, (offset, fuzz) in enumerate(runs):
            end = self._run_at[r + 1] if r + 1 < len(runs) else self._n
            for k in range(self._run_at[r], end):
                yield HunkResult(self.file, k + 1, offset, fuzz)


class HunkLog(Sequence[HunkResult]):
    """A patch's hunk results: the files' HunkResults kept as they are (not one object per
    hunk), read as one sequence."""

    def __init__(self) -> None:
        self._parts: list[Sequence[HunkResult]] = []

    def extend(self, results: Iterable[HunkResult]) -> None:
        self._parts.append(results if isinstance(results, HunkResults) else list(results))

    def append(self, result: HunkResult) -> None:
        self._parts.append([result])

    def counts(self) -> tuple[int, int, int]:
        """(hunks, hunks with an offset and no fuzz, hunks with fuzz)."""
        total = moved = fuzzed = 0
        for part in self._parts:
            if isinstance(part, HunkResults):
                n, m, f = part.counts()
            else:
                n = len(part)
                m = sum(1 for h in part if h.offset and not h.fuzz)
                f = sum(1 for h in part if h.fuzz)
            total, moved, fuzzed = total + n, moved + m, fuzzed + f
        return total, moved, fuzzed

    def fuzzed(self) -> Iterator[HunkResult]:
        """Only the hunks applied with fuzz."""
        for part in self._parts:
            yield from (part.fuzzed() if isinstance(part, HunkResults)
                        else (h for h in part if h.fuzz))

    def __len__(self) -> int:
        return sum(len(p) for p in self._parts)

    @overload
    def __getitem__(self, k: int) -> HunkResult: ...

    @overload
    def __getitem__(self, k: slice) -> list[HunkResult]: ...

    def __getitem__(self, k: int | slice) -> HunkResult | list[HunkResult]:
        if isinstance(k, slice):
            return list(self)[k]
        if k < 0:
            k += len(self)
        for part in self._parts:
            if 0 <= k < len(part):
                return part[k]
            k -= len(part)
        raise IndexError("hunk result index out of range")

    def __iter__(self) -> Iterator[HunkResult]:
        for part in self._parts:
            yield from part

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))


# same(start, pf, sf): whether the input lines from 0-based `start` equal the pattern
# without its first pf and last sf lines (the caller checked the bounds).
Matcher = Callable[[int, int, int], bool]


def _locate(input_lines: int, same: Matcher, pat_lines: int, first: int, in_offset: int,
            last_frozen: int, prefix: int, suffix: int, fuzz: int) -> tuple[int, int]:
    """GNU 2.7.6 locate_hunk: return (where (1-based, 0 = not found), new in_offset)."""
    first_guess = first + in_offset
    context = max(prefix, suffix)
    prefix_fuzz = fuzz + prefix - context
    suffix_fuzz = fuzz + suffix - context
    max_where = input_lines - (pat_lines - suffix_fuzz) + 1
    min_where = last_frozen + 1
    max_pos = max_where - first_guess
    max_neg = first_guess - min_where
    max_offset = max(max_pos, max_neg)
    if not pat_lines:
        return first_guess, in_offset
    if first_guess <= max_neg:
        max_neg = first_guess - 1

    def match(offset: int, pf: int, sf: int) -> bool:
        start = first_guess + offset + pf - 1  # 0-based index of the first compared line
        if start < 0 or start + (pat_lines - sf - pf) > input_lines:
            return False
        return same(start, pf, sf)

    if prefix_fuzz < 0 and first <= 1:
        # Fewer leading than trailing context lines: can only match the start of the file.
        if suffix_fuzz < 0 and (pat_lines != input_lines or prefix < last_frozen):
            return 0, in_offset
        offset = 1 - first_guess
        if last_frozen <= prefix and offset <= max_pos and match(offset, 0, suffix_fuzz):
            return first_guess + offset, in_offset + offset
        return 0, in_offset
    if prefix_fuzz < 0:
        prefix_fuzz = 0
    if suffix_fuzz < 0:
        # Fewer trailing than leading context lines: can only match the end of the file.
        offset = first_guess - (input_lines - pat_lines + 1)
        if offset <= max_neg and match(-offset, prefix_fuzz, 0):
            return first_guess - offset, in_offset - offset
        return 0, in_offset
    if max_pos < 0:
        min_offset = first_guess - max_where
    elif max_neg < 0:
        min_offset = first_guess - min_where
    else:
        min_offset = 0
    for offset in range(min_offset, max_offset + 1):
        if offset <= max_pos and match(offset, prefix_fuzz, suffix_fuzz):
            return first_guess + offset, in_offset + offset
        if offset <= max_neg and match(-offset, prefix_fuzz, suffix_fuzz):
            return first_guess - offset, in_offset - offset
    return 0, in_offset


def _list_matcher(lines: list[bytes], pattern: list[bytes]) -> Matcher:
    pat = len(pattern)

    def same(start: int, pf: int, sf: int) -> bool:
        return lines[start:start + pat - sf - pf] == pattern[pf:pat - sf]
    return same


def _locate_fuzzed(input_lines: int, same: Matcher, pat_lines: int, first: int, in_offset: int,
                   last_frozen: int, prefix: int, suffix: int, max_fuzz: int) -> tuple[int, int, int]:
    """_locate at fuzz 0, 1, ... max_fuzz: (where, in_offset, fuzz used); where 0 = not found."""
    where = used = 0
    for used in range(max_fuzz + 1):
        where, in_offset = _locate(input_lines, same, pat_lines, first, in_offset, last_frozen,
                                   prefix, suffix, used)
        if where:
            break
    return where, in_offset, used


def _offsets_matcher(data: bytes, off: array[int], pattern: bytes) -> Matcher:
    """Compare byte ranges instead of line lists: both sides are whole lines split after
    each b"\\n", so equal bytes mean equal lines."""
    lines = _split_lines(pattern)
    pat = len(lines)
    joined: dict[tuple[int, int], bytes] = {(0, 0): pattern}

    def same(start: int, pf: int, sf: int) -> bool:
        want = joined.get((pf, sf))
        if want is None:
            want = joined[pf, sf] = b"".join(lines[pf:pat - sf])
        at = off[start]
        return off[start + pat - pf - sf] - at == len(want) and data.startswith(want, at)
    return same


def _line_starts(data: bytes) -> array[int]:
    """Offsets of every line start, then len(data); one small line object at a time."""
    return array("q", accumulate(map(len, io.BytesIO(data)), initial=0))


def apply_hunks(data: bytes, hunks: Sequence[Hunk], fuzz: int = 0, path: str = "",
                creating: bool = False) -> tuple[bytes, HunkResults]:
    """Apply hunks to one file's bytes the way GNU patch does. Raises HunkFailed."""
    if isinstance(hunks, Hunks) and hunks.all_plain() and (not data or data.endswith(b"\n")):
        return _apply_plain(data, hunks, fuzz, path, creating)
    if isinstance(hunks, Hunks):
        return _apply_lines(data, (hunks._peek(k) for k in range(len(hunks))), fuzz, path,
                            creating)
    return _apply_lines(data, hunks, fuzz, path, creating)


def _apply_plain(data: bytes, hunks: Hunks, fuzz: int, path: str,
                 creating: bool) -> tuple[bytes, HunkResults]:
    """apply_hunks for plain hunks on a file ending in a newline, in one forward pass over
    byte offsets. Runs of hunks validated in bulk by the parser go through _Plain.lean (one
    search per hunk on sides stripped in bulk); any hunk it cannot place exactly, and every
    other hunk, through _Plain.careful (GNU's search, offsets, fuzz)."""
    state = _Plain(data, hunks, fuzz, path)
    n = len(hunks._starts)
    k = 0
    while k < n:
        j = min(n, k + _CHUNK)
        zero = hunks._fast.find(0, k, j)  # lean takes only runs of bulk-validated hunks
        if not creating and zero != k:
            k, stop = state.lean(k, j if zero < 0 else zero)
        else:
            stop = k
        while k <= stop and k < n:  # the hunk lean stopped at, and the one it undid
            state.careful(k, creating)
            k += 1
    return state.finish(n)


_CHUNK = 1024  # hunks stripped in bulk at once: bounded temporary memory
# A side of a hunk from its text: drop the other side's lines, then every line's tag.
_PLUS_LINE_RE = re.compile(rb"\n\+[^\n]*")
_MINUS_LINE_RE = re.compile(rb"\n-[^\n]*")


def _sides(region: bytes, count: int) -> tuple[list[bytes], list[bytes]] | None:
    """The old and new sides of each of the `count` plain hunks making up region, as
    b"\n" + the side's lines without tags; None when a content line holds a NUL (the
    separator put in place of the headers: such hunks take the careful path). Each
    header becomes a NUL line plus a line of the other side, dropped with that side's
    lines by the one regex pass per side (only headers start a line with "@@ -" here)."""
    text = b"\n" + region
    sides = []
    for tag, drop, keep in ((b"+", _PLUS_LINE_RE, b"\n-"), (b"-", _MINUS_LINE_RE, b"\n+")):
        marked = text.replace(b"\n@@ -", b"\n\0\n" + tag)
        pieces = drop.sub(b"", marked).replace(keep, b"\n ").replace(b"\n ", b"\n").split(b"\0")
        if len(pieces) != count + 1:
            return None
        del pieces[0]
        sides.append(pieces)
    return sides[0], sides[1]


def _same_shape_sides(region: bytes, tags: bytes, count: int) -> tuple[list[bytes], list[bytes]] | None:
    """_sides of `count` plain hunks whose bodies all have the line tags `tags`: line i of
    every hunk is every (len(tags) + 1)-th line, so each side is gathered by list slicing
    (no per-line regex match), NUL lines in place of the headers."""
    lines = region.split(b"\n")
    step = len(tags) + 1  # the header and the body
    if len(lines) != step * count + 1 or lines[-1]:
        return None
    sides = []
    for drop, keep in ((0x2B, b"\n-"), (0x2D, b"\n+")):
        picked = [i for i, tag in enumerate(tags, 1) if tag != drop]
        width = len(picked) + 1
        out: list[bytes] = [b"\0"] * (width * count + 1)
        for slot, i in enumerate(picked, 1):
            out[slot::width] = lines[i::step]
        pieces = b"\n".join(out).replace(keep, b"\n ").replace(b"\n ", b"\n").split(b"\0")
        if len(pieces) != count + 2:  # a content line holds a NUL
            return None
        sides.append(pieces[1:-1])
    return sides[0], sides[1]


class _Plain:
    """The state of one file's forward pass: output so far, input consumed (GNU's
    last_frozen_line and its byte offset), the running offset, result runs."""

    def __init__(self, data: bytes, hunks: Hunks, fuzz: int, path: str) -> None:
        self.data, self.hunks, self.fuzz = data, hunks, fuzz
        self.nlines = data.count(b"\n")
        self.out = io.BytesIO()
        self.view = memoryview(data)
        self.results = HunkResults(path)
        self.run = (0, 0)
        self.off: array[int] | None = None
        self.in_offset = 0
        self.frozen = self.frozen_at = 0  # input lines already copied or deleted, bytes
        # The last hunk applied by lean, as (first line, old side, new side): undone when
        # the next hunk needs the careful path (lean also copied its trailing context).
        self.last: tuple[int, bytes, bytes] | None = None

    def finish(self, n: int) -> tuple[bytes, HunkResults]:
        self.results.close(n)
        self.out.write(self.view[self.frozen_at:])
        self.view.release()
        return self.out.getvalue(), self.results

    def lean(self, k: int, j: int) -> tuple[int, int]:
        """Apply hunks k..j-1 each at its own line (in_offset kept, no fuzz) while its old
        side is found there. Returns (first, last) hunks left to careful: the one lean
        stopped at and the one before it when lean applied that one; (j, j - 1) when done.
        Only hunks whose shape makes GNU try their own line first come here."""
        hunks, data, pos = self.hunks, self.data, self.frozen_at
        end = hunks._starts[j] if j < len(hunks._starts) else hunks._end
        text, tags = hunks.text(hunks._starts[k], end), hunks.same_shape(k, j)
        both = _sides(text, j - k) if tags is None else _same_shape_sides(text, tags, j - k)
        if both is None or pos == 0:  # pos 0: no newline before the first line to find
            return self._undo(k, k, [], [], [])
        olds, news = both  # each b"\n" + the side
        if self.run != (self.in_offset, 0):
            self.run = (self.in_offset, 0)
            self.results.mark(k, self.in_offset, 0)
        firsts = hunks._first[k:j]
        base = self.in_offset - 1
        # Newlines from the one before a hunk's first line to the next hunk's: the
        # distance of their first lines (the offset cancels out); for the first hunk, its
        # gap from the frozen input.
        want = [firsts[0] + base - self.frozen]
        want.extend(map(sub, islice(firsts, 1, None), firsts))
        # The hot loop: where each old side is next found, from just after the previous
        # one's first newline; a miss (-1) makes every later search start at the end. The
        # places are checked in bulk below: the right line, and not overlapping the
        # previous old side (adjacent or overlapping hunks go to careful: the emit below
        # needs a line in between).
        find, n = data.find, len(data)
        pos -= 1
        ats = [pos := find(old, pos + 1 or n) for old in olds]
        done = ats.index(-1) if ats[-1] < 0 else len(ats)
        del ats[done:]
        froms = [self.frozen_at, *map(add, ats, map(len, olds))]  # where each gap starts
        got = list(map(data.count, repeat(b"\n"), [self.frozen_at - 1, *ats], ats))
        if got != want[:done] or not all(map(le, froms, ats)):
            done = next(i for i, (a, b, f, t) in enumerate(zip(got, want, froms, ats,
                                                                strict=False))
                        if a != b or f > t)
        # The gaps but their last newline (each new side starts with it) and the new sides.
        parts = [b""] * (2 * done)
        parts[::2] = map(data.__getitem__, map(slice, froms, ats[:done]))
        parts[1::2] = islice(news, done)
        self.out.write(b"".join(parts))
        self.frozen_at = froms[done]
        if done:  # the last applied hunk's old lines end here
            self.frozen = firsts[done - 1] + base + olds[done - 1].count(b"\n") - 1
        if k + done == j:
            self.last = (firsts[-1], olds[-1], news[-1])
            return j, j - 1
        return self._undo(k + done, k, olds, news, firsts)

    def _undo(self, i: int, k: int, olds: list[bytes], news: list[bytes],
              firsts: array[int] | list[int]) -> tuple[int, int]:
        """Hunk i failed lean: take back the hunk before it if lean applied it (its copied
        trailing context may be what hunk i changes, as GNU allows), so careful redoes it.
        olds/news/firsts describe hunks k.. of lean's current run (sides with b"\n")."""
        last = (firsts[i - k - 1], olds[i - k - 1], news[i - k - 1]) if i > k else self.last
        self.last = None
        if last is None:
            return i, i
        first, old, new = last
        self.out.seek(self.out.tell() - len(new) + 1)
        self.out.truncate()
        self.frozen_at -= len(old) - 1
        self.frozen = first + self.in_offset - 1
        return i - 1, i

    def careful(self, k: int, creating: bool) -> None:
        """Hunk k the general way: checked at its expected place with one comparison; only
        a hunk that moved or needs fuzz indexes the file's lines (once) for GNU's search."""
        self.last = None
        hunks, data = self.hunks, self.data
        text = hunks.text(*hunks._span(k))
        m = _SIMPLE_RE.fullmatch(text)
        if m:  # context, removed, added, context: each part loses its tags at once
            first_b, old_len, lead, dels, adds, trail = m.groups()
            first = int(first_b) + (old_len is not None and int(old_len) == 0)
            lead, trail = lead[1:].replace(b"\n ", b"\n"), trail[1:].replace(b"\n ", b"\n")
            dels, adds = dels[1:].replace(b"\n-", b"\n"), adds[1:].replace(b"\n+", b"\n")
        else:
            first, lead, dels, adds, trail = _plain_parts(text, 0, len(text))
        pattern = lead + dels + trail
        prefix = lead.count(b"\n")
        suffix = trail.count(b"\n") if dels or adds else prefix
        pat_lines = prefix + dels.count(b"\n") + (suffix if dels or adds else 0)
        first_guess = first + self.in_offset
        where = used = 0
        gap = first_guess - 1 - self.frozen
        if prefix == suffix and pattern and gap >= 0 and first_guess - 1 + pat_lines <= self.nlines:
            at = self.frozen_at
            while gap > 64:
                at = _skip_re(64).match(data, at).end()  # type: ignore[union-attr]
                gap -= 64
            while gap:
                at = data.find(b"\n", at) + 1
                gap -= 1
            if data.startswith(pattern, at):
                where = first_guess
                target_at = at + len(lead)
        if not where:
            if self.off is None:
                self.off = _line_starts(data)
            same = _offsets_matcher(data, self.off, pattern)
            where, self.in_offset, used = _locate_fuzzed(
                self.nlines, same, pat_lines, first, self.in_offset, self.frozen, prefix, suffix,
                min(self.fuzz, max(prefix, suffix)))
            if not where:
                raise HunkFailed(k + 1, first + self.in_offset)
            # Under fuzz the leading context comes from the file, whatever its length.
            target_at = self.off[min(where - 1 + prefix, self.nlines)]
        if where == 1 and creating and data:
            raise HunkFailed(k + 1, 1, "creates a file that already exists")
        if dels or adds:
            target = where - 1 + prefix
            if self.frozen > target:
                raise HunkFailed(k + 1, where, "misordered hunks")
            self.out.write(self.view[self.frozen_at:target_at])
            self.out.write(adds)
            self.frozen, self.frozen_at = target + dels.count(b"\n"), target_at + len(dels)
        if (self.in_offset, used) != self.run:
            self.run = (self.in_offset, used)
            self.results.mark(k, self.in_offset, used)


def _plain_parts(buf: bytes, start: int, end: int) -> tuple[int, bytes, bytes, bytes, bytes]:
    """A plain hunk of any shape as (first old line, leading context, the changed span's old
    lines, its new lines, trailing context), contents without tags: what _SIMPLE_RE gives
    for the usual shape. Context lines inside the changed span belong to both sides."""
    m = _OLD_START_RE.match(buf, start)
    assert m is not None
    first = int(m.group(1)) + (m.group(2) is not None and int(m.group(2)) == 0)
    lines = buf[m.end():end].split(b"\n")
    lines.pop()  # each line: tag, content without its newline (plain: none lacks one)
    tags = bytes([line[0] for line in lines])
    prefix = len(tags) - len(tags.lstrip(b" "))
    if prefix == len(tags):
        return first, b"".join(line[1:] + b"\n" for line in lines), b"", b"", b""
    suffix = len(tags) - len(tags.rstrip(b" "))
    mid = lines[prefix:len(lines) - suffix]

    def side(part: list[bytes], drop: int) -> bytes:
        return b"".join(line[1:] + b"\n" for line in part if line[0] != drop)
    return (first, side(lines[:prefix], 0), side(mid, 0x2B), side(mid, 0x2D),
            side(lines[len(lines) - suffix:], 0))


@cache
def _skip_re(count: int) -> re.Pattern[bytes]:
    """Matches `count` whole lines (count <= 64: a few compiled patterns in all)."""
    return re.compile(rb"(?:[^\n]*\n){%d}" % count)


def _apply_lines(data: bytes, hunks: Iterable[Hunk], fuzz: int, path: str,
                 creating: bool) -> tuple[bytes, HunkResults]:
    """apply_hunks on a list of the file's lines: any hunk (markers, CRLF rule, edits)."""
    lines = _split_lines(data)
    out: list[bytes] = []
    results = HunkResults(path)
    in_offset = 0
    frozen = 0  # input lines already copied or deleted (GNU last_frozen_line)
    ragged = bool(lines) and not lines[-1].endswith(b"\n")
    for idx, h in enumerate(hunks, 1):
        old = h.old_lines()
        prefix, suffix = h.context()
        first = h.old_start if h.old_len else h.old_start + 1
        maxf = min(fuzz, max(prefix, suffix))
        same = _list_matcher(lines, old)
        where, in_offset, used = _locate_fuzzed(len(lines), same, len(old), first, in_offset, frozen,
                                                prefix, suffix, maxf)
        if not where:
            raise HunkFailed(idx, first + in_offset)
        if where == 1 and creating and data:
            raise HunkFailed(idx, 1, "creates a file that already exists")
        try:
            frozen = _apply_one(lines, h, where, frozen, out)
        except HunkFailed as exc:
            raise HunkFailed(idx, exc.line, exc.why) from None
        results.add(in_offset, used)
        ragged = ragged or _new_side_unterminated(h)
    out.extend(lines[frozen:])
    return (_join(out) if ragged else b"".join(out)), results


def _new_side_unterminated(h: Hunk) -> bool:
    """Whether the hunk's last new-side line is an added line without newline (only the last
    line of a side can lack one), found from the end instead of scanning every line."""
    for tag, content in reversed(h.lines):
        if tag != "-":
            return tag == "+" and not content.endswith(b"\n")
    return False


def _apply_one(lines: list[bytes], h: Hunk, where: int, frozen: int, out: list[bytes]) -> int:
    """GNU apply_hunk: copy input up to the hunk, drop '-' lines, insert '+' lines; context
    lines come from the input (they may differ under fuzz)."""
    base = where - 1
    old_i = 0
    for tag, content in h.lines:
        if tag == " ":
            old_i += 1  # copied from the input later, like GNU's copy_till
            continue
        target = base + old_i
        if frozen > target:
            raise HunkFailed(0, where, "misordered hunks")
        out.extend(lines[frozen:target])
        frozen = target
        if tag == "+":
            out.append(content)
        else:
            frozen += 1
            old_i += 1
    return frozen


def _join(chunks: list[bytes]) -> bytes:
    """Concatenate lines; a line without newline that is followed by more text gets one,
    as GNU patch's copy_till/apply_hunk do."""
    for k in range(len(chunks) - 1):
        c = chunks[k]
        if c and not c.endswith(b"\n") and chunks[k + 1]:
            chunks[k] = c + b"\n"
    return b"".join(chunks)

