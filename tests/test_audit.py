"""`bulk-explain audit` (issue 12): real explain runs of the lecture's convnet, trained here on a
clean synthetic cat/dog set, over a dataset with planted problems (swapped labels, corrupt files, a
corner-tag shortcut, later batches with and without a brightness shift), then audits: label-issue
recall/precision, drift gate, strategy clusters, history, gates/exit codes, the report in a real
headless Chromium, and the same audit over S3 (moto) through `run --audit`.

The empty-CAM core fix (null peaks, cam_empty, cam_small) and the 'empty maps are never clustered'
rule are tested without Ray on small inputs.
"""

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from audit_data import synthetic_manifest, train_model, write_batch

CONTRACT_FILES = ("findings.parquet", "images.parquet", "clusters.parquet", "report.html", "summary.json")
CHECKS = ("label_issues", "low_confidence", "errors", "class_balance", "drift", "cam_border",
          "strategy_clusters", "empty_maps")
EXPLAIN = dict(batch_size=32, shard_size=64, cam_method="layercam", target_layer="conv2d_2")


# ---------------------------------------------------------------------------------------- core fix

def test_empty_cam_gives_null_peak_flag_and_small_map(tmp_path):
    from bulk_explain.schemas.image_manifest import CAM_SMALL_SIZE, IMAGE_MANIFEST_SCHEMA
    from bulk_explain.workers import image_io
    from bulk_explain.workers.layout import OutputLayout
    from bulk_explain.workers.explain.reader import DecodedImage
    from bulk_explain.workers.explain.writer import ShardWriter

    assert image_io.cam_peak(np.zeros((40, 30), np.float32)) == (None, None)
    x, y = image_io.cam_peak(np.pad(np.ones((1, 1), np.float32), ((5, 34), (20, 9))))
    assert (round(x, 3), round(y, 3)) == (round(20.5 / 30, 3), round(5.5 / 40, 3))
    # 7x7 (the lecture's net at 150 px) grows, 28x28 shrinks: both to the fixed grid, peak kept
    for n in (7, 28):
        cam = np.zeros((n, n), np.float32)
        cam[n - 1, 0] = 1.0
        small = image_io.cam_small(cam, CAM_SMALL_SIZE)
        assert small.shape == (CAM_SMALL_SIZE, CAM_SMALL_SIZE)
        assert np.unravel_index(small.argmax(), small.shape) == (CAM_SMALL_SIZE - 1, 0)

    writer = ShardWriter(OutputLayout(str(tmp_path)), 0, ["cat", "dog"], ["conv2d"])
    rows = []
    for position, cam in enumerate((np.zeros((4, 4), np.float32), np.eye(4, dtype=np.float32))):
        item = DecodedImage(position, f"/x/cats/{position}.png", "cats", 10, "1", image_id=f"{position:064x}",
                            bgr=np.full((20, 24, 3), 100, np.uint8))
        result = {"cam": cam, "pred_index": 0, "pred_score": 0.9, "top_index": np.array([0, 1]),
                  "top_score": np.array([0.9, 0.1]), "cam_index": 0, "stats": np.ones((1, 4), np.float32)}
        rows.append(writer.image_row(item, result))
    marker = writer.commit(rows, "hash", 0.1, "fp")
    assert marker["empty_maps"] == 1
    table = pq.read_table(os.path.join(tmp_path, "manifest", "shard-00000.parquet"))
    assert table.schema.equals(IMAGE_MANIFEST_SCHEMA, check_metadata=False)
    names = table.schema.names  # appended after `shard`, never inserted before it
    assert names.index("shard") < names.index("cam_empty")
    assert names[names.index("cam_empty"):names.index("cam_empty") + 3] == ["cam_empty", "cam_small", "cam_small_shape"]
    empty, full = table.to_pylist()
    assert empty["status"] == "ok" and empty["cam_empty"] is True
    assert empty["cam_peak_x"] is None and empty["cam_peak_y"] is None
    assert empty["cam_small"] == [0.0] * CAM_SMALL_SIZE ** 2 and empty["cam_small_shape"] == [14, 14]
    assert full["cam_empty"] is False and 0 <= full["cam_peak_x"] <= 1
    assert max(full["cam_small"]) > 0.9 and len(full["cam_small"]) == CAM_SMALL_SIZE ** 2


