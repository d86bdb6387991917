"""reference.images: reading every image mode, the official pSp input transforms, tensor2im, atomic writes."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reference.plumbing.files import atomic_write
from reference.images import (MIN_SIZE, atomic_write_image, atomic_write_npy, couple, read_image,
                           read_input, read_label_map, tensor_to_uint8, to_input_tensor)
from reference.plumbing.errors import InputImageError

H, W = 40, 48  # odd-ish, non-square test size (>= MIN_SIZE)


def gradient_rgb(h: int = H, w: int = W) -> np.ndarray:
    """[h, w, 3] uint8 with distinct values per channel and position."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 5 % 256, y * 6 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)


def save(tmp_path: Path, name: str, im: Image.Image, **kw) -> Path:
    path = tmp_path / name
    im.save(path, **kw)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height but holds no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------------------------------
# Modes


def test_rgb_unchanged(tmp_path):
    a = gradient_rgb()
    im = read_image(save(tmp_path, "rgb.png", Image.fromarray(a)))
    assert im.mode == "RGB" and np.array_equal(np.asarray(im), a)


def test_grayscale_stays_single_channel(tmp_path):
    a = gradient_rgb()[..., 0]
    im = read_image(save(tmp_path, "l.png", Image.fromarray(a, "L")))
    assert im.mode == "L" and np.array_equal(np.asarray(im), a)


def test_one_bit(tmp_path):
    a = (gradient_rgb()[..., 0] > 100)
    im = read_image(save(tmp_path, "one.png", Image.fromarray(a).convert("1")))
    assert im.mode == "L" and set(np.unique(np.asarray(im))) == {0, 255}
    assert np.array_equal(np.asarray(im) == 255, a)


