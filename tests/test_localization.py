"""Grad-CAM localizes: the lecture's convnet, trained here on a synthetic two-class set where the
class is a shape at a random place, points at the object (pointing game) far more often than the
centre-point baseline does."""

import pytest

from _trained_models import SIZE, train_shapes_model


@pytest.mark.slow
def test_gradcam_pointing_game_beats_centre_baseline():
    from bulk_explain.workers import image_io
    from bulk_explain.workers.explain.explain_step import ExplainStep

    loaded, x_test, y_test, boxes = train_shapes_model(800, 100, epochs=6)
    # The last conv layer is 4x4 at this input size; the third conv (12x12) is the resolution
    # at which a 16-px object can be pointed at.
    step = ExplainStep(loaded, batch_size=50, target_layer="conv2d_2")
    hits = centre = 0
    for start in range(0, len(x_test), 50):
        out = step(x_test[start : start + 50], y_test[start : start + 50])
        for j in range(50):
            px, py = image_io.cam_peak(image_io.upsample_cam(out["cam"][j], SIZE, SIZE))
            x0, y0, x1, y1 = boxes[start + j]
            hits += x0 <= px * SIZE <= x1 and y0 <= py * SIZE <= y1
            centre += x0 <= SIZE / 2 <= x1 and y0 <= SIZE / 2 <= y1
    assert hits >= 60, f"pointing game {hits}/100"
    assert hits >= 3 * max(centre, 5), f"pointing game {hits}/100 vs centre baseline {centre}/100"
