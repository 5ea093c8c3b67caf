"""Decoding and transforming one record: images, captions and the bad-record error.

Every random choice for a sample (flip, crop offset, which of several captions) is drawn in
:func:`load_sample` from ``sample_generator(seed, step, position, STREAM_DATA)``, in a fixed order.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bksdm.seeding import STREAM_DATA, sample_generator
from bksdm.train.data.records import ImageData, Record


class BadRecordError(ValueError):
    """A record that cannot be used (its image or caption is missing, corrupt or empty)."""


def open_image(data: ImageData, max_pixels: int | None = None) -> Image.Image:
    """Opens an image lazily: the header is read, the pixels are not decoded yet (so JPEG draft mode works).

    Args:
        data: Encoded bytes, a path, or a PIL image (returned as is).
        max_pixels: Refuse images with more pixels; defaults to PIL's decompression-bomb limit
            ``Image.MAX_IMAGE_PIXELS`` (PIL only warns between 1x and 2x that limit; here both refuse).

    Returns:
        The image, not yet loaded.

    Raises:
        BadRecordError: If there is no image, it is not an image, or it is above the pixel limit.
        OSError: If the file is missing or unreadable.
    """
    if data is None:
        raise BadRecordError("no image")
    if isinstance(data, Image.Image):
        image = data
    else:
        if not isinstance(data, bytes):
            # Read the file in one go: a lazily opened file would hold a handle until the pixels are loaded.
            with open(data, "rb") as f:
                data = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data))
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise BadRecordError(f"image above the decompression-bomb limit: {exc}") from exc
            except UnidentifiedImageError as exc:
                # PIL's message names the BytesIO object's address: replace it, so that reasons are reproducible.
                raise BadRecordError("not an image (PIL cannot identify the format)") from exc
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is not None and image.width * image.height > limit:
        raise BadRecordError(f"image of {image.width}x{image.height} pixels is above the limit of {limit} pixels")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB.

    Transparent pixels are composited on white: transparent web images (logos, product cut-outs) are mostly
    made to be shown on a light page, and PIL's plain convert would show whatever colour the hidden pixels
    hold, often black. 16- and 32-bit grayscale is scaled to 8 bits, not
    clipped (PIL's convert clips ``I;16`` at 255, turning most of the image white).
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.size and values.max() <= 1.0:
            values = values * 255.0  # float images are usually in [0, 1]
        elif image.mode != "F" and values.size and (image.mode.startswith("I;16") or values.max() > 255):
            values = values / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transpose that shows the image upright (as ``ImageOps.exif_transpose``)."""


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright); 1 when the EXIF block is absent or unreadable."""
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # a corrupt EXIF block raises assorted types; it must not cost a decodable image
        return 1


class Transformed(NamedTuple):
    """Output of :class:`ImageTransform`."""

    pixel_values: torch.Tensor
    """(3, R, R) float32 in [-1, 1]."""
    flipped: bool
    original_size: tuple[int, int]
    """(height, width) of the image as stored (after EXIF rotation): SDXL's size conditioning."""
    crop_top_left: tuple[int, int]
    """(top, left) of the crop in the resized image: SDXL's crop conditioning."""


