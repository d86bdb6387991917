"""The test suite's CPU cost per test and per file: a pytest plugin and its report.

On 2 cores the suite is CPU-bound (both cores ~97 % busy through a run), so its wall time follows
the CPU seconds its tests cost, not their wall times (each of which includes the other worker's
load). The plugin records, per test (setup + call + teardown), the CPU seconds (user + sys) of the
pytest process and of its children that ended and were waited for (`resource.getrusage`
RUSAGE_SELF / RUSAGE_CHILDREN): subprocess runs, g++, spawned exports. Not seen: processes that
outlive the test (a Ray instance's GCS, raylet and workers until it shuts down, inductor's compile
workers); the report gives the machine's busy CPU seconds over the run (`/proc/stat`) beside the
recorded sum, and the difference is theirs (plus collection and pytest-xdist itself).

Usage (the README's test command with every test, as CI runs it, plus the plugin;
`benchmarks/RESULTS.md`, "The test suite's CPU cost"):

    PSP_RUN_SLOW=1 PSP_SUITE_CPU=/tmp/suite_cpu .venv/bin/python -m pytest -q -n 2 --dist loadfile -p benchmarks.suite_cpu
    .venv/bin/python -m benchmarks.suite_cpu /tmp/suite_cpu

Writes `$PSP_SUITE_CPU/<worker>.jsonl` (one row per test: `id`, `wall`, `self`, `children` in s)
and `$PSP_SUITE_CPU/stat.json` (the busy and idle CPU seconds of `/proc/stat` at the start and the
end of the run, from the controller). Without `PSP_SUITE_CPU` the plugin does nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import time
from pathlib import Path

import pytest

ENV = "PSP_SUITE_CPU"


def _cpu() -> tuple[float, float]:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime


def _proc_stat() -> dict[str, float]:
    """The machine's busy and idle CPU seconds since boot (`/proc/stat`'s first line)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]  # idle + iowait
    return {"busy": (sum(ticks) - idle) / hz, "idle": idle / hz, "time": time.time()}


_rows = None


def pytest_configure(config):
    if os.environ.get(ENV) and not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = Path(os.environ[ENV])
        folder.mkdir(parents=True, exist_ok=True)
        config._suite_cpu_start = _proc_stat()


def pytest_unconfigure(config):
    start = getattr(config, "_suite_cpu_start", None)
    if start is not None:
        (Path(os.environ[ENV]) / "stat.json").write_text(json.dumps({"start": start, "end": _proc_stat()}))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _rows
    if not os.environ.get(ENV):
        yield
        return
    if _rows is None:
        _rows = open(Path(os.environ[ENV]) / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.jsonl", "a")
    t0 = time.time()
    s0, c0 = _cpu()
    yield
    s1, c1 = _cpu()
    _rows.write(json.dumps({"id": item.nodeid, "wall": time.time() - t0, "self": s1 - s0, "children": c1 - c0}) + "\n")
    _rows.flush()


def report(folder: Path, top: int = 15) -> str:
    """Per-file and per-test CPU seconds of a recorded run, largest first, as Markdown lines.

    Raises:
        FileNotFoundError: `folder` holds no `<worker>.jsonl` rows.
    """
    rows = [json.loads(line) for path in sorted(folder.glob("*.jsonl")) for line in path.read_text().splitlines()]
    if not rows:
        raise FileNotFoundError(f"{folder}: no <worker>.jsonl rows; run pytest with {ENV}={folder} -p benchmarks.suite_cpu")
    per_file = collections.defaultdict(lambda: [0.0, 0.0])
    for r in rows:
        f = per_file[r["id"].split("::")[0]]
        f[0] += r["self"] + r["children"]
        f[1] += r["wall"]
    recorded = sum(v[0] for v in per_file.values())
    out = []
    stat = folder / "stat.json"
    if stat.is_file():
        s = json.loads(stat.read_text())
        busy, idle = (s["end"][k] - s["start"][k] for k in ("busy", "idle"))
        out.append(f"run: {s['end']['time'] - s['start']['time']:.0f} s wall; machine busy {busy:.0f} CPU-s, "
                   f"idle {idle:.0f} CPU-s; recorded in tests {recorded:.0f} CPU-s ({busy - recorded:.0f} not seen)")
    else:
        out.append(f"recorded in tests: {recorded:.0f} CPU-s")
    out += ["", "| file | CPU-s | test wall s |", "|---|---|---|"]
    out += [f"| {name} | {cpu:.0f} | {wall:.0f} |" for name, (cpu, wall) in sorted(per_file.items(), key=lambda kv: -kv[1][0])]
    out += ["", "| test | CPU-s (own + children) | wall s |", "|---|---|---|"]
    for r in sorted(rows, key=lambda r: -(r["self"] + r["children"]))[:top]:
        out.append(f"| {r['id']} | {r['self']:.0f} + {r['children']:.0f} | {r['wall']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.suite_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help=f"the folder the run wrote (${ENV})")
    ap.add_argument("--top", type=int, default=15, help="tests listed (default 15)")
    args = ap.parse_args(argv)
    try:
        print(report(args.folder, args.top))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
