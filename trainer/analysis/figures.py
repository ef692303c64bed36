"""The run report's figures as PNG bytes: the clusters on a PCA map, the training
curves, the silhouette per k. Rendering only, no file I/O, and no clock: the same result
gives the same bytes. matplotlib is imported inside the functions (only rank 0 draws),
and only its object-oriented Agg API, never pyplot's global state."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from trainer.analysis.clustering import ClusterResult, display_title
from trainer.analysis.findings import distinctive_genres, finite

_ANNOTATED_TITLES = 8  # most-rated items labelled on the PCA plot


def cluster_colours(k: int) -> list[str]:
    """One hex colour per cluster, the same in the plot and the HTML table."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if k <= 10:
        colours = colormaps["tab10"].colors[:k]
    elif k <= 20:
        # tab20 pairs each hue dark then light; all darks first keeps neighbours distinct.
        tab20 = colormaps["tab20"].colors
        colours = (tab20[0::2] + tab20[1::2])[:k]
    else:
        colours = colormaps["turbo"](np.linspace(0.05, 0.95, k))
    return [to_hex(c) for c in colours]


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, outside pyplot's global state."""
    # Imported here: only rank 0 draws, and the object-oriented Agg API keeps
    # pyplot's global state (and any interactive backend) out of the process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    # No metadata beyond the default Software tag: identical runs give identical bytes.
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def render_pca(result: ClusterResult) -> bytes:
    """PNG of the PCA projection coloured by cluster, the most-rated titles labelled."""
    k = result.k
    colours = cluster_colours(k)
    figure = _figure(11, 7.5)
    axes = figure.add_subplot()
    xy = result.projection
    # Small, translucent points stay readable for tens of thousands of items.
    point_size = float(np.clip(20_000 / len(xy), 3, 30))
    for cluster, summary in enumerate(result.clusters):
        members = result.labels == cluster
        if not members.any():
            continue
        axes.scatter(
            xy[members, 0],
            xy[members, 1],
            s=point_size,
            color=colours[cluster],
            alpha=0.7,
            linewidths=0,
            rasterized=True,
            label=legend_label(summary),
        )
    most_rated = _most_rated(result)[:_ANNOTATED_TITLES]
    axes.scatter(
        xy[most_rated, 0],
        xy[most_rated, 1],
        s=max(point_size, 12) * 2,
        facecolors="none",
        edgecolors="black",
        linewidths=0.8,
    )
    first, second = result.explained_variance
    axes.set_xlabel(f"PC1 ({first:.1%} of variance)")
    axes.set_ylabel(f"PC2 ({second:.1%} of variance)")
    nmi = result.scores.get("nmi")
    nmi_text = f", NMI with genre {nmi['score']:.3f}" if nmi else ""
    space = "unit-normalised " if result.config.normalize else ""
    # A figure title: constrained layout centres it on the figure, never clipped by the legend.
    figure.suptitle(
        f"Item embeddings ({space}PCA) coloured by cluster\n"
        f"k={k}, {len(xy):,} items{nmi_text}; circled: the most-rated items"
    )
    axes.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        markerscale=max(1.0, 20 / point_size) ** 0.5,
        ncols=max(1, math.ceil(k / 30)),
        title="cluster (size): most over-represented genre",
        title_fontsize=8,
    )
    _label_points(
        figure, axes, xy, most_rated, [display_title(result.items, i) for i in most_rated]
    )
    return _png(figure)


# Label positions tried in turn (offset in points, alignment): the first that
# overlaps no label placed before wins.
_LABEL_OFFSETS = [
    ((5, 4), "left", "bottom"),
    ((5, -4), "left", "top"),
    ((-5, 4), "right", "bottom"),
    ((-5, -4), "right", "top"),
    ((5, 14), "left", "bottom"),
    ((-5, -14), "right", "top"),
]


def _label_points(figure, axes, xy: np.ndarray, rows: np.ndarray, labels: list[str]) -> None:
    """Name the points `rows`, moving a label around its point until it overlaps no other."""
    from matplotlib import patheffects

    # Settle the constrained layout first, so the extents measured are the final ones.
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    outline = [patheffects.withStroke(linewidth=2.5, foreground="white")]
    placed = []
    for row, label in zip(rows, labels):
        for attempt, (offset, ha, va) in enumerate(_LABEL_OFFSETS):
            text = axes.annotate(
                _shorten(label, 32),
                xy=(xy[row, 0], xy[row, 1]),
                xytext=offset,
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=8,
                path_effects=outline,
            )
            box = text.get_window_extent(renderer)
            last = attempt == len(_LABEL_OFFSETS) - 1
            if last or not any(box.overlaps(other) for other in placed):
                placed.append(box)
                break
            text.remove()


