"""ImageNet (ILSVRC 2012) with the MLPerf ResNet-50 v1.5 preprocessing, in numpy and PIL.

The paper (Nado et al., 2021, Appendix B.1) uses the MLPerf closed-division pipeline:
``tf.image.sample_distorted_bounding_box`` -> ``decode_and_crop_jpeg`` -> ``resize`` ->
``random_flip_left_right`` -> normalise. This module re-implements those steps without
TensorFlow:

* Training: a random crop with TF's sampling semantics (whole image as the only bounding box,
  ``min_object_covered=0.1``, ``aspect_ratio_range=(3/4, 4/3)``, ``area_range=(0.08, 1.0)``,
  ``max_attempts=10``; if no attempt succeeds, or the crop is the whole image, fall back to the
  evaluation centre crop), bilinear resize to 224x224, a horizontal flip with probability 1/2,
  then ``(x - MEAN_RGB) / STDDEV_RGB``.
* Evaluation: centre crop of side ``int(224 / (224 + 32) * min(height, width))``, offset
  ``((side_difference + 1) // 2)``, bilinear resize to 224x224, normalise.

Resizing follows ``tf.image.resize(method='bilinear')``: half-pixel centres and no
anti-aliasing (PIL's bilinear filter anti-aliases when it shrinks, which would change pixels).
JPEG decoding is PIL's (libjpeg); TF's decoder may differ in the last bit on some pixels.

Randomness comes only from the ``np.random.Generator`` passed in (the batch iterator seeds it
from ``(seed, epoch, index)``), so a pipeline is reproducible.
"""

from __future__ import annotations

import io
import logging
import math
import os
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

NAME = "imagenet2012"
IMAGE_SIZE = 224
CROP_PADDING = 32
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
NUM_CLASSES = 1000
SPLIT_SIZES = {"train": 1_281_167, "validation": 50_000}

# tf.image.sample_distorted_bounding_box arguments of the MLPerf v0.7 ResNet reference.
MIN_OBJECT_COVERED = 0.1
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
AREA_RANGE = (0.08, 1.0)
MAX_ATTEMPTS = 10

Window = tuple[int, int, int, int]  # (offset_y, offset_x, height, width)