def test_empty_maps_are_listed_and_never_clustered(tmp_path):
    from bulk_explain.jobs.audit import AuditConfig, run_audit

    out = str(tmp_path / "out")
    planted = synthetic_manifest(out, 1200, rows_per_file=1200, seed=3)
    result = run_audit(AuditConfig(output=out, cluster_sample_per_class=200), progress=False)
    audit = result.audit_uri
    images = pq.read_table(os.path.join(audit, "images.parquet")).to_pylist()
    listed = {r["source_uri"] for r in images if r["check"] == "empty_maps"}
    assert listed == planted["empty"] and len(listed) > 20
    clustered = set(pq.read_table(os.path.join(audit, "clusters.parquet")).column("source_uri").to_pylist())
    assert clustered and not clustered & planted["empty"]
    assert not {r["source_uri"] for r in images if r["check"] == "cam_border"} & planted["empty"]
    # every non-empty readable image is in a cluster: the sample (200 per class) plus the assigned rest
    ok_nonempty = 1200 - len(planted["error"]) - len(planted["empty"])
    assert len(clustered) == ok_nonempty
    # the corner maps form their own cluster(s), flagged as a border strategy
    border = {r["source_uri"] for r in images if r["check"] == "strategy_clusters"}
    assert planted["corner"] <= border and len(border) <= 1.2 * len(planted["corner"])
    empty_finding = result.finding("empty_maps")
    assert "layercam" in empty_finding["details"] and empty_finding["status"] == "warn"


def test_check_helpers_flag_rank_and_count_per_class():
    """`Check.flag` (share, rows worst first) and `Check.count_by_class`, which every check uses."""
    from bulk_explain.jobs.audit.checks import Check

    check = Check()
    population = np.array([True, True, True, True, False, True])
    flagged = np.array([False, True, True, False, False, True])
    scores = np.array([0.9, 0.4, 0.1, 0.8, 0.0, 0.4], np.float32)
    value, rows, ranked_scores = check.flag(flagged, population, scores)
    assert value == 3 / 5 and rows.tolist() == [2, 1, 5] and ranked_scores.tolist() == scores[[2, 1, 5]].tolist()
    assert rows.dtype == np.int64 and ranked_scores.dtype == np.float32
    highest_first = lambda s: np.argsort(-s, kind="stable")  # noqa: E731
    assert check.flag(flagged, population, scores, highest_first)[1].tolist() == [1, 5, 2]
    # row numbers instead of a mask: ties keep the given order under a stable sort
    assert check.flag(np.array([5, 1]), population, scores, highest_first)[1].tolist() == [5, 1]
    value, rows, ones = check.flag(flagged, population, worst_first=None)  # manifest order, scored 1
    assert rows.tolist() == [1, 2, 5] and ones.tolist() == [1.0, 1.0, 1.0]
    assert check.flag(np.zeros(6, bool), population, scores)[0] == 0.0

    names = ["cat", "dog", "owl", "fox"]
    codes = np.array([1, 3, 1, -1, 0, 3, 1])  # -1: no class, not counted; owl: none, left out
    assert list(check.count_by_class(codes, names).items()) == [("dog", 3), ("fox", 2), ("cat", 1)]
    assert list(check.count_by_class(codes, names, top=2).items()) == [("dog", 3), ("fox", 2)]
    assert check.count_by_class(np.array([2, 0]), names) == {"cat": 1, "owl": 1}
    assert list(check.count_by_class(np.array([2, 0]), names)) == ["cat", "owl"]  # ties in class order
    assert check.count_by_class(np.zeros(0, np.int32), names) == {}


# ------------------------------------------------------------------------- real runs on planted data

@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return train_model(str(tmp_path_factory.mktemp("model") / "cats_dogs.keras"))


def _explain(root, out, model):
    from bulk_explain.jobs import ExplainConfig, ModelSpec, run_explain

    result = run_explain(ExplainConfig(inputs=(root,), output=out, model=ModelSpec(kind="cats_dogs", model_file=model),
                                       **EXPLAIN), progress=False)
    assert result.exit_code == 0
    return result


