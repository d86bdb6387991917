"""Run one memory-heavy step (a checkpoint build, an ONNX export) in a child process of its own.

Why: torch does not give the memory of a large load back to the operating system, so a step that
holds a 1.2 GB checkpoint leaves the process that ran it gigabytes larger for the rest of its life.
Run in a child, that memory ends with the child, and the parent's peak stays what its own work
needs (the first `engine.run` on the demo checkpoint: see benchmarks/RESULTS.md, "ONNX export,
first run and the test suite").

The child is a fresh interpreter started with its own entry point, `python -m reference.plumbing.child`
(`subprocess.Popen`), not `multiprocessing`'s "spawn": spawn re-imports the parent's `__main__`,
so a user's script without an `if __name__ == "__main__":` guard ran again inside the child, reached
its `engine.load` again and waited forever on the export lock its own parent held (issue 18). This
child imports only the module of the function it runs.

Protocol (POSIX; private to one parent and its child): the parent writes one frame on the child's
stdin, `(sys.path, module, qualname, args)`, and keeps stdin open while the child works (the child
stops, as on Ctrl-C, when it closes: the parent died); the child answers on a pipe of its own
(`pass_fds`) with frames `("message", m)`, ..., then `("ok", result)` or `("error", exception)`. A
frame is an 8-byte big-endian length and a pickle. Pickle is acceptable here only because each side
reads what the other wrote for it over a private pipe, in the same run: nothing is read from a file
or from anyone else.

Source: the Python standard library's `subprocess` (`Popen`, `pass_fds`), `pickle`, `signal`, and
`multiprocessing`'s own "spawn" preparation (the child gets the parent's `sys.path`).
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable

_FRAME = struct.Struct("!Q")
# Bound on one frame's declared size (the request's arguments, a message, the result): what our own
# steps send is kilobytes; a larger length means a corrupt stream, not something to allocate.
MAX_FRAME_BYTES = 256 * 2**20
# How long an interrupted parent lets its child finish its own Ctrl-C cleanup before it sends SIGTERM.
INTERRUPT_GRACE_S = 2.0
# The folder `reference/` is in: the child must import `reference.plumbing.child` before it gets the parent's
# sys.path (a checkout run without installing it).
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_PARENT_PYTHONPATH = "PSP_CHILD_PARENT_PYTHONPATH"  # the parent's PYTHONPATH, put back in the child


def _send(stream: BinaryIO, obj: Any) -> None:
    """One frame: `obj` pickled first (a failure writes nothing), then length and bytes."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_FRAME.pack(len(data)) + data)
    stream.flush()


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(stream: BinaryIO) -> Any:
    """The next frame's object.

    Raises:
        EOFError: the stream ended (before or inside a frame: the writer is gone).
        RuntimeError: a frame declaring more than `MAX_FRAME_BYTES`.
    """
    header = _read_exactly(stream, _FRAME.size)
    if len(header) < _FRAME.size:
        raise EOFError
    (n,) = _FRAME.unpack(header)
    if n > MAX_FRAME_BYTES:
        raise RuntimeError(f"a frame of {n} bytes from the other process (at most {MAX_FRAME_BYTES}): a corrupt stream")
    data = _read_exactly(stream, n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)  # noqa: S301 - written by our own parent/child over a private pipe (module docstring)


def _importable_name(fn: Callable[..., Any]) -> tuple[str, str]:
    """(module, qualname) by which the child imports `fn`.

    Raises:
        ValueError: `fn` is local, a lambda, or defined in a script run as `__main__` (the child
            never imports the parent's script).
    """
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module == "__main__":  # run with `python -m pkg.mod`: importable under its real name
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else None
    if not module or not qualname or "<" in qualname:
        raise ValueError(f"call_in_child runs a module-level function the child can import by name; {fn!r} is "
                         "local, a lambda, or defined in a script: move it into a module")
    return module, qualname


def _child_environment() -> dict[str, str]:
    """The parent's environment with the project root first on PYTHONPATH, so that `-m reference.plumbing.child`
    imports from a checkout run without installing it; the parent's own PYTHONPATH travels in
    `_PARENT_PYTHONPATH` ("+value", or "-" when it had none) and the child puts it back at its start
    (for what `fn` starts). An installed copy (the root is a site-packages folder) is found without
    it, and a site-packages folder on PYTHONPATH would come before the standard library."""
    import site

    env = dict(os.environ)
    if str(_PROJECT_ROOT) not in site.getsitepackages():
        parent = env.get("PYTHONPATH")
        env[_PARENT_PYTHONPATH] = "-" if parent is None else "+" + parent
        env["PYTHONPATH"] = os.pathsep.join([str(_PROJECT_ROOT)] + ([parent] if parent else []))
    return env


