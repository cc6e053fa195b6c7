"""An upstream kernel as a commit of the workspace's repository: made from the upstream
cache's object store when it holds the tree (packs linked, nothing copied), else from one
`git fast-import` stream straight from the tarball (no extraction, no `git add` of 70k
files). The commit message carries the tarball's digest, so a cached tag is checked."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

from fsbuild import progress, upstream
from fsbuild.errors import WorkspaceError
from fsbuild.gitio import IDENT, Started, fi_data, fi_path, git, git_out
from fsbuild.upstream import Upstream, check_member

DIGEST_TRAILER = "Fsbuild-Upstream-Digest"
PARTIAL_TRAILER = "Fsbuild-Upstream-Partial"


def upstream_commit(root: Path, meta_dir: Path, up: Upstream) -> str:
    """A new commit of `up` in the repository at `root` (store first, tarball otherwise)."""
    return from_store(root, up) or fast_import_tarball(root, meta_dir, up)


def commit_message(up: Upstream) -> bytes:
    return f"upstream {up.version}\n\n{DIGEST_TRAILER}: {up.digest}\n".encode()


def from_store(root: Path, up: Upstream) -> str | None:
    """The upstream's commit made from its tree in the upstream cache's object store (its
    packs linked in, nothing copied); None when the store does not hold it."""
    if not upstream.store_has_tree(up.store_tree):
        return None
    upstream.link_packs(root / ".git")
    return git(root, "commit-tree", up.store_tree, "-F", "-",
               input=commit_message(up)).stdout.decode().strip()


def partial_commit(root: Path, up: Upstream) -> str:
    """A commit of the upstream's partial tree (only some paths: a plain-mode rebase's);
    its message says so, and no tag names it."""
    if not upstream.store_has_tree(up.partial_tree):
        raise WorkspaceError(f"{up.tarball}: its partial tree {up.partial_tree} is not in the store")
    upstream.link_packs(root / ".git")
    msg = commit_message(up) + f"{PARTIAL_TRAILER}: {up.partial_tree}\n".encode()
    return git(root, "commit-tree", up.partial_tree, "-F", "-", input=msg).stdout.decode().strip()


def fast_import_tarball(root: Path, meta_dir: Path, up: Upstream) -> str:
    msg = commit_message(up)
    marks = meta_dir / "import.marks"
    # zlib level 1 and no deltas: the import is CPU-bound on compression otherwise
    started = Started(root, "-c", "core.compression=1", "-c", "pack.compression=1", "fast-import",
                      "--quiet", "--done", "--depth=0", "--force", f"--export-marks={marks}")
    fi = started.popen
    assert fi.stdin is not None
    try:
        files = _stream_blobs(up, fi.stdin.write)
        fi.stdin.write(b"commit refs/fsbuild/import\nmark :1\n")
        fi.stdin.write(f"author {IDENT}\ncommitter {IDENT}\n".encode() + fi_data(msg))
        for path, (mode, mark) in sorted(files.items()):
            fi.stdin.write(b"M %o :%d " % (mode, mark) + fi_path(path) + b"\n")
        fi.stdin.write(b"\ndone\n")
        fi.stdin.close()
    except BaseException:
        fi.kill()
        fi.wait()
        raise
    err = fi.stderr.read() if fi.stderr else b""
    if fi.wait() != 0:
        raise WorkspaceError(f"git fast-import of {up.tarball.name} failed: {err.decode()[-300:]}")
    commit = git_out(root, "rev-parse", "refs/fsbuild/import")
    git(root, "update-ref", "-d", "refs/fsbuild/import")
    return commit


def _stream_blobs(up: Upstream, write: Callable[[bytes], object]) -> dict[str, tuple[int, int]]:
    """Write every file of the tarball as a blob; returns path -> (mode, mark)."""
    files: dict[str, tuple[int, int]] = {}
    mark = 1
    prefix = up.topdir + "/"
    with upstream.open_tar(up.tarball) as tf, progress.bar(f"importing {up.version}") as bar:
        for m in tf:
            name = check_member(m, str(up.tarball))
            if not name.startswith(prefix):
                continue
            rel = name[len(prefix):]
            if m.isfile():  # streamed: a member is never held whole in memory
                mark += 1
                write(b"blob\nmark :%d\ndata %d\n" % (mark, m.size))
                upstream.stream_member(tf.extractfile(m) or io.BytesIO(), write, m.size, rel)
                write(b"\n")
                files[rel] = (0o100755 if m.mode & 0o100 else 0o100644, mark)
                bar.advance()
                continue
            if m.issym():
                data, mode = m.linkname.encode(), 0o120000
            elif m.islnk():
                target = files.get(check_member(tarfile.TarInfo(m.linkname), "")[len(prefix):])
                if target:
                    files[rel] = target
                continue
            else:
                continue
            mark += 1
            write(b"blob\nmark :%d\n" % mark + fi_data(data))
            files[rel] = (mode, mark)
            bar.advance()
    return files
