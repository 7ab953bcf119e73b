"""Score-CAM, several CAM methods in one run, and the faithfulness metrics (deletion / insertion
AUC, ROAD), each against plain one-image references written here, and on a model trained here
on the synthetic object-at-a-random-place set, where the right answer is known."""

import json
import os

import cv2
import numpy as np
import pytest

from conftest import photo_like, write_image
from _trained_models import train_shapes_model


# ---------------------------------------------------------------------------- references


def _probability(model, images_scaled, classes, sigmoid_binary):
    """Class probability of each image, one model call per image (no batching)."""
    out = []
    for img, c in zip(images_scaled, classes):
        y = np.asarray(model(img[None].astype(np.float32), training=False))[0]
        if sigmoid_binary:
            out.append(y[0] if c == 1 else 1.0 - y[0])
        else:
            out.append(y[c])
    return np.asarray(out, np.float64)


def reference_scorecam(model, target_layer, image_scaled, class_index, sigmoid_binary, max_channels):
    """Score-CAM for ONE image from the paper / the authors' code: upsample each channel map
    bilinearly, min-max normalize, mask the input, weight = class probability; constant maps are
    skipped; only the `max_channels` channels with the highest mean activation are scored."""
    import keras

    probe = keras.Model(model.inputs, model.get_layer(target_layer).output)
    acts = np.asarray(probe(image_scaled[None].astype(np.float32), training=False))[0]  # h, w, k
    h, w = image_scaled.shape[:2]
    k = acts.shape[-1]
    chosen = np.argsort(-acts.mean(axis=(0, 1)), kind="stable")[: (max_channels or k)]
    weights = np.zeros(k)
    for c in chosen:
        up = cv2.resize(acts[:, :, c], (w, h), interpolation=cv2.INTER_LINEAR)
        if up.max() == up.min():
            continue
        mask = (up - up.min()) / (up.max() - up.min())
        weights[c] = _probability(model, [image_scaled * mask[:, :, None]], [class_index], sigmoid_binary)[0]
    cam = np.maximum((acts * weights).sum(axis=-1), 0)
    return cam / cam.max() if cam.max() > 0 else cam


