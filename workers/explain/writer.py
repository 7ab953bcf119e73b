"""The write stage of the explain kind: heatmaps, overlays and channel grids encoded and written
in a thread pool behind compute; then the shard's commit through the shared protocol
(`bulk_explain.workers.commit`: staged part `_staging/shard-N.parquet`, marker
`_commits/shard-N.json`, published part `manifest/shard-N.parquet`), then orphaned image files of
earlier attempts deleted.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from bulk_explain.schemas.image_manifest import CAM_SMALL_SIZE, IMAGE_MANIFEST_SCHEMA
from bulk_explain.workers import image_io
from bulk_explain.workers.commit import commit_unit
from bulk_explain.workers.explain.labels import LabelMatcher
from bulk_explain.workers.layout import OutputLayout
from bulk_explain.workers.explain.reader import DecodedImage


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
        """Commits the shard (`bulk_explain.workers.commit.commit_unit`: staged part, marker,
        published part), then deletes per-image files of earlier attempts that no row references.

        Raises:
            CommitConflict: the marker was replaced or withdrawn by another run before publishing.
        """
        table = pa.Table.from_pylist(rows, schema=IMAGE_MANIFEST_SCHEMA)
        ok = sum(1 for r in rows if r["status"] == "ok")
        marker = commit_unit(self.layout, self.shard, table, content_hash, result_fingerprint, {
            "ok": ok,
            "error": len(rows) - ok,
            "empty_maps": sum(1 for r in rows if r.get("cam_empty")),
            "seconds": round(seconds, 3),
        })
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


def cam_spread(cam_full: np.ndarray) -> Optional[float]:
    """Share of the heatmap's pixels (original size) above half its maximum: small for a focused
    map, near 1 for a flat one whose peak means little. None for an all-zero map."""
    peak = float(cam_full.max()) if cam_full.size else 0.0
    if not peak > 0.0:
        return None
    return float(np.count_nonzero(cam_full > 0.5 * peak)) / cam_full.size
