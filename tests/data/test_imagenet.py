"""ImageNet: MLPerf preprocessing in numpy/PIL, and the tfds loader on mocked data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from batchlab import data
from batchlab.data import imagenet

LOW = (0.0 - max(imagenet.MEAN_RGB)) / min(imagenet.STDDEV_RGB)
HIGH = (255.0 - min(imagenet.MEAN_RGB)) / min(imagenet.STDDEV_RGB)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def random_pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_eval_crop_is_exact_on_a_synthetic_image():
    pixels = random_pixels(256, 320)
    # Side int(224 / 256 * 256) = 224; offsets ((256-224)+1)//2 = 16 and ((320-224)+1)//2 = 48.
    assert imagenet.center_crop_window(256, 320) == (16, 48, 224, 224)
    want = (pixels[16:240, 48:272].astype(np.float32) - np.float32(imagenet.MEAN_RGB)) / (
        np.float32(imagenet.STDDEV_RGB)
    )
    got = imagenet.preprocess_for_eval(pixels)
    assert got.shape == (224, 224, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # Lossless PNG bytes decode to the same pixels.
    np.testing.assert_array_equal(imagenet.preprocess_for_eval(encode(pixels, "PNG")), got)


def test_center_crop_window_of_a_typical_photo():
    # 375x500: side int(0.875 * 375) = 328; offsets (47+1)//2 = 24 and (172+1)//2 = 86.
    assert imagenet.center_crop_window(375, 500) == (24, 86, 328, 328)


def test_resize_bilinear_matches_tf_half_pixel_semantics():
    row = np.array([[0.0, 10.0]])[..., None]
    np.testing.assert_allclose(imagenet.resize_bilinear(row, 1, 4)[0, :, 0], [0, 2.5, 7.5, 10])
    row = np.array([[0.0, 1.0, 2.0, 3.0]])[..., None]
    np.testing.assert_allclose(imagenet.resize_bilinear(row, 1, 2)[0, :, 0], [0.5, 2.5])
    pixels = random_pixels(5, 7)
    np.testing.assert_array_equal(imagenet.resize_bilinear(pixels, 5, 7), pixels)


def test_distorted_crops_respect_the_mlperf_constraints():
    rng = np.random.default_rng(0)
    height, width = 300, 400
    fallbacks = 0
    areas = []
    for _ in range(2000):
        y, x, h, w = imagenet.sample_distorted_bounding_box(height, width, rng)
        assert 0 <= y and 0 <= x and y + h <= height and x + w <= width
        if (h, w) == (height, width):
            fallbacks += 1
            continue
        area = h * w / (height * width)
        areas.append(area)
        assert imagenet.MIN_OBJECT_COVERED <= area <= 1.0
        assert 0.75 - 0.02 <= w / h <= 4 / 3 + 0.02  # Rounding to whole pixels.
    assert fallbacks < 20
    assert min(areas) < 0.15 and max(areas) > 0.9  # The range is actually explored.


def test_crops_are_deterministic_per_seed():
    a = imagenet.sample_distorted_bounding_box(300, 400, np.random.default_rng(7))
    b = imagenet.sample_distorted_bounding_box(300, 400, np.random.default_rng(7))
    assert a == b


def test_impossible_crops_fall_back_to_the_centre_crop():
    # A 1-pixel-high strip: no 3/4..4/3 crop covers 8% of it, so every attempt fails.
    pixels = random_pixels(1, 300)
    assert imagenet.sample_distorted_bounding_box(1, 300, np.random.default_rng(0)) == (
        0,
        0,
        1,
        300,
    )
    got = imagenet.preprocess_for_train(pixels, np.random.default_rng(0))
    assert got.shape == (224, 224, 3)


def test_train_preprocessing_flips_about_half_the_time():
    pixels = random_pixels(64, 64)
    flips = 0
    for seed in range(200):
        out = imagenet.preprocess_for_train(pixels, np.random.default_rng(seed))
        assert out.shape == (224, 224, 3) and out.dtype == np.float32
        # Re-run the same draws without the flip to see whether this one flipped.
        rng = np.random.default_rng(seed)
        window = imagenet.sample_distorted_bounding_box(64, 64, rng)
        if window[2:] == (64, 64):
            window = imagenet.center_crop_window(64, 64)
        y, x, h, w = window
        plain = imagenet.normalize(imagenet.resize_bilinear(pixels[y : y + h, x : x + w], 224, 224))
        if not np.array_equal(out, plain):
            np.testing.assert_array_equal(out, plain[:, ::-1])
            flips += 1
    assert 70 < flips < 130


def test_grey_and_cmyk_jpegs_decode_to_rgb():
    grey = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    assert imagenet.decode_image(encode(grey, "JPEG")).shape == (40, 30, 3)
    buffer = io.BytesIO()
    Image.fromarray(random_pixels(20, 10)).convert("CMYK").save(buffer, format="JPEG")
    assert imagenet.decode_image(buffer.getvalue()).shape == (20, 10, 3)


def test_pipeline_on_mock_imagenet_random_arrays(tmp_path, monkeypatch):
    """tfds' random mock (decoded uint8 images of random size) through input_pipeline."""
    # tfds 4.9.10's mock sets `__getitems__` on its MagicMock as a plain attribute, so it is
    # called without `self` and fails; batch reads go through `__getitem__` here instead.
    from tensorflow_datasets.core.data_sources import base

    monkeypatch.setattr(
        base.BaseDataSource, "__getitems__", lambda self, keys: [self[k] for k in keys]
    )
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):

        def run(seed):
            with data.input_pipeline(
                "imagenet2012",
                "train",
                3,
                data_dir=tmp_path,
                seed=seed,
                decode=True,
            ) as it:
                return [next(it) for _ in range(3)]

        first, again, other = run(0), run(0), run(1)
        with data.input_pipeline(
            "imagenet2012", "validation", 4, data_dir=tmp_path, decode=True
        ) as it:
            evaluation = list(it)
    for batch in first:
        assert batch["image"].shape == (3, 224, 224, 3) and batch["image"].dtype == np.float32
        assert batch["label"].dtype == np.int32
        assert ((batch["label"] >= 0) & (batch["label"] < 1000)).all()
        assert LOW - 1e-5 <= batch["image"].min() and batch["image"].max() <= HIGH + 1e-5
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert any(
        not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other, strict=True)
    )
    assert [b["mask"].tolist() for b in evaluation] == [[True] * 4, [True, True, False, False]]


