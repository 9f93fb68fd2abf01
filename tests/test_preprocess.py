"""Decoding, presets and metadata-driven preprocessing."""

import json

import numpy as np
import pytest
from PIL import Image

from onnxsal.errors import ImageError, MissingFileError, SizeError
from onnxsal.preprocess import Preprocess, load_image, make_spec, parse_size, prepare


def pixels():
    return (np.arange(4 * 5 * 3).reshape(4, 5, 3) * 3 % 256).astype(np.uint8)


@pytest.mark.parametrize("preset,expect", [
    ("imagenet", lambda p: (p / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])),
    ("caffe", lambda p: p[..., ::-1] - np.array([103.939, 116.779, 123.68])),
    ("tf", lambda p: p / 127.5 - 1),
    ("unit", lambda p: p / 255),
    ("raw", lambda p: p.astype(float)),
])
def test_presets(preset, expect):
    p = pixels()
    spec = Preprocess.from_preset(preset).fitted("NHWC", (4, 5), 3)
    x = spec.to_tensor(Image.fromarray(p))
    np.testing.assert_allclose(x[0], expect(p.astype(np.float64)), rtol=1e-5, atol=1e-4)
    nchw = Preprocess.from_preset(preset).fitted("NCHW", (4, 5), 3).to_tensor(Image.fromarray(p))
    np.testing.assert_allclose(nchw[0], x[0].transpose(2, 0, 1))


def test_metadata_json_round_trip_and_overrides():
    spec = Preprocess.from_json(json.dumps({"preset": "imagenet", "size": [8, 8]}))
    assert spec.mean == (0.485, 0.456, 0.406) and spec.size == (8, 8)
    assert Preprocess.from_json(spec.to_json()) == spec
    over = make_spec(mean=[0.5, 0.5, 0.5], bgr=True, base=spec)
    assert over.mean == (0.5, 0.5, 0.5) and over.std == spec.std and over.color == "BGR"