def test_rgba_is_composited_over_white(tmp_path):
    a = gradient_rgb()
    alpha = np.zeros((H, W), np.uint8)
    alpha[:, W // 3:] = 255
    alpha[:, 2 * W // 3:] = 128
    rgba = np.concatenate([a, alpha[..., None]], axis=-1)
    out = np.asarray(read_image(save(tmp_path, "rgba.png", Image.fromarray(rgba, "RGBA")))).astype(int)
    assert (out[:, : W // 3] == 255).all(), "fully transparent pixels must become white"
    assert np.array_equal(out[:, W // 3: 2 * W // 3], a[:, W // 3: 2 * W // 3])
    half = a[:, 2 * W // 3:].astype(int)
    expected = (half * 128 + 255 * 127) / 255
    assert np.abs(out[:, 2 * W // 3:] - expected).max() <= 1


def test_la_is_composited_over_white(tmp_path):
    lum = gradient_rgb()[..., 1]
    alpha = np.full((H, W), 255, np.uint8)
    alpha[: H // 2] = 0
    im = read_image(save(tmp_path, "la.png", Image.fromarray(np.stack([lum, alpha], -1), "LA")))
    assert im.mode == "L"
    out = np.asarray(im)
    assert (out[: H // 2] == 255).all() and np.array_equal(out[H // 2:], lum[H // 2:])


def test_palette_with_and_without_transparency(tmp_path):
    idx = (np.arange(H * W).reshape(H, W) % 4).astype(np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)]
    p = Image.fromarray(idx, "P")
    p.putpalette(sum(colours, ()))
    plain = np.asarray(read_image(save(tmp_path, "p.png", p)))
    assert np.array_equal(plain, np.array(colours, np.uint8)[idx])
    for name in ("pt.png", "pt.gif"):
        out = np.asarray(read_image(save(tmp_path, name, p, transparency=3)))
        assert (out[idx == 3] == 255).all(), f"{name}: transparent palette entry must become white"
        assert np.array_equal(out[idx != 3], np.array(colours, np.uint8)[idx[idx != 3]])


def test_cmyk(tmp_path):
    c = Image.fromarray(np.concatenate([gradient_rgb(), gradient_rgb()[..., :1]], -1), "CMYK")
    out = read_image(save(tmp_path, "cmyk.tif", c))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(c.convert("RGB")))


@pytest.mark.parametrize("mode, ext", [("I;16", "png"), ("I;16B", "tiff"), ("I", "tiff")])
def test_16_bit_is_scaled_not_clipped(tmp_path, mode, ext):
    v8 = gradient_rgb()[..., 2].astype(np.int64)
    v8[0, :4] = [0, 1, 254, 255]
    v16 = v8 * 257  # an 8-bit image widened to 16 bits must come back exactly
    v16[1, :3] = [128, 32896, 65535]  # 0.498 -> 0, 128.0 -> 128, max -> 255
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    src = Image.frombytes(mode, (W, H), v16.astype(dtype).tobytes())
    im = read_image(save(tmp_path, f"deep.{ext}", src))
    assert im.mode == "L"
    out = np.asarray(im).astype(np.int64)
    expected = v8.copy()
    expected[1, :3] = [0, 128, 255]
    assert np.array_equal(out, expected)


def test_32_bit_out_of_range_is_refused(tmp_path):
    big = Image.fromarray(np.full((H, W), 70000, np.int32))
    path = save(tmp_path, "big.tiff", big)
    with pytest.raises(InputImageError, match=r"big\.tiff.*outside 0\.\.65535"):
        read_image(path)


@pytest.mark.parametrize("orientation, turn", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    a = gradient_rgb()
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = np.asarray(read_image(save(tmp_path, "exif.png", Image.fromarray(a), exif=exif)))
    assert np.array_equal(out, np.rot90(a, k=turn))  # 6: shown turned 90 deg clockwise


def test_exif_orientation_jpeg(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path, "exif.jpg", Image.fromarray(gradient_rgb(60, 80)), exif=exif, quality=95)
    assert read_image(path).size == (60, 80)  # stored 80x60 landscape, shown portrait


# ------------------------------------------------------------------------------------------------
# The official transforms


def test_rgb_input_reproduces_the_official_golden_input(shared):
    golden = np.load(shared / "golden" / "public_ffhq_encode_256_seed0.npz")["inputs_rgb256_uint8"][0]
    im = read_image(shared / "data" / "faces" / "aligned" / "psp_input_img.jpg")
    x = to_input_tensor([im], label_nc=0)
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    # ToTensor + Normalize(0.5, 0.5) of the golden bytes, as the official transform computes it
    expected = (torch.from_numpy(golden).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.equal(x[0], expected)
    assert np.array_equal(np.rint((x[0].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).astype(np.uint8), golden)


def test_batch_of_different_sizes(shared):
    faces = shared / "data" / "faces" / "aligned"
    ims = [read_image(faces / n) for n in ("hyperstyle_pitt_256.jpg", "restyle_merkel_512.jpg")]
    x = to_input_tensor(ims, label_nc=0)
    assert x.shape == (2, 3, 256, 256) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[1], to_input_tensor(ims[1:], 0)[0])


def test_sketch_input(shared):
    path = shared / "data" / "sketch" / "psp_input_sketch.jpg"
    x = to_input_tensor([read_input(path, label_nc=1)], label_nc=1)
    assert x.shape == (1, 1, 256, 256) and x.dtype == torch.float32
    official = np.asarray(Image.open(path).convert("L").resize((256, 256), Image.BILINEAR)) / np.float32(255)
    assert torch.equal(x[0, 0], torch.from_numpy(official.astype(np.float32)))
    assert x.min() == 0 and x.max() == 1  # black strokes on white, no normalisation


def test_segmentation_input(shared):
    path = shared / "data" / "segmentation" / "psp_input_mask.png"
    labels = read_input(path, label_nc=19)
    assert labels.mode == "L"
    x = to_input_tensor([labels], label_nc=19)
    assert x.shape == (1, 19, 256, 256) and x.dtype == torch.float32
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(x.sum(1), torch.ones(1, 256, 256)), "exactly one class per pixel"
    # official: convert('L'), Resize((256, 256)) -- bilinear, even on class ids -- then one-hot
    ids = np.asarray(Image.open(path).convert("L").resize((256, 256), Image.BILINEAR))
    assert torch.equal(x[0].argmax(0), torch.from_numpy(ids.astype(np.int64)))
    present = {int(c) for c in torch.nonzero(x[0].sum((1, 2))).flatten()}
    assert {0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17} <= present  # the file's ids


def test_palette_label_map_keeps_indices(tmp_path):
    idx = (np.arange(H * W).reshape(H, W) % 19).astype(np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette([(i * 37) % 256 for i in range(768)])  # colours whose luminance is not the index
    m = read_label_map(save(tmp_path, "mask.png", p))
    assert m.mode == "L" and np.array_equal(np.asarray(m), idx)


def test_label_id_out_of_range(tmp_path):
    ids = np.zeros((H, W), np.uint8)
    ids[3, 4] = 19
    path = save(tmp_path, "bad_mask.png", Image.fromarray(ids, "L"))
    with pytest.raises(InputImageError, match=r"bad_mask\.png.*class id 19.*label_nc=19"):
        to_input_tensor([read_input(path, 19)], 19, names=[str(path)])
    x = to_input_tensor([read_input(path, 20)], 20)  # fine with 20 classes
    assert x.shape == (1, 20, 256, 256)


def test_16_bit_label_ids_above_255_are_reported(tmp_path):
    ids = np.zeros((H, W), np.uint16)
    ids[0, 0] = 300
    path = save(tmp_path, "mask16.png", Image.fromarray(ids))
    with pytest.raises(InputImageError, match=r"mask16\.png.*class id 300.*label_nc=19"):
        to_input_tensor([read_label_map(path)], 19, names=[str(path)])


def test_colour_label_map_is_refused(tmp_path):
    path = save(tmp_path, "colour_mask.png", Image.fromarray(gradient_rgb()))
    with pytest.raises(InputImageError, match=r"colour_mask\.png.*colour image"):
        read_label_map(path)


# ------------------------------------------------------------------------------------------------
# Bad inputs


def _truncated_jpeg(tmp_path, shared):
    data = (shared / "data" / "faces" / "aligned" / "psp_input_img.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return tmp_path / "truncated.jpg"


@pytest.mark.parametrize("case, match", [
    ("empty", "empty file"),
    ("truncated", "truncated"),
    ("text", "not an image"),
    ("tiny", "too small"),
    ("huge_header", "above the limit"),
    ("missing", "no such file"),
])
def test_bad_inputs_name_the_file(tmp_path, shared, case, match):
    if case == "empty":
        path = tmp_path / "empty.jpg"
        path.write_bytes(b"")
    elif case == "truncated":
        path = _truncated_jpeg(tmp_path, shared)
    elif case == "text":
        path = tmp_path / "notes.jpg"
        path.write_text("this is not a picture\n")
    elif case == "tiny":
        path = save(tmp_path, "tiny.png", Image.new("RGB", (1, 1)))
    elif case == "huge_header":
        # 12000x12000 = 144 M pixels: between PIL's warning and error thresholds, so only our check
        # stops it; the file has no pixel data, so a decode attempt would fail differently.
        path = png_header_only(tmp_path / "huge.png", 12000, 12000)
    else:
        path = tmp_path / "missing.png"
    with pytest.raises(InputImageError, match=match) as info:
        read_image(path)
    assert str(info.value).startswith(str(path))


def test_pixel_limit_is_configurable(tmp_path):
    path = save(tmp_path, "ok.png", Image.fromarray(gradient_rgb()))
    with pytest.raises(InputImageError, match=r"ok\.png: 48x40 = 1,920 pixels is above the limit of 1,000"):
        read_image(path, max_pixels=1000)
    assert read_image(path, max_pixels=H * W).size == (W, H)


def test_min_size(tmp_path):
    path = save(tmp_path, "thin.png", Image.fromarray(gradient_rgb(MIN_SIZE - 1, 200)))
    with pytest.raises(InputImageError, match=r"thin\.png: 200x31 is too small"):
        read_image(path)
    assert read_image(save(tmp_path, "edge.png", Image.fromarray(gradient_rgb(MIN_SIZE, MIN_SIZE)))).size == (32, 32)


# ------------------------------------------------------------------------------------------------
# Output conversion and writing


def test_tensor_to_uint8_is_official_tensor2im():
    img = torch.tensor([-2.0, -1.0, 0.0, 0.5, 0.999, 1.0, 3.0, -0.01]).reshape(1, 1, 1, 8).expand(1, 3, 1, 8)
    out = tensor_to_uint8(img)
    assert out.shape == (1, 1, 8, 3) and out.dtype == np.uint8
    # (x+1)/2*255: -> 0, 0, 127.5 -> 127 (truncated), 191.25 -> 191, 254.87 -> 254, 255, 255, 126.2 -> 126
    assert out[0, 0, :, 0].tolist() == [0, 0, 127, 191, 254, 255, 255, 126]
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=rng) * 2
    ref = x.permute(0, 2, 3, 1).numpy()  # official: numpy float32, clip, *255, astype
    ref = (ref + 1) / 2
    ref[ref < 0] = 0
    ref[ref > 1] = 1
    assert np.array_equal(tensor_to_uint8(x), (ref * 255).astype("uint8"))


def test_couple_keeps_aspect_and_puts_input_left():
    inp = np.zeros((100, 150, 3), np.uint8)
    inp[..., 0] = 200
    out = np.full((256, 256, 3), 7, np.uint8)
    c = couple(inp, out)
    assert c.shape == (256, 384 + 256, 3)
    assert np.array_equal(c[:, 384:], out) and (np.abs(c[:, :384, 0].astype(int) - 200) <= 1).all()


def _dir_names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_atomic_writes_leave_only_the_file(tmp_path):
    a = gradient_rgb()
    p = atomic_write_image(tmp_path / "sub" / "out.png", a)
    assert np.array_equal(np.asarray(Image.open(p)), a)
    n = atomic_write_npy(tmp_path / "sub" / "w.npy", np.ones((14, 512), np.float32))
    assert np.load(n).shape == (14, 512) and np.load(n).dtype == np.float32
    j = atomic_write_image(tmp_path / "sub" / "c.jpg", a)
    assert Image.open(j).format == "JPEG"
    assert _dir_names(tmp_path / "sub") == ["c.jpg", "out.png", "w.npy"]


def test_atomic_write_failure_leaves_nothing_and_keeps_the_old_file(tmp_path):
    def half_then_fail(f):
        f.write(b"partial data")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        atomic_write(tmp_path / "new.bin", half_then_fail)
    assert _dir_names(tmp_path) == []

    atomic_write_npy(tmp_path / "old.npy", np.arange(3))
    with pytest.raises(OSError, match="simulated"):
        atomic_write(tmp_path / "old.npy", half_then_fail)
    assert _dir_names(tmp_path) == ["old.npy"] and np.load(tmp_path / "old.npy").tolist() == [0, 1, 2]

    with pytest.raises(ValueError, match="unknown image extension"):
        atomic_write_image(tmp_path / "x.unknownext", gradient_rgb())
    with pytest.raises(ValueError, match="uint8"):
        atomic_write_image(tmp_path / "x.png", gradient_rgb().astype(np.float32))
    assert _dir_names(tmp_path) == ["old.npy"]
