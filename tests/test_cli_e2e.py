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

from schemas.image_manifest import IMAGE_MANIFEST_SCHEMA


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
    cmd = [sys.executable, "-m", "jobs"] if module else [sys.executable, "-c", "from jobs.cli import main; raise SystemExit(main())"]
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", RAY_AUTH_MODE="disabled")
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
    assert meta.get(b"bulk_explain.schema_version") == b"1"
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
        assert row["pred_label"] in ("cat", "dog") and row["pred_index"] in (0, 1)
        assert row["pred_score"] >= 0.5
        assert [t["label"] for t in row["top_k"]][0] == row["pred_label"]
        assert len(row["activations"]) == 8  # 4 conv + 4 pooling layers
        for a in row["activations"]:
            assert 0.0 <= a["zero_fraction"] <= 1.0 and a["max"] >= a["mean"] and a["std"] >= 0
    assert rows[[p for p in files if "cats" in p][0]]["label"] == "cats"
    assert rows[[p for p in files if "nested" in p][0]]["label"] == "deep"
    assert rows[[p for p in files if p.endswith("top.webp")][0]]["label"] is None
    # activation grids for the first image of each shard
    grids = [u for r in rows.values() for u in r["activation_grid_uris"]]
    assert grids and all(os.path.exists(u) for u in grids)


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


def test_rerun_skips_committed_shards_via_python_m(finished_job):
    files, out, args, _ = finished_job
    proc = run_cli(args, module=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 shards already committed" in proc.stderr
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["skipped_shards"] == 4 and summary["processed_shards"] == 0
    assert ds.dataset(os.path.join(out, "manifest")).count_rows() == len(files)


def test_changed_config_is_refused(finished_job):
    _, out, args, _ = finished_job
    changed = [a if a != "gradcam" else a for a in args] + ["--top-k", "1"]
    proc = run_cli(changed)
    assert proc.returncode == 2
    assert "different configuration" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_python_api_vgg16_with_label_class(ray_local, tmp_path):
    from jobs import ExplainConfig, ModelSpec, run_explain

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
