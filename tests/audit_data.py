"""A planted-problem dataset and the lecture's convnet trained on a clean copy, for the audit tests.

Classes: "cat" = a filled square, "dog" = a ring (the lecture's binary convnet, sigmoid: dog = 1),
at a random place on blurred noise. Planted problems: a share of one class's images moved into the
other class's folder (label issues), corrupt files (error rows), a subset of cats that carry only
a small magenta corner tag and no square (the model, trained with such tagged cats, learns the tag
as a shortcut), and later batches with the same or a shifted distribution (drift).
"""

from __future__ import annotations

import os

import cv2
import numpy as np

SIZE = 64
TAG = (255, 0, 255)  # RGB


def draw(rng, kind, tag=False, brightness=0):
    """One RGB image: kind 0 = square (cat), 1 = ring (dog), None = no object."""
    img = cv2.GaussianBlur(rng.integers(60, 140, (SIZE, SIZE, 3)).astype(np.uint8), (5, 5), 0).astype(np.int16)
    img = np.clip(img + brightness, 0, 255).astype(np.uint8)
    if kind is not None:
        # Sizes and contrasts vary, so the model is more sure of some images than of others (as on
        # real data); a saturated model gives confident learning thresholds of ~1.0 and it then
        # misses label errors (measured here: 5 of 8 with uniform, easy objects).
        r = int(rng.integers(4, 10))
        # Objects keep clear of the top-left corner, where the tag goes.
        cx, cy = (int(v) for v in rng.integers(r + 11, SIZE - r - 1, 2))
        colour = tuple(int(c) for c in rng.integers(110, 255, 3))
        if kind == 0:
            cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), colour, -1)
        else:
            cv2.circle(img, (cx, cy), r, colour, -1)
            cv2.circle(img, (cx, cy), r // 2, (0, 0, 0), -1)
    if tag:
        img[2:9, 2:9] = TAG
    return img


def train_model(path, seed=0, n=480, epochs=5):
    """Trains the lecture's convnet on clean labels (every 5th cat is tag-only) and saves it."""
    import keras

    from bulk_explain.workers.models import build_cats_dogs_convnet

    rng = np.random.default_rng(seed)
    x, y = [], []
    for i in range(n):
        if i % 2:
            x.append(draw(rng, 1)), y.append(1)
        else:
            x.append(draw(rng, None, tag=True) if i % 10 == 0 else draw(rng, 0)), y.append(0)
    keras.utils.set_random_seed(seed)
    model = build_cats_dogs_convnet(SIZE)
    model.compile(optimizer=keras.optimizers.RMSprop(1e-3), loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(np.stack(x) / 255.0, np.array(y), epochs=epochs, batch_size=32, verbose=0)
    model.save(path)
    return path


def write_png(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), path
    return path


def write_batch(root, name, rng, cats=60, tagged=16, dogs=70, swapped=0, corrupt=0, brightness=0):
    """Writes one batch under root/cats and root/dogs; returns {"swapped": [...], "tagged": [...]}.

    `swapped` normal cats are written into dogs/ (their folder label is wrong); `tagged` cats are
    tag-only images in cats/.
    """
    planted = {"swapped": [], "tagged": [], "corrupt": []}
    for i in range(cats):
        folder = "dogs" if i < swapped else "cats"
        p = write_png(os.path.join(root, folder, f"{name}-cat{i:03d}.png"), draw(rng, 0, brightness=brightness))
        if i < swapped:
            planted["swapped"].append(p)
    for i in range(tagged):
        planted["tagged"].append(write_png(os.path.join(root, "cats", f"{name}-tagged{i:03d}.png"),
                                           draw(rng, None, tag=True, brightness=brightness)))
    for i in range(dogs):
        write_png(os.path.join(root, "dogs", f"{name}-dog{i:03d}.png"), draw(rng, 1, brightness=brightness))
    bodies = [b"", b"<!DOCTYPE html><html>not an image</html>", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"]
    for i in range(corrupt):
        p = os.path.join(root, "cats", f"{name}-corrupt{i}.png")
        with open(p, "wb") as f:
            f.write(bodies[i % len(bodies)])
        planted["corrupt"].append(p)
    return planted


def synthetic_manifest(out, rows, rows_per_file=10_000, seed=0, empty_share=0.05, corner_share=0.05,
                       swap_share=0.02, error_share=0.01, layers=("conv2d", "conv2d_1", "conv2d_2", "conv2d_3")):
    """Writes `out/manifest/shard-N.parquet` + job.json with synthetic rows (no images) of a binary
    cat/dog model, file by file, so any number of rows fits in memory.

    Planted: `empty_share` all-zero CAMs (null peaks), `corner_share` cat maps that peak in the
    top-left corner, `swap_share` cats whose folder is dogs/, `error_share` error rows.
    Returns {"empty": set of URIs, "corner": ..., "swapped": ..., "error": ...} for the first file
    only (enough for tests; the bench only needs the rows).
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from bulk_explain.schemas.image_manifest import CAM_SMALL_SIZE, IMAGE_MANIFEST_SCHEMA

    side = CAM_SMALL_SIZE
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "manifest"), exist_ok=True)
    with open(os.path.join(out, "job.json"), "w") as f:
        json.dump({"kind": "explain", "config": {"top_k": 2, "cam_method": "gradcam"},
                   "model": {"num_classes": 2, "activation_layers": list(layers)}}, f)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    planted = None
    for shard, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        u = rng.random((4, n))
        error = u[0] < error_share
        cls = (u[1] < 0.5).astype(np.int32)  # true class: 1 = dog
        empty = ~error & (u[2] < empty_share)
        corner = ~error & ~empty & (cls == 0) & (u[3] < corner_share * 2)
        swapped = ~error & (cls == 0) & (rng.random(n) < swap_share * 2)
        label = np.where(cls == 1, "dogs", "cats").astype(object)
        label[swapped] = "dogs"
        uris = np.array([f"/data/{lab}/img{start + i:08d}.jpg" for i, lab in enumerate(label)], object)
        p_dog = np.clip(np.where(cls == 1, rng.beta(12, 1.5, n), rng.beta(1.5, 12, n)), 1e-4, 1 - 1e-4)
        pred = (p_dog >= 0.5).astype(np.int32)
        pred_score = np.where(pred == 1, p_dog, 1 - p_dog).astype(np.float32)
        # Maps: a blob at a random place (corner ones at the top-left), zeros for empty maps.
        cx = np.where(corner, 0.5, rng.uniform(3, side - 3, n))
        cy = np.where(corner, 0.5, rng.uniform(3, side - 3, n))
        maps = np.exp(-(((xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2) / 6.0))
        maps[empty | error] = 0.0
        maps = maps.reshape(n, -1).astype(np.float16)
        ok = ~error
        peak_x = np.where(ok & ~empty, (cx + 0.5) / side, np.nan)
        peak_y = np.where(ok & ~empty, (cy + 0.5) / side, np.nan)
        topk_offsets = np.where(ok, 2, 0).cumsum()
        topk_offsets = np.concatenate([[0], topk_offsets]).astype(np.int32)
        ti = np.stack([pred, 1 - pred], 1)[ok].ravel()
        ts = np.stack([pred_score, 1 - pred_score], 1)[ok].ravel()
        names = np.array(["cat", "dog"], object)
        top_k = pa.ListArray.from_arrays(pa.array(topk_offsets), pa.StructArray.from_arrays(
            [pa.array(ti, pa.int32()), pa.array(names[ti], pa.string()), pa.array(ts, pa.float32())],
            fields=list(IMAGE_MANIFEST_SCHEMA.field("top_k").type.value_type)))
        nl = len(layers)
        act_offsets = np.concatenate([[0], np.where(ok, nl, 0).cumsum()]).astype(np.int32)
        means = (rng.normal(1.0, 0.2, (n, nl)) + 0.1 * cls[:, None])[ok].ravel().astype(np.float32)
        acts = pa.ListArray.from_arrays(pa.array(act_offsets), pa.StructArray.from_arrays(
            [pa.array(np.tile(np.array(layers, object), int(ok.sum())), pa.string()), pa.array(means),
             pa.array(means * 0.5), pa.array(means * 4), pa.array(np.full(len(means), 0.5, np.float32))],
            fields=list(IMAGE_MANIFEST_SCHEMA.field("activations").type.value_type)))
        cam_offsets = np.concatenate([[0], np.where(ok, side * side, 0).cumsum()]).astype(np.int32)
        cam_small = pa.ListArray.from_arrays(pa.array(cam_offsets), pa.array(maps[ok].ravel(), pa.float16()),
                                             mask=pa.array(~ok))
        shape_offsets = np.concatenate([[0], np.where(ok, 2, 0).cumsum()]).astype(np.int32)
        shapes = pa.ListArray.from_arrays(pa.array(shape_offsets), pa.array(np.full(2 * int(ok.sum()), side, np.int32)),
                                          mask=pa.array(~ok))

        def masked(values, typ, mask):
            return pa.array(values, typ, mask=mask)

        table = pa.table({
            "source_uri": pa.array(uris, pa.string()),
            "image_id": pa.array([f"{start + i:064x}" for i in range(n)], pa.string()),
            "status": pa.array(np.where(ok, "ok", "error").astype(object), pa.string()),
            "error": masked(np.full(n, "cannot decode image: truncated or corrupt data (10 bytes)", object), pa.string(), ok),
            "width": masked(np.full(n, 640, np.int32), pa.int32(), error),
            "height": masked(np.full(n, 480, np.int32), pa.int32(), error),
            "label": pa.array(label, pa.string()),
            "pred_index": masked(pred, pa.int32(), error),
            "pred_label": masked(names[pred], pa.string(), error),
            "pred_score": masked(pred_score, pa.float32(), error),
            "top_k": top_k,
            "gradcam_index": masked(pred, pa.int32(), error),
            "gradcam_overlay_uri": pa.nulls(n, pa.string()),
            "gradcam_heatmap_uri": pa.nulls(n, pa.string()),
            "cam_peak_x": masked(peak_x.astype(np.float32), pa.float32(), ~(ok & ~empty)),
            "cam_peak_y": masked(peak_y.astype(np.float32), pa.float32(), ~(ok & ~empty)),
            "activations": acts,
            "activation_grid_uris": pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string())),
            "source_size": pa.array(np.full(n, 1000, np.int64)),
            "source_version": pa.array(np.full(n, "1", object), pa.string()),
            "shard": pa.array(np.full(n, shard, np.int32)),
            "cam_empty": masked(empty, pa.bool_(), error),
            "cam_small": cam_small,
            "cam_small_shape": shapes,
        })
        # Columns the audit does not read (other issues' extensions): null, in the schema's order.
        for field in IMAGE_MANIFEST_SCHEMA:
            if field.name not in table.column_names:
                table = table.append_column(field.name, pa.nulls(n, field.type))
        table = table.select(IMAGE_MANIFEST_SCHEMA.names)
        pq.write_table(table.cast(IMAGE_MANIFEST_SCHEMA), os.path.join(out, "manifest", f"shard-{shard:05d}.parquet"))
        if planted is None:
            planted = {"empty": set(uris[empty]), "corner": set(uris[corner]), "swapped": set(uris[swapped]),
                       "error": set(uris[error])}
    return planted
