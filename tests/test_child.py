"""`reference.plumbing.child.call_in_child` as users run it (issue 18, items 2 and 8): a plain script with no
`if __name__ == "__main__":` guard, Ctrl-C and a killed parent, and the ONNX export's progress per
graph as it happens.

The child is `python -m reference.plumbing.child`: it never imports the parent's `__main__`. Under
multiprocessing "spawn" (before) the script test below hung: the child re-ran the script, reached
`engine.load` again and waited on the export lock its parent held. Scripts are real files run by a
real interpreter in a subprocess; the export runs on the session's 32 px learn_in_w checkpoint.
(Result, messages in order, the exception's type and a child that dies without a word:
tests/test_safety.py, `test_call_in_child_relays_messages_result_and_errors`.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from reference.plumbing.child import _importable_name, call_in_child

# ------------------------------------------------------------------------------------------------
# Steps run in the child (module-level: the child imports this module by name)


def _surroundings(notify) -> dict:
    """What the child sees: its `__main__`, its stdin, its sys.path."""
    return {"main": getattr(sys.modules["__main__"].__spec__, "name", None), "stdin": sys.stdin.read(),
            "path": list(sys.path), "pythonpath": os.environ.get("PYTHONPATH")}


def test_the_child_runs_its_own_entry_point_with_our_path_and_no_stdin(monkeypatch):
    """The child's `__main__` is `reference.plumbing.child` (not this process's: spawn re-imported it), it has
    this process's sys.path (a folder added here is there) and PYTHONPATH (for what it starts), and
    reads nothing from stdin, even when this process's stdin has data."""
    monkeypatch.syspath_prepend("/nonexistent/psp-test-marker")
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"the parent's input\n")
    os.close(write_fd)
    saved = os.dup(0)
    os.dup2(read_fd, 0)
    try:
        seen = call_in_child(_surroundings)
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(read_fd)
    assert seen["main"] == "reference.plumbing.child"
    assert seen["stdin"] == ""
    assert "/nonexistent/psp-test-marker" in seen["path"]
    assert seen["path"][: len(sys.path)] == sys.path
    assert seen["pythonpath"] == os.environ.get("PYTHONPATH")


def test_functions_the_child_cannot_import_are_refused():
    """A lambda, a local function or a function of a script run as `__main__` cannot be imported by
    the child: refused here with a ValueError that says what to do, before any process starts."""
    def local(notify):
        return None

    for fn in (lambda notify: None, local):
        with pytest.raises(ValueError, match="move it into a module"):
            _importable_name(fn)
    assert _importable_name(_surroundings) == (__name__, "_surroundings")


# ------------------------------------------------------------------------------------------------
# A real script interrupted: Ctrl-C, and a parent killed by SIGTERM

STEP = '''
import os, time

def work(folder, notify):
    temp = os.path.join(folder, "partial.tmp")
    open(temp, "w").close()
    notify(("started", os.getpid()))
    try:
        time.sleep(120)
    finally:
        os.remove(temp)
        open(os.path.join(folder, "cleaned"), "w").close()
'''

SCRIPT = '''
import sys
import slowstep
from reference.plumbing.child import call_in_child

try:
    call_in_child(slowstep.work, (sys.argv[1],), lambda m: print(*m, flush=True), what="slow step")
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
'''


