"""Fuzz the patch parser with mutated real diffs (the repo's patches/ plus git-header
samples): every input must either parse, and then format back byte-identically, or be
refused with an FsbuildError (one line, its exit code) — never another exception.

A seeded mutator, so a failure names the seed and index that reproduce it. `make test` runs
FUZZ_COUNT (20,000) inputs; `make fuzz` runs a million: python3 tests/test_fuzz.py 1000000."""

from __future__ import annotations

import random
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script by `make fuzz`
    sys.path.insert(0, str(ROOT))

from fsbuild.errors import FsbuildError  # noqa: E402
from fsbuild.patch import format_patch, parse_patch  # noqa: E402

FUZZ_COUNT = 20_000
SEED = 0x12_0010

# Git extended headers the repo's own patches rarely carry: modes, renames, quoting, links.
SAMPLES = [
    b"diff --git a/run.sh b/run.sh\nold mode 100644\nnew mode 100755\n",
    b"diff --git a/l b/l\nnew file mode 120000\nindex 0000000..1111111\n--- /dev/null\n"
    b"+++ b/l\n@@ -0,0 +1 @@\n+target\n\\ No newline at end of file\n",
    b"diff --git a/gone.c b/gone.c\ndeleted file mode 100644\nindex 3333333..0000000\n"
    b"--- a/gone.c\n+++ /dev/null\n@@ -1,2 +0,0 @@\n-int x;\n-int y;\n",
    b"diff --git a/old.txt b/new.txt\nsimilarity index 90%\nrename from old.txt\n"
    b"rename to new.txt\n--- a/old.txt\n+++ b/new.txt\n@@ -1,2 +1,2 @@\n x\n-y\n"
    b"\\ No newline at end of file\n+z\n",
    b'diff --git "a/sp ace\\303\\251" "b/sp ace\\303\\251"\nindex 1111111..2222222 100644\n'
    b'--- "a/sp ace\\303\\251"\n+++ "b/sp ace\\303\\251"\n@@ -1 +1 @@\n-a\n+b\n',
    b"Index: linux/a.c\n===================================================================\n"
    b"--- linux.orig/a.c\t2014-01-01 00:00:00.000000000 +0000\n+++ linux/a.c\n@@ -2 +2 @@\n"
    b"-old\r\n+new\r\n",
]

TOKENS = [
    b"old mode ", b"new mode ", b"new file mode ", b"deleted file mode ", b"10064x", b"120000",
    b"100755", b"0", b'"a/x\\08"', b'"b/\\377\\7"', b"\\", b'"', b"@@ -", b" @@", b"@@ -1,3 +1,4 @@\n",
    b"@@ -0,0 +1 @@\n", b"diff --git a/x b/x\n", b"--- a/x\n+++ b/x\n", b"--- /dev/null\n",
    b"\\ No newline at end of file\n", b"\r\n", b"\r", b"\n", b"index 0000000..1111111 100644\n",
    b"rename from x\n", b"copy to y\n", b"Binary files a/x and b/x differ\n", b"9" * 30,
    b"7" * 5000, b"-", b"+", b" ", b"\t", b"\x00", b"\xff\xfe", b"../", b"/etc/passwd",
    b"1970-01-01 00:00:00", b"similarity index 100%\n", b"GIT binary patch\n",
]


def corpus() -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted((ROOT / "patches").rglob("*.patch"))]
    return [s for s in seeds if s] + SAMPLES


def _window(rng: random.Random, data: bytes, limit: int = 6000) -> bytes:
    """A slice of a seed starting at a line boundary, so big patches stay cheap to fuzz."""
    if len(data) <= limit:
        return data
    starts = [m.end() for m in re.finditer(rb"\n(?=diff |--- |@@ )", data)] or [0]
    start = rng.choice(starts)
    return data[start:start + limit]


def _line_bounds(data: bytes) -> list[int]:
    return [0] + [m.end() for m in re.finditer(rb"\n", data)]


def mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:  # replace one byte
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 1:  # insert a dictionary token
            buf[pos:pos] = rng.choice(TOKENS)
        elif op == 2:  # delete a range
            del buf[pos:pos + rng.randint(1, 64)]
        elif op in (3, 4, 5):  # line-level: delete, duplicate, swap
            bounds = _line_bounds(bytes(buf))
            if len(bounds) < 3:
                continue
            k = rng.randrange(len(bounds) - 1)
            a, b = bounds[k], bounds[k + 1]
            line = bytes(buf[a:b])
            if op == 3:
                del buf[a:b]
            elif op == 4:
                buf[a:a] = line
            else:
                j = rng.randrange(len(bounds) - 1)
                c, d = bounds[j], bounds[j + 1]
                if d <= a:
                    buf[a:b] = buf[c:d]
                    buf[c:d] = line
        elif op == 6:  # change a number
            nums = list(re.finditer(rb"\d+", bytes(buf)))
            if nums:
                m = rng.choice(nums)
                buf[m.start():m.end()] = rng.choice([b"0", b"1", b"99999", b"8", b"-1", b"9" * 40, b""])
        elif op == 7:  # splice a slice of another seed
            other = rng.choice(seeds)
            s = rng.randint(0, len(other))
            buf[pos:pos] = other[s:s + rng.randint(1, 400)]
        else:  # truncate
            del buf[pos:]
    return bytes(buf)


def inputs(count: int, seed: int = SEED) -> Iterator[tuple[int, bytes]]:
    rng = random.Random(seed)
    seeds = corpus()
    for k in range(count):
        yield k, mutate(rng, _window(rng, rng.choice(seeds)), seeds)


def check(data: bytes) -> str | None:
    """None when the parser behaved; otherwise what went wrong."""
    try:
        parsed = parse_patch(data, "fuzz.patch")
    except FsbuildError as exc:
        if "\n" in exc.message:
            return f"multi-line error: {exc.message!r}"
        return None
    except Exception as exc:  # any other exception is the bug we hunt
        return f"{type(exc).__name__}: {exc}"
    if format_patch(parsed) != data:
        return "format_patch(parse_patch(x)) != x"
    return None


def run(count: int, seed: int = SEED) -> tuple[int, list[tuple[int, str, bytes]]]:
    failures: list[tuple[int, str, bytes]] = []
    done = 0
    for k, data in inputs(count, seed):
        why = check(data)
        done += 1
        if why:
            failures.append((k, why, data))
    return done, failures


def test_seed_corpus_parses_and_round_trips() -> None:
    seeds = corpus()
    assert len(seeds) > len(SAMPLES)  # the repo's patches are there
    for data in seeds:
        assert check(data) is None


def test_fuzzed_parser_never_crashes() -> None:
    done, failures = run(FUZZ_COUNT)
    assert done == FUZZ_COUNT
    shown = [(k, why, data[:300]) for k, why, data in failures[:3]]
    assert not failures, f"{len(failures)} of {done} inputs (seed {SEED:#x}): {shown}"


def main(argv: list[str]) -> int:
    count = int(argv[1]) if len(argv) > 1 else 1_000_000
    seed = int(argv[2], 0) if len(argv) > 2 else SEED
    start = time.monotonic()
    done, failures = run(count, seed)
    for k, why, data in failures[:10]:
        print(f"input {k}: {why}\n  {data[:200]!r}")
    print(f"fuzz: {done} inputs (seed {seed:#x}), {len(failures)} failures, "
          f"{time.monotonic() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