def reference_causal(model, image_u8, cam, class_index, steps, mode, scale):
    """RISE deletion / insertion for ONE image: blur 11/5 (mirrored border), rank by the map
    upsampled bilinearly (stable), step i changes floor(i*N/K) pixels, trapezoid AUC."""
    h, w = image_u8.shape[:2]
    n = h * w
    full = cv2.resize(cam.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR).ravel()
    order = np.argsort(-full, kind="stable")
    img = image_u8.astype(np.float32).reshape(n, 3)
    blurred = cv2.GaussianBlur(image_u8.astype(np.float32), (11, 11), 5, borderType=cv2.BORDER_REFLECT_101)
    blurred = blurred.reshape(n, 3)
    start, end = (img, blurred) if mode == "deletion" else (blurred, img)
    curve = []
    for i in range(steps + 1):
        x = start.copy()
        idx = order[: (i * n) // steps]
        x[idx] = end[idx]
        curve.append(_probability(model, [scale(x.reshape(h, w, 3))], [class_index], True)[0])
    curve = np.asarray(curve)
    return (curve.sum() - (curve[0] + curve[-1]) / 2) / steps, curve


def reference_linear_impute(img, removed):
    """ROAD's system for one image, solved directly (scipy), as in its code."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    from bulk_explain.workers.explain.faithfulness import ROAD_NEIGHBOUR_WEIGHTS

    h, w, c = img.shape
    flat = removed.ravel()
    idx = np.flatnonzero(flat)
    var = {p: i for i, p in enumerate(idx)}
    rows, cols, vals = [], [], []
    b = np.zeros((len(idx), c))
    for i, p in enumerate(idx):
        y, x = divmod(int(p), w)
        total = 0.0
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                wt = ROAD_NEIGHBOUR_WEIGHTS[dy + 1][dx + 1]
                yy, xx = y + dy, x + dx
                if wt == 0 or not (0 <= yy < h and 0 <= xx < w):
                    continue
                total += wt
                q = yy * w + xx
                if flat[q]:
                    rows.append(i), cols.append(var[q]), vals.append(-wt)
                else:
                    b[i] += wt * img[yy, xx]
        rows.append(i), cols.append(i), vals.append(total)
    a = coo_matrix((vals, (rows, cols)), shape=(len(idx), len(idx))).tocsc()
    out = img.astype(np.float64).reshape(-1, c).copy()
    out[idx] = spsolve(a, b).reshape(len(idx), c)
    return out.reshape(h, w, c)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shapes_model():
    """The lecture's convnet trained on squares (class 0) vs rings (class 1) at a random place."""
    loaded, x_test, y_test, _ = train_shapes_model(400, 32, epochs=5)
    return loaded, x_test, y_test


# ---------------------------------------------------------------------------- Score-CAM


@pytest.mark.parametrize("kind,size,channels", [("cats_dogs", 64, None), ("vgg16", 48, 6)])
def test_scorecam_equals_one_image_reference(kind, size, channels):
    import tensorflow as tf

    from bulk_explain.workers.explain.explain_step import ExplainStep
    from bulk_explain.workers.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(kind=kind, weights="random", input_size=size, seed=7))
    sigmoid = loaded.output_kind == "sigmoid"
    rng = np.random.default_rng(3)
    images = np.stack([photo_like(rng, size, size) for _ in range(3)])
    requested = np.array([0, 1, -1], np.int32) if sigmoid else np.array([5, -1, 17], np.int32)
    step = ExplainStep(loaded, batch_size=4, method="scorecam", scorecam_channels=channels)
    out = step(images, requested)
    scaled = np.asarray(loaded.preprocessing.scale_tensor(tf.constant(images, tf.float32)))
    k = loaded.model.get_layer(step.target_layer).output.shape[-1]
    assert channels is None or channels < k  # the cap path is exercised for VGG16
    for i in range(3):
        ref = reference_scorecam(loaded.model, step.target_layer, scaled[i], int(out["cam_index"][i]), sigmoid,
                                 channels if channels is not None else 128)
        assert ref.max() > 0
        np.testing.assert_allclose(out["cam"][i], ref, atol=1e-4, err_msg=f"{kind} image {i}")


# ---------------------------------------------------------------------------- metrics vs references


def test_deletion_insertion_equal_per_image_reference(shapes_model):
    from bulk_explain.workers.explain.explain_step import ExplainStep

    loaded, x_test, y_test = shapes_model
    steps = 8
    step = ExplainStep(loaded, batch_size=6, target_layer="conv2d_2", metrics=("deletion", "insertion"),
                       metric_steps=steps)
    images, classes = x_test[:5], y_test[:5]  # 5 of 6: padding exercised
    out = step(images, classes)
    assert out["deletion_curve"].shape == (5, 1, steps + 1)
    moved = 0
    for i in range(5):
        for mode in ("deletion", "insertion"):
            auc, curve = reference_causal(loaded.model, images[i], out["cam"][i], int(classes[i]), steps, mode,
                                          lambda x: x / 255.0)
            np.testing.assert_allclose(out[f"{mode}_curve"][i, 0], curve, atol=1e-4, err_msg=f"{mode} image {i}")
            np.testing.assert_allclose(out[f"{mode}_auc"][i, 0], auc, atol=1e-4)
            moved += np.ptp(curve) > 0.5
    assert moved >= 3  # the curves actually move on this model (a flat curve would prove nothing)
    # the baseline itself, borders included (saturated probabilities above would hide a border
    # difference): RISE's blur with mirrored borders
    import tensorflow as tf

    from bulk_explain.workers.explain.faithfulness import gaussian_blur

    got = np.asarray(gaussian_blur(tf.constant(images, tf.float32)))
    for i in range(len(images)):
        ref = cv2.GaussianBlur(images[i].astype(np.float32), (11, 11), 5, borderType=cv2.BORDER_REFLECT_101)
        np.testing.assert_allclose(got[i], ref, atol=1e-3)


