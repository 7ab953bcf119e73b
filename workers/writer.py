"""The write stage: heatmaps, overlays and channel grids encoded and written in a thread pool
behind compute; then the shard's commit: staged part, commit marker, published part.

Commit protocol (ARCHITECTURE.md, "Output protocol"): the part is first written to
`_staging/shard-N.parquet` (outside `manifest/`, invisible to every reader), then the commit marker
`_commits/shard-N.json` is written (the commit point), then the same bytes are written to
`manifest/shard-N.parquet` (one atomic write: temp + rename locally, one PUT on S3) and the staged
copy is deleted. A crash before the marker leaves nothing visible; a crash after it leaves a
committed shard that the next run publishes from `_staging/` ("roll forward").
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.image_manifest import IMAGE_MANIFEST_SCHEMA
from workers import image_io
from workers.faults import fault_point
from workers.layout import OutputLayout
from workers.reader import DecodedImage


def base_row(item: DecodedImage, shard: int) -> dict:
    return {
        "source_uri": item.uri,
        "image_id": item.image_id,
        "status": "ok" if item.ok else "error",
        "error": item.error,
        "width": int(item.bgr.shape[1]) if item.bgr is not None else None,
        "height": int(item.bgr.shape[0]) if item.bgr is not None else None,
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
        methods: the run's CAM method names, in order (`explanations`; the first one also fills
            the gradcam_* and cam_peak_* columns).
    """

    def __init__(self, layout: OutputLayout, shard: int, class_names: Sequence[str],
                 activation_layers: Sequence[str], overlay_quality: int = 90,
                 methods: Sequence[str] = ("gradcam",)):
        self.layout = layout
        self.storage = layout.storage
        self.shard = shard
        self.class_names = list(class_names)
        self.activation_layers = list(activation_layers)
        self.overlay_quality = overlay_quality
        self.methods = list(methods)

    def error_row(self, item: DecodedImage) -> dict:
        return base_row(item, self.shard)

    def image_row(self, item: DecodedImage, result: Dict[str, np.ndarray],
                  activation_maps: Optional[List[np.ndarray]] = None) -> dict:
        """Encodes and writes the image's outputs; returns its manifest row. Runs in the write pool.

        `result` holds this image's slice of the compiled step's outputs.
        """
        row = base_row(item, self.shard)
        try:
            h, w = item.bgr.shape[:2]
            cam_full = image_io.upsample_cam(result["cam"], w, h)
            heat = image_io.heatmap_uint8(cam_full)
            overlay = image_io.overlay_bgr(item.bgr, heat)
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
                cam_peak_x=float(peak_x),
                cam_peak_y=float(peak_y),
                activations=[
                    {"layer": name, "mean": float(s[0]), "std": float(s[1]), "max": float(s[2]),
                     "zero_fraction": float(s[3])}
                    for name, s in zip(self.activation_layers, stats)
                ],
                activation_grid_uris=grid_uris,
            )
            row["explanations"] = self._explanations(item, result, heat_uri, overlay_uri, (peak_x, peak_y))
        except Exception as exc:  # a write failure is this image's error, not the shard's
            row.update(status="error", error=f"cannot write outputs: {type(exc).__name__}: {exc}".replace("\n", " "))
        return row

    def _explanations(self, item: DecodedImage, result: Dict[str, np.ndarray], heat_uri: str,
                      overlay_uri: str, peak) -> List[dict]:
        """One entry per method: the first reuses the files written above, each further method
        writes its own heatmap and overlay (`-<method>` names); metrics where computed, else null."""
        h, w = item.bgr.shape[:2]
        cams = result.get("cams")
        entries = []
        for m, method in enumerate(self.methods):
            if m > 0:
                cam_full = image_io.upsample_cam(cams[m], w, h)
                heat = image_io.heatmap_uint8(cam_full)
                m_heat = self.layout.heatmap(self.shard, item.position, item.image_id, method)
                m_overlay = self.layout.overlay(self.shard, item.position, item.image_id, method)
                self.storage.write_bytes(m_heat, image_io.encode_png(heat))
                self.storage.write_bytes(m_overlay, image_io.encode_jpeg(image_io.overlay_bgr(item.bgr, heat),
                                                                         self.overlay_quality))
                m_peak = image_io.cam_peak(cam_full)
            else:
                m_heat, m_overlay, m_peak = heat_uri, overlay_uri, peak
            entry = {"method": method, "heatmap_uri": m_heat, "overlay_uri": m_overlay,
                     "cam_peak_x": float(m_peak[0]), "cam_peak_y": float(m_peak[1]),
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
        per-image files of earlier attempts that no row references."""
        table = pa.Table.from_pylist(rows, schema=IMAGE_MANIFEST_SCHEMA)
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
            "content_hash": content_hash,
            "result_fingerprint": result_fingerprint,
            "seconds": round(seconds, 3),
            "committed_at": time.time(),
            "worker_pid": os.getpid(),
            "worker_rss_bytes": rss_bytes(),
        }
        self.storage.write_bytes(self.layout.commit_marker(self.shard), json.dumps(marker).encode())
        fault_point("after_marker", self.shard)
        self.storage.write_bytes(self.layout.manifest_part(self.shard), data)
        self.storage.delete(staged)
        fault_point("after_publish", self.shard)
        self.delete_orphans(rows)
        return marker

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


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
