"""Decode/encode edge cases and the lecture's overlay formula."""

import io
import os
import struct
import zlib

import cv2
import numpy as np
import pytest

from bulk_explain.workers import image_io
from bulk_explain.workers.image_io import ImageDecodeError, decode_rgb


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
    # 16-bit values whose high and low bytes differ (65535 or v*257 would hide a conversion that
    # keeps the low byte): 8 bits are the value scaled by 255/65535, i.e. about the high byte.
    deep = np.random.default_rng(3).integers(0, 65536, (8, 9, 3)).astype(np.uint16)
    deep[0, 0] = (0x12F0, 0xABCD, 0x00FF)  # BGR in the file
    assert np.mean((deep >> 8) != (deep & 0xFF)) > 0.9
    out = decode_rgb(_png(deep))
    assert out.dtype == np.uint8 and out.shape == (8, 9, 3)
    expected_rgb = deep[..., ::-1].astype(np.float64) / 257.0
    assert np.abs(out - expected_rgb).max() <= 1.0, np.abs(out - expected_rgb).max()
    assert tuple(out[0, 0]) in {(0, 171, 18), (1, 171, 19)}  # RGB order of 0x00FF, 0xABCD, 0x12F0
    deep_gray = deep[..., 0]
    out = decode_rgb(_png(deep_gray))
    assert np.abs(out - (deep_gray.astype(np.float64) / 257.0)[..., None]).max() <= 1.0


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


# The documented cap (README: "images over 178,956,970 pixels"), written here as a literal so a
# change to the module's constant shows up as a failing test, not as a silently moved limit.
PIXEL_CAP = 178_956_970


def _png_header(width, height):
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def _gif_header(width, height):
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\0" * 10


def _bmp_header(width, height):
    # 14-byte file header, then the BITMAPINFOHEADER: size, width, height (negative = top-down)
    return b"BM" + b"\0" * 12 + struct.pack("<Iii", 40, width, -height) + b"\0" * 28


def _jpeg_header(width, height):
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\0\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + sof0 + b"\0" * 16


HEADERS = {"png": _png_header, "gif": _gif_header, "bmp": _bmp_header, "jpeg": _jpeg_header}


def test_pixel_cap_is_the_documented_one():
    assert image_io.MAX_IMAGE_PIXELS == PIXEL_CAP


@pytest.mark.parametrize("fmt", sorted(HEADERS))
def test_decompression_bomb_refused_from_every_header_format(fmt):
    # One pixel row over the cap (17000 x 10527 = 178,959,000): refused from the header alone
    # (these bytes hold no pixel data at all), with the claimed size in the one-line reason.
    assert 17000 * 10527 > PIXEL_CAP >= 17000 * 10526
    data = HEADERS[fmt](17000, 10527)
    assert image_io.header_size(data) == (17000, 10527)
    with pytest.raises(ImageDecodeError, match="pixel cap") as info:
        decode_rgb(data)
    assert "17000x10527" in str(info.value) and "\n" not in str(info.value)


def test_header_size_for_jpeg_png_gif_bmp():
    rgb = np.zeros((33, 47, 3), np.uint8)
    for ext in (".jpg", ".png", ".bmp"):
        ok, buf = cv2.imencode(ext, rgb)
        assert image_io.header_size(buf.tobytes()) == (47, 33), ext
    for fmt, make in HEADERS.items():
        assert image_io.header_size(make(47, 33)) == (47, 33), fmt


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



# ----------------------------------------------------------------------------- preprocessing fidelity
# Pinned to Keras itself, not to our own constants: a drift here would silently wrong every
# ImageNet prediction and every CAM.


def test_vgg16_scaling_equals_keras_preprocess_input():
    import keras
    import tensorflow as tf

    from bulk_explain.workers.preprocessing import Preprocessing

    images = np.random.default_rng(0).integers(0, 256, (3, 10, 12, 3)).astype(np.float32)
    expected = keras.applications.vgg16.preprocess_input(images.copy())
    got = Preprocessing(16, 16, "vgg16").scale_tensor(tf.constant(images)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(Preprocessing(16, 16, "rescale").scale_tensor(tf.constant(images)).numpy(),
                               images / 255.0, atol=1e-6)
    np.testing.assert_allclose(Preprocessing(16, 16, "tf").scale_tensor(tf.constant(images)).numpy(),
                               keras.applications.mobilenet_v2.preprocess_input(images.copy()), atol=1e-5)


@pytest.mark.parametrize("src_hw, dst_hw", [((37, 53), (16, 24)), ((20, 30), (64, 48)), ((101, 67), (50, 50))])
def test_nearest_resize_equals_keras_load_img(tmp_path, src_hw, dst_hw):
    """The read stage's decode + resize against keras.utils.load_img(target_size, "nearest") on the
    same file (PNG: lossless, so both decoders see the same pixels)."""
    import keras

    from bulk_explain.workers.preprocessing import Preprocessing
    from bulk_explain.workers.explain.reader import read_one

    rgb = np.random.default_rng(sum(src_hw)).integers(0, 256, src_hw + (3,), dtype=np.uint8)
    path = str(tmp_path / "x.png")
    assert cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    expected = np.asarray(keras.utils.load_img(path, target_size=dst_hw, interpolation="nearest"))
    item = read_one(0, path, None, os.path.getsize(path), "1", Preprocessing(*dst_hw, "rescale"))
    assert item.ok, item.error
    assert item.model_input.shape == dst_hw + (3,)
    np.testing.assert_array_equal(item.model_input, expected)