def test_road_imputation_equals_direct_solve():
    """The in-graph solver (CG from a coarse-to-fine start) against ROAD's direct sparse solve:
    within a few grey levels, less than ROAD's own noise (sigma 2.55)."""
    from bulk_explain.workers.explain.faithfulness import ROAD_NOISE, linear_impute

    rng = np.random.default_rng(0)
    size = 64  # two coarser levels below this one
    img = cv2.GaussianBlur(rng.uniform(0, 255, (size, size, 3)).astype(np.float32), (5, 5), 0)
    yy, xx = np.mgrid[0:size, 0:size]
    blob_order = np.argsort(np.hypot(yy - 19, xx - 40).ravel(), kind="stable")
    masks = []
    for fraction in (0.1, 0.5, 0.9):  # MoRF-like blobs, the hardest case for an iterative solver
        m = np.zeros(size * size, bool)
        m[blob_order[: int(fraction * size * size)]] = True
        masks.append(m.reshape(size, size))
    masks.append(rng.random((size, size)) < 0.5)  # scattered pixels
    import tensorflow as tf

    batch = np.stack([img] * len(masks))
    # compiled, as in the job (eager while-loops would take seconds)
    got = np.asarray(tf.function(linear_impute)(batch, np.stack(masks)[..., None].astype(np.float32)))
    for i, m in enumerate(masks):
        ref = reference_linear_impute(img, m)
        err = np.abs(got[i] - ref)[m]
        print(f"mask {i}: mean error {err.mean():.3f}, max {err.max():.3f} grey levels")
        assert err.mean() < 0.4 * ROAD_NOISE and err.max() < 1.5 * ROAD_NOISE, (i, err.mean(), err.max())
        np.testing.assert_array_equal(got[i][~m], img[~m])  # kept pixels untouched


# ---------------------------------------------------------------------------- known answer


def test_metrics_rank_gradcam_above_random_above_inverted_per_class(shapes_model):
    """Grad-CAM's map must beat a random map and the inverted map must lose to both, reported per
    class: a blurred image is itself read as one class with high confidence, and for that class
    deletion / insertion barely move whatever the map (the issue's lecture-model observation)."""
    from bulk_explain.workers.explain.explain_step import ExplainStep

    loaded, x_test, y_test = shapes_model
    n = len(x_test)
    step = ExplainStep(loaded, batch_size=n, target_layer="conv2d_2", metrics=("deletion", "insertion", "road"))
    out = step(x_test, y_test)
    cams, classes = out["cam"], out["cam_index"]
    rng = np.random.default_rng(1)
    maps = {"random": rng.random(cams.shape).astype(np.float32), "inverted": 1.0 - cams}
    results = {"gradcam": {k: out[k][:, 0] for k in ("deletion_auc", "insertion_auc", "road_morf", "road_lerf")}}
    results.update({name: step.faithfulness(x_test, m, classes) for name, m in maps.items()})

    import tensorflow as tf

    from bulk_explain.workers.explain.faithfulness import gaussian_blur

    blurred = np.asarray(gaussian_blur(tf.constant(x_test, tf.float32)))
    p_ring = np.asarray(loaded.model(blurred / 255.0, training=False))[:, 0]
    featureless_class = int(np.round(np.mean(p_ring)))  # what a blurred image is read as

    table = {}
    for name, r in results.items():
        gap = r["insertion_auc"] - r["deletion_auc"]
        road_gap = r["road_lerf"].mean(axis=1) - r["road_morf"].mean(axis=1)
        for c in (0, 1):
            k = classes == c
            table[name, c] = (gap[k].mean(), road_gap[k].mean(), r["deletion_auc"][k].mean(), r["insertion_auc"][k].mean())
        table[name, "all"] = (gap.mean(), road_gap.mean(), r["deletion_auc"].mean(), r["insertion_auc"].mean())
    print(f"\nblurred images are read as class {featureless_class} (mean p(ring) {np.mean(p_ring):.3f})")
    print("map       class  ins-del  lerf-morf  deletion  insertion")
    for (name, c), v in table.items():
        print(f"{name:9s} {str(c):5s} {v[0]:8.3f} {v[1]:9.3f} {v[2]:9.3f} {v[3]:10.3f}")

    informative = 1 - featureless_class
    for c in ("all", informative):
        g, rd, inv = table["gradcam", c][0], table["random", c][0], table["inverted", c][0]
        assert g > rd + 0.2 and inv < rd - 0.2, f"class {c}: ins-del gradcam {g:.3f} random {rd:.3f} inverted {inv:.3f}"
        assert table["gradcam", c][1] > 0.1, f"class {c}: ROAD MoRF not below LeRF for Grad-CAM"
        assert table["inverted", c][1] < -0.1, f"class {c}: ROAD inverted map should have MoRF above LeRF"
    # The featureless class: its deletion ends at (and insertion starts from) an image the model
    # reads as that class, so no map separates itself there; the overall mean mixes both classes.
    g0 = table["gradcam", featureless_class][0]
    assert abs(g0) < 0.2 and abs(table["gradcam", informative][0]) > 2 * abs(g0) + 0.3
    assert table["gradcam", featureless_class][1] >= -0.02  # MoRF <= LeRF (a tie) for that class too