@pytest.fixture(scope="module")
def audited(model_file, tmp_path_factory):
    """(Each run starts and stops its own embedded Ray: `ray_local` is per test.)
    Batch 1 (planted swaps, corrupt files, tag-only cats) -> audit A; batch 2 with the same
    distribution -> audit B; batch 3 brighter -> audit C. Each audit's baseline is the previous."""
    from bulk_explain.jobs.audit import AuditConfig, run_audit

    base = tmp_path_factory.mktemp("audit")
    root, out = str(base / "in"), str(base / "out")
    rng = np.random.default_rng(1)
    planted = write_batch(root, "b1", rng, cats=80, tagged=16, dogs=80, swapped=8, corrupt=3)
    first = _explain(root, out, model_file)
    a = run_audit(AuditConfig(output=out), progress=False)
    write_batch(root, "b2", rng, cats=30, tagged=6, dogs=30)
    _explain(root, out, model_file)
    b = run_audit(AuditConfig(output=out, gates=("drift<=0.3",)), progress=False)
    write_batch(root, "b3", rng, cats=30, tagged=6, dogs=30, brightness=60)
    _explain(root, out, model_file)
    c = run_audit(AuditConfig(output=out, gates=("drift<=0.3",)), progress=False)
    return {"root": root, "out": out, "planted": planted, "first": first, "audits": (a, b, c)}


def _images(audit, check):
    rows = pq.read_table(os.path.join(audit.audit_uri, "images.parquet")).to_pylist()
    return [r for r in rows if r["check"] == check]


@pytest.mark.slow
def test_label_issues_find_the_planted_swaps(audited):
    a = audited["audits"][0]
    swapped = set(audited["planted"]["swapped"])
    flagged = [r["source_uri"] for r in _images(a, "label_issues")]
    hits = len(set(flagged) & swapped)
    recall, precision = hits / len(swapped), hits / max(len(flagged), 1)
    print(f"label issues: recall {recall:.2f} ({hits}/{len(swapped)}), precision {precision:.2f} "
          f"({hits}/{len(flagged)})")
    assert recall >= 0.8 and precision >= 0.5
    ranks = [r["rank"] for r in _images(a, "label_issues")]
    assert ranks == list(range(1, len(ranks) + 1))
    scores = [r["score"] for r in _images(a, "label_issues")]
    assert scores == sorted(scores)  # ranked by self-confidence, least confident first


@pytest.mark.slow
def test_errors_and_summary_counts(audited):
    a = audited["audits"][0]
    errors = a.finding("errors")
    assert "3 of 179 images" in errors["details"], errors
    assert {r["source_uri"] for r in _images(a, "errors")} == set(audited["planted"]["corrupt"])
    with open(os.path.join(audited["out"], "summary.json")) as f:
        assert json.load(f)["empty_maps"] == audited["first"].empty_maps


@pytest.mark.slow
def test_drift_gate_passes_on_same_distribution_and_fails_on_shift(audited):
    a, b, c = audited["audits"]
    assert a.finding("drift")["value"] is None and a.baseline is None  # nothing to compare yet
    assert b.baseline == a.audit_id and c.baseline == b.audit_id
    print("drift B:", b.finding("drift")["details"])
    print("drift C:", c.finding("drift")["details"])
    assert b.finding("drift")["status"] == "pass" and b.exit_code == 0 and not b.failed_gates
    assert "66 images added or changed" in b.finding("drift")["details"]
    assert c.finding("drift")["status"] == "fail" and c.exit_code == 3
    assert c.failed_gates == [f"gate drift<=0.3 failed: drift = {c.finding('drift')['value']:.4g}"]
    assert c.finding("drift")["value"] >= 0.5


@pytest.mark.slow
def test_tagged_shortcut_images_form_one_pure_border_cluster(audited):
    a = audited["audits"][0]
    tagged = set(audited["planted"]["tagged"])
    clusters = pq.read_table(os.path.join(a.audit_uri, "clusters.parquet")).to_pylist()
    by_cluster = {}
    for r in clusters:
        by_cluster.setdefault(r["cluster"], []).append(r["source_uri"])
    best = max(by_cluster, key=lambda k: len(tagged & set(by_cluster[k])))
    members = set(by_cluster[best])
    coverage, purity = len(tagged & members) / len(tagged), len(tagged & members) / len(members)
    empty = {r["source_uri"] for r in _images(a, "empty_maps")}
    print(f"tagged images: cluster {best} holds {len(tagged & members)}/{len(tagged)} (coverage {coverage:.2f}), "
          f"purity {purity:.2f} ({len(members)} members); empty maps among tagged: {len(tagged & empty)}")
    assert coverage >= 0.8 and purity >= 0.8
    assert all(r["cluster_size"] == len(by_cluster[r["cluster"]]) for r in clusters)
    # the cluster is reported as a border strategy
    border = {r["source_uri"] for r in _images(a, "strategy_clusters")}
    assert tagged & members <= border
    assert a.finding("strategy_clusters")["status"] == "warn"


