"""Ray's known-harmless notices stay off the console, and nothing else is lost: the native stderr filter
(pure pump, then a real process), the raylet's worker-pool notice, the auth notice."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from dp4tl_ray import ray_console
from dp4tl_ray.stderr_filter import dropped, pump

REPO = Path(__file__).resolve().parents[1]
RULES = ray_console.NATIVE_RULES
RAY_DATA_LINE = (b"[2026-12-06 14:23:41,131 E 2020 2020] core_worker.cc:2465: Actor with class name: "
                 b"'MapWorker(MapBatches(SurrogateEmbedder))' and ID: '1434cc' has constructor arguments in the "
                 b"object store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, "
                 b"the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")
OTHER_ACTOR_LINE = RAY_DATA_LINE.replace(b"MapWorker(MapBatches(SurrogateEmbedder))", b"KMeansShard")


def test_only_ray_datas_actor_pool_line_matches():
    assert dropped(RAY_DATA_LINE, RULES)
    assert not dropped(OTHER_ACTOR_LINE, RULES)  # the same warning for one of our own actors still shows
    assert not dropped(b"[2026-12-06 E 1 1] core_worker.cc:99: something else went wrong", RULES)


def _pumped(writes: list[bytes], pause_s: float = 0.0) -> bytes:
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    t = threading.Thread(target=pump, args=(src_r, dst_w, RULES, 0.05))
    t.start()
    for w in writes:
        os.write(src_w, w)
        time.sleep(pause_s)
    os.close(src_w)
    t.join(10)
    assert not t.is_alive()
    os.close(dst_w)
    out = b""
    while chunk := os.read(dst_r, 1 << 16):
        out += chunk
    os.close(src_r)
    os.close(dst_r)
    return out


def test_pump_drops_the_matching_lines_and_keeps_everything_else_in_order():
    out = _pumped([b"first\n", RAY_DATA_LINE + b"\n", b"sec", b"ond\n", OTHER_ACTOR_LINE + b"\n", b"no newline at the end"])
    assert out == b"first\nsecond\n" + OTHER_ACTOR_LINE + b"\nno newline at the end"


def test_pump_passes_a_partial_line_on_after_a_pause():
    """A progress bar's \\r update or a prompt is not held back waiting for a newline."""
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    t = threading.Thread(target=pump, args=(src_r, dst_w, RULES, 0.05), daemon=True)
    t.start()
    os.write(src_w, b"\r[extract] 10%")
    time.sleep(0.5)
    os.set_blocking(dst_r, False)
    assert os.read(dst_r, 100) == b"\r[extract] 10%"
    os.close(src_w)
    t.join(10)
    for fd in (src_r, dst_r, dst_w):
        os.close(fd)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)


def test_a_filtered_process_loses_nothing_else_of_its_stderr_even_when_it_crashes():
    """Native writes to descriptor 2 and Python's stderr both pass, in order, and the last words of a process
    that dies (a traceback, then an abrupt exit) still arrive: the child drains the pipe after it."""
    code = (
        "import os, sys\n"
        "from dp4tl_ray.ray_console import filter_native_notices\n"
        "assert filter_native_notices() and filter_native_notices()\n"  # once per process
        f"os.write(2, b'native before\\n' + {RAY_DATA_LINE!r} + b'\\n')\n"
        "print('python line', file=sys.stderr)\n"
        "print('stdout untouched')\n"
        "sys.stdout.flush()\n"
        "import traceback\n"
        "try:\n    raise RuntimeError('boom')\nexcept RuntimeError:\n    traceback.print_exc()\n"
        "sys.stderr.flush()\n"
        "os._exit(3)\n"  # no atexit: the child must still write what it holds
    )
    r = _run(code)
    assert r.returncode == 3
    assert r.stdout == b"stdout untouched\n"
    err = r.stderr.decode()
    assert "core_worker" not in err
    assert err.startswith("native before\npython line\nTraceback")
    assert err.rstrip().endswith("RuntimeError: boom")


def test_a_normal_exit_hands_stderr_back_with_everything_written():
    r = _run("from dp4tl_ray.ray_console import filter_native_notices; import sys\n"
             "filter_native_notices()\n"
             "sys.stderr.write('x' * 200000 + '\\nlast line\\n')\n"
             "sys.exit(2)")
    assert r.returncode == 2
    assert r.stderr == b"x" * 200000 + b"\nlast line\n"


def test_the_raylets_worker_pool_notice_is_dropped_and_its_other_lines_kept(capsys):
    import ray._private.worker as ray_worker

    # the pinned Ray's error thread looks the printer up as a module global at each call: what the wrapper relies on
    assert "print_to_stdstream" in ray_worker.listen_error_messages.__code__.co_names
    original = ray_worker.print_to_stdstream
    try:
        ray_console.drop_worker_pool_notice()
        wrapped = ray_worker.print_to_stdstream
        ray_console.drop_worker_pool_notice()  # once: not wrapped twice
        assert ray_worker.print_to_stdstream is wrapped is not original
        notice = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 127.0.0.1, "
                  "which is 4x the maximum expected startup concurrency (2).")
        ray_worker.print_to_stdstream({"lines": [notice], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        ray_worker.print_to_stdstream({"lines": ["a task died: out of memory"], "pid": "raylet", "is_err": False},
                                      ignore_prefix=False)
        out = capsys.readouterr().out
        assert "worker processes have been started" not in out
        assert "a task died: out of memory" in out
    finally:
        ray_worker.print_to_stdstream = original


def test_the_default_auth_notice_is_dropped_once_and_others_kept(caplog):
    logger = logging.getLogger(ray_console.AUTH_NOTICE_LOGGER)
    before = list(logger.filters)
    try:
        ray_console.drop_default_auth_notice()
        ray_console.drop_default_auth_notice()
        assert len(logger.filters) == len(before) + 1
        with caplog.at_level(logging.INFO, logger=ray_console.AUTH_NOTICE_LOGGER):
            logger.info(ray_console.AUTH_DEFAULT_NOTICE + " Generated a token.")
            logger.info("Could not read the token file /root/.ray/auth_token")
        messages = [r.getMessage() for r in caplog.records]
        assert messages == ["Could not read the token file /root/.ray/auth_token"]
    finally:
        logger.filters[:] = before
