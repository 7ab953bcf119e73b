"""Image decode and encode: bytes in, uint8 arrays out, and back.

OpenCV releases the GIL in imdecode / resize / imencode, so these functions run in thread pools
ahead of (decode) and behind (encode) the compiled step.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Optional, Tuple

# A decompression bomb (a 30000x30000 PNG is 100 kB on disk, 2.7 GB decoded) is refused from its
# header, before any pixel is decoded. 178,956,970 is Pillow's hard limit (2x its warning limit).
MAX_IMAGE_PIXELS = 178_956_970
# OpenCV's own check (every format, TIFF and WebP included) reads this variable once, when cv2 is
# loaded: set here for processes where this module loads cv2 first, and by the driver in the
# workers' environment. Its default (2**30 pixels) is 6x ours.
OPENCV_PIXEL_CAP_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"
os.environ.setdefault(OPENCV_PIXEL_CAP_ENV, str(MAX_IMAGE_PIXELS))
# Files larger than this are not read at all (an uncompressed TIFF at the pixel cap is 537 MB).
MAX_FILE_BYTES = 1 << 30

import cv2  # noqa: E402
import numpy as np  # noqa: E402


class ImageDecodeError(ValueError):
    """The bytes are not an image we can use; the message is one line for the manifest."""


def image_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def header_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) read from a PNG/JPEG/GIF/BMP header without decoding, or None if unknown."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:2] == b"BM" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    if data[:2] == b"\xff\xd8":
        i = 2
        n = len(data)
        while i + 9 < n:
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 1 if marker == 0xFF else 2
                continue
            seg_len = struct.unpack(">H", data[i + 2 : i + 4])[0]
            # SOF0..SOF15 except DHT(C4), JPG(C8), DAC(CC) carry the frame size.
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return w, h
            i += 2 + seg_len
    return None


def jpeg_exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8) of a JPEG, read from its APP1 segment; 1 if absent."""
    if data[:2] != b"\xff\xd8":
        return 1
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in (0xD9, 0xDA):  # end of image / start of scan: no more metadata
            return 1
        seg_len = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            tiff = data[i + 10:i + 2 + seg_len]
            if tiff[:2] not in (b"II", b"MM") or len(tiff) < 8:
                return 1
            e = "<" if tiff[:2] == b"II" else ">"
            ifd = struct.unpack(e + "I", tiff[4:8])[0]
            if ifd + 2 > len(tiff):
                return 1
            count = struct.unpack(e + "H", tiff[ifd:ifd + 2])[0]
            for k in range(count):
                entry = tiff[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
                if len(entry) < 12:
                    return 1
                if struct.unpack(e + "H", entry[:2])[0] == 0x0112:
                    value = struct.unpack(e + "H", entry[8:10])[0]
                    return value if 1 <= value <= 8 else 1
            return 1
        i += 2 + seg_len
    return 1


def display_size(data: bytes) -> Optional[Tuple[int, int]]:
    """(width, height) of the image as displayed (EXIF orientation 5-8 swaps the stored sides),
    from the header alone; None if the header gives no size."""
    size = header_size(data)
    if size is None:
        return None
    return (size[1], size[0]) if jpeg_exif_orientation(data) >= 5 else size


# libjpeg's DCT scaling: decoding at 1/2, 1/4 or 1/8 skips most of the IDCT work.
REDUCED_DECODE_FLAGS = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def reduced_decode_factor(data: bytes, min_side: int, max_side: Optional[int]) -> int:
    """The largest JPEG DCT scale factor (8, 4, 2) whose image keeps both sides >= `min_side` (the
    model input) and the long side >= `max_side` (the output size asked for); 1 = full decode.
    Only for JPEG (other formats would be decoded at full size and then shrunk: no saving)."""
    if not max_side or data[:2] != b"\xff\xd8":
        return 1
    size = header_size(data)
    if size is None:
        return 1
    w, h = size
    for factor in (8, 4, 2):
        # libjpeg rounds the scaled size up: ceil(side / factor)
        sw, sh = -(-w // factor), -(-h // factor)
        if min(sw, sh) >= min_side and max(sw, sh) >= max_side:
            return factor
    return 1


def decode_rgb(data: bytes) -> np.ndarray:
    """Like `decode_bgr`, in RGB order."""
    return cv2.cvtColor(decode_bgr(data), cv2.COLOR_BGR2RGB)


def decode_bgr(data: bytes, reduce: int = 1) -> np.ndarray:
    """Decodes image bytes to an HxWx3 uint8 BGR array (OpenCV order) in display orientation.

    EXIF orientation is applied; grayscale, RGBA, palette and 16-bit inputs become 8-bit RGB;
    animated images give their first frame.

    Args:
        data: the file's bytes.
        reduce: 1, or 2/4/8 to decode a JPEG at that fraction of its size (`reduced_decode_factor`).

    Raises:
        ImageDecodeError: empty, undecodable or larger than MAX_IMAGE_PIXELS.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    size = header_size(data)
    if size is not None and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ImageDecodeError(
            f"image is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, over the {MAX_IMAGE_PIXELS:,} pixel cap"
        )
    buf = np.frombuffer(data, np.uint8)
    try:
        # IMREAD_COLOR: 3-channel 8-bit BGR, EXIF orientation applied (IGNORE_ORIENTATION not set).
        bgr = cv2.imdecode(buf, REDUCED_DECODE_FLAGS.get(reduce, cv2.IMREAD_COLOR))
    except cv2.error as exc:
        text = str(exc).strip().splitlines()[-1]
        if "CV_IO_MAX_IMAGE_PIXELS" in text:
            raise ImageDecodeError(f"image is over the {MAX_IMAGE_PIXELS:,} pixel cap (refused by the decoder "
                                   f"before allocating)") from None
        raise ImageDecodeError(f"cannot decode image: {text}") from None
    if bgr is None or bgr.size == 0:
        head = data[:16].lstrip()
        if head[:1] == b"<" or head[:5].lower() in (b"<!doc", b"<html"):
            raise ImageDecodeError(f"not an image: looks like HTML/XML text ({len(data)} bytes)")
        if size is not None:
            raise ImageDecodeError(f"cannot decode image: truncated or corrupt data ({len(data)} bytes)")
        raise ImageDecodeError(f"not a decodable image ({len(data)} bytes, starts with {data[:8]!r})")
    return bgr


def encode_png(array: np.ndarray) -> bytes:
    # Heatmaps are smooth: the FILTERED strategy is both faster and ~2x smaller than the default
    # (measured on 640x480 heatmaps: 1.4 ms / 29 kB vs 2.8 ms / 60 kB).
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_FILTERED])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def encode_jpeg(bgr: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def upsample_cam(cam: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear upsampling of a [0,1] map to the original image size."""
    return cv2.resize(cam.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def heatmap_uint8(cam_full: np.ndarray) -> np.ndarray:
    """0..1 float map -> 0..255 uint8, truncating as the lecture's np.uint8(255 * heatmap)."""
    return np.uint8(255 * np.clip(cam_full, 0.0, 1.0))


def overlay_bgr(bgr: np.ndarray, heat_u8: np.ndarray, intensity: float = 0.4) -> np.ndarray:
    """The lecture's overlay: clip(JET(heat) * 0.4 + original_BGR). Input and output are BGR."""
    jet = cv2.applyColorMap(heat_u8, cv2.COLORMAP_JET)  # BGR
    # addWeighted saturates to 0..255, i.e. the clip.
    return cv2.addWeighted(jet, float(intensity), bgr, 1.0, 0.0)


def fit_long_side(bgr: np.ndarray, max_side: Optional[int]) -> np.ndarray:
    """`bgr` shrunk (area interpolation, aspect ratio kept) so its long side is at most `max_side`."""
    h, w = bgr.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return bgr
    scale = max_side / max(h, w)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)


def cam_is_empty(cam: np.ndarray) -> bool:
    """True when the map is all zeros (or not finite): it explains nothing and has no peak."""
    peak = float(np.max(cam)) if cam.size else 0.0
    return not (np.isfinite(peak) and peak > 0.0)


def cam_peak(cam_full: np.ndarray) -> Tuple[Optional[float], Optional[float]]:
    """(x, y) of the heatmap maximum as 0..1 fractions of width/height (pixel centres), or
    (None, None) for an empty (all-zero) map, whose argmax would be the top-left pixel."""
    if cam_is_empty(cam_full):
        return None, None
    h, w = cam_full.shape
    idx = int(np.argmax(cam_full))
    y, x = divmod(idx, w)
    return (x + 0.5) / w, (y + 0.5) / h


def cam_small(cam: np.ndarray, size: int) -> np.ndarray:
    """The CAM at the target layer's resolution resized to a fixed size x size grid (float32,
    0..1): area-averaged when shrinking, bilinear when growing, so every row has the same shape."""
    cam = np.nan_to_num(cam.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    h, w = cam.shape
    shrink = h >= size and w >= size
    small = cv2.resize(cam, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.clip(small, 0.0, 1.0)


def channel_grid(activation: np.ndarray, images_per_row: int = 16, margin: int = 1) -> np.ndarray:
    """The lecture's "every channel" image of one layer for one image: standardize each channel,
    x64 + 128, clip, tile `images_per_row` per row. Returns uint8 grayscale."""
    h, w, c = activation.shape
    rows = (c + images_per_row - 1) // images_per_row
    grid = np.zeros((rows * (h + margin) - margin, images_per_row * (w + margin) - margin), np.uint8)
    for k in range(c):
        ch = activation[:, :, k].astype(np.float32)
        ch = ch - ch.mean()
        std = ch.std()
        if std > 0:
            ch /= std
        ch = np.clip(ch * 64 + 128, 0, 255).astype(np.uint8)
        r, col = divmod(k, images_per_row)
        grid[r * (h + margin) : r * (h + margin) + h, col * (w + margin) : col * (w + margin) + w] = ch
    return grid
