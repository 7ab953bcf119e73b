"""Decode/encode edge cases and the lecture's overlay formula."""

import io
import struct
import zlib

import cv2
import numpy as np
import pytest

from workers import image_io
from workers.image_io import ImageDecodeError, decode_rgb


def _png(array):
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def _jpeg_with_orientation(rgb, orientation):
    """A JPEG whose EXIF says 'rotate for display' (Orientation tag 0x0112)."""
    from PIL import Image

    img = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_grayscale_rgba_and_16bit_become_8bit_rgb():
    gray = np.full((10, 12), 77, np.uint8)
    assert decode_rgb(_png(gray)).shape == (10, 12, 3)
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 2] = 200  # red in BGRA
    rgba[..., 3] = 255
    out = decode_rgb(_png(rgba))
    assert out.shape == (10, 12, 3) and out[0, 0, 0] == 200  # RGB order: red first
    deep = np.full((8, 9, 3), 65535, np.uint16)
    out = decode_rgb(_png(deep))
    assert out.dtype == np.uint8 and out.max() == 255


def test_exif_orientation_is_applied():
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255  # left half white
    out = decode_rgb(_jpeg_with_orientation(rgb, 6))  # 6 = rotate 90 CW for display
    assert out.shape[:2] == (40, 20)
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the white half is now on top


def test_bad_inputs_raise_one_line_errors():
    for data, pattern in (
        (b"", "empty"),
        (b"<!DOCTYPE html><html>nope</html>", "HTML"),
        (b"plain text, not an image", "not a decodable image"),
    ):
        with pytest.raises(ImageDecodeError, match=pattern) as info:
            decode_rgb(data)
        assert "\n" not in str(info.value)
    truncated = _png(np.full((64, 64, 3), 9, np.uint8))[:60]
    with pytest.raises(ImageDecodeError):
        decode_rgb(truncated)


def test_decompression_bomb_refused_from_header():
    # A PNG header claiming 30000x30000 pixels: refused before any decoding.
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    with pytest.raises(ImageDecodeError, match="pixel cap"):
        decode_rgb(b"\x89PNG\r\n\x1a\n" + chunk)


def test_header_size_for_jpeg_png_gif_bmp():
    rgb = np.zeros((33, 47, 3), np.uint8)
    for ext in (".jpg", ".png", ".bmp"):
        ok, buf = cv2.imencode(ext, rgb)
        assert image_io.header_size(buf.tobytes()) == (47, 33), ext
    assert image_io.header_size(b"GIF89a" + struct.pack("<HH", 47, 33) + b"\0" * 10) == (47, 33)


def test_overlay_matches_lecture_formula():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    cam = rng.random((30, 40)).astype(np.float32)
    heat = image_io.heatmap_uint8(cam)
    np.testing.assert_array_equal(heat, np.uint8(255 * cam))
    # lecture: superimposed = applyColorMap(uint8(255*h), JET) * 0.4 + cv2.imread(...) (BGR), clipped
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    expected = np.clip(cv2.applyColorMap(heat, cv2.COLORMAP_JET) * 0.4 + bgr, 0, 255)
    got = image_io.overlay_bgr(bgr, heat)
    assert np.abs(got.astype(float) - expected).max() <= 1.0  # rounding vs truncation


def test_cam_peak_in_original_coordinates():
    cam = np.zeros((4, 4), np.float32)
    cam[3, 0] = 1.0  # bottom-left cell
    full = image_io.upsample_cam(cam, 200, 100)
    x, y = image_io.cam_peak(full)
    assert x < 0.25 and y > 0.75


def test_channel_grid_shape_and_range():
    act = np.random.default_rng(0).random((5, 6, 20)).astype(np.float32)
    grid = image_io.channel_grid(act, images_per_row=16, margin=1)
    assert grid.dtype == np.uint8 and grid.shape == (2 * (5 + 1) - 1, 16 * (6 + 1) - 1)