def test_formats_orientation_alpha_and_grayscale(tmp_path):
    p = pixels()
    for ext in ("png", "jpg", "bmp", "tiff", "webp"):
        Image.fromarray(p).save(tmp_path / f"a.{ext}")
        assert load_image(tmp_path / f"a.{ext}").size == (5, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(p).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (4, 5)
    rgba = np.zeros((4, 5, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert np.all(np.asarray(load_image(tmp_path / "clear.png")) == 255)  # transparent -> white
    spec = Preprocess.from_preset("unit").fitted("NCHW", (4, 5), 1)
    prep = prepare(tmp_path / "a.png", spec, layout="NCHW", channels=1, size=(4, 5))
    assert prep.tensor.shape == (1, 1, 4, 5) and "grayscale" in prep.notes[0]
    Image.fromarray(p[..., 0]).save(tmp_path / "gray.png")
    spec3 = Preprocess.from_preset("unit").fitted("NCHW", (4, 5), 3)
    prep = prepare(tmp_path / "gray.png", spec3, layout="NCHW", channels=3, size=(4, 5))
    assert prep.tensor.shape == (1, 3, 4, 5) and "RGB" in prep.notes[0]


def test_transparency_is_flattened_onto_white_and_said(tmp_path):
    """pytorch-grad-cam's recipes drop the alpha channel and keep whatever colour a transparent pixel
    holds; onnxsal puts it on white, and says so when some pixel is transparent."""
    p = pixels()
    alpha = np.full((4, 5), 255, np.uint8)
    alpha[1:3, 1:4] = 0
    spec = Preprocess.from_preset("raw").fitted("NCHW", (4, 5), 3)
    Image.fromarray(np.dstack([p, alpha]), "RGBA").save(tmp_path / "cut.png")
    prep = prepare(tmp_path / "cut.png", spec, layout="NCHW", channels=3, size=(4, 5))
    want = np.where(alpha[..., None] == 0, 255, p).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(prep.tensor[0], want)
    assert prep.notes == ["flattened the image's transparent pixels onto white"]
    Image.fromarray(np.dstack([p, np.full((4, 5), 255, np.uint8)]), "RGBA").save(tmp_path / "opaque.png")
    assert prepare(tmp_path / "opaque.png", spec, layout="NCHW", channels=3, size=(4, 5)).notes == []
    grey = Image.fromarray(np.dstack([p[..., 0], alpha]), "LA")
    grey.save(tmp_path / "grey.png")
    prep = prepare(tmp_path / "grey.png", spec, layout="NCHW", channels=3, size=(4, 5))
    assert prep.notes == ["flattened the image's transparent pixels onto white",
                          "converted the grayscale image to RGB for this 3-channel model"]
    np.testing.assert_array_equal(prep.tensor[0, 0], np.where(alpha == 0, 255, p[..., 0]))


def test_an_animation_or_a_stack_reads_its_first_frame_and_says_so(tmp_path):
    p = pixels()
    spec = Preprocess.from_preset("unit").fitted("NCHW", (4, 5), 3)
    frames = [Image.fromarray(p), Image.fromarray(255 - p), Image.fromarray(p // 2)]
    for ext in ("gif", "tiff"):
        frames[0].save(tmp_path / f"many.{ext}", save_all=True, append_images=frames[1:])
        prep = prepare(tmp_path / f"many.{ext}", spec, layout="NCHW", channels=3, size=(4, 5))
        assert "read the first of the image's 3 frames" in prep.notes
        first = spec.to_tensor(load_image(tmp_path / f"many.{ext}"))
        np.testing.assert_allclose(prep.tensor, first)
        if ext == "tiff":                  # lossless: the first frame's own pixels
            np.testing.assert_allclose(prep.tensor, spec.to_tensor(Image.fromarray(p)), atol=1e-6)
    Image.fromarray(p).save(tmp_path / "one.png")
    assert prepare(tmp_path / "one.png", spec, layout="NCHW", channels=3, size=(4, 5)).notes == []


def test_resize_to_model_size(tmp_path):
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "big.png")
    spec = Preprocess.from_preset("unit").fitted("NCHW", (8, 8), 3)
    prep = prepare(tmp_path / "big.png", spec, layout="NCHW", channels=3, size=(8, 8))
    assert prep.tensor.shape == (1, 3, 8, 8) and prep.display.shape == (40, 30, 3)


def test_bad_inputs(tmp_path):
    spec = Preprocess.from_preset("unit").fitted("NCHW", (4, 5), 3)
    with pytest.raises(MissingFileError):
        prepare(tmp_path / "none.png", spec, layout="NCHW", channels=3, size=(4, 5))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="cannot read"):
        prepare(tmp_path / "bad.png", spec, layout="NCHW", channels=3, size=(4, 5))
    np.save(tmp_path / "x.npy", np.zeros((3, 7, 7), np.float32))
    with pytest.raises(ImageError, match="shape"):
        prepare(tmp_path / "x.npy", spec, layout="NCHW", channels=3, size=(4, 5))
    np.save(tmp_path / "ok.npy", np.ones((3, 4, 5), np.float32))
    assert prepare(tmp_path / "ok.npy", spec, layout="NCHW", channels=3, size=(4, 5)).tensor.shape == (1, 3, 4, 5)
    Image.fromarray(pixels()).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="preprocess"):
        prepare(tmp_path / "a.png", None, layout="NCHW", channels=3, size=(4, 5))
    with pytest.raises(SizeError, match="--size must look like 224x224, not 'big'"):
        parse_size("big")
    assert parse_size("224x200") == (224, 200) and parse_size("96") == (96, 96)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_a_uint8_pixel_array_is_an_image(layout):
    """np.asarray(Image.open(...)) is an image's pixels: taken as a preprocessed tensor, a
    channels-last model of the same size got 0-255 where it expects -1..1."""
    p = pixels()
    spec = Preprocess.from_preset("tf").fitted(layout, (4, 5), 3)
    want = spec.to_tensor(Image.fromarray(p))
    for arr in (p, p[:, :, :1], p[:, :, 0], p[None]):    # RGB, greyscale with or without its axis, a batch of one
        prep = prepare(arr, spec, layout=layout, channels=3, size=(4, 5))
        ref = want if arr.shape[-1] == 3 else \
            spec.to_tensor(Image.fromarray(p[:, :, 0]).convert("RGB"))
        np.testing.assert_allclose(prep.tensor, ref)
        assert "took the uint8 (H, W[, C]) array as an image's pixels" in prep.notes
    big = np.repeat(np.repeat(p, 2, axis=0), 2, axis=1)       # resized to the model's size, as a file is
    assert prepare(big, spec, layout=layout, channels=3, size=(4, 5)).tensor.shape == want.shape
    if layout == "NHWC":                 # a float array stays an already preprocessed input
        x = (p / 127.5 - 1).astype(np.float32)
        np.testing.assert_array_equal(prepare(x, spec, layout=layout, channels=3, size=(4, 5)).tensor[0], x)
    with pytest.raises(ImageError, match="preprocess"):
        prepare(p, None, layout=layout, channels=3, size=(4, 5))


def test_pixel_arrays_with_alpha_are_images_flattened_onto_white(tmp_path):
    """np.asarray of an RGBA or grey + alpha PNG: read as the file is (alpha onto white), unless the
    model itself takes four (or two) channels, where the array is its own tensor."""
    p = pixels()
    alpha = np.full(p.shape[:2] + (1,), 255, np.uint8)
    alpha[0, 0] = 0                                       # one transparent pixel: white there
    spec = Preprocess.from_preset("unit").fitted("NCHW", (4, 5), 3)
    for arr, mode in ((np.concatenate([p, alpha], axis=2), "RGBA"),
                      (np.concatenate([p[:, :, :1], alpha], axis=2), "LA")):
        prep = prepare(arr, spec, layout="NCHW", channels=3, size=(4, 5))
        Image.fromarray(arr, mode).save(tmp_path / f"{mode}.png")        # the same pixels as a file on disk
        want = prepare(tmp_path / f"{mode}.png", spec, layout="NCHW", channels=3, size=(4, 5)).tensor
        np.testing.assert_array_equal(prep.tensor, want)
        assert prep.tensor[0, :, 0, 0].tolist() == [1.0, 1.0, 1.0]
        assert "took the uint8 (H, W[, C]) array as an image's pixels" in prep.notes
    four = np.concatenate([p, alpha], axis=2)[None]      # a 4-channel uint8 NHWC model's own input
    prep4 = prepare(four, None, layout="NHWC", channels=4, size=(4, 5))
    np.testing.assert_array_equal(prep4.tensor, four)


def test_an_encoded_image_s_bytes_or_open_file_is_read_as_the_file(tmp_path):
    """A service holds an upload as bytes or a file object: both read as the file on disk would."""
    import io

    Image.fromarray(pixels()).save(tmp_path / "a.png")
    spec = Preprocess.from_preset("imagenet").fitted("NCHW", (4, 5), 3)
    want = prepare(tmp_path / "a.png", spec, layout="NCHW", channels=3, size=(4, 5))
    data = (tmp_path / "a.png").read_bytes()
    with open(tmp_path / "a.png", "rb") as f:
        for given in (data, bytearray(data), io.BytesIO(data), f):
            got = prepare(given, spec, layout="NCHW", channels=3, size=(4, 5))
            np.testing.assert_array_equal(got.tensor, want.tensor)
            np.testing.assert_array_equal(got.display, want.display)
            assert got.name == "image"
    with pytest.raises(ImageError, match="cannot read the image bytes as an image"):
        prepare(b"not an image", spec, layout="NCHW", channels=3, size=(4, 5))
    with pytest.raises(ImageError, match="cannot read the image file given as an image"):
        prepare(io.BytesIO(b"GIF89a truncated"), spec, layout="NCHW", channels=3, size=(4, 5))


def test_deep_greyscale_is_scaled_not_clipped(tmp_path):
    """16-bit PNG/TIFF, 32-bit integer and float images: Pillow's own convert clips them at 255."""
    deep = (np.arange(4 * 5).reshape(4, 5) * 3000 + 7).astype(np.uint16)  # 7 .. 57007, most above 255
    Image.fromarray(deep).save(tmp_path / "d16.png")
    Image.fromarray(deep).save(tmp_path / "d16.tif")
    Image.fromarray(deep.astype(np.int32), "I").save(tmp_path / "d32.tif")
    Image.fromarray(deep.astype(np.float32) / 65535).save(tmp_path / "df.tif")
    want = deep / 65535
    for name in ("d16.png", "d16.tif", "d32.tif", "df.tif"):
        for channels in (1, 3):
            spec = Preprocess.from_preset("unit").fitted("NCHW", (4, 5), channels)
            prep = prepare(tmp_path / name, spec, layout="NCHW", channels=channels, size=(4, 5))
            assert prep.tensor.shape == (1, channels, 4, 5)
            for c in range(channels):   # the full depth survives: steps of 3000/65535, finer than 1/255 apart
                np.testing.assert_allclose(prep.tensor[0, c], want, rtol=0, atol=1e-6)
            assert "full depth" in prep.notes[0]
            assert prep.display.shape == (4, 5, 3)
            np.testing.assert_allclose(prep.display[..., 0], np.round(want * 255), atol=1)
    from_pil = prepare(Image.fromarray(deep), spec, layout="NCHW", channels=3, size=(4, 5))   # the API's PIL input
    np.testing.assert_allclose(from_pil.tensor[0, 2], want, rtol=0, atol=1e-6)
    # resized at full depth: a 16-bit ramp halves to the mean of neighbours, not to 255
    ramp = np.tile((np.arange(8) * 8000).astype(np.uint16), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    spec = Preprocess.from_preset("raw").fitted("NCHW", (4, 4), 1)
    x = prepare(tmp_path / "ramp.png", spec, layout="NCHW", channels=1, size=(4, 4)).tensor[0, 0]
    expect = Preprocess.from_preset("raw").fitted("NCHW", (4, 4), 1).to_tensor(
        Image.fromarray((ramp * (255 / 65535)).astype(np.float32), "F"))[0, 0]
    np.testing.assert_allclose(x, expect, rtol=1e-6)
    assert x.max() < 255 and x.min() > 0


def test_deep_images_without_a_known_scale_are_refused(tmp_path):
    Image.fromarray(np.full((4, 5), 3.5, np.float32)).save(tmp_path / "hu.tif")
    Image.fromarray(np.full((4, 5), -1000, np.int32), "I").save(tmp_path / "neg.tif")
    spec = Preprocess.from_preset("unit").fitted("NCHW", (4, 5), 1)
    with pytest.raises(ImageError, match=r"floating-point image with values from 3.5 to 3.5, outside 0 to 1"):
        prepare(tmp_path / "hu.tif", spec, layout="NCHW", channels=1, size=(4, 5))
    with pytest.raises(ImageError, match=r"32-bit integer image .* outside 0 to 65535"):
        prepare(tmp_path / "neg.tif", spec, layout="NCHW", channels=1, size=(4, 5))


def test_very_large_images_read_or_are_refused_in_one_line(tmp_path, monkeypatch):
    """Pillow warns between its limit and twice it (a 100-megapixel photo) and refuses beyond."""
    import warnings

    from PIL import Image

    path = tmp_path / "big.png"
    Image.new("RGB", (60, 50), (10, 20, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)          # 3000 pixels: over it, under twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).size == (60, 50)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match=r"cannot read .*big.png: Image size \(3000 pixels\) exceeds limit of 2000 "
                                         r"pixels.*downscale it first"):
        load_image(path)
