"""strategy_clusters: SpRAy (Lapuschkin et al. 2019, "Unmasking Clever Hans predictors").

Per predicted class, the small CAMs (L2-normalized, so clusters group where the model looks, not
how strongly) are clustered by spectral clustering on a symmetric k-nearest-neighbour graph; the
number of clusters is the eigengap of that graph's normalized Laplacian. Only the
`max_cluster_classes` most frequent predicted classes with at least MIN_CLUSTER_IMAGES non-empty maps
are clustered. At most
`cluster_sample_per_class` images per class are clustered (the ones with the smallest row keys, so
the same images are chosen in every audit); all other images of the class are assigned to the
nearest cluster centre in one streaming pass. Empty maps are excluded (see empty_maps).

The value is the share of clustered images that fall in "border clusters": clusters whose mean map
peaks in the outer border, i.e. a strategy that looks at the image's edge (a tag, a watermark, a
frame) rather than at an object.
"""

from __future__ import annotations

import warnings

import numpy as np

from bulk_explain.jobs.audit.checks import AuditContext, Check, Finding, register_check
from bulk_explain.jobs.audit.checks.cam import in_border
from bulk_explain.jobs.audit.config import MIN_CLUSTER_IMAGES

NEIGHBOURS = 10  # k of the kNN affinity graph (SpRAy uses a kNN graph as well)
EXAMPLES_PER_CLUSTER = 8


def normalized(maps: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(maps, axis=1, keepdims=True)
    return np.divide(maps, norm, out=np.zeros_like(maps), where=norm > 0)


def eigengap_clusters(x: np.ndarray, max_clusters: int, seed: int = 0):
    """Spectral clustering of the rows of `x` with k chosen by the eigengap.

    Returns:
        (labels [n], k, the smallest eigenvalues of the normalized Laplacian).
    """
    import scipy.sparse
    from scipy.linalg import eigh
    from scipy.sparse.csgraph import laplacian
    from scipy.sparse.linalg import eigsh
    from sklearn.cluster import SpectralClustering
    from sklearn.neighbors import kneighbors_graph

    n = len(x)
    graph = kneighbors_graph(x, min(NEIGHBOURS, n - 1), mode="connectivity", include_self=False)
    affinity = (0.5 * (graph + graph.T)).tocsr()
    top = min(max_clusters, n - 1)
    lap = laplacian(affinity, normed=True)
    if n <= 300:
        eigenvalues = eigh(lap.toarray(), eigvals_only=True, subset_by_index=[0, top])
    else:
        # The smallest eigenvalues of L are 1 - the largest of I - L (sparse, converges in a few
        # Lanczos steps), where a dense solver costs O(n^3).
        shifted = scipy.sparse.identity(n, format="csr") - lap
        v0 = np.full(n, 1.0 / np.sqrt(n))  # fixed start vector: the same clusters every audit
        eigenvalues = np.sort(1.0 - eigsh(shifted, k=top + 1, which="LA", v0=v0, return_eigenvectors=False))
    gaps = np.diff(eigenvalues)[:max_clusters]
    k = int(np.argmax(gaps)) + 1 if len(gaps) else 1
    if k == 1:
        return np.zeros(n, np.int64), 1, eigenvalues
    with warnings.catch_warnings():
        # A kNN graph of well-separated strategies is often disconnected: that is the point here.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed,
                                    assign_labels="cluster_qr").fit_predict(affinity)
    return np.asarray(labels, np.int64), k, eigenvalues


