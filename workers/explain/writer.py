"""The write stage: heatmaps, overlays and channel grids encoded and written in a thread pool
behind compute; then the shard's commit: staged part, commit marker, published part.

Commit protocol (ARCHITECTURE.md, "Output protocol"): the part is first written to
`_staging/shard-N.parquet` (outside `manifest/`, invisible to every reader), then the commit marker
`_commits/shard-N.json` is written (the commit point), then the same bytes are written to
`manifest/shard-N.parquet` (one atomic write: temp + rename locally, one PUT on S3) and the staged
copy is deleted. A crash before the marker leaves nothing visible; a crash after it leaves a
committed shard that the next run publishes from `_staging/` ("roll forward").

Every commit is one attempt with its own id (a uuid): the part's Parquet metadata carries the
shard, its content hash and the attempt id, and the marker names the same attempt. A marker and a
part that disagree (two runs interleaved on one output, a part copied from elsewhere) are not a
commit; the driver redoes such a shard (`read_part_commit`).
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bulk_explain.schemas.image_manifest import CAM_SMALL_SIZE, IMAGE_MANIFEST_SCHEMA
from bulk_explain.workers import image_io
from bulk_explain.workers.faults import fault_point
from bulk_explain.workers.explain.labels import LabelMatcher
from bulk_explain.workers.layout import OutputLayout
from bulk_explain.workers.explain.reader import DecodedImage


# Keys of a part's Parquet key-value metadata that tie it to its commit marker.
PART_SHARD = "bulk_explain.shard"
PART_CONTENT_HASH = "bulk_explain.content_hash"
PART_ATTEMPT = "bulk_explain.attempt_id"
PART_FINGERPRINT = "bulk_explain.result_fingerprint"
_FOOTER_READ = 64 * 1024


class CommitConflict(RuntimeError):
    """Another attempt replaced or withdrew this attempt's commit marker before it was published
    (two runs on one output); the shard is retried instead of publishing a part that disagrees."""


def read_part_commit(storage, uri: str) -> Optional[dict]:
    """The commit identity a part carries in its footer: {"shard", "content_hash", "attempt_id",
    "result_fingerprint"}, or None when the file is missing, not Parquet or has none.

    Reads only the footer (one ranged read of the last 64 KiB, a second one for a larger footer),
    never the data pages.
    """
    try:
        tail = storage.read_tail(uri, _FOOTER_READ)
        if len(tail) < 12 or tail[-4:] != b"PAR1":
            return None
        size = int.from_bytes(tail[-8:-4], "little") + 8
        if size > len(tail):
            tail = storage.read_tail(uri, size)
            if len(tail) < size:
                return None
        # The footer alone parses as a file that starts with the magic bytes.
        meta = pq.read_metadata(io.BytesIO(b"PAR1" + tail[-size:])).metadata or {}
    except (OSError, pa.ArrowException, ValueError):
        return None
    keys = {"shard": PART_SHARD, "content_hash": PART_CONTENT_HASH, "attempt_id": PART_ATTEMPT,
            "result_fingerprint": PART_FINGERPRINT}
    info = {name: meta.get(key.encode(), b"").decode() or None for name, key in keys.items()}
    return info if info["attempt_id"] else None


def marker_agrees(marker: dict, part: Optional[dict]) -> bool:
    """True when `part` (from `read_part_commit`) is the part `marker` committed."""
    return bool(part and marker.get("attempt_id") and part["attempt_id"] == marker["attempt_id"]
                and part["content_hash"] == marker.get("content_hash")
                and part["shard"] == str(marker.get("shard")))


def base_row(item: DecodedImage, shard: int) -> dict:
    # width/height are the original's even when the read stage decoded a JPEG reduced
    original = item.original_size or ((item.bgr.shape[1], item.bgr.shape[0]) if item.bgr is not None else None)
    return {
        "source_uri": item.uri,
        "image_id": item.image_id,
        "status": "ok" if item.ok else "error",
        "error": item.error,
        "width": int(original[0]) if original is not None else None,
        "height": int(original[1]) if original is not None else None,
        "label": item.label,
        "top_k": [],
        "activations": [],
        "activation_grid_uris": [],
        "source_size": item.size,
        "source_version": item.version,
        "shard": shard,
        "explanations": [],
    }


class ShardWriter:
    """Writes one shard's per-image outputs and, on `commit`, its manifest part and marker.

    Args:
        layout: output naming.
        shard: shard id.
        class_names: model class names (index -> label).
        activation_layers: names of the summarized layers, in stats order.
        overlay_quality: JPEG quality.
        overlay_max_side: overlays and heatmaps at most this long (None: the original size).
        methods: the run's CAM method names, in order (`explanations`; the first one also fills
            the gradcam_* and cam_peak_* columns).
    """

    def __init__(self, layout: OutputLayout, shard: int, class_names: Sequence[str],
                 activation_layers: Sequence[str], overlay_quality: int = 90, overlay_max_side: Optional[int] = None,
                 methods: Sequence[str] = ("gradcam",)):
        self.layout = layout
        self.storage = layout.storage
        self.shard = shard
        self.class_names = list(class_names)
        self.activation_layers = list(activation_layers)
        self.overlay_quality = overlay_quality
        self.labels = LabelMatcher(self.class_names)
        self.overlay_max_side = overlay_max_side
        self.methods = list(methods)

    def error_row(self, item: DecodedImage) -> dict:
        row = base_row(item, self.shard)
        row["label_index"] = self.labels.index(item.label)
        return row

    def image_row(self, item: DecodedImage, result: Dict[str, np.ndarray],
                  activation_maps: Optional[List[np.ndarray]] = None) -> dict:
        """Encodes and writes the image's outputs; returns its manifest row. Runs in the write pool.

        `result` holds this image's slice of the compiled step's outputs.
        """
        row = base_row(item, self.shard)
        row["label_index"] = self.labels.index(item.label)
        try:
            bgr = image_io.fit_long_side(item.bgr, self.overlay_max_side)
            h, w = bgr.shape[:2]
            cam_full = image_io.upsample_cam(result["cam"], w, h)
            heat = image_io.heatmap_uint8(cam_full)
            overlay = image_io.overlay_bgr(bgr, heat)
            heat_uri = self.layout.heatmap(self.shard, item.position, item.image_id)
            overlay_uri = self.layout.overlay(self.shard, item.position, item.image_id)
            self.storage.write_bytes(heat_uri, image_io.encode_png(heat))
            self.storage.write_bytes(overlay_uri, image_io.encode_jpeg(overlay, self.overlay_quality))
            grid_uris = []
            for li, maps in enumerate(activation_maps or []):
                uri = self.layout.activation_grid(self.shard, item.position, item.image_id, li,
                                                  self.activation_layers[li])
                self.storage.write_bytes(uri, image_io.encode_png(image_io.channel_grid(maps)))
                grid_uris.append(uri)
            peak_x, peak_y = image_io.cam_peak(cam_full)
            small = image_io.cam_small(result["cam"], CAM_SMALL_SIZE)
            pred = int(result["pred_index"])
            stats = result["stats"]
            row.update(
                pred_index=pred,
                pred_label=self.class_names[pred],
                pred_score=float(result["pred_score"]),
                top_k=[
                    {"index": int(i), "label": self.class_names[int(i)], "score": float(s)}
                    for i, s in zip(result["top_index"], result["top_score"])
                ],
                gradcam_index=int(result["cam_index"]),
                gradcam_overlay_uri=overlay_uri,
                gradcam_heatmap_uri=heat_uri,
                cam_peak_x=peak_x,
                cam_peak_y=peak_y,
                cam_empty=image_io.cam_is_empty(result["cam"]),
                cam_small=small.ravel().tolist(),
                cam_small_shape=list(small.shape),
                activations=[
                    {"layer": name, "mean": float(s[0]), "std": float(s[1]), "max": float(s[2]),
                     "zero_fraction": float(s[3])}
                    for name, s in zip(self.activation_layers, stats)
                ],
                activation_grid_uris=grid_uris,
                correct=None if row["label_index"] is None else pred == row["label_index"],
                cam_spread=cam_spread(cam_full),
            )
            row["explanations"] = self._explanations(item, bgr, result, heat_uri, overlay_uri, (peak_x, peak_y))
        except Exception as exc:  # a write failure is this image's error, not the shard's
            row.update(status="error", error=f"cannot write outputs: {type(exc).__name__}: {exc}".replace("\n", " "))
        return row

    def _explanations(self, item: DecodedImage, bgr: np.ndarray, result: Dict[str, np.ndarray], heat_uri: str,
                      overlay_uri: str, peak) -> List[dict]:
        """One entry per method: the first reuses the files written above, each further method
        writes its own heatmap and overlay (`-<method>` names); metrics where computed, else null."""
        h, w = bgr.shape[:2]  # the overlay's size (at most --overlay-max-side)
        cams = result.get("cams")
        entries = []
        for m, method in enumerate(self.methods):
            if m > 0:
                cam_full = image_io.upsample_cam(cams[m], w, h)
                heat = image_io.heatmap_uint8(cam_full)
                m_heat = self.layout.heatmap(self.shard, item.position, item.image_id, method)
                m_overlay = self.layout.overlay(self.shard, item.position, item.image_id, method)
                self.storage.write_bytes(m_heat, image_io.encode_png(heat))
                self.storage.write_bytes(m_overlay, image_io.encode_jpeg(image_io.overlay_bgr(bgr, heat),
                                                                         self.overlay_quality))
                m_peak = image_io.cam_peak(cam_full)
            else:
                m_heat, m_overlay, m_peak = heat_uri, overlay_uri, peak
            entry = {"method": method, "heatmap_uri": m_heat, "overlay_uri": m_overlay,
                     # an all-zero map has no peak (null), as in cam_peak_x/y
                     "cam_peak_x": None if m_peak[0] is None else float(m_peak[0]),
                     "cam_peak_y": None if m_peak[1] is None else float(m_peak[1]),
                     "deletion_auc": None, "insertion_auc": None, "road_morf": None, "road_lerf": None}
            for key in ("deletion_auc", "insertion_auc"):
                if key in result:
                    entry[key] = float(result[key][m])
            for key in ("road_morf", "road_lerf"):
                if key in result:
                    entry[key] = [float(v) for v in result[key][m]]
            entries.append(entry)
        return entries

    def commit(self, rows: List[dict], content_hash: str, seconds: float, result_fingerprint: str) -> dict:
        """Stages the manifest part, writes the commit marker, publishes the part, then deletes
        per-image files of earlier attempts that no row references.

        Raises:
            CommitConflict: the marker was replaced or withdrawn by another run before publishing.
        """
        attempt_id = uuid.uuid4().hex
        schema = IMAGE_MANIFEST_SCHEMA.with_metadata({
            **IMAGE_MANIFEST_SCHEMA.metadata, PART_SHARD: str(self.shard), PART_CONTENT_HASH: content_hash,
            PART_ATTEMPT: attempt_id, PART_FINGERPRINT: result_fingerprint})
        table = pa.Table.from_pylist(rows, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        staged = self.layout.staged_part(self.shard)
        fault_point("before_stage", self.shard)
        self.storage.write_bytes(staged, data)
        fault_point("after_stage", self.shard)
        ok = sum(1 for r in rows if r["status"] == "ok")
        marker = {
            "shard": self.shard,
            "rows": len(rows),
            "ok": ok,
            "error": len(rows) - ok,
            "empty_maps": sum(1 for r in rows if r.get("cam_empty")),
            "content_hash": content_hash,
            "attempt_id": attempt_id,
            "result_fingerprint": result_fingerprint,
            "seconds": round(seconds, 3),
            "committed_at": time.time(),
            "worker_pid": os.getpid(),
            "worker_rss_bytes": rss_bytes(),
        }
        self.storage.write_bytes(self.layout.commit_marker(self.shard), json.dumps(marker).encode())
        fault_point("after_marker", self.shard)
        # Publish only while the marker is still ours: a run that redid this shard meanwhile owns
        # it now (narrows the window; the driver's marker/part check is what guarantees).
        self._check_marker(attempt_id)
        self.storage.write_bytes(self.layout.manifest_part(self.shard), data)
        self.storage.delete(staged)
        fault_point("after_publish", self.shard)
        self._check_marker(attempt_id)
        self.delete_orphans(rows)
        return marker

    def _check_marker(self, attempt_id: str) -> None:
        try:
            current = json.loads(self.storage.read_bytes(self.layout.commit_marker(self.shard)))
        except (OSError, ValueError):
            current = None
        if not isinstance(current, dict) or current.get("attempt_id") != attempt_id:
            raise CommitConflict(f"shard {self.shard} was redone by another run while this one committed "
                                 "it (two jobs on one output?); retrying")

    def delete_orphans(self, rows: List[dict]) -> int:
        """Deletes files in this shard's image folders that no row references: outputs of an
        earlier plan of the shard (other positions/images) and temp files of crashed writes."""
        keep = set()
        for r in rows:
            keep.update(u for u in (r.get("gradcam_overlay_uri"), r.get("gradcam_heatmap_uri")) if u)
            keep.update(r.get("activation_grid_uris") or ())
            keep.update(u for e in r.get("explanations") or () for u in (e["heatmap_uri"], e["overlay_uri"]) if u)
        deleted = 0
        for folder in self.layout.shard_image_dirs(self.shard):
            for uri in list(self.storage.list_names(folder)):
                if uri not in keep:
                    self.storage.delete(uri)
                    deleted += 1
        return deleted


def cam_spread(cam_full: np.ndarray) -> Optional[float]:
    """Share of the heatmap's pixels (original size) above half its maximum: small for a focused
    map, near 1 for a flat one whose peak means little. None for an all-zero map."""
    peak = float(cam_full.max()) if cam_full.size else 0.0
    if not peak > 0.0:
        return None
    return float(np.count_nonzero(cam_full > 0.5 * peak)) / cam_full.size


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
