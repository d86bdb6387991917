"""`export.triton_repo`: a Triton model repository from a plan's sidecar, for real (no TensorRT needed).

A sidecar written by `export.tensorrt.builder.write_plan_sidecar` plus dummy plan bytes go through the CLI; the
written `config.pbtxt` is parsed with a small protobuf-text-format parser below (the subset Triton
configs use: `key: value`, `key { ... }`, `key [ ... ]`, repeated fields) and checked field by
field, and once against the exact expected text.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reference.description import ModelDescription, read_sidecar, sidecar_path

from export import tensorrt as T
from export import triton_repo as TR

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# a protobuf text format parser for Triton configs


TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<num>-?\d+(?:\.\d+)?)'
                   r'|(?P<id>[A-Za-z_][A-Za-z0-9_]*)|(?P<p>[{}\[\]:,]))')


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = re.sub(r"#[^\n]*", "", text)
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = TOKEN.match(text, pos)
        if not m:
            raise ValueError(f"bad token at {pos}: {text[pos:pos + 20]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def parse_pbtxt(text: str) -> dict:
    """Parse protobuf text format into {field: [values]} (every field a list: repeated or not)."""
    toks = _tokens(text)
    i = 0

    def value():
        nonlocal i
        kind, tok = toks[i]
        i += 1
        if kind == "str":
            return tok[1:-1]
        if kind == "num":
            return float(tok) if "." in tok else int(tok)
        if kind == "id":
            return tok  # enum
        if tok == "{":
            return message("}")
        raise ValueError(f"unexpected {tok!r}")

    def message(end):
        nonlocal i
        msg: dict = {}
        while i < len(toks) and toks[i][1] != end:
            kind, key = toks[i]
            if kind != "id":
                raise ValueError(f"field name expected, got {key!r}")
            i += 1
            if toks[i][1] == ":":
                i += 1
            if toks[i][1] == "[":
                i += 1
                items = []
                while toks[i][1] != "]":
                    items.append(value())
                    if toks[i][1] == ",":
                        i += 1
                i += 1
                msg.setdefault(key, []).extend(items)
            else:
                msg.setdefault(key, []).append(value())
        if end is not None:
            if i >= len(toks):
                raise ValueError(f"missing {end!r}")
            i += 1
        return msg

    msg = message(None)
    if i != len(toks):
        raise ValueError("trailing tokens")
    return msg


def test_parser_on_a_triton_example():
    cfg = parse_pbtxt('name: "m"  # comment\nplatform: "tensorrt_plan"\nmax_batch_size: 8\n'
                      'input [ { name: "a" data_type: TYPE_FP32 dims: [ 16 ] }, { name: "b" dims: [-1, 2] } ]\n'
                      'dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }')
    assert cfg["name"] == ["m"] and cfg["max_batch_size"] == [8]
    assert [t["name"][0] for t in cfg["input"]] == ["a", "b"]
    assert cfg["input"][1]["dims"] == [-1, 2] and cfg["input"][0]["data_type"] == ["TYPE_FP32"]
    assert cfg["dynamic_batching"][0]["preferred_batch_size"] == [4, 8]
    with pytest.raises((ValueError, IndexError)):
        parse_pbtxt("input [ { name: \"a\" ")


# ----------------------------------------------------------------------------------------------
# fixtures: a plan sidecar from the real writer, and plan bytes


def description(n_styles: int = 18, size: int = 1024) -> ModelDescription:
    return ModelDescription(input_nc=3, label_nc=0, output_size=size, n_styles=n_styles, dataset_type="ffhq_encode",
                            checkpoint={"path": "psp_ffhq_encode.pt", "size": 1, "sha256_first_mib": "0" * 64},
                            latent_avg=[[0.0] * 512 for _ in range(n_styles)])


def write_plan(tmp_path: Path, profiles=((1, 1, 1), (2, 4, 8)), name: str = "psp.plan", n_styles: int = 18,
               size: int = 1024) -> Path:
    plan = tmp_path / name
    plan.write_bytes(b"dummy plan bytes \x00\x01\x02")
    build = {
        "tensorrt_version": "10.9.0.34", "gpu": {"name": "NVIDIA L4", "compute_capability": "8.9", "index": 0},
        "inputs": [{"name": "x", "shape": [-1, 3, 256, 256], "dtype": "float32"}],
        "outputs": [{"name": "img", "shape": [-1, 3, size, size], "dtype": "float32"},
                    {"name": "w_plus", "shape": [-1, n_styles, 512], "dtype": "float32"}],
        "profiles": [{"name": f"p{i}", "min": a, "opt": b, "max": c} for i, (a, b, c) in enumerate(profiles)],
        "flags": {"precision": "fp16"}, "build_time_s": 1.0,
    }
    T.write_plan_sidecar(plan, description(n_styles, size), {"part": "psp", "resize": False, "opset": 17}, build)
    return plan


def cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it: a fresh `python -m export.triton_repo` process."""
    return subprocess.run([sys.executable, "-m", "export.triton_repo", *args], cwd=REPO, capture_output=True, text=True)


