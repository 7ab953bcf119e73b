"""The audit driver: read the manifest -> load the baseline -> run every registered check ->
statuses and gates -> thumbnails -> Parquet tables -> report.html -> summary.json -> history.

    from bulk_explain.jobs.audit import AuditConfig, run_audit
    result = run_audit(AuditConfig(output="out/", gates=("label_issues<=0.02",)))
    result.exit_code  # 0 every gate passed, 3 a gate failed

Layout (the "Audit contract" of the project brief): `DST/audits/<UTC time>/` holds
`findings.parquet`, `images.parquet`, `clusters.parquet`, `report.html`, `summary.json`, the
report's `thumbs/` and `population.parquet` (what the next audit compares against: a key per
image version and the drift columns, no URIs). `summary.json` is written last: an audit folder
without it is unfinished and never used as a baseline. `DST/audits/history.parquet` gains one row
per check.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bulk_explain.jobs.audit.checks import AuditContext, Finding, all_checks
from bulk_explain.jobs.audit.checks.drift import drift_features
from bulk_explain.jobs.audit.config import AuditConfig
from bulk_explain.jobs.audit.data import ManifestReader
from bulk_explain.jobs.validation import ConfigError
from bulk_explain.workers.faults import fault_point
from bulk_explain.workers.storage import storage_for

FINDINGS_SCHEMA = pa.schema([("check", pa.string()), ("value", pa.float64()), ("threshold", pa.float64()),
                             ("status", pa.string()), ("details", pa.string())])
IMAGES_SCHEMA = pa.schema([("source_uri", pa.string()), ("check", pa.string()), ("score", pa.float32()),
                           ("rank", pa.int32()), ("thumbnail_uri", pa.string())])
CLUSTERS_SCHEMA = pa.schema([("source_uri", pa.string()), ("class", pa.string()), ("cluster", pa.int32()),
                             ("cluster_size", pa.int32()), ("distance", pa.float32())])
HISTORY_SCHEMA = pa.schema([("audit_id", pa.string()), ("audited_at", pa.timestamp("ms", tz="UTC")),
                            ("check", pa.string()), ("value", pa.float64()), ("threshold", pa.float64()),
                            ("status", pa.string())])


@dataclasses.dataclass
class AuditResult:
    """What an audit found.

    Attributes:
        audit_id: the audit's folder name (UTC time).
        audit_uri: `DST/audits/<audit_id>`.
        findings: one dict per check (check, value, threshold, status, details).
        failed_gates: one line per failed gate.
        baseline: the baseline audit's id, or None.
        rows: manifest rows audited.
        seconds: wall time.
    """

    audit_id: str
    audit_uri: str
    findings: List[dict]
    failed_gates: List[str]
    baseline: Optional[str]
    rows: int
    seconds: float

    @property
    def exit_code(self) -> int:
        return 3 if self.failed_gates else 0

    @property
    def report_uri(self) -> str:
        return storage_for(self.audit_uri).join(self.audit_uri, "report.html")

    def finding(self, check: str) -> dict:
        return next(f for f in self.findings if f["check"] == check)


@dataclasses.dataclass
class Baseline:
    """The population an earlier audit saw: a key per image version and its drift columns."""

    audit_id: str
    keys: np.ndarray
    features: Dict[str, np.ndarray]
    rows: int


def _log(enabled: bool, text: str) -> None:
    if enabled:
        print(f"[bulk-explain audit] {text}", file=sys.stderr, flush=True)


def _read_parquet(storage, uri: str) -> Optional[pa.Table]:
    try:
        data = storage.read_bytes(uri)
    except Exception as exc:  # missing: FileNotFoundError locally, NoSuchKey/404 on S3
        if isinstance(exc, FileNotFoundError) or type(exc).__name__ in ("NoSuchKey", "ClientError") \
                or "404" in str(exc) or "Not Found" in str(exc):
            return None
        raise
    return pq.read_table(io.BytesIO(data))


def _write_parquet(storage, uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def finished_audits(storage, audits_dir: str) -> List[str]:
    """Ids of audits under `audits_dir` that finished (their summary.json exists), oldest first."""
    ids = set()
    for uri in storage.list_names(audits_dir):
        parts = uri.replace("\\", "/").rstrip("/").split("/")
        if len(parts) >= 2 and parts[-1] == "summary.json":
            ids.add(parts[-2])
    return sorted(ids)


def load_baseline(storage, audits_dir: str, which: str, current_id: str) -> Optional[Baseline]:
    """The baseline audit's population: "previous" = the latest finished audit before this one."""
    if which == "none":
        return None
    done = [a for a in finished_audits(storage, audits_dir) if a < current_id]
    if which == "previous":
        if not done:
            return None
        which = done[-1]
    elif which not in done:
        known = ", ".join(done[-5:]) or "none"
        raise ConfigError(f"baseline audit {which!r} not found under {audits_dir} (finished audits: {known})")
    table = _read_parquet(storage, storage.join(audits_dir, which, "population.parquet"))
    if table is None:
        raise ConfigError(f"baseline audit {which!r} has no population.parquet; choose another --baseline")
    ok = np.asarray(table.column("ok").to_numpy(zero_copy_only=False), bool)
    features = {}
    for name in table.column_names:
        if name in ("key", "ok"):
            continue
        values = table.column(name).to_numpy()
        features[name] = values[ok]
    return Baseline(which, np.asarray(table.column("key").to_numpy()), features, int(ok.sum()))


