"""OpenVINO's two paths in `export.backends.graph.OpenVINORunner`: the streams path (a call of >= 2
images, one image per request, several at once; opt-in) and the latency path (1 image, or streams
off: the default), and the generator compiled for a static batch (the default): the same outputs in
the same order as one image at a time."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("openvino", reason="the openvino backend is not installed")

from export.compare import assert_close  # noqa: E402


@pytest.fixture(scope="module")
def small_w_graphs(small_w):
    """The fp32 graphs of `small_w` in the session's engine cache (exported once per test run)."""
    from export.backends.graph import ReferenceLoader, cached_graphs
    from reference.plumbing.files import cache_dir

    return cached_graphs(small_w, ReferenceLoader(small_w), cache_dir() / "onnx")


@pytest.mark.slow
@pytest.mark.parametrize("static", [False, True], ids=["dynamic-generator", "static-generator"])
def test_a_batch_on_streams_equals_its_images_one_at_a_time(small_w_graphs, tmp_path, monkeypatch, static):
    """5 distinct images through 2 streams (pinned: not what this machine's cores would give) equal
    the same images through the latency path one at a time, in order (fp32 contract); a 1-image
    call takes the latency path, a 5-image call the streams path."""
    import export.backends.graph as xg

    monkeypatch.setattr(xg, "OPENVINO_STATIC_GENERATOR", static)
    model = xg.GraphPSP(small_w_graphs["encoder"], small_w_graphs["generator"], "openvino", "fp32", tmp_path,
                        threads=2, streams=2)
    assert model.generator.static_batch == (model.max_generator_batch if static else None)
    x = torch.rand(5, 3, 256, 256, generator=torch.Generator().manual_seed(20)) * 2 - 1
    singles = _batch_equals_singles(model.encode, model.encoder, x, "w_plus")
    w_plus = singles + 0.1 * torch.randn(singles.shape, generator=torch.Generator().manual_seed(21))
    _batch_equals_singles(model.synthesize, model.generator, w_plus, "img")


def _batch_equals_singles(run, runner, a: torch.Tensor, what: str) -> torch.Tensor:
    """`run` of each item alone (latency path) then of all at once (streams path): equal, in order."""
    singles = torch.cat([run(a[i : i + 1]) for i in range(len(a))])
    assert runner.last_path == "latency"
    batch = run(a)
    assert runner.last_path == "streams"
    assert_close(batch, singles, what)
    # in order: each item's output is its own, not a neighbour's (the items differ)
    assert all(not torch.allclose(singles[i], singles[i + 1]) for i in range(len(a) - 1))
    return singles


@pytest.mark.slow
def test_streams_off_runs_every_call_on_the_latency_path(small_w_graphs, tmp_path):
    """streams=1 (the default): a batch runs on the latency path, on a static batch of 2 in chunks
    with the last one padded, and gives the same outputs as the streams path of another runner of
    the same graph."""
    from export.backends.graph import openvino_runner

    w_plus = torch.randn(3, 8, 512, generator=torch.Generator().manual_seed(22)).numpy()
    latency = openvino_runner(small_w_graphs["generator"], "w_plus", "img", "fp32", tmp_path, threads=2,
                              static_batch=2)
    assert latency.streams == 1
    out = latency(w_plus)
    assert latency.last_path == "latency" and out.shape[0] == 3
    streams = openvino_runner(small_w_graphs["generator"], "w_plus", "img", "fp32", tmp_path, threads=2, streams=2)
    assert_close(torch.from_numpy(streams(w_plus)), torch.from_numpy(out), "img")
    assert streams.last_path == "streams"


def test_streams_follow_the_cores():
    """One stream per core, at most `MAX_STREAMS`; one core: no streams."""
    from export.backends.graph import MAX_STREAMS, openvino_streams

    assert openvino_streams(1) == 1
    assert openvino_streams(2) == 2
    assert openvino_streams(64) == MAX_STREAMS
