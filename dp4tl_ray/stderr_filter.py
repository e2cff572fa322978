"""Drop known lines from this process's native stderr (file descriptor 2), losing nothing else.

Some of Ray's notices are written by its C++ core straight to file descriptor 2, where no Python
logging filter sees them. :func:`install` routes descriptor 2 through a small child process that
copies every byte to the real stderr except whole lines matching a :data:`Rule`. Nothing else
changes: every other line and every partial line (a progress bar's ``\\r`` update, a prompt) is
passed on at once (a partial line after :data:`PARTIAL_FLUSH_S` of quiet).

The child is in a session of its own and exits when the last writer closes the pipe, so a Ctrl-C,
a ``kill`` of the process group or a crash of this process does not cut off what it wrote last: the
child still drains the pipe. At a normal exit this process hands descriptor 2 back and waits for the
child, so its last lines are out before the shell prompt.

This file is run as a script by the child (``python -I -S stderr_filter.py``: isolated, so its own folder,
which holds a ``select`` package, is not on its path): standard library only.
"""

from __future__ import annotations

import atexit
import os
import select
import subprocess
import sys
from collections.abc import Sequence

Rule = tuple[bytes, ...]  # a line is dropped when it contains every part of one rule
PARTIAL_FLUSH_S = 0.05
_CHILD: subprocess.Popen | None = None


def dropped(line: bytes, rules: Sequence[Rule]) -> bool:
    """Whether ``line`` contains every part of one of ``rules``."""
    return any(all(part in line for part in rule) for rule in rules)


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data``; False when the destination is gone (then the caller only drains)."""
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        return False
    return True


def pump(src: int, dst: int, rules: Sequence[Rule], flush_after_s: float = PARTIAL_FLUSH_S) -> None:
    """Copy ``src`` to ``dst`` until end of file, without the whole lines that match ``rules``.

    Complete lines go out as they arrive; an unfinished line goes out after ``flush_after_s`` of
    quiet (it can then no longer be dropped, which a line written in one piece never needs)."""
    pending, alive = b"", True
    while True:
        readable, _, _ = select.select([src], [], [], flush_after_s if pending else None)
        if not readable:
            alive = alive and _write_all(dst, pending)
            pending = b""
            continue
        chunk = os.read(src, 1 << 16)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not dropped(line, rules))
        if kept and alive:
            alive = _write_all(dst, kept)
    if pending and alive and not dropped(pending, rules):
        _write_all(dst, pending)


def _encode(rules: Sequence[Rule]) -> list[str]:
    """Rules as the child's arguments: one argument per rule, its parts joined by NUL-free ``\\x1f``."""
    return ["\x1f".join(part.decode() for part in rule) for rule in rules]


def _decode(args: Sequence[str]) -> list[Rule]:
    return [tuple(part.encode() for part in arg.split("\x1f")) for arg in args]


def install(rules: Sequence[Rule]) -> bool:
    """Route this process's descriptor 2 through a filter child dropping ``rules``' lines (once per
    process). Returns False, changing nothing, when the child cannot start."""
    global _CHILD
    if _CHILD is not None:
        return True
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__), *_encode(rules)],
                                 stdin=read_fd, stdout=2, stderr=2, start_new_session=True)
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        return False
    os.close(read_fd)
    saved = os.dup(2)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    _CHILD = child
    atexit.register(_hand_back, saved)
    return True


def _hand_back(saved: int, wait_s: float = 5.0) -> None:
    """Put the real stderr back on descriptor 2 and let the child write what it holds."""
    global _CHILD
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(saved, 2)
    os.close(saved)
    if _CHILD is not None:
        try:
            _CHILD.wait(timeout=wait_s)  # ends once every writer (a Ray process it started, too) has closed
        except subprocess.TimeoutExpired:
            pass
        _CHILD = None


def main(argv: Sequence[str]) -> None:
    pump(0, 1, _decode(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
