"""Reading an explain output for an audit: one streaming pass over the manifest into compact
numpy columns (no per-row Python objects, no heatmap PNGs), and later passes that fetch only the
small CAMs of chosen rows. Everything goes through the storage seam, so local and S3 outputs read
the same way."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Dict, Iterator, List, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bulk_explain.jobs.validation import ConfigError
from bulk_explain.workers.storage import StorageError, storage_for

BATCH_ROWS = 65_536
# The central region for "CAM mass outside the centre": the middle half of each side (a quarter of
# the area). A map spread evenly has 3/4 of its mass outside it.
CENTRE = (0.25, 0.75)

_SCALARS = ["source_uri", "source_version", "status", "error", "label", "pred_index", "pred_score",
            "cam_peak_x", "cam_peak_y", "cam_empty", "gradcam_overlay_uri"]


def row_keys(uris: pa.Array, versions: pa.Array) -> np.ndarray:
    """int64 key per row from sha256(uri NUL version): identifies "this image at this version"
    across audits without storing the URI again, and orders rows for deterministic sampling."""
    out = np.empty(len(uris), np.int64)
    for i, (u, v) in enumerate(zip(uris.to_pylist(), versions.to_pylist())):
        digest = hashlib.sha256(f"{u}\0{v}".encode("utf-8", "surrogateescape")).digest()
        out[i] = int.from_bytes(digest[:8], "little", signed=True)
    return out


def _np(array, dtype, fill) -> np.ndarray:
    return np.asarray(pc.fill_null(array, fill).to_numpy(zero_copy_only=False), dtype=dtype)


def _list_matrix(column: pa.Array, width: int, dtype, fill) -> np.ndarray:
    """A list column with up to `width` entries per row as an [n, width] matrix (missing = fill)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    out = np.full((n, width), fill, dtype)
    lengths = _np(pc.list_value_length(column), np.int64, 0)
    flat = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype)
    full = lengths == width
    if np.all(full | (lengths == 0)):  # every row complete or empty (cam_small): one reshape
        out[full] = flat.reshape(-1, width)
        return out
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = cols < width
    out[rows[keep], cols[keep]] = flat[keep]
    return out


def _struct_matrix(column, field: str, width: int, dtype, fill) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    out = np.full((n, width), fill, dtype)
    lengths = _np(pc.list_value_length(column), np.int64, 0)
    flat = np.asarray(pc.fill_null(column.flatten().field(field), fill).to_numpy(zero_copy_only=False), dtype)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = cols < width
    out[rows[keep], cols[keep]] = flat[keep]
    return out


def outer_mass(cam_small: np.ndarray, side: int) -> np.ndarray:
    """Share of each map's mass outside the central region (NaN for an all-zero map)."""
    maps = cam_small.reshape(len(cam_small), side, side).astype(np.float32)
    lo, hi = int(round(CENTRE[0] * side)), int(round(CENTRE[1] * side))
    total = maps.sum(axis=(1, 2))
    inner = maps[:, lo:hi, lo:hi].sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1.0 - inner / total, np.nan).astype(np.float32)