def cli_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same CLI in this process (`main`), for the many error cases (a process costs ~2 s of imports)."""
    try:
        code = TR.main(list(args))
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["export.triton_repo", *args], code, out, err)


# ----------------------------------------------------------------------------------------------
# the repository


def test_cli_writes_a_repository(tmp_path):
    plan = write_plan(tmp_path)
    res = cli("--plan", str(plan), "--out", str(tmp_path / "repo"), "--preferred-batch", "4,8",
              "--max-queue-delay-us", "250")
    assert res.returncode == 0, res.stderr
    model = tmp_path / "repo" / "psp"
    assert (model / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert sorted(p.name for p in (model / "1").iterdir()) == ["model.plan"]   # nothing else in the version dir
    assert (model / "psp_engine.json").read_bytes() == sidecar_path(plan).read_bytes()   # the plan's sidecar
    assert read_sidecar(plan, T.PLAN_KIND)[0] == description().replace(precision="fp16")

    cfg = parse_pbtxt((model / "config.pbtxt").read_text())
    assert cfg["name"] == ["psp"] and cfg["platform"] == ["tensorrt_plan"]
    assert cfg["max_batch_size"] == [8]                   # default: the largest profile max
    (x,) = cfg["input"]
    assert (x["name"], x["data_type"], x["dims"]) == (["x"], ["TYPE_FP32"], [3, 256, 256])   # no batch dim
    outs = {o["name"][0]: o for o in cfg["output"]}
    assert outs["img"]["dims"] == [3, 1024, 1024] and outs["w_plus"]["dims"] == [18, 512]
    assert all(o["data_type"] == ["TYPE_FP32"] for o in outs.values())
    (db,) = cfg["dynamic_batching"]
    assert db["preferred_batch_size"] == [4, 8] and db["max_queue_delay_microseconds"] == [250]
    (ig,) = cfg["instance_group"]
    assert ig["kind"] == ["KIND_GPU"] and ig["profile"] == ["0", "1"]


def test_config_exact_text(tmp_path):
    plan = write_plan(tmp_path, profiles=((1, 2, 4),), n_styles=14, size=256)
    res = TR.write_triton_repo(plan, tmp_path / "repo", name="psp_256", max_batch=3, preferred_batch=[2],
                               max_queue_delay_us=100)
    assert res["max_batch"] == 3 and res["placed"] in ("hard link", "copy")
    assert res["config"].read_text() == """\
