"""The one path layer: every path the framework reads or writes goes through these helpers (etils.epath).

Local paths and URIs work alike: `gs://`, `s3://`, `az://`, `hf://` (epath picks tf.io.gfile when TensorFlow is
installed, else fsspec, which needs `gcsfs` / `s3fs` for the bucket stores). So a pod run can keep its data
shards, tokenizer, workdir, `init_from` checkpoints, eval data and inference inputs / outputs in a bucket.
ArrayRecord shards themselves are opened by array_record's own file layer (it reads and writes `gs://`
natively); discovery (globs, shard prefixes, directories) goes through here.

Tests use an in-memory fsspec filesystem registered for `gs://` (tests/test_fs.py shows how), so the remote
code path runs without a network.
"""
from __future__ import annotations

import builtins
import os
from collections.abc import Iterator
from typing import IO

from etils import epath

GLOB_CHARS = "*?["


def is_remote(p) -> bool:
    return "://" in os.fspath(p)


def path(p) -> epath.Path:
    return epath.Path(os.fspath(p))


def absolute(p) -> str:
    """Local paths made absolute (a later chdir cannot move them); URIs unchanged."""
    p = os.fspath(p)
    return p if is_remote(p) else os.path.abspath(p)


def join(*parts) -> str:
    return os.fspath(epath.Path(*[os.fspath(x) for x in parts]))


def dirname(p) -> str:
    return os.fspath(path(p).parent)


def exists(p) -> bool:
    return path(p).exists()


def isdir(p) -> bool:
    return path(p).is_dir()


def listdir(p) -> list[str]:
    """Sorted entry names of a directory."""
    return sorted(c.name for c in path(p).iterdir())


def makedirs(p) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def open(p, mode: str = "r") -> IO:  # noqa: A001 (the module's file opener, like os.open / io.open)
    return path(p).open(mode)


def read_bytes(p) -> bytes:
    return path(p).read_bytes()


def read_text(p) -> str:
    return path(p).read_text()


def write_bytes(p, data: bytes) -> None:
    path(p).write_bytes(data)


def write_text(p, text: str) -> None:
    path(p).write_text(text)


def copy_from_local(local: str, dst) -> None:
    """Streams a local file to dst (local or URI)."""
    import shutil
    with builtins.open(local, "rb") as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out, 16 << 20)


def has_glob(p) -> bool:
    return any(ch in os.fspath(p) for ch in GLOB_CHARS)


def glob(pattern) -> list[str]:
    """Sorted matches of a pattern whose wildcards may be in any component (`gs://b/d*/x-*`); no `**`."""
    pattern = os.fspath(pattern)
    if "**" in pattern:
        raise ValueError(f"{pattern!r}: recursive '**' globs are not supported (list each level with '*')")
    head, rest = pattern, []
    while has_glob(head):  # split off the components that hold wildcards
        head, sep, tail = head.rpartition("/")
        rest.insert(0, tail)
        if sep and not head:
            head = "/"
    if not rest:
        return [pattern] if exists(pattern) else []
    if head.endswith(":/"):  # "gs://bucket*": keep the scheme intact
        raise ValueError(f"{pattern!r}: put wildcards after the bucket name")
    base = path(head if head else ".")
    out = [os.fspath(m) for m in base.glob("/".join(rest))]
    if not head:  # relative pattern: report relative paths, as glob.glob does
        out = [os.path.relpath(m) if not is_remote(m) else m for m in out]
    return sorted(out)


def walk_files(root) -> Iterator[str]:
    """Every file under root (sorted, recursive)."""
    for dirpath, _, files in path(root).walk():
        for f in sorted(files):
            yield os.fspath(dirpath / f)


def writable_dir_error(p) -> str | None:
    """Why files cannot be written under directory p, or None. Local paths are checked without creating
    anything (the nearest existing ancestor must be a writable directory); for URIs the store decides at
    write time."""
    p = os.fspath(p)
    if is_remote(p):
        return None
    p = os.path.abspath(p)
    probe = p
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None