def render_training_curves(
    epochs: list[dict[str, Any]], metrics: dict[str, Any] | None
) -> bytes | None:
    """PNG of train loss and validation RMSE per epoch; None without any epoch to plot."""
    from matplotlib.ticker import MaxNLocator

    loss = _series(epochs, "train_loss")
    val = _series(epochs, "val_rmse")
    if not loss[0] and not val[0]:
        return None
    metrics = metrics or {}
    figure = _figure(11, 3.8)
    left, right = figure.subplots(1, 2)
    left.plot(*loss, color="#1f77b4", marker="o" if len(loss[0]) <= 30 else None, markersize=3)
    left.set_title("Training loss")
    left.set_ylabel("train loss")
    right.plot(
        *val,
        color="#d62728",
        marker="o" if len(val[0]) <= 30 else None,
        markersize=3,
        label="validation RMSE",
    )
    right.set_title("Validation RMSE")
    right.set_ylabel("RMSE")
    if val[0]:
        best_epoch = metrics.get("best_epoch")
        if best_epoch not in val[0]:
            best_epoch = val[0][int(np.argmin(val[1]))]
        best = val[1][val[0].index(best_epoch)]
        right.axvline(best_epoch, color="grey", linestyle=":", linewidth=1)
        right.scatter(
            [best_epoch],
            [best],
            color="#d62728",
            zorder=3,
            label=f"best: epoch {best_epoch}, {best:.4f}",
        )
        test_rmse = finite(metrics.get("test_rmse"))
        if test_rmse is not None:
            right.scatter(
                [best_epoch],
                [test_rmse],
                marker="*",
                s=90,
                color="black",
                zorder=3,
                label=f"test RMSE {test_rmse:.4f}",
            )
    baseline = finite(metrics.get("baseline_test_rmse"))
    if baseline is not None:
        right.axhline(
            baseline,
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"bias-only baseline (test) {baseline:.4f}",
        )
    right.legend(fontsize=8)
    for axes in (left, right):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    return _png(figure)


def render_k_selection(selection: dict[str, Any]) -> bytes:
    """PNG of the silhouette per k tried by --clusters auto, the chosen k marked."""
    from matplotlib.ticker import MaxNLocator

    scored = [e for e in selection["silhouette_by_k"] if e["silhouette"] is not None]
    figure = _figure(7, 3.2)
    axes = figure.add_subplot()
    axes.plot(
        [e["k"] for e in scored],
        [e["silhouette"] for e in scored],
        marker="o",
        markersize=3,
        color="#1f77b4",
    )
    chosen = selection["chosen_k"]
    best = next(e["silhouette"] for e in scored if e["k"] == chosen)
    axes.scatter(
        [chosen], [best], s=80, color="#d62728", zorder=3, label=f"chosen k={chosen} ({best:.3f})"
    )
    axes.set_xlabel("k (clusters)")
    axes.set_ylabel("mean silhouette")
    axes.set_title(f"Choosing k: silhouette on {selection['sample_size']:,} items")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def _series(epochs: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(e["epoch"], finite(e.get(key))) for e in epochs]
    points = [(x, y) for x, y in points if y is not None]
    return [x for x, _ in points], [y for _, y in points]


def _most_rated(result: ClusterResult) -> np.ndarray:
    """Row positions of the kept items, most training ratings first (item id breaks ties)."""
    items = result.items
    return np.lexsort((items["item_id"].to_numpy(), -items["train_ratings"].to_numpy()))


def legend_label(summary: dict[str, Any]) -> str:
    """'7 (60): Adventure ×2.9': the cluster's most over-represented common genre.

    The commonest genre alone would read "Drama" for most clusters of a film
    catalogue; lift says what sets the cluster apart.
    """
    telling = distinctive_genres(summary, 1)
    if not telling:
        return f"{summary['cluster']} ({summary['size']:,})"
    g = telling[0]
    return f"{summary['cluster']} ({summary['size']:,}): {g['genre']} ×{g['lift']:.1f}"


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