def decode_image(image: bytes | np.ndarray) -> np.ndarray:
    """Returns an RGB uint8 array (H, W, 3) from encoded bytes or an array.

    Args:
      image: JPEG/PNG bytes (grey-scale and CMYK are converted), or an (H, W), (H, W, 1) or
        (H, W, 3) uint8 array.

    Returns:
      uint8 array of shape (H, W, 3).
    """
    if isinstance(image, bytes | bytearray | memoryview):
        from PIL import Image  # Pillow: only needed to decode.

        with Image.open(io.BytesIO(bytes(image))) as pil:
            return np.asarray(pil.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"image must have shape (H, W, 1|3); got {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array.astype(np.uint8, copy=False)


def _lrint(x: float) -> int:
    # TF's kernel rounds with C's lrintf: to nearest, ties to even, like Python's round().
    return int(round(x))


def _random_crop_attempt(
    height: int,
    width: int,
    aspect_ratio: float,
    area_range: tuple[float, float],
    rng: np.random.Generator,
) -> Window | None:
    """One attempt of TF's GenerateRandomCrop: sample a height, derive the width, place it."""
    min_area = area_range[0] * width * height
    max_area = area_range[1] * width * height
    crop_height = _lrint(math.sqrt(min_area / aspect_ratio))
    max_height = _lrint(math.sqrt(max_area / aspect_ratio))
    if _lrint(max_height * aspect_ratio) > width:
        # The largest height whose rounded width still fits.
        max_height = int((width + 0.5 - 1e-7) / aspect_ratio)
        if _lrint(max_height * aspect_ratio) > width:
            max_height -= 1
    max_height = min(max_height, height)
    crop_height = min(crop_height, max_height)
    if crop_height < max_height:
        crop_height += int(rng.integers(0, max_height - crop_height + 1))
    crop_width = _lrint(crop_height * aspect_ratio)
    area = crop_width * crop_height
    # Tolerate rounding that leaves the area just outside the range.
    if area < min_area:
        crop_height += 1
        crop_width = _lrint(crop_height * aspect_ratio)
        area = crop_width * crop_height
    if area > max_area:
        crop_height -= 1
        crop_width = _lrint(crop_height * aspect_ratio)
        area = crop_width * crop_height
    if (
        area < min_area
        or area > max_area
        or crop_width > width
        or crop_height > height
        or crop_width <= 0
        or crop_height <= 0
    ):
        return None
    offset_y = int(rng.integers(0, height - crop_height)) if crop_height < height else 0
    offset_x = int(rng.integers(0, width - crop_width)) if crop_width < width else 0
    return offset_y, offset_x, crop_height, crop_width


def sample_distorted_bounding_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    min_object_covered: float = MIN_OBJECT_COVERED,
    aspect_ratio_range: tuple[float, float] = ASPECT_RATIO_RANGE,
    area_range: tuple[float, float] = AREA_RANGE,
    max_attempts: int = MAX_ATTEMPTS,
) -> Window:
    """Samples a crop window like ``tf.image.sample_distorted_bounding_box`` (whole-image box).

    Each attempt draws an aspect ratio uniformly from ``aspect_ratio_range``, a height uniformly
    between the heights that give ``area_range`` of the image at that ratio, and a uniform
    offset. It is accepted when it covers at least ``min_object_covered`` of the image.

    Args:
      height: image height in pixels.
      width: image width in pixels.
      rng: source of randomness.
      min_object_covered: minimum fraction of the (whole-image) box the crop must cover.
      aspect_ratio_range: width / height range of the crop.
      area_range: crop area as a fraction of the image area.
      max_attempts: attempts before giving up.

    Returns:
      ``(offset_y, offset_x, crop_height, crop_width)``; the whole image when every attempt
      fails (as TF does).
    """
    for _ in range(max_attempts):
        aspect_ratio = float(rng.uniform(aspect_ratio_range[0], aspect_ratio_range[1]))
        window = _random_crop_attempt(height, width, aspect_ratio, area_range, rng)
        if window is None:
            continue
        covered = (window[2] * window[3]) / float(height * width)
        if covered >= min_object_covered:
            return window
    return 0, 0, height, width


def center_crop_window(
    height: int, width: int, image_size: int = IMAGE_SIZE, crop_padding: int = CROP_PADDING
) -> Window:
    """Returns the MLPerf evaluation crop: a centred square of the shorter side's 224/256.

    Args:
      height: image height.
      width: image width.
      image_size: output size (224).
      crop_padding: the padding that defines the crop fraction (32, i.e. 224/256).

    Returns:
      ``(offset_y, offset_x, side, side)``.
    """
    # At least one pixel, so a degenerate 1-pixel-high image still yields a crop.
    side = max(1, int((image_size / (image_size + crop_padding)) * min(height, width)))
    return ((height - side) + 1) // 2, ((width - side) + 1) // 2, side, side


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale = in_size / out_size
    centres = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    floor = np.floor(centres)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(centres), in_size - 1).astype(np.intp)
    frac = (centres - floor).astype(np.float32)
    return lower, upper, frac


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes like ``tf.image.resize(..., method='bilinear')`` (half-pixel, no antialias).

    Args:
      image: (H, W, C) array.
      height: output height.
      width: output width.

    Returns:
      float32 array (height, width, C). Same-size resizing returns the input unchanged.
    """
    image = np.asarray(image, dtype=np.float32)
    top, bottom, dy = _bilinear_taps(image.shape[0], height)
    rows = image[top] + (image[bottom] - image[top]) * dy[:, None, None]
    left, right, dx = _bilinear_taps(image.shape[1], width)
    resized: np.ndarray = rows[:, left] + (rows[:, right] - rows[:, left]) * dx[None, :, None]
    return resized


def normalize(image: np.ndarray) -> np.ndarray:
    """Returns ``(image - MEAN_RGB) / STDDEV_RGB`` as float32."""
    mean = np.asarray(MEAN_RGB, np.float32)
    std = np.asarray(STDDEV_RGB, np.float32)
    return ((np.asarray(image, np.float32) - mean) / std).astype(np.float32, copy=False)


def _crop(image: np.ndarray, window: Window) -> np.ndarray:
    y, x, h, w = window
    return image[y : y + h, x : x + w]


def preprocess_for_eval(image: bytes | np.ndarray, *, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Centre crop (224/256 of the shorter side), bilinear resize, normalise.

    Args:
      image: encoded bytes or an RGB uint8 array.
      image_size: output side.

    Returns:
      float32 (image_size, image_size, 3), normalised by MEAN_RGB / STDDEV_RGB.
    """
    pixels = decode_image(image)
    window = center_crop_window(pixels.shape[0], pixels.shape[1], image_size)
    return normalize(resize_bilinear(_crop(pixels, window), image_size, image_size))


