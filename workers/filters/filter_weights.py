"""Filter-weight plots (the lecture's "plot the learned filters directly").

* First conv layer (its kernel reads the 3 image channels): every filter as a small colour image.
  Each kh x kw x 3 filter is min-max normalized on its own and enlarged with nearest-neighbour
  (no smoothing), so a 3x3 filter stays 9 visible squares. Models fed BGR (VGG16's caffe
  preprocessing) have their kernel channels flipped to RGB for display.
* Every layer: the lecture's per-channel grayscale view, one row per filter and one column per
  input channel, for the first N filters x M channels, normalized with the layer's min and max
  as in the lecture (`filters = (filters - f_min) / (f_max - f_min)`).

All functions return uint8 arrays; `write_weight_plots` encodes PNGs and writes them through the
storage seam.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from bulk_explain.workers.filters.filter_vis import contact_sheet, encode_png


def conv_kernel(layer) -> Optional[np.ndarray]:
    """The (kh, kw, in_channels, filters) kernel of a Conv2D layer, or None for other layers."""
    import keras

    if not isinstance(layer, keras.layers.Conv2D) or getattr(layer, "kernel", None) is None:
        return None
    kernel = np.asarray(layer.kernel.numpy() if hasattr(layer.kernel, "numpy") else layer.kernel)
    return kernel if kernel.ndim == 4 else None


def _enlarge(tile: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)  # nearest, exactly


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def color_filter_tiles(kernel: np.ndarray, scale: int = 10, input_order: str = "RGB") -> List[np.ndarray]:
    """One RGB uint8 tile of (kh*scale, kw*scale, 3) per filter of a 3-input-channel kernel.

    Each filter is min-max normalized on its own (a constant filter becomes mid-gray).
    """
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"colour filters need a (kh, kw, 3, n) kernel, received {kernel.shape}")
    tiles = []
    for i in range(kernel.shape[3]):
        f = kernel[:, :, :, i].astype(np.float64)
        if input_order == "BGR":
            f = f[:, :, ::-1]
        lo, hi = f.min(), f.max()
        unit = (f - lo) / (hi - lo) if hi > lo else np.full_like(f, 0.5)
        tiles.append(_enlarge(_to_uint8(unit), scale))
    return tiles


def channel_grid(kernel: np.ndarray, n_filters: int, n_channels: int, scale: int = 8,
                 margin: int = 2) -> np.ndarray:
    """The lecture's grayscale view: rows = the first `n_filters` filters, columns = their first
    `n_channels` input channels, each a (kh*scale, kw*scale) tile; white margins between tiles."""
    if kernel.ndim != 4:
        raise ValueError(f"expected a (kh, kw, in, out) kernel, received {kernel.shape}")
    nf = min(n_filters, kernel.shape[3])
    nc = min(n_channels, kernel.shape[2])
    k = kernel.astype(np.float64)
    lo, hi = k.min(), k.max()
    unit = (k - lo) / (hi - lo) if hi > lo else np.full_like(k, 0.5)
    tiles = [_enlarge(_to_uint8(unit[:, :, c, f]), scale) for f in range(nf) for c in range(nc)]
    return contact_sheet(tiles, per_row=nc, margin=margin, background=255)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def write_weight_plots(model, layers: Sequence[str], storage, weights_root: str, n_filters: int = 16,
                       n_channels: int = 16, input_order: str = "RGB", per_row: int = 16) -> List[Dict]:
    """Writes the plots for each Conv2D layer in `layers` under `weights_root`; returns one record
    per file written: {"layer", "kind": "channels"|"color_sheet"|"color", "uri", ...}.

    Files: `<layer>_channels.png` (gray N x M view) for every conv layer; for a layer reading the
    3 image channels also `<layer>_color.png` (all filters, `per_row` a row) and
    `<layer>/filter_XXXX.png` (one per filter). Non-conv layers are skipped.
    """
    records: List[Dict] = []
    for name in layers:
        kernel = conv_kernel(model.get_layer(name))
        if kernel is None:
            continue
        stem = _safe(name)
        scale = max(1, 24 // max(kernel.shape[0], kernel.shape[1]))
        grid = channel_grid(kernel, n_filters, n_channels, scale=scale)
        uri = storage.join(weights_root, f"{stem}_channels.png")
        storage.write_bytes(uri, encode_png(grid))
        records.append({"layer": name, "kind": "channels", "uri": uri,
                        "filters": min(n_filters, kernel.shape[3]), "channels": min(n_channels, kernel.shape[2])})
        if kernel.shape[2] == 3:
            cscale = max(1, 30 // max(kernel.shape[0], kernel.shape[1]))
            tiles = color_filter_tiles(kernel, scale=cscale, input_order=input_order)
            sheet = contact_sheet(tiles, per_row=per_row, margin=2, background=255)
            uri = storage.join(weights_root, f"{stem}_color.png")
            storage.write_bytes(uri, encode_png(sheet, "RGB"))
            records.append({"layer": name, "kind": "color_sheet", "uri": uri, "filters": len(tiles)})
            for i, tile in enumerate(tiles):
                uri = storage.join(weights_root, stem, f"filter_{i:04d}.png")
                storage.write_bytes(uri, encode_png(tile, "RGB"))
            records.append({"layer": name, "kind": "color", "uri": storage.join(weights_root, stem),
                            "filters": len(tiles)})
    return records
