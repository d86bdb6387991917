"""Run one memory-heavy step (a checkpoint build, an ONNX export) in a spawned child process.

Why: torch does not give the memory of a large load back to the operating system, so a step that
holds a 1.2 GB checkpoint leaves the process that ran it gigabytes larger for the rest of its life.
Run in a child, that memory ends with the child, and the parent's peak stays what its own work
needs (the first `engine.run` on the demo checkpoint: see benchmarks/RESULTS.md, "ONNX export,
first run and the test suite").

Source: the Python standard library's `multiprocessing` ("spawn" start method: a fresh interpreter,
no fork of the parent's threads or memory; `Pipe`).
"""

from __future__ import annotations

from typing import Any, Callable


def _child_main(fn: Callable[..., Any], args: tuple, conn) -> None:
    """The child: `fn(*args, notify)`; its messages, then its result or exception, go back on `conn`.
    SIGTERM (the parent's way to stop it) is Ctrl-C here, so `fn`'s cleanup (temp files) runs."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        conn.send(("ok", fn(*args, lambda message: conn.send(("message", message)))))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent, which raises it
        try:
            conn.send(("error", e))
        except Exception:  # an exception that does not pickle: its text
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        conn.close()


def call_in_child(fn: Callable[..., Any], args: tuple = (), on_message: Callable[[Any], None] | None = None,
                  what: str = "child process") -> Any:
    """`fn(*args, notify)` in a spawned child process; returns its result or raises its exception.

    Args:
        fn: a module-level function (it is pickled by reference); its last argument, `notify(message)`,
            sends a picklable message to the parent while it runs (progress, "loaded", ...).
        args: picklable arguments.
        on_message: called in this process with each message, in order.
        what: names the step in the error raised when the child dies without an answer.

    Returns:
        What `fn` returned (it must pickle).

    Raises:
        Whatever `fn` raised (the same exception, or a RuntimeError with its text when it does not
        pickle); RuntimeError when the child died without a word (killed, out of memory).
        KeyboardInterrupt here (Ctrl-C, or SIGTERM where the caller maps it) stops the child too:
        it gets SIGTERM, which it handles as Ctrl-C, and is waited for.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(fn, args, send), daemon=True, name=f"psp-{what.replace(' ', '-')}")
    proc.start()
    send.close()
    answered = False
    try:
        try:
            while True:
                status, value = receive.recv()
                if status != "message":
                    break
                if on_message is not None:
                    on_message(value)
            answered = True
        except EOFError:
            proc.join()
            raise RuntimeError(f"the {what} died (exit code {proc.exitcode}; out of memory?); rerun the command") from None
    finally:
        if not answered:  # interrupted here: stop the child (it removes its temp files)
            proc.join(timeout=2)  # Ctrl-C reached the child too: let it finish its cleanup first
            if proc.is_alive():
                proc.terminate()
        proc.join()
        receive.close()
    if status == "error":
        raise value
    return value
