"""The README and the test suite's own messages tell the truth.

Source: issue 10 ("Docs drift"): a stale "alignment is planned" line, skips that said "set PSP_SHARED"
without saying what it is.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()


def test_shared_data_is_there(shared):
    """The shared folder holds what the tests read (`data/`, `golden/`); also the test that
    test_shared_skip_says_what_and_where runs without it."""
    assert (shared / "data").is_dir() and (shared / "golden").is_dir()


@pytest.mark.slow
def test_shared_skip_says_what_and_where(tmp_path):
    """Without the shared data, a test that needs it is skipped with what the folder is and where it comes from.

    The pytest subprocess runs test_shared_data_is_there: this file imports no torch, so the
    subprocess takes about a second, where a test file of the models takes several to import. It is not an xdist worker, so the worker's variables
    are left out (under them tests/conftest.py imports torch)."""
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("PYTEST_XDIST_")}
    env["PSP_SHARED"] = str(tmp_path / "no_shared")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          "tests/test_docs.py::test_shared_data_is_there"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    skips = [ln for ln in res.stdout.splitlines() if ln.startswith("SKIPPED")]
    assert res.returncode == 0 and skips, res.stdout[-2000:]
    for line in skips:
        assert str(tmp_path / "no_shared") in line and "comes beside the checkout" in line and "PSP_SHARED" in line


def test_readme_has_no_stale_lines_and_says_how_to_run_the_quick_set():
    assert "alignment is planned" not in README
    assert '-m "not slow"' in README and "PSP_SHARED" in README
    assert "python -m engine.cache" in README and "--all-faces" in README and "--include-extras" in README


class _Item:
    def __init__(self, name: str, slow: bool):
        self.name, self.slow = name, slow

    def get_closest_marker(self, name: str):
        return object() if name == "slow" and self.slow else None


class _Config:
    def __init__(self, file_or_dir: list, markexpr: str):
        self.option = type("Option", (), {"file_or_dir": file_or_dir, "markexpr": markexpr})()
        self.deselected = []
        self.hook = type("Hook", (), {"pytest_deselected": lambda _, items: self.deselected.extend(items)})()


def test_the_readme_command_runs_the_quick_set_and_ci_runs_every_test(monkeypatch):
    """The README's test command leaves out the tests marked `slow` (the quick set, issue 10: at most
    10 minutes on 2 cores), and says so; `.ci/run` runs the same command with `PSP_RUN_SLOW=1`, so
    CI runs them all. Naming test files or giving `-m` runs what was asked."""
    import conftest

    env = conftest.RUN_SLOW_ENV
    assert conftest.slow_tests_left_out([], "", {})
    assert conftest.slow_tests_left_out([], "", {env: "0"})
    assert not conftest.slow_tests_left_out([], "", {env: "1"})
    assert not conftest.slow_tests_left_out(["tests/test_aoti.py"], "", {})
    assert not conftest.slow_tests_left_out([], "slow", {})

    monkeypatch.delenv(env, raising=False)
    items = [_Item("quick", False), _Item("slow", True), _Item("quick2", False)]
    config = _Config([], "")
    conftest.pytest_collection_modifyitems(config, items)
    assert [i.name for i in items] == ["quick", "quick2"] and [i.name for i in config.deselected] == ["slow"]
    monkeypatch.setenv(env, "1")
    items = [_Item("quick", False), _Item("slow", True)]
    conftest.pytest_collection_modifyitems(_Config([], ""), items)
    assert [i.name for i in items] == ["quick", "slow"]

    command = "-m pytest -q -n 2 --dist loadfile"
    assert f".venv/bin/python {command}\n" in README and f"{env}=1 " in README
    assert f'{env}=1 "$venv/bin/python" {command}\n' in (REPO / ".ci" / "run").read_text()


def _layout_rows() -> list[tuple[str, str, str]]:
    """(floor, folder, what) of the README's layout table."""
    start = README.index("| floor | folder | what |")
    rows = []
    for line in README[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        floor, folder, what = (c.strip() for c in line.strip("|").split("|"))
        rows.append((floor, folder.strip("`"), what))
    return rows


def test_the_readme_layout_is_the_tree():
    """Each folder of the README's layout table exists, every module or subpackage it names in
    backticks is there, the floors are those tests/test_layering.py enforces, and every top-level
    package and subpackage of the tree has a row or is named in one (issue 19)."""
    import re

    from test_layering import FLOORS

    rows = _layout_rows()
    named = set()
    for floor, folder, what in rows:
        path = REPO / folder
        assert path.is_dir(), folder
        if folder.rstrip("/") != "tests":
            assert int(floor) == FLOORS[folder.rstrip("/").replace("/", ".")], (folder, floor)
        for name in re.findall(r"`([a-z_]+/?)`", what):
            if (path / f"{name}.py").is_file() or (path / name.rstrip("/")).is_dir():
                named.add(f"{folder}{name}".rstrip("/"))
                continue
            sub = [p for p in path.rglob(f"{name.rstrip('/')}*") if p.stem == name.rstrip("/")]
            assert sub, f"README layout: {folder} names `{name}`, which is not in the tree"
    packages = {p.parent.relative_to(REPO).as_posix() for top in FLOORS if "." not in top
                for p in (REPO / top).rglob("__init__.py")}
    listed = {f.rstrip("/") for _, f, _ in rows} | named
    assert sorted(packages - listed) == [], "packages missing from the README's layout table"


def test_where_things_are_names_real_files():
    """The README's "Where things are" paragraph: every file it names exists, and every `file::name` defines name."""
    import re

    start = README.index("**Where things are**")
    text = README[start:README.index("\n\n", start)]
    paths = re.findall(r"`((?:reference|kernels|export|engine|benchmarks|tests)/[\w/]+\.py)(?:::(\w+))?", text)
    assert len(paths) >= 8
    for path, name in paths:
        assert (REPO / path).is_file(), path
        if name:
            assert re.search(rf"^def {name}\(|^class {name}\b", (REPO / path).read_text(), re.M), f"{path}::{name}"
