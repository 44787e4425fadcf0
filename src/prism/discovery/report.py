"""DIR/report.html: a 2-D map of the prompts coloured by cluster (UMAP when umap-learn is installed, else
PCA), the cluster sizes and their central prompts."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np


def project(points: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """2-D coordinates of the prompts and the method's name."""
    if len(points) < 3:
        return np.zeros((len(points), 2)), "none (too few prompts)"
    try:
        import umap

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(points), "UMAP"
    except ImportError:
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(points), "PCA"


def map_png(coordinates: np.ndarray, labels: np.ndarray, names: dict[int, str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 6), dpi=100)
    colours = plt.get_cmap("tab20")
    for index, (cluster_id, name) in enumerate(sorted(names.items())):
        chosen = labels == cluster_id
        axes.scatter(coordinates[chosen, 0], coordinates[chosen, 1], s=8, alpha=0.7, label=name,
                     color="lightgrey" if cluster_id < 0 else colours(index % 20))
    axes.legend(fontsize=7, markerscale=2, loc="best")
    axes.set_xticks([])
    axes.set_yticks([])
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def write_report(path: Path, summary: dict[str, Any], coordinates: np.ndarray, labels: np.ndarray,
                 names: dict[int, str], method: str) -> Path:
    image = base64.b64encode(map_png(coordinates, labels, names)).decode()
    rows = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td>{c['size']}</td><td>{c['share']:.1%}</td><td><ul>"
        + "".join(f"<li>{html.escape(e)}</li>" for e in c["examples"]) + "</ul></td></tr>"
        for c in summary["clusters"])
    ari = f"<p>Adjusted Rand index against the log's labels: {summary['ari']:.3f}</p>" if "ari" in summary else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>prism discover</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td{{vertical-align:top;padding:4px 8px}}
table{{border-collapse:collapse}}tr{{border-bottom:1px solid #ddd}}</style></head><body>
<h1>Domains found in {html.escape(summary['log'])}</h1>
<p>{summary['prompts']} prompts, {len(summary['clusters'])} clusters (embedding: {html.escape(summary['embedding'])};
clusters: {html.escape(summary['criterion'])}).</p>{ari}
<h2>Map ({method})</h2><img alt="prompts in 2-D, coloured by cluster" src="data:image/png;base64,{image}">
<h2>Clusters</h2><table><tr><th>domain</th><th>prompts</th><th>share</th><th>central prompts</th></tr>{rows}</table>
</body></html>
"""
    path.write_text(page)
    return path