def population_table(data) -> pa.Table:
    """What the next audit's drift check compares against: a key per row (image + version), its
    status and the drift columns; no URIs (31 MB per million rows)."""
    columns = {"key": pa.array(data.keys), "ok": pa.array(data.ok)}
    for name, (kind, values) in drift_features(data, np.arange(len(data))).items():
        columns[name] = pa.array(values.astype(np.int32 if kind == "categorical" else np.float32))
    return pa.table(columns)


def _status(check, finding: Finding, gates) -> tuple:
    mine = [g for g in gates if g.check == check.name]
    if mine:
        failed = [g for g in mine if not g.passes(finding.value)]
        return ("fail" if failed else "pass"), mine[0].limit, failed
    warn = finding.value is not None and finding.value > check.default_threshold
    return ("warn" if warn else "pass"), check.default_threshold, []


def _new_audit_id() -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}Z"


def _make_thumbnails(storage, audit_uri: str, data, rows: np.ndarray, side: int, threads: int = 8) -> Dict[int, str]:
    """Small JPEGs of the overlays of `rows`, written once under `thumbs/`; {row: relative path}.
    A row whose overlay is missing or unreadable gets none (the report shows its name instead)."""
    import cv2

    overlays = data.overlay_uris

    def one(row):
        uri = overlays[int(row)].as_py()
        if not uri:
            return row, None
        try:
            img = cv2.imdecode(np.frombuffer(storage_for(uri).read_bytes(uri), np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                return row, None
            h, w = img.shape[:2]
            scale = side / max(h, w)
            if scale < 1:
                img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
            if not ok:
                return row, None
            name = f"thumbs/{int(data.keys[row]) & 0xFFFFFFFFFFFFFFFF:016x}.jpg"
            storage.write_bytes(storage.join(audit_uri, *name.split("/")), buf.tobytes())
            return row, name
        except Exception:
            return row, None

    with ThreadPoolExecutor(threads) as pool:
        return {int(r): n for r, n in pool.map(one, [int(r) for r in rows]) if n}


def run_audit(config: AuditConfig, progress: bool = True) -> AuditResult:
    """Audits an explain output: every registered check, gates, report, history.

    Args:
        config: the audit configuration (validated here).
        progress: print stage lines to stderr.

    Returns:
        AuditResult (exit_code 3 when a gate failed).

    Raises:
        ConfigError: no manifest in `config.output`, a bad gate or an unknown baseline (exit 2).
    """
    t0 = time.perf_counter()
    config = config.validated()
    storage = storage_for(config.output)
    root = config.output.rstrip("/") if "://" in config.output else config.output
    audits_dir = storage.join(root, "audits")
    audit_id = config.audit_id or _new_audit_id()
    audit_uri = storage.join(audits_dir, audit_id)
    if storage.exists(storage.join(audit_uri, "summary.json")):
        raise ConfigError(f"audit {audit_id} already exists under {audits_dir}")
    reader = ManifestReader(root)
    baseline = load_baseline(storage, audits_dir, config.baseline, audit_id)
    try:
        return _audit(config, storage, root, audits_dir, audit_id, audit_uri, reader, baseline, progress, t0)
    except (KeyboardInterrupt, SystemExit) as exc:
        # Ctrl-C, or SIGTERM under `sigterm_raises` (the command's): what was written of this audit
        # has no summary.json, so it is never a baseline; remove it so that audits/ holds finished
        # audits only. A second signal during the clean-up leaves the rest (still never a baseline).
        what = "SIGTERM" if isinstance(exc, SystemExit) and exc.code == 143 else type(exc).__name__
        removed = _remove_unfinished(storage, audit_uri)
        _log(True, f"interrupted ({what}); the unfinished audit {audit_id} was "
                   f"{'removed' if removed else 'left without summary.json (never used as a baseline)'}; "
                   "re-run the same command to audit again")
        raise


def _remove_unfinished(storage, audit_uri: str) -> bool:
    """Deletes every object of an audit that has no summary.json; True when nothing is left."""
    try:
        if storage.exists(storage.join(audit_uri, "summary.json")):
            return False  # finished after all: never delete a finished audit
        storage.delete_tree(audit_uri)
        return True
    except Exception:  # noqa: BLE001 - best effort: an unfinished audit is harmless
        return False


def _audit(config, storage, root, audits_dir, audit_id, audit_uri, reader, baseline, progress, t0) -> AuditResult:
    data = reader.load()
    _log(progress, f"{len(data)} manifest rows ({int(data.ok.sum())} ok); baseline: "
                   f"{baseline.audit_id if baseline else 'none'}")

    ctx = AuditContext(data=data, reader=reader, config=config, baseline=baseline)
    checks = all_checks()
    rows_out, failed_gates = [], []
    for check in checks:
        t = time.perf_counter()
        finding = check.run(ctx)
        ctx.results[check.name] = finding
        status, threshold, failed = _status(check, finding, config.gates)
        for g in failed:
            failed_gates.append(f"gate {g} failed: {check.name} = {finding.value:.4g}")
        rows_out.append({"check": check.name, "value": None if finding.value is None else float(finding.value),
                         "threshold": float(threshold), "status": status, "details": finding.details})
        _log(progress, f"{check.name}: {status} ({time.perf_counter() - t:.1f} s) {finding.details}")

    # Thumbnails: the worst-ranked images of every check and the most typical of every cluster.
    wanted = []
    for check in checks:
        wanted.append(ctx.results[check.name].rows[: config.thumbnails_per_check])
    strategy = ctx.results.get("strategy_clusters")
    for info in (strategy.extra.get("info", []) if strategy else []):
        wanted.append(info["_examples"])
    wanted = np.unique(np.concatenate(wanted)) if wanted else np.zeros(0, np.int64)
    thumbs = _make_thumbnails(storage, audit_uri, data, wanted, config.thumbnail_side) if len(wanted) else {}

    tables = []
    for check in checks:
        f = ctx.results[check.name]
        if not len(f.rows):
            continue
        names = [thumbs.get(int(r)) for r in f.rows]
        tables.append(pa.table({
            "source_uri": data.uris.take(pa.array(f.rows)),
            "check": pa.array([check.name] * len(f.rows), pa.string()),
            "score": pa.array(f.scores, pa.float32()),
            "rank": pa.array(np.arange(1, len(f.rows) + 1, dtype=np.int32)),
            "thumbnail_uri": pa.array([storage.join(audit_uri, *n.split("/")) if n else None for n in names],
                                      pa.string()),
        }, schema=IMAGES_SCHEMA))
    images = pa.concat_tables(tables) if tables else IMAGES_SCHEMA.empty_table()
    clusters = CLUSTERS_SCHEMA.empty_table()
    if strategy is not None and "cluster" in strategy.extra:
        cl, dist = strategy.extra["cluster"], strategy.extra["distance"]
        members = np.flatnonzero(cl >= 0)
        sizes = np.bincount(cl[members], minlength=len(strategy.extra["info"]))
        classes = np.asarray(data.class_names, object)[data.pred[members]]
        clusters = pa.table({"source_uri": data.uris.take(pa.array(members)), "class": pa.array(classes, pa.string()),
                             "cluster": pa.array(cl[members], pa.int32()),
                             "cluster_size": pa.array(sizes[cl[members]].astype(np.int32)),
                             "distance": pa.array(dist[members], pa.float32())}, schema=CLUSTERS_SCHEMA)
    findings = pa.Table.from_pylist(rows_out, schema=FINDINGS_SCHEMA)
    _write_parquet(storage, storage.join(audit_uri, "findings.parquet"), findings)
    _write_parquet(storage, storage.join(audit_uri, "images.parquet"), images)
    _write_parquet(storage, storage.join(audit_uri, "clusters.parquet"), clusters)
    _write_parquet(storage, storage.join(audit_uri, "population.parquet"), population_table(data))

    history_uri = storage.join(audits_dir, "history.parquet")
    history = _read_parquet(storage, history_uri)
    audited_at = datetime.datetime.now(datetime.timezone.utc)
    new_history = pa.Table.from_pylist(
        [{"audit_id": audit_id, "audited_at": audited_at, "check": r["check"], "value": r["value"],
          "threshold": r["threshold"], "status": r["status"]} for r in rows_out], schema=HISTORY_SCHEMA)
    if history is not None:
        history = history.cast(HISTORY_SCHEMA)
        history = history.filter(pc.not_equal(history.column("audit_id"), audit_id))
        full_history = pa.concat_tables([history, new_history])
    else:
        full_history = new_history

    from bulk_explain.jobs.audit.report import render_report

    meta = {"audit_id": audit_id, "output": root, "baseline": baseline.audit_id if baseline else None,
            "rows": len(data), "ok": int(data.ok.sum()), "errors": int((~data.ok).sum()),
            "gates": [str(g) for g in config.gates], "failed_gates": failed_gates,
            "thumbnails_per_check": config.thumbnails_per_check,
            "cam_method": (data.job.get("config") or {}).get("cam_method")}
    html = render_report(meta, checks, ctx.results, rows_out, full_history.to_pylist(), thumbs, data)
    storage.write_bytes(storage.join(audit_uri, "report.html"), html.encode("utf-8"))

    from bulk_explain.workers.commit import rss_bytes

    result = AuditResult(audit_id=audit_id, audit_uri=audit_uri, findings=rows_out, failed_gates=failed_gates,
                         baseline=meta["baseline"], rows=len(data), seconds=time.perf_counter() - t0)
    summary = dict(meta, seconds=round(result.seconds, 3), exit_code=result.exit_code,
                   finished_at=time.time(), rss_bytes=rss_bytes(),
                   checks={r["check"]: dict(r, data=ctx.results[r["check"]].data) for r in rows_out},
                   gate_results=[{"gate": str(g), "value": ctx.results[g.check].value,
                                  "passed": g.passes(ctx.results[g.check].value)} for g in config.gates])
    fault_point("audit_written")  # tests: every file but summary.json is written
    storage.write_bytes(storage.join(audit_uri, "summary.json"), json.dumps(summary, indent=2, default=float).encode())
    _write_parquet(storage, history_uri, full_history)
    _log(progress, f"report: {result.report_uri} ({result.seconds:.1f} s)")
    for line in failed_gates:
        _log(progress, line)
    return result
