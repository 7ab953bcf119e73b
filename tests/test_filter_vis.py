"""Filter visualization: the batched ascent against the lecture's one-filter loop, ascent quality on
a trained convnet, deprocessing, contact sheets and filter-weight plots."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from bulk_explain.workers.filters import filter_vis
from bulk_explain.workers.filters.filter_vis import FilterAscent, contact_sheet, deprocess_image, start_noise


def _small_convnet(size=32, seed=0):
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(shape=(size, size, 3)),
            layers.Conv2D(8, 3, activation="relu", name="c1"),
            layers.MaxPooling2D(2, name="p1"),
            layers.Conv2D(12, 3, activation="relu", name="c2"),
            layers.Conv2D(6, 3, activation="relu", name="c3"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(2, activation="softmax"),
        ],
        name="small",
    )


# ---------------------------------------------------------------- the lecture, written out again


def _lecture_filter_pattern(model, layer_name, filter_index, start, iterations, learning_rate):
    """The lecture's generate_filter_pattern with its own start image replaced by `start`."""
    import keras
    import tensorflow as tf

    feature_extractor = keras.Model(inputs=model.inputs, outputs=model.get_layer(name=layer_name).output)

    def compute_loss(image, filter_index):
        activation = feature_extractor(image)
        filter_activation = activation[:, 2:-2, 2:-2, filter_index]
        return tf.reduce_mean(filter_activation)

    @tf.function
    def gradient_ascent_step(image, filter_index, learning_rate):
        with tf.GradientTape() as tape:
            tape.watch(image)
            loss = compute_loss(image, filter_index)
        grads = tape.gradient(loss, image)
        grads = tf.math.l2_normalize(grads)
        image += learning_rate * grads
        return image

    image = tf.constant(start[None])
    first = float(compute_loss(image, filter_index))
    for _ in range(iterations):
        image = gradient_ascent_step(image, filter_index, learning_rate)
    return image[0].numpy(), first, float(compute_loss(image, filter_index))


def _lecture_deprocess(image):
    image = image.copy()
    image -= image.mean()
    image /= image.std()
    image *= 64
    image += 128
    image = np.clip(image, 0, 255).astype("uint8")
    return image[25:-25, 25:-25, :]


# ---------------------------------------------------------------- tests


def test_start_noise_is_per_filter_and_in_range():
    a = start_noise(0, "c1", 3, 20)
    assert a.shape == (20, 20, 3) and a.dtype == np.float32
    assert 0.4 <= a.min() and a.max() <= 0.6
    np.testing.assert_array_equal(a, start_noise(0, "c1", 3, 20))
    assert not np.array_equal(a, start_noise(0, "c1", 4, 20))
    assert not np.array_equal(a, start_noise(1, "c1", 3, 20))
    assert not np.array_equal(a, start_noise(0, "c2", 3, 20))


