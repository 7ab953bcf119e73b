"""The hostile-input corpus (issue 5), generated here and run through the CLI: every broken file is
an error row with a one-line reason, every odd-but-valid file is an ok row, and the job goes on."""

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib

import cv2
import numpy as np
import pyarrow.dataset as ds
import pytest

from conftest import REPO, photo_like, write_image

from bulk_explain.workers import image_io
from bulk_explain.workers.image_io import ImageDecodeError, decode_bgr

MODEL = ["--model", "cats_dogs", "--weights", "random", "--input-size", "64"]
# Credentials in the environment (and in an endpoint URL) must never reach outputs or logs.
SECRETS = {"AWS_ACCESS_KEY_ID": "AKIASENTINELKEYID0001", "AWS_SECRET_ACCESS_KEY": "sentinel-secret-7f3a9c",
           "AWS_SESSION_TOKEN": "sentinel-token-b41d"}
ENDPOINT_WITH_PASSWORD = "http://minio-user:sentinel-password-55e1@127.0.0.1:9"


def run_cli(args, env_extra=None, wait_for_flag=None, on_flag=None):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3", **(env_extra or {}))
    cmd = [sys.executable, "-m", "bulk_explain", *args]
    if wait_for_flag is None:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not os.path.exists(wait_for_flag):
        assert proc.poll() is None and time.monotonic() < deadline, "the job never reached its fault point"
        time.sleep(0.05)
    on_flag()
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ----------------------------------------------------------------------------- corpus