# ---------------------------------------------------------------------------- several methods


def test_several_methods_in_one_step_equal_single_method_steps():
    from bulk_explain.workers.explain.explain_step import ExplainStep
    from bulk_explain.workers.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(kind="cats_dogs", weights="random", input_size=64, seed=11))
    rng = np.random.default_rng(5)
    images = np.stack([photo_like(rng, 64, 64) for _ in range(3)])
    kw = dict(metrics=("deletion", "insertion", "road"), metric_steps=4)
    methods = ["gradcam", "gradcam++", "layercam", "scorecam"]
    together = ExplainStep(loaded, 3, method=",".join(methods), scorecam_channels=16, **kw)(images)
    assert together["cams"].shape[:2] == (3, 4)
    np.testing.assert_array_equal(together["cam"], together["cams"][:, 0])
    for m, name in enumerate(methods):
        # metrics alone for a gradient method and Score-CAM, not first in the list (tracing the
        # metric loops for every method would double this test's time for no new path)
        alone = ExplainStep(loaded, 3, method=name, scorecam_channels=16,
                            **(kw if name in ("gradcam++", "scorecam") else {}))(images)
        np.testing.assert_allclose(together["cams"][:, m], alone["cam"], atol=1e-6, err_msg=name)
        for key in ("deletion_auc", "insertion_auc", "road_morf", "road_lerf"):
            if key in alone:
                np.testing.assert_allclose(together[key][:, m], alone[key][:, 0], atol=1e-6, err_msg=f"{name} {key}")
    # maps differ between methods: the per-method columns are not copies of one map
    assert np.abs(together["cams"][:, 0] - together["cams"][:, 3]).max() > 0.05


def test_layout_names_per_method(tmp_path):
    from bulk_explain.workers.layout import OutputLayout

    layout = OutputLayout(str(tmp_path))
    image_id = "ab" * 8
    first = layout.heatmap(3, 7, image_id)
    assert layout.heatmap(3, 7, image_id, "") == first and first.endswith("00003/00007-" + image_id + ".png")
    assert layout.heatmap(3, 7, image_id, "gradcam++").endswith("00007-" + image_id + "-gradcampp.png")
    assert layout.overlay(3, 7, image_id, "scorecam").endswith("00007-" + image_id + "-scorecam.jpg")
    assert layout.overlay(3, 7, image_id, "../../x").endswith("-x.jpg")  # no separator survives
    with pytest.raises(ValueError, match="letters or digits"):
        layout.overlay(3, 7, image_id, "/..")


