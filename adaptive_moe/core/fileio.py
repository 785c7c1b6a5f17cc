"""Durable file writes: the one way this package replaces a file a reader may be looking at
(strategy tables, checkpoint markers, a training run's logs and summaries).

``atomic_write`` writes a temporary file beside the target, fsyncs it, renames it over the
target and fsyncs the directory: a crash or a full disk leaves either the old file or the
new one, never a torn one.

``check_input_file``, ``read_input`` and ``read_json`` read the files a user names on a
command line; ``check_output_dir`` and ``check_output_file`` check where one writes."""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write_synced(tmp, data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_synced(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` (created or truncated), flushed to disk.

    os.open with mode 0o666 lets the umask decide the permissions, as for any new file
    (tempfile.mkstemp would make the file readable by its owner only)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- reading what a user names -------------------------------------------------------
#
# A command line's input files may be anything a path can name: a FIFO (opening it waits
# for a writer), /dev/zero (reading it never ends), a directory, a file of random bytes or
# a JSON nested deeper than the parser's recursion. Each is refused with one message that
# names the flag and the file, before anything opens it.

MAX_INPUT_BYTES = 256 * 2**20  # the largest input file read (a corpus may be larger: not here)
MAX_JSON_BYTES = 16 * 2**20  # configs, kernel profiles, calibrations, link fits, meta.json
MAX_JSON_DEPTH = 64  # deeper than any config this package reads


def check_input_file(path: str | os.PathLike[str], flag: str, max_bytes: int | None = None) -> Path:
    """``path`` as a Path when it names an existing regular file of at most ``max_bytes``;
    else ValueError ``"<flag> <path>: <why>"``. Only stats the path (opens nothing)."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: no such file") from None
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot be read ({err.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{flag} {path}: is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{flag} {path}: not a regular file (a FIFO, device or socket)")
    if max_bytes is not None and info.st_size > max_bytes:
        raise ValueError(
            f"{flag} {path}: {info.st_size} bytes, more than the {max_bytes} this reads"
        )
    return path


def read_input(path: str | os.PathLike[str], flag: str, max_bytes: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of the regular file ``path`` (see ``check_input_file``), at most
    ``max_bytes`` even if the file grows while read."""
    path = check_input_file(path, flag, max_bytes)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot be read ({err.strerror})") from None
    if len(data) > max_bytes:
        raise ValueError(f"{flag} {path}: more than the {max_bytes} bytes this reads")
    return data


def read_json(path: str | os.PathLike[str], flag: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``: a regular UTF-8 file of at most ``max_bytes``, nested at
    most ``MAX_JSON_DEPTH`` deep; else ValueError naming the flag and the file."""
    raw = read_input(path, flag, max_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path}: not a text (UTF-8 JSON) file") from None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"{flag} {path}: JSON nested {depth} deep, more than {MAX_JSON_DEPTH}")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{flag} {path}: not valid JSON ({err})") from None


def json_depth(text: str) -> int:
    """The deepest bracket nesting of JSON ``text``, brackets inside strings not counted
    (counted before parsing: the parser itself recurses once per level)."""
    # Strings removed first (escapes included), so the brackets left are structure.
    bare = _JSON_STRING.sub("", text)
    depth = deepest = 0
    for ch in _BRACKETS.findall(bare):
        depth += 1 if ch in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


def check_output_dir(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` as a Path when it is a directory this process can write, or can be
    created as one; else ValueError naming the flag."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a directory")
    _check_writable(_existing_ancestor(path), path, flag)
    return path


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """``path`` as a Path when a file can be written there (an existing regular file is
    replaced); else ValueError naming the flag."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory; name a file")
    if path.exists() and not path.is_file():
        raise ValueError(f"{flag} {path}: exists and is not a regular file")
    parent = _existing_ancestor(path.parent)
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is not a directory")
    _check_writable(parent, path, flag)
    return path


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_writable(existing: Path, path: Path, flag: str) -> None:
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable")