@pytest.mark.slow
def test_audit_folder_history_and_report_are_self_contained(audited):
    from bulk_explain.workers.storage import storage_for

    audits = audited["audits"]
    out = audited["out"]
    history = pq.read_table(os.path.join(out, "audits", "history.parquet")).to_pylist()
    # other tests may have audited this output too (test order is random): one row per check per audit
    folders = [d for d in os.listdir(os.path.join(out, "audits")) if os.path.isdir(os.path.join(out, "audits", d))]
    assert len(history) == len(CHECKS) * len(folders) and len(folders) >= len(audits)
    assert sorted({h["audit_id"] for h in history}) == sorted(folders)
    for audit in audits:
        mine = [h for h in history if h["audit_id"] == audit.audit_id]
        assert sorted(h["check"] for h in mine) == sorted(CHECKS)
        for name in CONTRACT_FILES:
            assert os.path.isfile(os.path.join(audit.audit_uri, name)), name
        findings = pq.read_table(os.path.join(audit.audit_uri, "findings.parquet"))
        assert findings.column_names == ["check", "value", "threshold", "status", "details"]
        assert findings.column("check").to_pylist() == list(CHECKS)
        assert set(findings.column("status").to_pylist()) <= {"pass", "warn", "fail"}
        for v in findings.column("value").to_pylist():
            assert v is None or 0.0 <= v <= 1.0
        images = pq.read_table(os.path.join(audit.audit_uri, "images.parquet"))
        assert images.column_names == ["source_uri", "check", "score", "rank", "thumbnail_uri"]
        clusters = pq.read_table(os.path.join(audit.audit_uri, "clusters.parquet"))
        assert clusters.column_names == ["source_uri", "class", "cluster", "cluster_size", "distance"]
    c = audits[-1]
    html = open(os.path.join(c.audit_uri, "report.html"), encoding="utf-8").read()
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing from a network
    assert "@import" not in html and "url(http" not in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) >= 20
    for src in srcs:
        assert src.startswith("thumbs/") and src.endswith(".jpg")  # relative: works when copied from S3
        data = storage_for(c.audit_uri).read_bytes(os.path.join(c.audit_uri, src))
        assert len(data) < 30_000  # small thumbnails, never full-size overlays
    assert html.count("<svg") >= len(CHECKS)  # one history plot per check (+ mean heatmaps)
    for section in ("gates", "clusters", *(f"check-{n}" for n in CHECKS)):
        assert f'id="{section}"' in html


def _cli(args):
    from bulk_explain.jobs.cli import main

    return main(args)


