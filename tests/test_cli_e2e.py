"""End to end through the CLI (a real embedded Ray in a subprocess), and through the Python API."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pyarrow.dataset as ds
import pytest

from conftest import REPO, photo_like, write_image

from bulk_explain.schemas.image_manifest import IMAGE_MANIFEST_SCHEMA


def make_mixed_folder(root, rng):
    """Returns {path: (width, height) or None for undecodable}."""
    files = {}
    for i in range(7):
        h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        files[write_image(os.path.join(root, "cats", f"cat.{i}.jpg"), photo_like(rng, h, w))] = (w, h)
    for i in range(5):
        gray = photo_like(rng, 70, 50)[..., 0]
        p = os.path.join(root, "dogs", f"dog {i}.png")  # a space in the name
        os.makedirs(os.path.dirname(p), exist_ok=True)
        cv2.imwrite(p, gray)
        files[p] = (50, 70)
    rgba = np.dstack([photo_like(rng, 33, 44), np.full((33, 44), 128, np.uint8)])
    p = os.path.join(root, "dogs", "alpha.png")
    cv2.imwrite(p, rgba)
    files[p] = (44, 33)
    files[write_image(os.path.join(root, "dogs", "deep", "nested.bmp"), photo_like(rng, 31, 29))] = (29, 31)
    files[write_image(os.path.join(root, "top.webp"), photo_like(rng, 36, 36))] = (36, 36)
    corrupt = os.path.join(root, "cats", "corrupt.jpg")
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    files[corrupt] = None
    empty = os.path.join(root, "dogs", "empty.jpg")
    open(empty, "wb").close()
    files[empty] = None
    # not images: ignored by extension, and a hidden folder ignored entirely
    with open(os.path.join(root, "cats", "notes.txt"), "w") as f:
        f.write("ignore me")
    write_image(os.path.join(root, ".hidden", "x.jpg"), photo_like(rng, 20, 20))
    return files


def run_cli(args, module=False, **kw):
    cmd = [sys.executable, "-m", "bulk_explain"] if module else [sys.executable, "-c", "from bulk_explain.jobs.cli import main; raise SystemExit(main())"]
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=600, **kw)


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("in")
    files = make_mixed_folder(str(root), rng)
    out = str(tmp_path_factory.mktemp("out") / "audit")
    args = ["run", "--input", str(root), "--output", out, "--model", "cats_dogs", "--weights", "random",
            "--input-size", "64", "--shard-size", "5", "--batch-size", "4", "--activation-grids", "1"]
    proc = run_cli(args)
    return files, out, args, proc


def test_cli_job_writes_complete_manifest(finished_job):
    files, out, _, proc = finished_job
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shards 4/4" in proc.stderr  # progress lines
    dataset = ds.dataset(os.path.join(out, "manifest"))
    assert dataset.schema.equals(IMAGE_MANIFEST_SCHEMA, check_metadata=False)
    table = dataset.to_table()
    assert len(dataset.files) == 4  # one file per shard, temp files invisible
    meta = dataset.schema.metadata or {}
    assert meta.get(b"bulk_explain.schema_version") == b"2"
    rows = {r["source_uri"]: r for r in table.to_pylist()}
    assert sorted(rows) == sorted(files) and table.num_rows == len(files)  # every input exactly once
    for path, size in files.items():
        row = rows[path]
        assert os.path.isabs(row["source_uri"])
        if size is None:
            assert row["status"] == "error" and row["error"] and "\n" not in row["error"]
            assert row["gradcam_overlay_uri"] is None
            continue
        assert row["status"] == "ok", row["error"]
        assert (row["width"], row["height"]) == size
        with open(path, "rb") as f:
            import hashlib

            assert row["image_id"] == hashlib.sha256(f.read()).hexdigest()
        overlay = cv2.imread(row["gradcam_overlay_uri"])
        heat = cv2.imread(row["gradcam_heatmap_uri"], cv2.IMREAD_UNCHANGED)
        assert overlay.shape == (size[1], size[0], 3)
        assert heat.shape == (size[1], size[0]) and heat.dtype == np.uint8
        if row["cam_empty"]:  # random weights: an all-zero map has no peak
            assert row["cam_peak_x"] is None and row["cam_peak_y"] is None and heat.max() == 0
        else:
            assert 0 <= row["cam_peak_x"] <= 1 and 0 <= row["cam_peak_y"] <= 1
            # the peak in the manifest is where the heatmap file is brightest
            py, px = int(row["cam_peak_y"] * size[1]), int(row["cam_peak_x"] * size[0])
            assert heat[min(py, size[1] - 1), min(px, size[0] - 1)] >= heat.max() - 2
        assert row["pred_label"] == ("cat", "dog")[row["pred_index"]]
        assert [t["label"] for t in row["top_k"]] == [row["pred_label"], ("cat", "dog")[1 - row["pred_index"]]]
        assert [t["score"] for t in row["top_k"]] == pytest.approx([row["pred_score"], 1 - row["pred_score"]], abs=1e-6)
        assert len(row["activations"]) == 8  # 4 conv + 4 pooling layers
        for a in row["activations"]:
            assert 0.0 <= a["zero_fraction"] <= 1.0 and a["max"] >= a["mean"] and a["std"] >= 0
    assert rows[[p for p in files if "cats" in p][0]]["label"] == "cats"
    assert rows[[p for p in files if "nested" in p][0]]["label"] == "deep"
    assert rows[[p for p in files if p.endswith("top.webp")][0]]["label"] is None
    # activation grids for the first image of each shard
    grids = [u for r in rows.values() for u in r["activation_grid_uris"]]
    assert grids and all(os.path.exists(u) for u in grids)


def test_predictions_equal_keras_on_the_same_files(finished_job):
    """pred_index / pred_score of the lossless inputs against Keras itself: the same seeded random
    model, keras.utils.load_img (nearest, 64 px), x/255, model.predict; p = P(dog)."""
    import keras

    from bulk_explain.workers.models import ModelSpec, load_model

    files, out, _, _ = finished_job
    rows = {r["source_uri"]: r for r in ds.dataset(os.path.join(out, "manifest")).to_table().to_pylist()}
    lossless = sorted(p for p, size in files.items() if size and p.endswith((".png", ".bmp")))
    assert len(lossless) >= 6
    model = load_model(ModelSpec(kind="cats_dogs", weights="random", input_size=64)).model
    x = np.stack([np.asarray(keras.utils.load_img(p, target_size=(64, 64), interpolation="nearest"), np.float32)
                  for p in lossless]) / 255.0
    p_dog = model.predict(x, verbose=0)[:, 0]
    for path, p in zip(lossless, p_dog):
        row = rows[path]
        assert row["pred_index"] == int(p > 0.5), path
        assert row["pred_score"] == pytest.approx(max(p, 1 - p), abs=1e-4), path


def test_job_json_and_summary(finished_job):
    files, out, _, proc = finished_job
    job = json.load(open(os.path.join(out, "job.json")))
    pre = job["model"]["preprocessing"]
    assert (pre["height"], pre["width"], pre["scaling"], pre["interpolation"]) == (64, 64, "rescale", "nearest")
    assert len(job["model"]["fingerprint"]) == 64 and job["versions"]["tensorflow"]
    assert job["config"]["shard_size"] == 5 and job["model"]["target_layer"] == "conv2d_3"
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["ok"] == sum(1 for s in files.values() if s) and summary["errors"] == 2
    assert summary["shards"] == 4 and summary["images_per_second"] > 0


def _copy_output(out, tmp_path):
    """A private copy of the module's output, for a test that writes to it (the module's job stays
    as the other tests read it, in any order)."""
    import shutil

    copy = str(tmp_path / "audit")
    shutil.copytree(out, copy)
    return copy


def _with(args, **changes):
    """`args` with --flag values replaced (flag_name=value; None removes the flag) or appended."""
    args = list(args)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in args:
            i = args.index(flag)
            del args[i:i + 2]
        if value is not None:
            args += [flag, str(value)]
    return args


def _snapshot(root):
    return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
            for d, _, fs in os.walk(root) for f in fs}


def test_rerun_skips_committed_shards_via_python_m(finished_job, tmp_path):
    files, shared_out, args, _ = finished_job
    out = _copy_output(shared_out, tmp_path)
    proc = run_cli(_with(args, output=out), module=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 shards already committed" in proc.stderr
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["skipped_shards"] == 4 and summary["processed_shards"] == 0
    assert ds.dataset(os.path.join(out, "manifest")).count_rows() == len(files)


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    from bulk_explain.workers.models import ModelSpec, load_model

    path = str(tmp_path_factory.mktemp("weights") / "other.keras")  # cats_dogs: --weights is a model file
    load_model(ModelSpec(kind="cats_dogs", weights="random", input_size=64, seed=1)).model.save(path)
    return path


@pytest.mark.parametrize("change", [
    {"model": "vgg16", "input_size": 32},
    {"weights": "OTHER_WEIGHTS"},
    {"seed": 1},
    {"input_size": 48},
    {"interpolation": "bilinear"},
    {"target_layer": "conv2d_2"},
    {"activation_layers": "conv2d,conv2d_1"},
    {"cam_method": "gradcam++"},
    {"cam_score": "probability"},
    {"cam_class": "label"},
    {"top_k": 1},
    {"activation_grids": 0},
], ids=lambda change: ",".join(change))
def test_changed_config_is_refused_before_ray(finished_job, tmp_path, capsys, ray_init_calls, other_weights, change):
    from bulk_explain.jobs.cli import main

    _, shared_out, args, _ = finished_job
    out = _copy_output(shared_out, tmp_path)
    change = {k: (other_weights if v == "OTHER_WEIGHTS" else v) for k, v in change.items()}
    before = _snapshot(out)
    capsys.readouterr()
    assert main(_with(args, output=out, **change)) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and len(err.strip().splitlines()) == 1, err
    assert ray_init_calls == []  # refused before Ray started
    assert _snapshot(out) == before  # nothing in DST written, deleted or touched


def test_unchanged_config_is_accepted_without_starting_ray(finished_job, tmp_path, capsys, ray_init_calls):
    """The control for the refusals above: the very same command on the same output is accepted,
    and with every shard committed it starts no Ray at all."""
    from bulk_explain.jobs.cli import main

    _, shared_out, args, _ = finished_job
    out = _copy_output(shared_out, tmp_path)
    assert main(_with(args, output=out)) == 0
    assert "4 shards already committed" in capsys.readouterr().err
    assert ray_init_calls == []


def test_overwrite_replaces_a_different_configuration(finished_job, tmp_path, capsys):
    from bulk_explain.jobs.cli import main

    files, shared_out, args, _ = finished_job
    out = _copy_output(shared_out, tmp_path)
    assert main(_with(args, output=out, top_k=1) + ["--overwrite", "--quiet"]) == 0, capsys.readouterr().err
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["processed_shards"] == 4 and summary["skipped_shards"] == 0
    job = json.load(open(os.path.join(out, "job.json")))
    assert job["config"]["top_k"] == 1 and job["config"]["overwrite"] is True
    rows = ds.dataset(os.path.join(out, "manifest")).to_table().to_pylist()
    assert sorted(r["source_uri"] for r in rows) == sorted(files)
    assert all(len(r["top_k"]) == 1 for r in rows if r["status"] == "ok")
    # and the new configuration is now the one a plain re-run must match
    assert main(_with(args, output=out, top_k=1) + ["--quiet"]) == 0
    assert main(_with(args, output=out) + ["--quiet"]) == 2


def test_same_config_with_other_weights_in_the_file_is_refused(tmp_path, capsys, ray_init_calls):
    """The weights file's path is unchanged but its content is not: caught by the model's
    fingerprint (after the driver loads the model, still before Ray starts)."""
    from bulk_explain.jobs.cli import main
    from bulk_explain.workers.models import ModelSpec, load_model

    write_image(str(tmp_path / "in" / "cats" / "a.png"), photo_like(np.random.default_rng(0), 30, 40))
    weights = str(tmp_path / "w.keras")  # cats_dogs: --weights is a model file
    load_model(ModelSpec(kind="cats_dogs", weights="random", input_size=64, seed=1)).model.save(weights)
    args = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "cats_dogs",
            "--weights", weights, "--input-size", "64", "--quiet"]
    assert main(args) == 0
    assert len(ray_init_calls) == 1
    load_model(ModelSpec(kind="cats_dogs", weights="random", input_size=64, seed=2)).model.save(weights)
    before = _snapshot(str(tmp_path / "out"))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "different configuration or model" in err and len(err.strip().splitlines()) == 1, err
    assert len(ray_init_calls) == 1 and _snapshot(str(tmp_path / "out")) == before


def test_python_api_vgg16_with_label_class(ray_local, tmp_path):
    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain

    rng = np.random.default_rng(3)
    for i in range(3):
        write_image(str(tmp_path / "in" / "tench" / f"{i}.jpg"), photo_like(rng, 50, 60))
    config = ExplainConfig(
        inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"),
        model=ModelSpec(kind="vgg16", weights="random", input_size=32), batch_size=2, shard_size=2,
        cam_class="label", activation_layers=("block1_conv1", "block5_pool"), top_k=3,
    )
    result = run_explain(config, progress=False)
    assert result.exit_code == 0 and result.ok == 3 and result.shards == 2
    table = ds.dataset(result.manifest_uri).to_table().to_pylist()
    assert {r["label"] for r in table} == {"tench"}
    assert all(r["gradcam_index"] == 0 for r in table)  # ImageNet class 0 is "tench"
    assert all(len(r["top_k"]) == 3 and [a["layer"] for a in r["activations"]] == ["block1_conv1", "block5_pool"]
               for r in table)
    assert ray_local.is_initialized()  # the API reuses the caller's Ray and leaves it running