def png_bomb(width=30000, height=30000) -> bytes:
    """A real, valid 8-bit grayscale PNG of width x height zeros: ~4 MB on disk, 900 MB decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (width + 1)  # filter byte + pixels
    z = zlib.compressobj(1)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tiff_bomb_header(width=30000, height=30000) -> bytes:
    """A little-endian TIFF whose first IFD claims width x height RGB pixels (no real pixel data).
    Our header parser does not read TIFF: OpenCV's own cap (set by the driver) must refuse it."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 8), (277, 3, 1, 3), (278, 4, 1, height), (279, 4, 1, width * height * 3)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high with the left half white; EXIF orientation 6 (rotate 90 CW for
    display) -> displayed 20 wide x 40 high with the white half on top."""
    from PIL import Image

    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("CMYK", (48, 32), (0, 255, 255, 0)).save(buf, format="JPEG", quality=95)  # pure red
    return buf.getvalue()


def animated_gif() -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _encode(ext, array):
    ok, buf = cv2.imencode(ext, array)
    assert ok
    return buf.tobytes()


def build_corpus(root: str, rng) -> dict:
    """Writes the corpus; returns {relative name: expected}, expected = ("ok", (w, h)) or
    ("error", reason substring). Names not in the dict must not appear in the manifest."""
    expect = {}

    def put(rel, data, outcome):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        if outcome is not None:
            expect[rel] = outcome
        return path

    photo = photo_like(rng, 48, 64)  # RGB
    jpeg = _encode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    put("cats/normal.jpg", jpeg, ("ok", (64, 48)))
    put("cats/zero.jpg", b"", ("error", "empty file"))
    put("cats/truncated.jpg", jpeg[: len(jpeg) // 3], ("error", "truncated or corrupt"))
    put("cats/page.jpg", b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n", ("error", "HTML"))
    put("cats/notes.jpg", b"just some text, renamed\n", ("error", "not a decodable image"))
    # 16-bit with high and low bytes that differ: the high byte is the photo, the low byte noise.
    # Its outputs must match those of the same photo stored as 8-bit (test below); a conversion
    # that kept the low byte would explain noise instead.
    low = rng.integers(0, 256, photo.shape).astype(np.uint16)
    put("cats/deep16.png", _encode(".png", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR).astype(np.uint16) * 256 + low),
        ("ok", (64, 48)))
    put("cats/eight.png", _encode(".png", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR)), ("ok", (64, 48)))
    put("cats/gray.png", _encode(".png", photo[..., 0]), ("ok", (64, 48)))
    put("cats/rgba.png", _encode(".png", np.dstack([photo, np.full(photo.shape[:2], 100, np.uint8)])), ("ok", (64, 48)))
    put("cats/cmyk.jpg", cmyk_jpeg(), ("ok", (48, 32)))
    put("cats/exif_rotated.jpg", exif_rotated_jpeg(), ("ok", (20, 40)))
    put("cats/one_pixel.png", _encode(".png", np.full((1, 1, 3), 200, np.uint8)), ("ok", (1, 1)))
    put("cats/animated.gif", animated_gif(), ("ok", (30, 20)))
    put("dogs/bomb.png", png_bomb(), ("error", "pixel cap"))
    put("dogs/bomb.tif", tiff_bomb_header(), ("error", "pixel cap"))
    put("dogs/with spaces in name.jpg", jpeg, ("ok", (64, 48)))
    put("dogs/ünïcödé 猫.jpg", jpeg, ("ok", (64, 48)))
    put("dogs/new\nline.jpg", jpeg, ("ok", (64, 48)))
    put("dogs/vanishes.jpg", jpeg, ("error", "disappeared between listing and reading"))
    # A 2 GiB sparse file: refused from its listed size, never read into memory.
    with open(put("dogs/huge.jpg", b"", ("error", "byte cap")), "r+b") as f:
        f.truncate(2 << 30)
    # A name that is not UTF-8 on disk: listed with a \xNN escape, still read and processed.
    os.makedirs(os.path.join(root, "odd"), exist_ok=True)
    with open(os.fsencode(os.path.join(root, "odd")) + b"/latin1-\xe9t\xe9.jpg", "wb") as f:
        f.write(jpeg)
    expect["odd/latin1-\\xe9t\\xe9.jpg"] = ("ok", (64, 48))
    # Never listed: hidden folders and files, a FIFO named like an image (reading it would block
    # forever), a symlink loop (listing must end), a dangling symlink, a non-image extension.
    put(".hidden/secret.jpg", jpeg, None)
    put("cats/.DS_Store.jpg", jpeg, None)
    put("cats/readme.txt", b"hello", None)
    os.mkfifo(os.path.join(root, "dogs", "fifo.jpg"))
    os.symlink(root, os.path.join(root, "dogs", "loop"))
    os.symlink(os.path.join(root, "nowhere.jpg"), os.path.join(root, "cats", "dangling.jpg"))
    if os.geteuid() != 0:  # root reads through chmod 000; see test_unreadable_file_as_root
        path = put("cats/unreadable.jpg", jpeg, ("error", "permission denied"))
        os.chmod(path, 0)
    return expect


@pytest.fixture(scope="module")
def hostile_job(tmp_path_factory):
    rng = np.random.default_rng(11)
    root = str(tmp_path_factory.mktemp("hostile"))
    expect = build_corpus(root, rng)
    out = str(tmp_path_factory.mktemp("out") / "audit")
    flag = str(tmp_path_factory.mktemp("flags") / "planned")
    args = ["run", "--input", root, "--output", out, *MODEL, "--shard-size", "6", "--batch-size", "4",
            "--s3-endpoint-url", ENDPOINT_WITH_PASSWORD]

    def delete_one_file():  # between the driver's listing and the worker's read
        os.remove(os.path.join(root, "dogs", "vanishes.jpg"))
        os.remove(flag)

    proc = run_cli(args, env_extra={"BULK_EXPLAIN_TEST_CRASH_AT": "planned", "BULK_EXPLAIN_TEST_CRASH_ACTION": "wait",
                                    "BULK_EXPLAIN_TEST_CRASH_FLAG": flag, **SECRETS},
                   wait_for_flag=flag, on_flag=delete_one_file)
    return root, out, args, expect, proc


def test_every_hostile_input_is_one_row_with_a_one_line_reason(hostile_job):
    root, out, _, expect, proc = hostile_job
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = ds.dataset(os.path.join(out, "manifest")).to_table()
    rows = {os.path.relpath(r["source_uri"], root): r for r in table.to_pylist()}
    assert table.num_rows == len(rows)  # no duplicates
    assert sorted(rows) == sorted(expect)  # hidden, FIFO, loop, dangling, .txt: not listed
    for rel, (status, detail) in expect.items():
        row = rows[rel]
        assert row["status"] == status, (rel, row["error"])
        if status == "error":
            assert detail in row["error"], (rel, row["error"])
            assert "\n" not in row["error"] and len(row["error"]) < 300, (rel, row["error"])
            assert row["gradcam_overlay_uri"] is None and row["pred_label"] is None
        else:
            assert (row["width"], row["height"]) == detail, rel
            heat = cv2.imread(row["gradcam_heatmap_uri"], cv2.IMREAD_UNCHANGED)
            assert heat.shape == (detail[1], detail[0]), rel
            assert row["pred_label"] in ("cat", "dog")
    summary = json.load(open(os.path.join(out, "summary.json")))
    n_err = sum(1 for s, _ in expect.values() if s == "error")
    assert summary["errors"] == n_err and summary["ok"] == len(expect) - n_err


def test_exif_orientation_is_applied_in_the_outputs(hostile_job):
    root, out, *_ = hostile_job
    row = [r for r in ds.dataset(os.path.join(out, "manifest")).to_table().to_pylist()
           if r["source_uri"].endswith("exif_rotated.jpg")][0]
    overlay = cv2.imread(row["gradcam_overlay_uri"]).astype(float)
    assert overlay.shape[:2] == (40, 20)
    # overlay = original + 0.4 * JET: the white half (top after rotation) stays the brightest
    assert overlay[:20].mean() > overlay[20:].mean() + 60


def test_sixteen_bit_png_explained_like_its_8bit_copy(hostile_job):
    root, out, *_ = hostile_job
    rows = {os.path.basename(r["source_uri"]): r for r in ds.dataset(os.path.join(out, "manifest")).to_table().to_pylist()}
    deep, eight = rows["deep16.png"], rows["eight.png"]
    assert deep["status"] == eight["status"] == "ok"
    assert deep["pred_index"] == eight["pred_index"]
    assert deep["pred_score"] == pytest.approx(eight["pred_score"], abs=0.02)
    a = cv2.imread(deep["gradcam_overlay_uri"]).astype(float)
    b = cv2.imread(eight["gradcam_overlay_uri"]).astype(float)
    assert np.abs(a - b).mean() < 4, np.abs(a - b).mean()


UNREADABLE_AS_NOBODY = """
import json, os, pwd, sys
from bulk_explain.workers.preprocessing import Preprocessing
from bulk_explain.workers.explain.reader import read_one