def test_deprocess_matches_lecture_at_150_and_scales_crop():
    rng = np.random.default_rng(1)
    image = rng.normal(3.0, 2.0, size=(150, 150, 3)).astype(np.float32)
    ours = deprocess_image(image)
    theirs = _lecture_deprocess(image)
    assert ours.shape == (100, 100, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert (ours == theirs).mean() > 0.999
    assert deprocess_image(image[:48, :48]).shape == (32, 32, 3)  # crop 25*48/150 = 8
    flat = deprocess_image(np.full((30, 30, 3), 0.5, np.float32))
    assert (flat == 128).all()


@pytest.mark.parametrize("layer", ["c1", "c3"])
def test_batched_equals_one_at_a_time_lecture_loop(layer):
    size, steps, lr = 32, 12, 10.0
    model = _small_convnet(size)
    filters = [0, 1, 2, 3, 4]
    starts = np.stack([start_noise(7, layer, f, size) for f in filters])
    ascent = FilterAscent(model, layer, size, steps=steps, learning_rate=lr)
    # batch 2 over 5 filters: two full batches and a padded tail
    result = ascent.ascend(filters, starts, batch_size=2)
    assert result.batch_sizes == [2, 2, 2]
    for k, f in enumerate(filters):
        image, first, last = _lecture_filter_pattern(model, layer, f, starts[k], steps, lr)
        np.testing.assert_allclose(result.images[k], image, rtol=0, atol=2e-4)
        assert result.activation_start[k] == pytest.approx(first, rel=1e-4, abs=1e-6)
        assert result.activation_end[k] == pytest.approx(last, rel=1e-4, abs=1e-5)
    # moved away from the start for live filters: the comparison above is not between two no-ops
    live = result.activation_start > 0
    assert live.any()
    assert np.abs(result.images[live] - starts[live]).max() > 1.0


def test_per_filter_normalization_not_per_batch():
    """Each element moves by exactly lr in L2 per step, whatever the other elements do."""
    size = 24
    model = _small_convnet(size)
    ascent = FilterAscent(model, "c2", size, steps=1, learning_rate=10.0)
    starts = np.stack([start_noise(0, "c2", f, size) for f in range(4)])
    result = ascent.ascend(range(4), starts, batch_size=4)
    moved = np.sqrt(((result.images - starts) ** 2).sum(axis=(1, 2, 3)))
    live = result.activation_start > 0
    assert live.sum() >= 2
    np.testing.assert_allclose(moved[live], 10.0, rtol=1e-4)


def test_batch_halves_on_out_of_memory(monkeypatch):
    import tensorflow as tf

    size = 24
    model = _small_convnet(size)
    ascent = FilterAscent(model, "c1", size, steps=2)
    real = ascent.run_batch

    def limited(images, filter_indices, steps_per_call=None):
        if len(filter_indices) > 2:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
        return real(images, filter_indices, steps_per_call)

    monkeypatch.setattr(ascent, "run_batch", limited)
    starts = np.stack([start_noise(0, "c1", f, size) for f in range(8)])
    result = ascent.ascend(range(8), starts, batch_size=8)
    assert result.batch_sizes == [2, 2, 2, 2]
    # against the lecture's one-filter loop (independent of FilterAscent), filter by filter
    for f in range(8):
        image, _, last = _lecture_filter_pattern(model, "c1", f, starts[f], 2, 10.0)
        np.testing.assert_allclose(result.images[f], image, atol=2e-4)
        assert result.activation_end[f] == pytest.approx(last, rel=1e-4, abs=1e-5)


def test_measured_batch_choice_keeps_every_result():
    size = 24
    model = _small_convnet(size)
    ascent = FilterAscent(model, "c2", size, steps=3)
    starts = np.stack([start_noise(0, "c2", f, size) for f in range(12)])
    result = ascent.ascend(range(12), starts, batch_size=None, auto="measure", max_batch=4)
    assert (1, 1) in ascent.timings and ascent.chosen_batch is not None
    assert sum(min(b, 12) for b in result.batch_sizes) >= 12
    # every filter's result equals the lecture's one-filter loop, whatever batch was chosen
    for f in range(12):
        _, _, last = _lecture_filter_pattern(model, "c2", f, starts[f], 3, 10.0)  # the lecture's rate
        assert result.activation_end[f] == pytest.approx(last, rel=1e-4, abs=1e-5)


def test_tail_uses_compiled_sizes_without_padding():
    size = 24
    model = _small_convnet(size)
    ascent = FilterAscent(model, "c1", size, steps=1)
    ascent._function(1)  # compiled, as after a measurement
    starts = np.stack([start_noise(0, "c1", f, size) for f in range(7)])
    result = ascent.ascend(range(7), starts, batch_size=4)
    assert result.batch_sizes == [4, 1, 1, 1]


def _trained_convnet(size=32, seed=0):
    """A small convnet trained a few epochs on synthetic stripes: horizontal vs vertical."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    n = 256
    x = rng.uniform(0, 0.2, size=(n, size, size, 3)).astype(np.float32)
    y = np.arange(n) % 2
    for i in range(n):
        period = int(rng.integers(3, 7))
        phase = int(rng.integers(0, period))
        colour = rng.uniform(0.5, 1.0, size=3)
        stripes = ((np.arange(size) + phase) % period) < period // 2
        if y[i]:
            x[i][:, stripes] += colour
        else:
            x[i][stripes, :] += colour
    model = keras.Sequential(
        [
            keras.Input(shape=(size, size, 3)),
            layers.Conv2D(8, 3, activation="relu", name="conv_a"),
            layers.MaxPooling2D(2),
            layers.Conv2D(16, 3, activation="relu", name="conv_b"),
            layers.GlobalAveragePooling2D(),
            layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=4, batch_size=32, verbose=0)
    assert history.history["accuracy"][-1] > 0.8, history.history
    return model


def test_ascent_raises_activation_on_trained_convnet_and_sheet_size():
    size = 40
    model = _trained_convnet(size)
    for layer in ("conv_a", "conv_b"):
        ascent = FilterAscent(model, layer, size, steps=20, learning_rate=10.0)
        n = ascent.num_filters
        starts = np.stack([start_noise(0, layer, f, size) for f in range(n)])
        result = ascent.ascend(range(n), starts, batch_size=n)
        dead = (result.activation_start == 0) & (result.activation_end == 0)
        live = ~dead
        assert live.sum() >= n // 2, f"{layer}: {dead.sum()} of {n} dead"
        improved = result.activation_end[live] > result.activation_start[live]
        assert improved.mean() >= 0.9, (layer, result.activation_start, result.activation_end)
        tiles = [deprocess_image(img) for img in result.images]
        crop = filter_vis.crop_for_size(size)
        tile = size - 2 * crop
        assert all(t.shape == (tile, tile, 3) for t in tiles)
        per_row = 6
        sheet = contact_sheet(tiles, per_row=per_row, margin=5)
        rows = -(-n // per_row)
        assert sheet.shape == (rows * tile + (rows - 1) * 5, per_row * tile + (per_row - 1) * 5, 3)
        # every tile sits where the grid says
        r, c = divmod(n - 1, per_row)
        np.testing.assert_array_equal(sheet[r * (tile + 5):r * (tile + 5) + tile, c * (tile + 5):c * (tile + 5) + tile],
                                      tiles[-1])


def test_contact_sheet_layout_small():
    tiles = [np.full((4, 3, 3), k, np.uint8) for k in range(1, 6)]
    sheet = contact_sheet(tiles, per_row=2, margin=1)
    assert sheet.shape == (3 * 4 + 2, 2 * 3 + 1, 3)
    assert sheet[0, 0, 0] == 1 and sheet[0, 4, 0] == 2 and sheet[5, 0, 0] == 3 and sheet[10, 0, 0] == 5
    assert sheet[4, 0, 0] == 0 and sheet[10, 4, 0] == 0  # margin and empty cell stay background


def test_small_output_layer_keeps_a_pixel():
    model = _small_convnet(16)
    ascent = FilterAscent(model, "c3", 16, steps=2)
    assert ascent.output_hw == (3, 3) and ascent.border_used == (1, 1)
    starts = np.stack([start_noise(0, "c3", f, 16) for f in range(2)])
    result = ascent.ascend(range(2), starts, batch_size=2)
    assert np.isfinite(result.activation_end).all()


# ---------------------------------------------------------------- filter-weight plots


def test_color_filter_tiles_per_filter_minmax_nearest_and_bgr():
    from bulk_explain.workers.filters.filter_weights import color_filter_tiles

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
    kernel[..., 1] *= 100  # a filter on another scale still spans 0..255 on its own
    tiles = color_filter_tiles(kernel, scale=5)
    assert len(tiles) == 4 and all(t.shape == (15, 15, 3) and t.dtype == np.uint8 for t in tiles)
    for i, tile in enumerate(tiles):
        assert tile.min() == 0 and tile.max() == 255
        small = tile[::5, ::5]
        np.testing.assert_array_equal(tile, np.repeat(np.repeat(small, 5, 0), 5, 1))  # no smoothing
        f = kernel[..., i]
        expected = np.rint((f - f.min()) / (f.max() - f.min()) * 255)
        np.testing.assert_array_equal(small, expected.astype(np.uint8))
    bgr = color_filter_tiles(kernel, scale=5, input_order="BGR")
    np.testing.assert_array_equal(bgr[0], tiles[0][:, :, ::-1])


def test_channel_grid_is_the_lectures_gray_view():
    from bulk_explain.workers.filters.filter_weights import channel_grid

    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 3, 8, 10)).astype(np.float32)
    grid = channel_grid(kernel, n_filters=6, n_channels=3, scale=4, margin=2)
    assert grid.shape == (6 * 12 + 5 * 2, 3 * 12 + 2 * 2) and grid.ndim == 2
    unit = (kernel - kernel.min()) / (kernel.max() - kernel.min())  # the lecture: layer-wide min-max
    for f in range(6):
        for c in range(3):
            tile = grid[f * 14:f * 14 + 12, c * 14:c * 14 + 12]
            np.testing.assert_array_equal(tile[::4, ::4], np.rint(unit[:, :, c, f] * 255).astype(np.uint8))
    assert (grid[12:14, :] == 255).all()  # margin


def test_write_weight_plots_through_storage(tmp_path):
    from bulk_explain.workers.filters.filter_weights import write_weight_plots
    from bulk_explain.workers.storage import storage_for

    model = _small_convnet(24)
    storage = storage_for(str(tmp_path))
    records = write_weight_plots(model, ["c1", "p1", "c2"], storage, str(tmp_path / "weights"), 4, 5)
    kinds = {(r["layer"], r["kind"]) for r in records}
    assert kinds == {("c1", "channels"), ("c1", "color_sheet"), ("c1", "color"), ("c2", "channels")}
    assert len(os.listdir(tmp_path / "weights" / "c1")) == 8
    import cv2

    c2 = cv2.imread(str(tmp_path / "weights" / "c2_channels.png"), cv2.IMREAD_UNCHANGED)
    assert c2.shape == (4 * 24 + 3 * 2, 5 * 24 + 4 * 2)


def test_measured_choice_is_kept_for_later_calls():
    size = 24
    model = _small_convnet(size)
    ascent = FilterAscent(model, "c2", size, steps=2)
    starts = np.stack([start_noise(0, "c2", f, size) for f in range(10)])
    ascent.ascend(range(10), starts, batch_size=None, auto="measure", max_batch=4)
    chosen = ascent.chosen_batch
    assert (chosen, ascent.steps_per_call) in ascent.timings
    # a faster-looking entry that did not pass the 10% rule must not change later decisions
    ascent.timings = {(b, 1): (0.0 if b != chosen else 1.0) for b in (1, 4)}
    again = ascent.ascend(range(8), starts[:8], batch_size=None, auto="measure", max_batch=4)
    assert set(again.batch_sizes) <= {chosen} | set(ascent.compiled_sizes())
    assert again.batch_sizes[0] == chosen


def test_filter_index_out_of_range_is_a_clear_error():
    model = _small_convnet(24)
    ascent = FilterAscent(model, "c1", 24, steps=1)
    with pytest.raises(ValueError, match="filter index 8 out of range"):
        ascent.ascend([7, 8], np.stack([start_noise(0, "c1", f, 24) for f in (7, 8)]), batch_size=2)


def test_one_step_per_call_equals_all_steps_in_one_call():
    size = 24
    model = _small_convnet(size)
    ascent = FilterAscent(model, "c2", size, steps=6)
    idx = [0, 3, 5]
    starts = np.stack([start_noise(2, "c2", f, size) for f in idx])
    whole = ascent.run_batch(starts, idx)
    for k in (1, 2, 3):
        split = ascent.run_batch(starts, idx, steps_per_call=k)
        for a, b in zip(whole, split):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="does not divide"):
        ascent.run_batch(starts, idx, steps_per_call=4)
