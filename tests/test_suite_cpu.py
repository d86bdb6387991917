"""benchmarks.suite_cpu: the per-test CPU recorder of the suite and its report, on a pytest run of
two tiny tests in a subprocess (one burns CPU in a child process, one in its own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

from benchmarks import suite_cpu

TESTS = '''
import subprocess, sys

def test_child():
    subprocess.run([sys.executable, "-c", "sum(range(3_000_000))"], check=True)

def test_own():
    sum(range(3_000_000))
'''


def test_records_own_and_child_cpu_and_reports_per_file(tmp_path):
    (tmp_path / "test_tiny.py").write_text(TESTS)
    out = tmp_path / "cpu"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env.update({suite_cpu.ENV: str(out), "PYTHONPATH": str(REPO)})
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.suite_cpu",
                          str(tmp_path / "test_tiny.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = {r["id"].split("::")[1]: r for r in map(json.loads, (out / "main.jsonl").read_text().splitlines())}
    assert set(rows) == {"test_child", "test_own"}
    assert rows["test_child"]["children"] > 0.02 and rows["test_own"]["children"] == 0
    assert rows["test_own"]["self"] > 0.02
    stat = json.loads((out / "stat.json").read_text())
    assert stat["end"]["busy"] > stat["start"]["busy"]
    text = suite_cpu.report(out)
    assert text.startswith("run: ") and "| test_tiny.py |" in text and "test_tiny.py::test_child" in text
    assert suite_cpu.main([str(tmp_path / "empty")]) == 2