readable, secret = sys.argv[1:3]
pre = Preprocessing(16, 16, "rescale")
warm = read_one(0, readable, None, os.path.getsize(readable), "1", pre)  # every import done as root
assert warm.ok, warm.error
try:
    nobody = pwd.getpwnam("nobody")
    uid, gid = nobody.pw_uid, nobody.pw_gid
except KeyError:
    uid = gid = 65534
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
item = read_one(1, secret, None, 10, "1", pre)
print(json.dumps({"uid": os.getuid(), "ok": item.ok, "error": item.error}))
"""


def test_unreadable_file_as_root(tmp_path):
    """Root reads through chmod 000, so as root the same read runs in a subprocess that has dropped
    its privileges to `nobody` first: the file is then really unreadable."""
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("not root: the hostile corpus holds a chmod-000 file (test_unreadable_file_is_an_error_row)")
    folder = tempfile.mkdtemp(prefix="perm-", dir="/tmp")
    try:
        os.chmod(folder, 0o755)  # nobody may list and traverse, not read the secret file
        readable = write_image(os.path.join(folder, "ok.png"), photo_like(np.random.default_rng(0), 20, 20))
        os.chmod(readable, 0o644)
        secret = write_image(os.path.join(folder, "secret.png"), photo_like(np.random.default_rng(1), 20, 20))
        os.chmod(secret, 0o600)
        env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run([sys.executable, "-c", UNREADABLE_AS_NOBODY, readable, secret], capture_output=True,
                              text=True, env=env, timeout=300, cwd=folder)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["uid"] != 0 and result["ok"] is False
    assert "permission denied" in result["error"] and "\n" not in result["error"]


def test_unreadable_file_is_an_error_row(hostile_job):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading, so there is no "
                    "unreadable file in the corpus; test_unreadable_file_as_root covers this path")
    root, out, *_ = hostile_job
    rows = ds.dataset(os.path.join(out, "manifest")).to_table().to_pylist()
    row = [r for r in rows if r["source_uri"].endswith("unreadable.jpg")][0]
    assert row["status"] == "error" and "permission denied" in row["error"]


def test_max_error_rate_turns_errors_into_exit_1(hostile_job, tmp_path):
    import shutil

    root, shared_out, args, expect, *_ = hostile_job
    # A copy of the output (the module's job stays as the other tests read it), same job (the rate
    # limit does not change rows): only the shard that held vanishes.jpg, now gone from the
    # listing, is redone.
    out = str(tmp_path / "audit")
    shutil.copytree(shared_out, out, symlinks=True)
    args = [out if a == shared_out else a for a in args]
    proc = run_cli([*args, "--max-error-rate", "0.2"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["error_rate_exceeded"] is True
    assert summary["processed_shards"] == 1 and summary["skipped_shards"] == summary["shards"] - 1
    assert summary["removed_images"] == 1 and summary["removed_image_uris"][0].endswith("vanishes.jpg")
    assert "shards already committed" in proc.stderr and "vanishes.jpg" in proc.stderr
    table = ds.dataset(os.path.join(out, "manifest")).to_table()
    assert table.num_rows == len(expect) - 1
    assert not any(u.endswith("vanishes.jpg") for u in table.column("source_uri").to_pylist())


def test_credentials_never_in_outputs_or_logs(hostile_job):
    root, out, _, _, proc = hostile_job
    secrets = [*SECRETS.values(), "sentinel-password-55e1"]
    job = json.load(open(os.path.join(out, "job.json")))
    assert job["config"]["s3_endpoint_url"] == "http://***@127.0.0.1:9"
    for d, _, names in os.walk(out):
        for name in names:
            data = open(os.path.join(d, name), "rb").read()
            for secret in secrets:
                assert secret.encode() not in data, (name, secret)
    for secret in secrets:
        assert secret not in proc.stderr and secret not in proc.stdout


# ----------------------------------------------------------------------------- safety: names

def _fake_result():
    return {"cam": np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), "pred_index": 1, "pred_score": 0.9,
            "top_index": np.array([1, 0]), "top_score": np.array([0.9, 0.1]), "cam_index": 1,
            "stats": np.zeros((1, 4), np.float32)}


def test_source_names_cannot_steer_writes_outside_dst(tmp_path):
    """Hostile source names (S3 keys with "..", absolute-looking and multi-line local names) end up
    only in the source_uri/label columns; every file the writer creates lies under DST."""
    import hashlib

    from bulk_explain.workers.layout import OutputLayout
    from bulk_explain.workers.explain.reader import DecodedImage
    from bulk_explain.workers.explain.writer import ShardWriter

    dst = tmp_path / "area" / "dst"
    layout = OutputLayout(str(dst))
    writer = ShardWriter(layout, 7, ["cat", "dog"], ["conv"], 90)
    hostile = ["s3://bucket/in/a/../../x.jpg", "s3://bucket/in/../../../other-bucket/y.jpg",
               "/data/in/../../../../etc/cron.d/evil.jpg", "/data/in/..\n../z.jpg", "/data/in/~root/.ssh/k.jpg"]
    rows = []
    for pos, uri in enumerate(hostile):
        data = uri.encode()
        item = DecodedImage(position=pos, uri=uri, label="..", size=len(data), version="1",
                            image_id=hashlib.sha256(data).hexdigest(), bgr=np.full((8, 8, 3), 90, np.uint8))
        row = writer.image_row(item, _fake_result(), [np.ones((2, 2, 3), np.float32)])
        assert row["status"] == "ok", row["error"]
        rows.append(row)
    writer.commit(rows, "hash", 0.1, "fp")
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert written and all(p.startswith(str(dst) + os.sep) for p in written)
    for row in rows:
        for uri in (row["gradcam_overlay_uri"], row["gradcam_heatmap_uri"], *row["activation_grid_uris"]):
            assert os.path.realpath(uri).startswith(str(dst) + os.sep) and ".." not in uri
    table = ds.dataset(str(dst / "manifest")).to_table()
    assert table.column("source_uri").to_pylist() == hostile


def test_layout_refuses_ids_that_are_not_ids():
    from bulk_explain.workers.layout import OutputLayout

    for layout, prefix in ((OutputLayout("/out/dst"), "/out/dst/"), (OutputLayout("s3://bucket/dst"), "s3://bucket/dst/")):
        good = "ab" * 32
        assert layout.overlay(1, 2, good).startswith(prefix)
        for call in (lambda: layout.overlay(1, 2, "../../../x"), lambda: layout.heatmap(1, 2, "ab/../../cd" * 2),
                     lambda: layout.overlay(-1, 0, good), lambda: layout.manifest_part("1/../../x"),
                     lambda: layout.commit_marker(True), lambda: layout.activation_grid(0, -3, good, 0, "l"),
                     lambda: layout.staged_part(2.5)):
            with pytest.raises(ValueError):
                call()
        # a layer name is sanitized, not trusted
        assert "/.." not in layout.activation_grid(0, 0, good, 0, "../../etc/passwd")[len(prefix):]


# ----------------------------------------------------------------------------- decode level

def test_decoders_on_odd_formats():
    bgr = decode_bgr(cmyk_jpeg())
    assert bgr.shape == (32, 48, 3) and bgr[..., 2].mean() > 200 and bgr[..., :2].mean() < 40  # red
    first = decode_bgr(animated_gif())
    assert first.shape == (20, 30, 3) and tuple(first[0, 0]) == (0, 0, 255)  # first frame, red (BGR)
    assert decode_bgr(_encode(".png", np.full((1, 1), 7, np.uint8))).shape == (1, 1, 3)
    with pytest.raises(ImageDecodeError, match="pixel cap"):
        decode_bgr(png_bomb(20000, 20000))


def test_reader_reports_a_vanished_file(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from bulk_explain.jobs.explain.plan import ShardTask
    from bulk_explain.workers.preprocessing import Preprocessing
    from bulk_explain.workers.explain.reader import iter_decoded_batches

    good = write_image(str(tmp_path / "a.jpg"), photo_like(np.random.default_rng(0), 20, 20))
    gone = str(tmp_path / "gone.jpg")
    task = ShardTask(0, [good, gone], [None, None], [1, 1], ["1", "1"])
    pre = Preprocessing(height=16, width=16, scaling="rescale")
    with ThreadPoolExecutor(2) as pool:
        items = [i for batch in iter_decoded_batches(task, pre, 4, pool) for i in batch]
    assert [i.ok for i in items] == [True, False]
    assert items[1].error == "file disappeared between listing and reading"


def test_header_cap_covers_all_header_formats():
    assert image_io.header_size(png_bomb(300, 200)) == (300, 200)
    assert image_io.MAX_IMAGE_PIXELS < 30000 * 30000