@pytest.mark.slow
def test_cli_gates_exit_codes(audited, capsys):
    out = audited["out"]
    code = _cli(["audit", "--output", out, "--quiet", "--gate", "label_issues<=0.001", "--gate", "errors<=0.5",
                 "--baseline", "none"])
    err = capsys.readouterr().err
    assert code == 3
    lines = [l for l in err.splitlines() if "gate" in l]
    assert len(lines) == 1 and "gate label_issues<=0.001 failed: label_issues = " in lines[0]
    assert _cli(["audit", "--output", out, "--quiet", "--gate", "errors<=0.5", "--baseline", "none"]) == 0
    for bad, expected in ((["--gate", "label_issues<0.1"], "CHECK<=X"), (["--gate", "nonsense<=1"], "unknown check"),
                          (["--baseline", "20000101T000000.000Z"], "not found")):
        assert _cli(["audit", "--output", out, "--quiet", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert _cli(["audit", "--output", str(audited["root"]) + "-none", "--quiet"]) == 2
    assert "no manifest" in capsys.readouterr().err
    assert _cli(["run", "--input", audited["root"], "--output", out, "--model", "cats_dogs", "--weights", "random",
                 "--gate", "errors<=0.1"]) == 2
    assert "--audit" in capsys.readouterr().err


def test_sigterm_releases_the_lease_and_removes_the_unfinished_audit(audited, tmp_path):
    """A scheduler stops an audit (SIGTERM) after it wrote everything but summary.json: it exits 143,
    releases DST's lease (so the next audit starts at once instead of exit 4 until the lease
    expires) and removes its unfinished folder; the next audit is unaffected."""
    from bulk_explain.workers.faults import CRASH_ACTION, CRASH_AT, CRASH_FLAG

    out = str(tmp_path / "out")
    shutil.copytree(audited["out"], out, ignore=shutil.ignore_patterns("audits", "_lease.json"))
    flag = tmp_path / "paused"
    command = [sys.executable, "-m", "bulk_explain", "audit", "--output", out, "--quiet", "--baseline", "none"]
    env = {**os.environ, "BULK_EXPLAIN_LEASE_SECONDS": "600"}
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, CRASH_AT: "audit_written", CRASH_ACTION: "pause", CRASH_FLAG: str(flag)})
    try:
        deadline = time.monotonic() + 300
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flag.exists(), proc.communicate(timeout=5)
        audits = os.path.join(out, "audits")
        (unfinished,) = os.listdir(audits)
        assert {"findings.parquet", "report.html", "population.parquet"} <= set(os.listdir(os.path.join(audits, unfinished)))
        assert os.path.exists(os.path.join(out, "_lease.json"))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert not os.path.exists(os.path.join(out, "_lease.json")), "lease left behind by a stopped audit"
    assert f"interrupted (SIGTERM); the unfinished audit {unfinished} was removed" in err, err
    assert os.listdir(audits) == []
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    (finished,) = [n for n in os.listdir(audits) if n != "history.parquet"]
    assert os.path.exists(os.path.join(audits, finished, "summary.json"))
    assert pq.read_table(os.path.join(audits, "history.parquet")).column("audit_id").unique().to_pylist() == [finished]


def test_missing_audit_dependency_is_one_line(tmp_path):
    code = ("import sys; sys.modules['cleanlab'] = None\n"
            "from bulk_explain.jobs.cli import main; raise SystemExit(main(['audit', '--output', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "pip install 'bulk-explain[audit]'" in proc.stderr
    blocked = ("import sys; sys.modules['cleanlab'] = None\n"
               "from bulk_explain.jobs.cli import main; raise SystemExit(main(sys.argv[1:]))")
    help_text = subprocess.run([sys.executable, "-c", blocked, "--help"], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert help_text.returncode == 0 and "audit" in help_text.stdout  # the command is there without the extra
    assert "--gate" in subprocess.run([sys.executable, "-c", blocked, "audit", "--help"], capture_output=True,
                                      text=True, env=dict(os.environ, PYTHONPATH=REPO), timeout=120).stdout


# ------------------------------------------------------------------------------ report in Chromium

def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, url):
        import websocket

        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events = []

    def call(self, method, **params):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method, timeout=60):
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            assert time.monotonic() < deadline, f"no {method} within {timeout} s"
            self.events.append(json.loads(self.ws.recv()))


