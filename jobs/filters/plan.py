"""The filters kind's plan: each layer's filters cut into units (layer, filter range), numbered in
layer order, each with a content hash of what it computes (settings key, layer, range), so the
shared commit protocol (`bulk_explain.jobs.units`) tells committed units from stale ones."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Dict, List, Sequence


@dataclasses.dataclass(frozen=True)
class FilterUnit:
    """One unit of work and of commit: filters [start, stop) of `layer`."""

    shard: int
    layer: str
    start: int
    stop: int
    content_hash: str

    def __len__(self) -> int:
        return self.stop - self.start

    def __repr__(self) -> str:  # what retries and failures print
        return f"unit {self.shard} ({self.layer} {self.start}-{self.stop})"


def settings_key(model_fingerprint: str, settings: Dict) -> str:
    """Hash of the model and the ascent settings: names the filter images (16 hex digits)."""
    payload = json.dumps({"fingerprint": model_fingerprint, "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def plan_units(layers: Sequence[str], filters: Dict[str, int], per_unit: int, key: str) -> List[FilterUnit]:
    """Units of at most `per_unit` filters, layer by layer in model order; ids 0, 1, ..."""
    units = []
    for layer in layers:
        for start in range(0, filters[layer], per_unit):
            stop = min(start + per_unit, filters[layer])
            digest = hashlib.sha256(json.dumps([key, layer, start, stop]).encode()).hexdigest()[:32]
            units.append(FilterUnit(len(units), layer, start, stop, digest))
    return units