name: "psp_256"
platform: "tensorrt_plan"
max_batch_size: 3
input [
  {
    name: "x"
    data_type: TYPE_FP32
    dims: [ 3, 256, 256 ]
  }
]
output [
  {
    name: "img"
    data_type: TYPE_FP32
    dims: [ 3, 256, 256 ]
  },
  {
    name: "w_plus"
    data_type: TYPE_FP32
    dims: [ 14, 512 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 2 ]
  max_queue_delay_microseconds: 100
}
instance_group [
  {
    kind: KIND_GPU
    count: 1
    profile: [ "0" ]
  }
]
"""


def test_rerun_replaces_the_model(tmp_path):
    plan = write_plan(tmp_path)
    repo = tmp_path / "repo"
    TR.write_triton_repo(plan, repo, max_batch=4)
    plan.unlink()
    plan = write_plan(tmp_path)           # a rebuilt plan: new bytes, same name
    plan.write_bytes(b"rebuilt")
    TR.write_triton_repo(plan, repo, max_batch=8)
    assert (repo / "psp" / "1" / "model.plan").read_bytes() == b"rebuilt"
    assert parse_pbtxt((repo / "psp" / "config.pbtxt").read_text())["max_batch_size"] == [8]
    assert sorted(p.name for p in (repo / "psp").iterdir()) == ["1", "config.pbtxt", "psp_engine.json"]


def _one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    return res.stderr


def test_missing_sidecar(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"x")
    err = _one_line_error(cli("--plan", str(plan), "--out", str(tmp_path / "repo")))
    assert f"{plan}.json: the sidecar of m.plan is missing" in err and "export.tensorrt" in err
    assert not (tmp_path / "repo").exists()


def test_missing_plan(tmp_path, capsys):
    err = _one_line_error(cli_here(capsys, "--plan", str(tmp_path / "none.plan"), "--out", str(tmp_path / "repo")))
    assert "none.plan: no such plan" in err


def test_not_a_sidecar(tmp_path, capsys):
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"x")
    (tmp_path / "m.plan.json").write_text('{"hello": 1}')
    err = _one_line_error(cli_here(capsys, "--plan", str(plan), "--out", str(tmp_path / "r")))
    assert "m.plan.json: not a psp-engine sidecar of version 2" in err


def test_max_batch_above_the_profiles(tmp_path, capsys):
    plan = write_plan(tmp_path, profiles=((1, 1, 1), (2, 4, 8)))
    err = _one_line_error(cli_here(capsys, "--plan", str(plan), "--out", str(tmp_path / "repo"), "--max-batch", "16"))
    assert "--max-batch 16 is above the plan's largest profile max 8" in err and "--profile MIN,OPT,16" in err
    assert not (tmp_path / "repo").exists()


def test_batch_sizes_in_no_profile(tmp_path, capsys):
    plan = write_plan(tmp_path, profiles=((1, 1, 1), (4, 8, 8)))
    err = _one_line_error(cli_here(capsys, "--plan", str(plan), "--out", str(tmp_path / "repo")))
    assert "batch sizes [2, 3] fall in no profile" in err
    res = cli_here(capsys, "--plan", str(plan), "--out", str(tmp_path / "repo"), "--max-batch", "1")
    assert res.returncode == 0, res.stderr


def test_preferred_above_max(tmp_path, capsys):
    plan = write_plan(tmp_path)
    err = _one_line_error(cli_here(capsys, "--plan", str(plan), "--out", str(tmp_path / "repo"), "--max-batch", "4",
                              "--preferred-batch", "4,8"))
    assert "--preferred-batch [8] outside 1..4" in err


@pytest.mark.parametrize("args", [["--max-batch", "0"], ["--preferred-batch", "a"], ["--max-queue-delay-us", "-1"]])
def test_usage_errors(tmp_path, capsys, args):
    plan = write_plan(tmp_path)
    res = cli_here(capsys, "--plan", str(plan), "--out", str(tmp_path / "repo"), *args)
    assert res.returncode == 2 and "usage:" in res.stderr


def test_bad_model_name(tmp_path):
    plan = write_plan(tmp_path)
    with pytest.raises(TR.TritonRepoError, match="--name 'a/b'"):
        TR.write_triton_repo(plan, tmp_path / "repo", name="a/b")


def test_copy_when_hard_links_fail(tmp_path, monkeypatch):
    plan = write_plan(tmp_path)

    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    res = TR.write_triton_repo(plan, tmp_path / "repo")
    assert res["placed"] == "copy" and res["plan"].read_bytes() == plan.read_bytes()


def test_cli_unknown_option_first_and_interrupt(tmp_path, capsys, monkeypatch):
    """The one CLI skeleton (reference.plumbing.cli.run_cli): a mistyped option is named before a missing one,
    and Ctrl-C (or SIGTERM) exits 130 with one line."""
    res = cli_here(capsys, "--pln", "m.plan")
    assert res.returncode == 2 and "unrecognized argument --pln (did you mean --plan?)" in res.stderr

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(TR, "write_triton_repo", interrupted)
    res = cli_here(capsys, "--plan", str(write_plan(tmp_path)), "--out", str(tmp_path / "repo"))
    assert res.returncode == 130 and res.stderr.startswith("interrupted: ") and res.stderr.count("\n") == 1
