"""Arrow schema of the image manifest (`DST/manifest/shard-XXXXX.parquet`), versioned.

Outside tests read these columns: extend, never rename. Bump SCHEMA_VERSION when adding columns.
"""

import pyarrow as pa

SCHEMA_VERSION = "1"

TOP_K_TYPE = pa.list_(
    pa.struct([("index", pa.int32()), ("label", pa.string()), ("score", pa.float32())])
)
ACTIVATIONS_TYPE = pa.list_(
    pa.struct(
        [
            ("layer", pa.string()),
            ("mean", pa.float32()),
            ("std", pa.float32()),
            ("max", pa.float32()),
            ("zero_fraction", pa.float32()),
        ]
    )
)

# One entry per CAM method of the run (`--cam-method a,b,...`), in the order asked; the metrics are
# null unless `--metrics` asked for them (definitions in job.json, "explanations").
EXPLANATIONS_TYPE = pa.list_(
    pa.struct(
        [
            ("method", pa.string()),
            ("heatmap_uri", pa.string()),
            ("overlay_uri", pa.string()),
            ("cam_peak_x", pa.float32()),
            ("cam_peak_y", pa.float32()),
            ("deletion_auc", pa.float32()),
            ("insertion_auc", pa.float32()),
            ("road_morf", pa.list_(pa.float32())),  # at ROAD_FRACTIONS 10/30/50/70/90 %
            ("road_lerf", pa.list_(pa.float32())),
        ]
    )
)

IMAGE_MANIFEST_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("image_id", pa.string()),  # sha256 hex of the source bytes
        ("status", pa.string()),  # 'ok' | 'error'
        ("error", pa.string()),
        ("width", pa.int32()),  # original size
        ("height", pa.int32()),
        ("label", pa.string()),  # parent folder name, or null
        ("pred_index", pa.int32()),
        ("pred_label", pa.string()),
        ("pred_score", pa.float32()),
        ("top_k", TOP_K_TYPE),
        ("gradcam_index", pa.int32()),
        ("gradcam_overlay_uri", pa.string()),
        ("gradcam_heatmap_uri", pa.string()),
        ("cam_peak_x", pa.float32()),  # 0..1 of original width, x right
        ("cam_peak_y", pa.float32()),  # 0..1 of original height, y down
        ("activations", ACTIVATIONS_TYPE),
        ("activation_grid_uris", pa.list_(pa.string())),  # opt-in channel grids, else empty
        ("source_size", pa.int64()),
        ("source_version", pa.string()),  # mtime_ns locally, ETag on S3
        ("shard", pa.int32()),
        ("explanations", EXPLANATIONS_TYPE),  # per CAM method; gradcam_*/cam_peak_* = the first
    ],
    metadata={"bulk_explain.schema": "image_manifest", "bulk_explain.schema_version": SCHEMA_VERSION},
)

PLAN_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("position", pa.int32()),  # index inside the shard
        ("source_uri", pa.string()),
        ("label", pa.string()),
        ("size", pa.int64()),
        ("version", pa.string()),
    ],
    metadata={"bulk_explain.schema": "plan", "bulk_explain.schema_version": SCHEMA_VERSION},
)