@pytest.mark.slow
def test_report_in_headless_chromium(audited, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium: install Debian's `chromium` package (.ci/run tries apt-get install chromium)")
    pytest.importorskip("websocket", reason="websocket-client (the test extra) is needed to talk to Chromium")
    import urllib.request

    report = os.path.join(audited["audits"][-1].audit_uri, "report.html")
    profile = tmp_path / "profile"
    proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync", "--no-first-run",
                             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-allow-origins=*",
                             "--window-size=1200,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.2)
        port = int(port_file.read_text().splitlines()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page = next(t for t in targets if t["type"] == "page")
        dt = _DevTools(page["webSocketDebuggerUrl"])
        for domain in ("Page", "Runtime", "Log"):
            dt.call(f"{domain}.enable")
        dt.call("Page.navigate", url="file://" + report)
        dt.wait_event("Page.loadEventFired")
        state = json.loads(dt.call("Runtime.evaluate", returnByValue=True, expression="""JSON.stringify({
            images: Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]),
            ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
            svgs: document.querySelectorAll('svg').length})""")["result"]["value"])
        metrics = dt.call("Page.getLayoutMetrics")["cssContentSize"]
        shot = dt.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                       clip={"x": 0, "y": 0, "width": 1200, "height": min(metrics["height"], 12000), "scale": 1})
        errors = [e for e in dt.events if e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    finally:
        proc.terminate()
        proc.wait(30)
    artifacts = os.environ.get("BULK_EXPLAIN_TEST_ARTIFACTS", str(tmp_path))
    os.makedirs(artifacts, exist_ok=True)
    png = os.path.join(artifacts, "audit_report.png")
    with open(png, "wb") as f:
        f.write(base64.b64decode(shot["data"]))
    print(f"report screenshot: {png}")
    assert not errors, errors
    assert len(state["images"]) >= 20
    broken = [src for src, complete, width in state["images"] if not (complete and width > 0)]
    assert not broken, broken
    for section in ("gates", "clusters", *(f"check-{n}" for n in CHECKS)):
        assert section in state["ids"], section
    assert state["svgs"] >= len(CHECKS)
    with open(png, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") == 1200


# ------------------------------------------------------------------------------------------- S3

@pytest.mark.slow
def test_run_with_audit_on_s3(s3_endpoint, s3_client, model_file, tmp_path):
    from s3_server import put_objects

    local = str(tmp_path / "in")
    planted = write_batch(local, "s3", np.random.default_rng(4), cats=12, tagged=2, dogs=12, swapped=2, corrupt=1)
    bucket = f"audit-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=bucket)
    objects = {}
    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                objects["in/" + os.path.relpath(path, local)] = f.read()
    put_objects(s3_client, bucket, objects)
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    for name in ("BULK_EXPLAIN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        env.pop(name, None)  # the endpoint reaches the job only through the flag
    out = f"s3://{bucket}/out"
    run = [sys.executable, "-m", "bulk_explain", "run", "--input", f"s3://{bucket}/in", "--output", out, "--model", "cats_dogs",
           "--model-file", model_file, "--cam-method", "layercam", "--target-layer", "conv2d_2", "--shard-size", "16",
           "--quiet", "--audit", "--gate", "errors<=0.5", "--s3-endpoint-url", s3_endpoint]
    proc = subprocess.run(run, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = {o["Key"] for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="out/audits/")
            for o in page.get("Contents", [])}
    ids = {k.split("/")[2] for k in keys if k.count("/") >= 3}
    assert len(ids) == 1
    audit = f"out/audits/{ids.pop()}"
    for name in CONTRACT_FILES:
        assert f"{audit}/{name}" in keys, name
    html = s3_client.get_object(Bucket=bucket, Key=f"{audit}/report.html")["Body"].read().decode()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert srcs and all(f"{audit}/{src}" in keys for src in srcs)  # relative links resolve in the bucket
    images = pq.read_table(io.BytesIO(s3_client.get_object(Bucket=bucket, Key=f"{audit}/images.parquet")["Body"].read()))
    flagged = {r["source_uri"] for r in images.to_pylist() if r["check"] == "label_issues"}
    swapped = {f"s3://{bucket}/in/" + os.path.relpath(p, local) for p in planted["swapped"]}
    assert swapped <= flagged
    thumbs = {r["thumbnail_uri"] for r in images.to_pylist() if r["thumbnail_uri"]}
    assert thumbs and all(t.startswith(f"s3://{bucket}/{audit}/thumbs/") for t in thumbs)

    # a second audit through the audit command: a failed gate is exit 3 with one line naming it
    proc = subprocess.run([sys.executable, "-m", "bulk_explain", "audit", "--output", out, "--gate", "label_issues<=0",
                           "--quiet", "--s3-endpoint-url", s3_endpoint], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert [l for l in proc.stderr.splitlines() if "gate" in l][0].startswith(
        "bulk-explain: gate label_issues<=0 failed: label_issues = ")
    history = pq.read_table(io.BytesIO(s3_client.get_object(Bucket=bucket, Key="out/audits/history.parquet")["Body"].read()))
    assert history.num_rows == 2 * len(CHECKS) and len(set(history.column("audit_id").to_pylist())) == 2