class ImageTransform:
    """Resize the shorter side to ``resolution``, crop a square, maybe flip, and scale to [-1, 1].

    The paper's recipe is center crop + random horizontal flip at 512 px. Resampling is PIL's bicubic: PIL
    widens the filter with the downscale factor, so it is antialiased (unlike ``torch`` interpolation without
    ``antialias``); compared with Lanczos it overshoots (rings) less around hard edges such as the text and
    logos common in web images, and it costs less.

    Memory stays bounded for any input: a JPEG is decoded at 1/2, 1/4 or 1/8 scale when that still covers
    the target size (``Image.draft``), only the crop window (plus a filter margin) is converted, and the
    resize first box-reduces by an integer factor (``reducing_gap``), so a 10000x200 image never becomes a
    25600x512 intermediate. Tiny images are upscaled.

    Every random choice comes from the generator passed in, in a fixed order: flip first (so the flip of a
    slot does not depend on the image size), then the crop's top, then its left.

    Args:
        resolution: Output side R.
        center_crop: Center crop if True, else a random crop.
        random_flip: Flip horizontally with probability 1/2.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = True) -> None:
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __repr__(self) -> str:
        return (
            f"ImageTransform(resolution={self.resolution}, center_crop={self.center_crop}, "
            f"random_flip={self.random_flip})"
        )

    def __call__(self, image: Image.Image, generator: torch.Generator) -> Transformed:
        """Transforms one image.

        Args:
            image: A PIL image, ideally not loaded yet (see :func:`open_image`) so that JPEG draft mode helps.
            generator: Source of the flip and crop decisions.

        Returns:
            The pixels and the choices made.
        """
        size = self.resolution
        flipped = bool(torch.rand((), generator=generator) < 0.5) if self.random_flip else False

        stored_w, stored_h = image.size
        orientation = _exif_orientation(image)
        width, height = (stored_h, stored_w) if orientation in (5, 6, 7, 8) else (stored_w, stored_h)
        scale = size / min(width, height)
        resized_w, resized_h = max(size, round(width * scale)), max(size, round(height * scale))
        if self.center_crop:
            top, left = (resized_h - size) // 2, (resized_w - size) // 2
        else:
            top = int(torch.randint(0, resized_h - size + 1, (), generator=generator))
            left = int(torch.randint(0, resized_w - size + 1, (), generator=generator))

        # Decode big JPEGs at a reduced scale that still covers the resized image (a no-op for other formats).
        image.draft(None, (math.ceil(stored_w * scale), math.ceil(stored_h * scale)))
        if orientation in _ORIENTATION_FIX:
            image = image.transpose(_ORIENTATION_FIX[orientation])  # loads the pixels
        # The crop window in the coordinates of the (possibly draft-reduced) loaded image.
        fx, fy = image.width / width, image.height / height
        box = (left / scale * fx, top / scale * fy, (left + size) / scale * fx, (top + size) / scale * fy)
        box = (box[0], box[1], min(box[2], image.width), min(box[3], image.height))
        # Cut the window with a margin for the filter's support before converting, to bound memory.
        margin = 2 * math.ceil(max(fx, fy) / scale) + 2
        x0, y0 = max(0, math.floor(box[0]) - margin), max(0, math.floor(box[1]) - margin)
        x1, y1 = min(image.width, math.ceil(box[2]) + margin), min(image.height, math.ceil(box[3]) + margin)
        window = to_rgb(image.crop((x0, y0, x1, y1)))
        out = window.resize(
            (size, size),
            Image.Resampling.BICUBIC,
            box=(box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0),
            reducing_gap=3.0,  # >= 3 is indistinguishable from a one-step resize (PIL docs)
        )
        if flipped:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)  # (3, R, R)
        pixels = pixels.to(torch.float32).div_(127.5).sub_(1.0)
        return Transformed(pixels, flipped, (height, width), (top, left))


def clean_caption(caption: Any) -> list[str]:
    """The usable captions of a record, stripped.

    Args:
        caption: A string, UTF-8 bytes, or a list of them (several captions per image).

    Returns:
        One or more non-empty captions.

    Raises:
        BadRecordError: If there is no usable caption (None, empty, not text, not valid UTF-8).
    """
    items = list(caption) if isinstance(caption, (list, tuple)) else [caption]
    captions, problems = [], []
    for item in items:
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"caption is not valid UTF-8 ({exc})")
                continue
        if not isinstance(item, str):
            problems.append("no caption" if item is None else f"caption is a {type(item).__name__}, not text")
            continue
        try:
            item.encode("utf-8")  # lone surrogates: undecodable bytes kept by the CSV reader
        except UnicodeEncodeError:
            problems.append("caption is not valid UTF-8")
            continue
        if item.strip():
            captions.append(item.strip())
        else:
            problems.append("empty caption")
    if not captions:
        raise BadRecordError("; ".join(problems) if problems else "empty caption list")
    return captions


def load_sample(record: Record, transform: ImageTransform, seed: int, step: int, position: int) -> dict[str, Any]:
    """Decodes and transforms one record for slot ``(step, position)`` of the global batch.

    Args:
        record: ``(image, caption, record_id)`` from a source.
        transform: The image transform.
        seed: The run's seed.
        step: Global step of the batch.
        position: Position of the sample within the global batch.

    Returns:
        The sample fields ``pixel_values``, ``caption``, ``record_id``, ``flipped``, ``original_size``,
        ``crop_top_left``.

    Raises:
        BadRecordError: If the record is unusable; the message names the record and the error.
    """
    image, caption, record_id = record
    generator = sample_generator(seed, step, position, STREAM_DATA)
    try:
        captions = clean_caption(caption)
        out = transform(open_image(image), generator)
    except BadRecordError as exc:
        raise BadRecordError(f"{record_id}: {exc}") from exc
    except Exception as exc:
        # PIL's decoders raise many types on malformed input (OSError for truncated files, SyntaxError,
        # struct.error, IndexError, ZeroDivisionError, ...): any of them means this record is unusable.
        # Nothing systematic is hidden: MAX_CONSECUTIVE_BAD failures in a row still stop the run.
        raise BadRecordError(f"{record_id}: {type(exc).__name__}: {exc}") from exc
    choice = int(torch.randint(len(captions), (), generator=generator)) if len(captions) > 1 else 0
    return {
        "pixel_values": out.pixel_values,
        "caption": captions[choice],
        "record_id": record_id,
        "flipped": out.flipped,
        "original_size": out.original_size,
        "crop_top_left": out.crop_top_left,
    }
