"""`--overlay-max-side`: smaller overlays and heatmaps, JPEGs decoded reduced by libjpeg, the
original size and orientation kept in the manifest."""

import io

import cv2
import numpy as np
import pytest

from conftest import photo_like


def _jpeg(rgb, orientation=None):
    from PIL import Image

    buf = io.BytesIO()
    kwargs = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=92, **kwargs)
    return buf.getvalue()


def _stored_640x480():
    """Stored 640 wide x 480 high, the left third bright: a landmark for the orientation."""
    rgb = photo_like(np.random.default_rng(0), 480, 640)
    rgb[:, :200] = 250
    return rgb


def test_reduced_decode_factor_keeps_model_size_and_max_side():
    from bulk_explain.workers.image_io import reduced_decode_factor

    data = _jpeg(_stored_640x480())
    assert reduced_decode_factor(data, 224, None) == 1  # default: full size
    assert reduced_decode_factor(data, 224, 256) == 2  # 320x240 still covers 224 and 256
    assert reduced_decode_factor(data, 32, 128) == 4  # 160x120
    assert reduced_decode_factor(data, 32, 64) == 8  # 80x60
    assert reduced_decode_factor(data, 150, 64) == 2  # 1/4 would be 160x120 < 150
    assert reduced_decode_factor(data, 500, 64) == 1
    ok, png = cv2.imencode(".png", _stored_640x480())
    assert reduced_decode_factor(png.tobytes(), 32, 64) == 1  # only JPEG has DCT scaling


@pytest.mark.parametrize("orientation", [None, 6])
def test_reduced_read_and_small_outputs(tmp_path, orientation):
    from bulk_explain.workers import image_io
    from bulk_explain.workers.layout import OutputLayout
    from bulk_explain.workers.preprocessing import Preprocessing
    from bulk_explain.workers.explain.reader import read_one
    from bulk_explain.workers.explain.writer import ShardWriter

    path = tmp_path / "in" / "a.jpg"
    path.parent.mkdir()
    path.write_bytes(_jpeg(_stored_640x480(), orientation))
    uri = str(path)
    pre = Preprocessing(32, 32, "rescale")
    full = read_one(0, uri, None, path.stat().st_size, "v", pre)
    small = read_one(0, uri, None, path.stat().st_size, "v", pre, max_side=128)
    display = (480, 640) if orientation == 6 else (640, 480)  # (width, height) as displayed
    assert full.bgr.shape[1::-1] == display and full.original_size is None
    # decoded at 1/4 by libjpeg, in display orientation; the original size from the header + EXIF
    assert small.bgr.shape[1::-1] == (display[0] // 4, display[1] // 4)
    assert small.original_size == display
    # the model sees the same size, and nearly the same pixels
    assert small.model_input.shape == full.model_input.shape == (32, 32, 3)
    assert np.abs(small.model_input.astype(int) - full.model_input.astype(int)).mean() < 12
    # bright third stays where the display orientation puts it (left, or top after rotation 6)
    bright = small.bgr.mean(axis=2)
    if orientation == 6:
        assert bright[:10].mean() > 240 and bright[-10:].mean() < 200
    else:
        assert bright[:, :10].mean() > 240 and bright[:, -10:].mean() < 200

    layout = OutputLayout(str(tmp_path / "out"))
    cam = np.zeros((4, 4), np.float32)
    cam[3, 0] = 1.0  # peak in the bottom-left cell
    result = {"cam": cam, "pred_index": 0, "pred_score": 0.9, "top_index": np.array([0]),
              "top_score": np.array([0.9]), "cam_index": 0, "stats": np.zeros((0, 4))}
    rows = {}
    small_size = (96, 128) if orientation == 6 else (128, 96)  # (width, height): long side 128, aspect kept
    for name, item, max_side, size in (("full", full, None, display), ("small", small, 128, small_size)):
        writer = ShardWriter(layout, 0, ["a", "b"], [], overlay_max_side=max_side)
        rows[name] = writer.image_row(item, result)
        assert rows[name]["status"] == "ok", rows[name]["error"]
        overlay = cv2.imread(rows[name]["gradcam_overlay_uri"])
        heat = cv2.imread(rows[name]["gradcam_heatmap_uri"], cv2.IMREAD_GRAYSCALE)
        assert overlay.shape[1::-1] == size and heat.shape[::-1] == size, name
    for name in rows:  # the manifest keeps the original size; the peak is relative, so the same
        assert (rows[name]["width"], rows[name]["height"]) == display
    assert abs(rows["small"]["cam_peak_x"] - rows["full"]["cam_peak_x"]) < 0.02
    assert abs(rows["small"]["cam_peak_y"] - rows["full"]["cam_peak_y"]) < 0.02
    assert rows["small"]["cam_peak_x"] < 0.25 and rows["small"]["cam_peak_y"] > 0.75


def test_exif_orientation_parser():
    from bulk_explain.workers.image_io import display_size, jpeg_exif_orientation

    rgb = np.zeros((20, 40, 3), np.uint8)
    for orientation in range(1, 9):
        data = _jpeg(rgb, orientation)
        assert jpeg_exif_orientation(data) == orientation
        assert display_size(data) == ((20, 40) if orientation >= 5 else (40, 20))
    assert jpeg_exif_orientation(_jpeg(rgb)) == 1
    assert jpeg_exif_orientation(b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00MM\x00") == 1  # truncated: no crash