def call_in_child(fn: Callable[..., Any], args: tuple = (), on_message: Callable[[Any], None] | None = None,
                  what: str = "child process") -> Any:
    """`fn(*args, notify)` in a child process (`python -m reference.plumbing.child`); returns its result or raises its exception.

    The child never imports this process's `__main__` (a user's script runs once, guard or not); it
    gets this process's `sys.path`, environment and working folder, and not its stdin (its stdin
    is the private request pipe; `/dev/null` for `fn`).

    Args:
        fn: a module-level function (sent by module and name, imported by the child); its last
            argument, `notify(message)`, sends a picklable message to this process while it runs
            (progress, "loaded", ...).
        args: picklable arguments.
        on_message: called in this process with each message, in order, as it arrives.
        what: names the step in the error raised when the child dies without an answer.

    Returns:
        What `fn` returned (it must pickle).

    Raises:
        Whatever `fn` raised (the same exception, or a RuntimeError with its text when it does not
        pickle); RuntimeError when the child died without a word (killed, out of memory), with its
        exit code; ValueError when `fn` cannot be imported by name (`_importable_name`).
        KeyboardInterrupt here (Ctrl-C, or SIGTERM where the caller maps it; also an exception
        from `on_message`) stops the child too: it is given `INTERRUPT_GRACE_S` to finish (a Ctrl-C
        at a terminal reaches it as well), then SIGTERM, which it handles as Ctrl-C (`fn`'s cleanup
        runs), and is waited for.
    """
    module, qualname = _importable_name(fn)
    request = pickle.dumps((list(sys.path), module, qualname, tuple(args)), protocol=pickle.HIGHEST_PROTOCOL)
    read_fd, write_fd = os.pipe()
    try:
        safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # no cwd on sys.path before PYTHONPATH
        proc = subprocess.Popen([sys.executable, *safe_path, "-m", "reference.plumbing.child", str(write_fd)],
                                stdin=subprocess.PIPE, pass_fds=(write_fd,), env=_child_environment())
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the child's copy only: EOF here when it exits
    replies = os.fdopen(read_fd, "rb")
    answered = False
    try:
        try:
            proc.stdin.write(_FRAME.pack(len(request)) + request)
            proc.stdin.flush()
        except BrokenPipeError:  # died at its start: its exit code below
            pass
        try:
            while True:
                status, value = _receive(replies)
                if status != "message":
                    break
                if on_message is not None:
                    on_message(value)
            answered = True
        except EOFError:
            proc.wait()
            raise RuntimeError(f"the {what} died (exit code {proc.returncode}; out of memory?); "
                               "rerun the command") from None
    finally:
        if not answered:  # interrupted here: stop the child (it removes its temp files)
            try:
                proc.wait(timeout=INTERRUPT_GRACE_S)  # a terminal's Ctrl-C reached it too: its own cleanup first
            except subprocess.TimeoutExpired:
                proc.terminate()
        try:
            proc.stdin.close()  # the child's sign that this process is done with it
        except OSError:
            pass
        proc.wait()
        replies.close()
    if status == "error":
        raise value
    return value


# ------------------------------------------------------------------------------------------------
# The child: python -m reference.plumbing.child <reply fd>


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _watch_parent(request: BinaryIO, done: threading.Event) -> None:
    """Block until the parent closes the request pipe; if `fn` is still running then, the parent
    died (killed): stop as on Ctrl-C instead of working on for no one."""
    while request.read(4096):
        pass
    if not done.is_set():
        os.kill(os.getpid(), signal.SIGTERM)


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives a pickle round trip, else a RuntimeError with its type and text."""
    try:
        pickle.loads(pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL))  # noqa: S301 - our own bytes
        return error
    except Exception:  # noqa: BLE001 - any failure to pickle or unpickle: send the text
        return RuntimeError(f"{type(error).__name__}: {error}")


def _child_main(argv: list[str]) -> int:
    """The child: read the request from stdin, run `fn(*args, notify)`, send messages and the answer
    on the reply fd `argv[0]`. SIGTERM (the parent's way to stop it) is Ctrl-C here, so `fn`'s
    cleanup (temp files) runs. Returns the exit code (1: no request, the parent is gone)."""
    signal.signal(signal.SIGTERM, _interrupt)
    replies = os.fdopen(int(argv[0]), "wb")
    request = os.fdopen(os.dup(0), "rb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # `fn` reads no stdin (the parent's is not ours to take)
    os.close(devnull)
    parent_pythonpath = os.environ.pop(_PARENT_PYTHONPATH, None)  # `_child_environment`'s note
    if parent_pythonpath == "-":
        os.environ.pop("PYTHONPATH", None)
    elif parent_pythonpath is not None:
        os.environ["PYTHONPATH"] = parent_pythonpath[1:]
    done = threading.Event()
    lock = threading.Lock()

    def notify(message: Any) -> None:
        with lock:
            _send(replies, ("message", message))

    try:
        try:
            parent_path, module, qualname, args = _receive(request)
        except EOFError:
            return 1
        sys.path[:] = list(parent_path) + [p for p in sys.path if p not in parent_path]
        threading.Thread(target=_watch_parent, args=(request, done), daemon=True).start()
        fn = importlib.import_module(module)
        for name in qualname.split("."):
            fn = getattr(fn, name)
        answer = ("ok", fn(*args, notify))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent, which raises it
        answer = ("error", _portable(e))
    done.set()
    with lock:
        try:
            try:
                _send(replies, answer)
            except OSError:
                raise
            except Exception as e:  # noqa: BLE001 - a result that does not pickle: the error instead
                _send(replies, ("error", RuntimeError(f"{type(e).__name__}: {e}")))
            replies.close()
        except OSError:  # the parent is gone (killed): no one to answer
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