def test_pipeline_on_mock_imagenet_jpeg_bytes(tmp_path):
    """A mocked imagenet2012 whose examples are real JPEG bytes, read undecoded by tfds."""
    examples = [
        {
            "image": encode(random_pixels(60 + 7 * i, 90 - 5 * i, seed=i), "JPEG"),
            "label": i,
            "file_name": f"n{i:08d}.JPEG".encode(),
        }
        for i in range(5)
    ]
    seen_decoders = []

    def as_data_source(builder, split=None, *, decoders=None, **kwargs):
        del builder, split, kwargs
        seen_decoders.append(decoders)
        return examples

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        source = data.get_dataset("imagenet2012", "train", tmp_path)
        assert isinstance(source[0]["image"], bytes)
        with data.input_pipeline("imagenet2012", "train", 2, data_dir=tmp_path, seed=3) as it:
            batch = next(it)
    assert isinstance(seen_decoders[0]["image"], tfds.decode.SkipDecoding)
    assert batch["image"].shape == (2, 224, 224, 3)
    assert LOW - 1e-5 <= batch["image"].min() and batch["image"].max() <= HIGH + 1e-5


def test_imagenet_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'validation'\]"):
        data.get_dataset("imagenet2012", "test", tmp_path)
    with pytest.raises(ValueError, match=r"unknown keyword arguments \['resize'\]"):
        data.get_dataset("imagenet2012", "train", tmp_path, resize=256)
    with pytest.raises(FileNotFoundError, match="no array_record imagenet2012 under"):
        data.get_dataset("imagenet2012", "train", tmp_path)
