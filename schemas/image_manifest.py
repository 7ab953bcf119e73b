"""Arrow schema of the image manifest (`DST/manifest/shard-XXXXX.parquet`), versioned.

Outside tests read these columns: extend, never rename. Bump SCHEMA_VERSION when adding columns.
"""

import pyarrow as pa

SCHEMA_VERSION = "2"  # 2: cam_empty, cam_small(_shape), label_index, correct, cam_spread, explanations; plan URIs large_string

# 14x14: VGG16's target layer at 224 px is 14x14 (stored without loss) and the lecture's convnet at
# 150 px is 7x7 (stored exactly, upsampled 2x); 196 float16 values = 392 bytes per row.
CAM_SMALL_SIZE = 14

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
        ("source_version", pa.string()),  # "size:mtime_ns" locally (or "sha256:..."), ETag on S3
        ("shard", pa.int32()),
        # An all-zero CAM (every channel weight <= 0 after the ReLU) explains nothing: its peaks are
        # null and this flag is true, so readers never take it for "looks at the top-left pixel".
        ("cam_empty", pa.bool_()),
        # The CAM at a fixed CAM_SMALL_SIZE x CAM_SMALL_SIZE grid (row-major, 0..1, float16), so
        # audits cluster and measure maps without decoding heatmap PNGs; null on error rows.
        ("cam_small", pa.list_(pa.float16())),
        ("cam_small_shape", pa.list_(pa.int32())),  # [rows, cols]
        ("label_index", pa.int32()),  # class the folder label names (workers/explain/labels.py), or null
        ("correct", pa.bool_()),  # pred_index == label_index; null without a matching label or on error
        ("cam_spread", pa.float32()),  # share of the heatmap above half its max (1 = flat); null if all zero
        ("explanations", EXPLANATIONS_TYPE),  # per CAM method; gradcam_*/cam_peak_* = the first
    ],
    metadata={"bulk_explain.schema": "image_manifest", "bulk_explain.schema_version": SCHEMA_VERSION},
)

PLAN_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("position", pa.int32()),  # index inside the shard
        ("source_uri", pa.large_string()),  # 64-bit offsets: URI text may pass 2 GiB
        ("label", pa.large_string()),
        ("size", pa.int64()),
        ("version", pa.large_string()),
    ],
    metadata={"bulk_explain.schema": "plan", "bulk_explain.schema_version": SCHEMA_VERSION},
)