@dataclasses.dataclass
class ManifestData:
    """The manifest as compact columns, one entry per row (index = row number of the scan).

    Attributes:
        uris, versions, overlay_uris, errors: Arrow string arrays.
        keys: int64 row keys (see `row_keys`).
        ok: status == "ok".
        label_codes / label_names: folder label as codes into label_names (-1 = none).
        pred: predicted class index (-1 on error rows); pred_score: its probability (NaN on error).
        topk_index / topk_score: [n, k] top-k classes (-1 / NaN padding).
        peak_x, peak_y: CAM peak (NaN when null: error row or empty map).
        cam_empty: the CAM is all zeros.
        outer: CAM mass outside the central region (NaN without a map).
        act_layers / act_means: summarized layers and [n, layers] activation means.
        class_names: index -> name (from job.json's count and the names seen in top_k).
        has: which optional columns the manifest had (older manifests lack the newer ones).
        cam_side: side of the small CAM grid (0 when the manifest has none).
    """

    uris: pa.Array
    versions: pa.Array
    overlay_uris: pa.Array
    errors: pa.Array
    keys: np.ndarray
    ok: np.ndarray
    label_codes: np.ndarray
    label_names: List[str]
    pred: np.ndarray
    pred_score: np.ndarray
    topk_index: np.ndarray
    topk_score: np.ndarray
    peak_x: np.ndarray
    peak_y: np.ndarray
    cam_empty: np.ndarray
    outer: np.ndarray
    act_layers: List[str]
    act_means: np.ndarray
    class_names: List[str]
    has: Dict[str, bool]
    cam_side: int
    job: dict

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ManifestReader:
    """Streams `DST/manifest/` through the storage seam.

    Args:
        output: the explain job's output root.

    Raises:
        ConfigError: there is no committed manifest under `output`.
    """

    def __init__(self, output: str):
        import pyarrow.dataset as ds

        self.output = output.rstrip("/") if "://" in output else output
        self.storage = storage_for(output)
        manifest = self.storage.join(self.output, "manifest")
        try:
            found = any(True for _ in self.storage.list_names(manifest))
        except StorageError as exc:
            raise ConfigError(str(exc)) from None
        if not found:
            raise ConfigError(f"no manifest under {output}: run `bulk-explain run --output {output}` first")
        fs, path = self.storage.filesystem(manifest)
        self.dataset = ds.dataset(path, filesystem=fs, format="parquet")
        self.columns = set(self.dataset.schema.names)
        try:
            self.job = json.loads(self.storage.read_bytes(self.storage.join(self.output, "job.json")))
        except Exception:
            self.job = {}

    def batches(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        cols = [c for c in columns if c in self.columns]
        # Deterministic order (sorted fragment paths, row order inside): row numbers of two scans agree.
        for fragment in sorted(self.dataset.get_fragments(), key=lambda f: f.path):
            for batch in fragment.to_batches(columns=cols, batch_size=BATCH_ROWS):
                yield batch

    def load(self) -> ManifestData:
        """One pass over the manifest: every column the checks need except the small CAMs."""
        wanted = _SCALARS + ["top_k", "activations", "cam_small", "cam_small_shape"]
        chunks: Dict[str, list] = {k: [] for k in ("uris", "versions", "overlays", "errors", "keys", "ok", "labels",
                                                     "pred", "score", "tki", "tks", "px", "py", "empty", "outer",
                                                     "acts")}
        job_classes = int((self.job.get("model") or {}).get("num_classes") or 0)
        k = int((self.job.get("config") or {}).get("top_k") or 5)
        k = max(1, min(k, job_classes)) if job_classes else k
        act_layers = list((self.job.get("model") or {}).get("activation_layers") or [])
        names: Dict[int, str] = {}
        cam_side = 0
        for batch in self.batches(wanted):
            n = batch.num_rows
            col = {name: batch.column(i) for i, name in enumerate(batch.schema.names)}
            null_str = pa.nulls(n, pa.string())
            uris = col["source_uri"]
            versions = col.get("source_version", null_str)
            chunks["uris"].append(uris)
            chunks["versions"].append(versions)
            chunks["overlays"].append(col.get("gradcam_overlay_uri", null_str))
            chunks["errors"].append(col.get("error", null_str))
            chunks["keys"].append(row_keys(uris, versions))
            ok = np.asarray(pc.equal(col["status"], "ok").fill_null(False).to_numpy(zero_copy_only=False), bool)
            chunks["ok"].append(ok)
            chunks["labels"].append(col.get("label", null_str))
            chunks["pred"].append(_np(col["pred_index"], np.int32, -1) if "pred_index" in col else np.full(n, -1, np.int32))
            chunks["score"].append(_np(pc.cast(col["pred_score"], pa.float32()), np.float32, np.nan)
                                   if "pred_score" in col else np.full(n, np.nan, np.float32))
            if "top_k" in col:
                tk = col["top_k"]
                chunks["tki"].append(_struct_matrix(tk, "index", k, np.int32, -1))
                chunks["tks"].append(_struct_matrix(tk, "score", k, np.float32, np.nan))
                flat = tk.flatten()
                idx = np.asarray(pc.fill_null(flat.field("index"), -1).to_numpy(zero_copy_only=False))
                if len(idx):
                    firsts = np.unique(idx, return_index=True)
                    labels = flat.field("label")
                    for i, pos in zip(*firsts):
                        if i >= 0 and int(i) not in names:
                            names[int(i)] = labels[int(pos)].as_py()
            else:
                chunks["tki"].append(np.full((n, k), -1, np.int32))
                chunks["tks"].append(np.full((n, k), np.nan, np.float32))
            for key, name in (("px", "cam_peak_x"), ("py", "cam_peak_y")):
                chunks[key].append(_np(pc.cast(col[name], pa.float32()), np.float32, np.nan) if name in col
                                   else np.full(n, np.nan, np.float32))
            if "cam_empty" in col:
                chunks["empty"].append(_np(col["cam_empty"], bool, False))
            else:
                chunks["empty"].append(np.zeros(n, bool))
            if "cam_small" in col:
                shapes = _list_matrix(col["cam_small_shape"], 2, np.int32, 0)
                side = int(shapes[ok][0, 0]) if ok.any() else 0
                cam_side = cam_side or side
                if cam_side:
                    cams = _list_matrix(col["cam_small"], cam_side * cam_side, np.float32, 0.0)
                    chunks["outer"].append(outer_mass(cams, cam_side))
                else:
                    chunks["outer"].append(np.full(n, np.nan, np.float32))
            else:
                chunks["outer"].append(np.full(n, np.nan, np.float32))
            if "activations" in col:
                acts = col["activations"]
                if not act_layers and len(acts.flatten()):
                    first = acts.flatten().field("layer")
                    act_layers = list(dict.fromkeys(first.to_pylist()[:64]))
                chunks["acts"].append(_struct_matrix(acts, "mean", len(act_layers), np.float32, np.nan))
            else:
                chunks["acts"].append(np.full((n, len(act_layers)), np.nan, np.float32))

        def cat(key, dtype=None, width=None):
            parts = chunks[key]
            if parts:
                return np.concatenate(parts)
            return np.zeros((0,) if width is None else (0, width), dtype)

        labels = pa.chunked_array(chunks["labels"] or [pa.array([], pa.string())], pa.string()).combine_chunks()
        encoded = pc.dictionary_encode(labels)
        label_codes = _np(encoded.indices, np.int32, -1)
        label_names = [str(x) for x in encoded.dictionary.to_pylist()]
        num = max([job_classes] + [i + 1 for i in names])
        class_names = [names.get(i, str(i)) for i in range(num)]
        has = {c: c in self.columns for c in ("cam_empty", "cam_small", "top_k", "activations", "label")}

        def strings(key):
            return pa.chunked_array(chunks[key] or [pa.array([], pa.string())], pa.string()).combine_chunks()

        return ManifestData(
            uris=strings("uris"), versions=strings("versions"), overlay_uris=strings("overlays"),
            errors=strings("errors"), keys=cat("keys", np.int64), ok=cat("ok", bool),
            label_codes=label_codes, label_names=label_names, pred=cat("pred", np.int32),
            pred_score=cat("score", np.float32), topk_index=cat("tki", np.int32, k),
            topk_score=cat("tks", np.float32, k), peak_x=cat("px", np.float32), peak_y=cat("py", np.float32),
            cam_empty=cat("empty", bool), outer=cat("outer", np.float32), act_layers=act_layers,
            act_means=cat("acts", np.float32, len(act_layers)), class_names=class_names, has=has,
            cam_side=cam_side, job=self.job,
        )

    def cam_rows(self, rows: np.ndarray, side: int) -> np.ndarray:
        """The small CAMs of the given row numbers (sorted or not), as [len(rows), side*side]
        float32, in the order of `rows`; one streaming pass, memory = the result + one batch."""
        rows = np.asarray(rows, np.int64)
        out = np.zeros((len(rows), side * side), np.float32)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        start = 0
        for batch in self.batches(["cam_small"]):
            end = start + batch.num_rows
            lo, hi = np.searchsorted(sorted_rows, [start, end])
            if hi > lo:
                cams = _list_matrix(batch.column(0), side * side, np.float32, 0.0)
                out[order[lo:hi]] = cams[sorted_rows[lo:hi] - start]
            start = end
        return out

    def iter_cams(self, side: int) -> Iterator[tuple]:
        """(first row number, [rows, side*side] float32) per batch, for assigning every row."""
        start = 0
        for batch in self.batches(["cam_small"]):
            yield start, _list_matrix(batch.column(0), side * side, np.float32, 0.0)
            start += batch.num_rows


def label_classes(label_names: Sequence[str], class_names: Sequence[str]) -> np.ndarray:
    """Model class index per folder label (-1 = no class of that name), with the explain job's own
    matching (`cats/` -> `cat`, case-insensitive)."""
    from bulk_explain.workers.explain.shard_worker import resolve_cam_classes

    return resolve_cam_classes(list(label_names), "label", list(class_names))