def preprocess_for_train(
    image: bytes | np.ndarray, rng: np.random.Generator, *, image_size: int = IMAGE_SIZE
) -> np.ndarray:
    """Random distorted crop, bilinear resize, random horizontal flip, normalise.

    Args:
      image: encoded bytes or an RGB uint8 array.
      rng: the example's random generator.
      image_size: output side.

    Returns:
      float32 (image_size, image_size, 3), normalised by MEAN_RGB / STDDEV_RGB.
    """
    pixels = decode_image(image)
    height, width = pixels.shape[:2]
    window = sample_distorted_bounding_box(height, width, rng)
    if window[2:] == (height, width):
        # MLPerf: a crop equal to the whole image (no attempt succeeded) becomes the eval crop.
        window = center_crop_window(height, width, image_size)
    resized = resize_bilinear(_crop(pixels, window), image_size, image_size)
    if rng.random() < 0.5:
        resized = resized[:, ::-1]
    return normalize(resized)


def train_preprocess(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Pipeline form of :func:`preprocess_for_train`: {'image', 'label'} -> float32 / int32."""
    return {
        "image": preprocess_for_train(example["image"], rng),
        "label": np.int32(example["label"]),
    }


def eval_preprocess(example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Pipeline form of :func:`preprocess_for_eval` (``rng`` unused)."""
    del rng
    return {"image": preprocess_for_eval(example["image"]), "label": np.int32(example["label"])}


def data_source(
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    manual_dir: str | os.PathLike[str] | None = None,
    decode: bool = False,
) -> Any:
    """Returns tfds' random-access source for imagenet2012 (array_record, no TensorFlow).

    Reading a prepared dataset needs no TensorFlow. Preparing it (``manual_dir`` holding
    ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar``) runs tfds' own imagenet2012
    builder, which imports TensorFlow: do that once on a machine that has it. A TFRecord copy
    can be converted with ``tfds convert_format``.

    Args:
      split: 'train' or 'validation'.
      data_dir: tfds data folder holding ``imagenet2012/<version>``.
      manual_dir: folder with the ImageNet tar files; when given, the dataset is prepared if
        missing. When None, it must already be prepared.
      decode: False returns the JPEG bytes under 'image' (decoded later by PIL in
        preprocessing); True lets tfds decode them into uint8 arrays.

    Returns:
      A source with ``len`` and ``__getitem__`` -> {'image', 'label', 'file_name'}.
    """
    import tensorflow_datasets as tfds

    download_and_prepare_kwargs = {}
    if manual_dir is not None:
        download_and_prepare_kwargs["download_config"] = tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual_dir)
        )
    try:
        return tfds.data_source(
            NAME,
            split=split,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=manual_dir is not None,
            decoders=None if decode else {"image": tfds.decode.SkipDecoding()},
            builder_kwargs={"file_format": "array_record"},
            download_and_prepare_kwargs=download_and_prepare_kwargs or None,
        )
    except (NotImplementedError, KeyError) as error:
        # tfds' errors when there is no array_record copy: KeyError when nothing is prepared
        # (its split dict is empty), NotImplementedError when only TFRecord files exist.
        raise FileNotFoundError(
            f"no array_record {NAME} under {data_dir}: prepare it once with "
            "file_format='array_record' (pass manual_dir=<folder with the ILSVRC2012 tars>; "
            "tfds' builder needs TensorFlow for that step), or convert a TFRecord copy with "
            f"`tfds convert_format`. tfds said: {error}"
        ) from error
