"""Per-process benchmarks (peak memory is per process): run one variant in a child process, and
the median of each figure over a variant's rounds."""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(argv: list[str]) -> dict | None:
    """`python <argv>` in a child process; the JSON object on the last line of its stdout, or None
    (its stderr's tail printed) when it failed."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def medians(rows: list[dict], variant: str, keys: tuple[str, ...]) -> dict[str, float]:
    """The median (upper median for an even count) of each of `keys` over the rows of `variant`."""
    mine = [r for r in rows if r["variant"] == variant]
    return {k: sorted(r[k] for r in mine)[len(mine) // 2] for k in keys}


def print_header(what: str, columns: list[str]) -> None:
    """The CPU model and flags (`reference.plumbing.platform.cpu_summary`), a line saying what ran, and a
    Markdown table header with `columns`."""
    from reference.plumbing.platform import cpu_summary

    print(f"CPU: {cpu_summary()}")
    print(f"{what}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
