"""Arrow schema of the filter manifest (`DST/filters/manifest.parquet`), versioned.

One row per visualized filter. Outside tests read the brief's columns (layer, filter_index,
image_uri, activation_start, activation_end): extend, never rename. Bump SCHEMA_VERSION when adding
columns.

`activation_start` / `activation_end` are the lecture's loss: the mean of the filter's activation
map with a 2-pixel border cut (fewer pixels where the map is smaller than 5x5; see
`border_used` in DST/filters/summary.json), on the start noise and on the final image.
`dead` marks a filter whose start and end activations are both exactly 0 (a ReLU unit that never
fired, so its gradient was 0 and its image is the start noise); dead filters are kept, not hidden.
"""

import pyarrow as pa

SCHEMA_VERSION = "1"

FILTER_MANIFEST_SCHEMA = pa.schema(
    [
        ("layer", pa.string()),
        ("filter_index", pa.int32()),
        ("image_uri", pa.string()),  # absolute path or s3:// URI of the filter's PNG
        ("activation_start", pa.float32()),
        ("activation_end", pa.float32()),
        ("dead", pa.bool_()),
        ("steps", pa.int32()),
        ("learning_rate", pa.float32()),
        ("size", pa.int32()),  # square input size of the ascent (before the centre crop)
        ("seed", pa.int64()),  # start noise: uniform 0.4..0.6 seeded by (seed, layer, filter_index)
        ("model_fingerprint", pa.string()),  # sha256 of architecture + weights
        ("settings_key", pa.string()),  # hash of fingerprint + settings: the cache key of this row
    ],
    metadata={"bulk_explain.schema": "filter_manifest", "bulk_explain.schema_version": SCHEMA_VERSION},
)