def _start_script(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """The script (no main guard) with its step module beside it, run until its child says it
    started; returns the script's process and the child's pid."""
    (tmp_path / "slowstep.py").write_text(STEP)
    (tmp_path / "script.py").write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "script.py"), str(tmp_path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("started "), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(line.split()[1])


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_ctrl_c_in_a_script_stops_the_child_after_its_cleanup(tmp_path):
    """SIGINT to the script (only to it, as a caller's Ctrl-C handler would see it): it stops its
    child, whose cleanup runs (temp file removed), waits for it, and exits with its own handler."""
    proc, child = _start_script(tmp_path)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out.strip() == "interrupted", (out, err)
    assert (tmp_path / "cleaned").is_file() and not (tmp_path / "partial.tmp").exists()
    assert _gone(child, 5), "the child outlived the script"


@pytest.mark.slow
def test_a_killed_parent_stops_its_child(tmp_path):
    """A script killed by SIGTERM (no handler: it dies at once) leaves no child working on: the child
    sees its request pipe close, stops as on Ctrl-C and cleans up."""
    proc, child = _start_script(tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert _gone(child, 30), "the child went on after its parent died"
    assert (tmp_path / "cleaned").is_file() and not (tmp_path / "partial.tmp").exists()


# ------------------------------------------------------------------------------------------------
# engine.load from a plain script on an empty cache: runs once, and the export says what it does

LOAD_SCRIPT = '''
import time
import engine

with open({counter!r}, "a") as f:
    f.write("start\\n")
eng = engine.load({checkpoint!r}, backend="openvino", precision="fp32",
                  announce=lambda line: print(f"{{time.monotonic():.3f}} {{line}}", flush=True))
with open({counter!r}, "a") as f:
    f.write("end\\n")
'''


@pytest.fixture(scope="module")
def plain_script_run(small_w, tmp_path_factory):
    """`LOAD_SCRIPT` (no main guard) run once in a subprocess on an empty engine cache: (the
    completed process, the counter file's lines)."""
    folder = tmp_path_factory.mktemp("plain_script")
    counter = folder / "counter.txt"
    script = folder / "load.py"
    script.write_text(textwrap.dedent(LOAD_SCRIPT.format(counter=str(counter), checkpoint=str(small_w))))
    env = {**os.environ, "PSP_ENGINE_CACHE": str(folder / "cache")}
    proc = subprocess.run([sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=480)  # about 40 s on 2 idle cores; 170 s seen at load 10
    return proc, counter.read_text().splitlines() if counter.exists() else []


@pytest.mark.slow
def test_engine_load_in_a_script_without_main_guard_runs_it_once(plain_script_run):
    """`engine.load(..., backend="openvino")` on an empty cache from a script with no main guard
    returns (it hung: the spawned export child re-ran the script), and the script's body ran once."""
    proc, counter = plain_script_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert counter == ["start", "end"], "the script's body ran more than once (or not to its end)"


@pytest.mark.slow
def test_export_progress_arrives_per_graph_as_it_happens(plain_script_run):
    """The export announces each graph as it starts (with its size) and as it ends, when it happens:
    the encoder's lines arrive before the generator's export is done (they came together at the
    end), and its start line about as long before its end line as its export took."""
    proc, _ = plain_script_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    stamped = [line.split(" ", 1) for line in proc.stdout.splitlines() if re.match(r"\d+\.\d+ ", line)]
    texts = [text for _, text in stamped]
    start = next(i for i, text in enumerate(texts) if text.startswith("exporting "))
    texts, at = texts[start:start + 6], [float(t) for t, _ in stamped[start:start + 6]]
    patterns = [r"exporting \S+ to ONNX graphs in .*"]
    for part in ("encoder", "generator"):
        patterns += [rf"  {part}: exporting [\d,]+ MiB of weights to \S+\.{part}\.onnx \.\.\.",
                     rf"  {part}: \S+\.{part}\.onnx, [\d,]+ MiB, [\d.]+ s"]
    patterns.append(r"exported in [\d.]+ s .*")
    assert len(texts) == 6 and all(re.fullmatch(p, t) for p, t in zip(patterns, texts)), texts
    encoder_s, generator_s = (float(re.search(r", ([\d.]+) s$", texts[i]).group(1)) for i in (2, 4))
    assert encoder_s > 0.5 and generator_s > 0.5, texts  # a window long enough to tell the timings apart
    assert at[2] - at[1] >= 0.8 * encoder_s, "the encoder's start line came late"
    assert at[5] - at[2] >= 0.8 * generator_s, "the encoder's end line waited for the generator's export"