@pytest.mark.parametrize("argv,needle", [
    (["--cam-method", "gradcam,nope"], "unknown CAM method 'nope'"),
    (["--metrics", "deletion,auc"], "unknown metric 'auc'"),
    (["--metric-steps", "0"], "--metric-steps must be"),
    (["--scorecam-channels", "-1"], "--scorecam-channels must be"),
])
def test_bad_method_or_metric_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    from bulk_explain.jobs.cli import main

    src = tmp_path / "in"
    src.mkdir()
    code = main(["run", "--input", str(src), "--output", str(tmp_path / "out"), "--model", "cats_dogs",
                 "--weights", "random", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err


@pytest.mark.slow  # two jobs with Score-CAM and every metric traced in the workers: ~80 s on 2 loaded cores
def test_run_with_several_methods_and_metrics(tmp_path, ray_local):
    """One job, gradcam + scorecam + metrics: one row per image, the nested per-method fields,
    files per method, definitions in job.json, per-method and per-class means in summary.json;
    and the scorecam entries equal a scorecam-only run's."""
    import pyarrow.dataset as ds

    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain
    from bulk_explain.schemas.image_manifest import EXPLANATIONS_TYPE

    rng = np.random.default_rng(8)
    src = tmp_path / "in"
    for i in range(5):
        write_image(str(src / ("cats" if i % 2 else "dogs") / f"{i}.png"), photo_like(rng, 60, 80))
    (src / "cats" / "broken.jpg").write_bytes(b"not an image")

    def run(out, method):
        config = ExplainConfig(inputs=(str(src),), output=str(out),
                               model=ModelSpec(kind="cats_dogs", weights="random", input_size=64, seed=2),
                               batch_size=4, shard_size=3, workers=1, cam_method=method,
                               metrics=("deletion", "insertion", "road"), metric_steps=4, scorecam_channels=8)
        result = run_explain(config, progress=False)
        assert result.exit_code == 0 and result.ok == 5 and result.errors == 1
        return ds.dataset(str(out / "manifest")).to_table().sort_by("source_uri").to_pylist()

    rows = run(tmp_path / "both", "gradcam,scorecam")
    assert len(rows) == 6 and len({r["source_uri"] for r in rows}) == 6
    schema = ds.dataset(str(tmp_path / "both" / "manifest")).schema
    assert schema.names[-1] == "explanations" and schema.field("explanations").type == EXPLANATIONS_TYPE
    for r in rows:
        if r["status"] == "error":
            assert r["explanations"] == []
            continue
        first, second = r["explanations"]
        assert [first["method"], second["method"]] == ["gradcam", "scorecam"]
        assert first["heatmap_uri"] == r["gradcam_heatmap_uri"] and first["overlay_uri"] == r["gradcam_overlay_uri"]
        assert (first["cam_peak_x"], first["cam_peak_y"]) == (r["cam_peak_x"], r["cam_peak_y"])
        assert second["heatmap_uri"].endswith("-scorecam.png") and second["overlay_uri"].endswith("-scorecam.jpg")
        for e in (first, second):
            assert os.path.isfile(e["heatmap_uri"]) and os.path.isfile(e["overlay_uri"])
            assert 0 <= e["deletion_auc"] <= 1 and 0 <= e["insertion_auc"] <= 1
            assert len(e["road_morf"]) == 5 and len(e["road_lerf"]) == 5

    job = json.loads((tmp_path / "both" / "job.json").read_text())
    defs = job["explanations"]
    assert [m["name"] for m in defs["methods"]] == ["gradcam", "scorecam"]
    assert defs["methods"][1]["max_channels"] == 8
    assert defs["metrics"]["deletion"]["steps"] == 4 and "blurred" in defs["metrics"]["deletion"]["baseline"]
    assert "probability" in defs["metrics"]["score"] and defs["metrics"]["road"]["fractions"] == [0.1, 0.3, 0.5, 0.7, 0.9]
    summary = json.loads((tmp_path / "both" / "summary.json").read_text())["explanations"]
    ins = [r["explanations"][1]["insertion_auc"] for r in rows if r["status"] == "ok"]
    stat = summary["by_method"]["scorecam"]["insertion_auc"]
    assert stat["n"] == 5 and stat["mean"] == pytest.approx(np.mean(ins), abs=1e-6)
    assert stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1]
    assert sum(c["images"] for c in summary["by_class"].values()) == 5
    assert set(summary["by_class"]) <= {"cat", "dog"}

    alone = run(tmp_path / "scorecam", "scorecam")
    for a, b in zip(rows, alone):
        if a["status"] != "ok":
            continue
        sa, sb = a["explanations"][1], b["explanations"][0]
        for key in ("cam_peak_x", "cam_peak_y", "deletion_auc", "insertion_auc"):
            assert sa[key] == pytest.approx(sb[key], abs=1e-5), key
        np.testing.assert_allclose(sa["road_morf"], sb["road_morf"], atol=1e-5)
        with open(sa["heatmap_uri"], "rb") as fa, open(sb["heatmap_uri"], "rb") as fb:
            assert fa.read() == fb.read()  # the same map, written under the per-method name