@register_check
class StrategyClusters(Check):
    name = "strategy_clusters"
    title = "Strategy clusters (SpRAy)"
    default_threshold = 0.05
    description = ("Per predicted class, spectral clusters of the normalized small CAMs (k by eigengap); the value "
                   "is the share of clustered images in clusters whose mean map peaks in the border.")

    def run(self, ctx: AuditContext) -> Finding:
        data, cfg = ctx.data, ctx.config
        side = data.cam_side
        if not data.has.get("cam_small") or not side:
            return Finding(None, "skipped: the manifest has no small CAMs (cam_small; re-run with --overwrite)")
        eligible = data.ok & ~data.cam_empty & (data.pred >= 0)
        classes, samples = [], []
        counts = np.bincount(data.pred[eligible], minlength=max(data.num_classes, 1))
        frequent = [c for c in np.argsort(-counts, kind="stable") if counts[c] >= MIN_CLUSTER_IMAGES]
        skipped = len(frequent) - cfg.max_cluster_classes
        for c in sorted(frequent[: cfg.max_cluster_classes]):
            rows = np.flatnonzero(eligible & (data.pred == c))
            if len(rows) > cfg.cluster_sample_per_class:
                rows = np.sort(rows[np.argsort(data.keys[rows], kind="stable")[: cfg.cluster_sample_per_class]])
            classes.append(int(c))
            samples.append(rows)
        if not classes:
            return Finding(None, f"skipped: no predicted class has {MIN_CLUSTER_IMAGES} or more non-empty maps")
        sample_rows = np.concatenate(samples)
        sample_maps = ctx.reader.cam_rows(sample_rows, side)
        cluster = np.full(len(data), -1, np.int32)  # cluster id, unique over classes
        distance = np.full(len(data), np.nan, np.float32)
        centres, centre_class, info = [], [], []
        offset = 0
        for c, rows in zip(classes, samples):
            maps = sample_maps[offset: offset + len(rows)]
            offset += len(rows)
            x = normalized(maps)
            labels, k, eigenvalues = eigengap_clusters(x, cfg.max_clusters)
            for j in range(k):
                members = labels == j
                centre = x[members].mean(axis=0)
                gid = len(centres)
                centres.append(centre)
                centre_class.append(c)
                cluster[rows[members]] = gid
                distance[rows[members]] = np.linalg.norm(x[members] - centre, axis=1)
                mean_map = maps[members].mean(axis=0).reshape(side, side)
                py, px = np.unravel_index(int(np.argmax(mean_map)), mean_map.shape)
                peak = ((px + 0.5) / side, (py + 0.5) / side)
                info.append({"class": data.class_names[c], "class_index": c, "cluster": gid, "local": j,
                             "sampled": int(members.sum()), "peak": [float(peak[0]), float(peak[1])],
                             "border": bool(in_border(np.array([peak[0]]), np.array([peak[1]]), cfg.border)[0]),
                             "eigenvalues": [float(e) for e in eigenvalues], "k": k,
                             "_mean_map": mean_map})
        # Assign every other eligible row of a clustered class to its class's nearest centre.
        centres_arr = np.stack(centres)
        centre_class = np.asarray(centre_class)
        todo = eligible & np.isin(data.pred, classes) & (cluster < 0)
        if todo.any():
            for start, maps in ctx.reader.iter_cams(side):
                idx = np.flatnonzero(todo[start: start + len(maps)])
                if not len(idx):
                    continue
                x = normalized(maps[idx])
                rows = start + idx
                for c in np.unique(data.pred[rows]):
                    mine = data.pred[rows] == c
                    ids = np.flatnonzero(centre_class == c)
                    xm, cm = x[mine], centres_arr[ids]
                    # |x - c|^2 expanded: no [rows, clusters, cells] temporary for a 64k-row batch
                    d2 = (xm * xm).sum(1)[:, None] + (cm * cm).sum(1)[None, :] - 2.0 * xm @ cm.T
                    d = np.sqrt(np.maximum(d2, 0.0))
                    best = np.argmin(d, axis=1)
                    cluster[rows[mine]] = ids[best]
                    distance[rows[mine]] = d[np.arange(len(best)), best]
        clustered = cluster >= 0
        sizes = np.bincount(cluster[clustered], minlength=len(centres))
        border_ids = [i["cluster"] for i in info if i["border"]]
        for i in info:
            i["size"] = int(sizes[i["cluster"]])
            members = np.flatnonzero(cluster == i["cluster"])
            i["_examples"] = members[np.argsort(distance[members], kind="stable")[:EXAMPLES_PER_CLUSTER]]
        in_border_clusters = np.isin(cluster, border_ids) & clustered
        value = float(in_border_clusters.sum() / clustered.sum())
        flagged = np.flatnonzero(in_border_clusters)
        order = np.argsort(distance[flagged], kind="stable")
        per_class = {}
        for i in info:
            per_class.setdefault(i["class"], []).append(i["size"])
        text = (f"{int(clustered.sum())} images in {len(info)} clusters over {len(classes)} classes "
                f"({', '.join(f'{name}: {len(s)}' for name, s in per_class.items())}); "
                f"{int(in_border_clusters.sum())} ({value:.1%}) are in clusters whose mean map peaks in the border"
                + (f"; {skipped} less frequent classes not clustered" if skipped > 0 else ""))
        return Finding(
            value, text, rows=flagged[order], scores=distance[flagged][order], score_name="distance to centre",
            data={"clusters": [{k: v for k, v in i.items() if not k.startswith("_")} for i in info],
                  "sample_per_class": cfg.cluster_sample_per_class, "neighbours": NEIGHBOURS,
                  "excluded_empty_maps": int((data.ok & data.cam_empty).sum())},
            extra={"cluster": cluster, "distance": distance, "info": info, "side": side},
        )
