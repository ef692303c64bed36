"""The run report: ``report.md`` and a self-contained ``report.html``, with the figures.

Rendering only, no file I/O: `render_all` turns a `ClusterResult` and what the run
folder says about training (a `trainer.run_files.RunFiles`) into PNG bytes (`figures`)
and two documents; `post_step` reads the run and writes what comes back. The HTML
embeds its CSS and its PNGs (base64 data URIs), so it opens anywhere, with no network
and no files beside it. Nothing here reads a clock: the same run gives the same report.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from trainer.analysis.clustering import SCORE_NAMES, ClusterResult
from trainer.analysis.figures import (
    cluster_colours,
    render_k_selection,
    render_pca,
    render_training_curves,
)
from trainer.analysis.findings import (
    SMALL_CLUSTER_NOTE,
    distinctive_genres,
    finite,
    lifts_are_findings,
)
from trainer.run_files import (
    CLUSTERS,
    CONFIG,
    CURVES_FIGURE,
    EPOCH_METRICS,
    FINAL_METRICS,
    ITEM_CLUSTERS,
    K_SELECTION_FIGURE,
    PCA_FIGURE,
    REPORT_HTML,
    REPORT_MD,
    RunFiles,
    is_ranking_key,
)

_MD_GENRES, _HTML_GENRES = 3, 4  # commonest genres shown per cluster
_MD_TITLES, _HTML_TITLES = 3, 5  # most-rated titles shown per cluster


@dataclass(frozen=True)
class Rendered:
    figures: dict[str, bytes]  # file name -> PNG, in the order to write them
    html: str
    markdown: str


def render_all(result: ClusterResult, summary: dict[str, Any], run: RunFiles) -> Rendered:
    """All figures and both reports for `result` (with `summary`, its clusters.json).

    Args:
        result: from `cluster_items`.
        summary: the clusters.json document of `result`.
        run: what the run folder says about training (metrics, config, epochs).
    """
    figures = {PCA_FIGURE: render_pca(result)}
    curves = render_training_curves(run.epochs, run.metrics)
    if curves is not None:
        figures[CURVES_FIGURE] = curves
    if result.k_selection is not None:
        figures[K_SELECTION_FIGURE] = render_k_selection(result.k_selection)
    return Rendered(
        figures=figures,
        html=render_html(result, summary, run, figures),
        markdown=render_markdown(result, run, list(figures), summary.get("tables")),
    )


# --- what both documents say ------------------------------------------------


# What was clustered, by clusters.json ``tables``: one sentence each.
_TABLES_TEXT = {
    "ranking": "The embeddings are the ranking tables' item factors (iALS, scored by "
    "<w_u, h_i>): on the sets measured their clusters follow genres more closely than a "
    "rating model's.",
    "rating": "The embeddings are the rating model's item factors.",
}


def _intro(result: ClusterResult, tables: str | None = None) -> str:
    config = result.config
    how = "K-Means" if result.algorithm == "kmeans" else "MiniBatchKMeans"
    if result.k_selection:
        sel = result.k_selection
        k_text = (
            f"k={result.k}, chosen as the best silhouette over k={sel['k_min']}..{sel['k_max']}"
        )
    else:
        k_text = f"k={result.k}"
    space = " after L2-normalising them (cosine geometry)" if config.normalize else ""
    return (
        f"{how} ({k_text}, seed {config.seed}) on the learned embeddings{space} of "
        f"{len(result.items):,} items with at least {config.min_item_ratings} training ratings"
        + (
            f"; {result.items_left_out:,} items with fewer were left out, since their "
            "embeddings are mostly the prior."
            if result.items_left_out
            else " (all of them)."
        )
        + (f" {_TABLES_TEXT[tables]}" if tables else "")
    )


def _silhouette_text(result: ClusterResult) -> str:
    silhouette = result.scores["silhouette"]
    value = "undefined (every item alone)" if silhouette is None else f"{silhouette:.3f}"
    return (
        f"Silhouette: {value} (-1 to 1; higher means tighter, better separated clusters; "
        "it does not involve genres)."
    )


def _genre_scope_text(result: ClusterResult) -> str:
    n_genre = len(result.items) - result.items_without_genres
    excluded = (
        f" ({result.items_without_genres:,} without genres excluded)"
        if result.items_without_genres
        else ""
    )
    return (
        f"Genre scores use the {n_genre:,} clustered items with known genres{excluded}. "
        "The primary genre is the first one listed. Chance baseline: the same score with "
        f"genres shuffled among those items, {result.config.baseline_shuffles} times "
        "(mean ± std); z is how many std the score lies above that mean."
    )


_NO_GENRES_TEXT = (
    "Genres are unknown for these items, so only the silhouette is reported; the "
    "clusters below are described by their most-rated items."
)
_LIFT_TEXT = (
    "Shares count a cluster's items tagged with the genre (an item may have several); "
    "lift = share in the cluster / share among all clustered items (the base rate), so "
    "×2.0 means twice as common as in the catalogue."
)


def _score_rows(result: ClusterResult) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, label in SCORE_NAMES.items():
        s = result.scores[name]
        z = "n/a (constant baseline)" if s["z"] is None else f"{s['z']:.1f}"
        baseline = f"{_fixed(s['baseline_mean'])} ± {_fixed(s['baseline_std'])}"
        rows.append((label, _fixed(s["score"]), baseline, z))
    return rows


def _scalar_metrics(metrics: dict[str, Any] | None) -> list[tuple[str, str]]:
    """metrics.json's scalar figures, ranking ones aside (they have their own table)."""
    return [
        (key, _number(value))
        for key, value in (metrics or {}).items()
        if isinstance(value, (int, float, str))
        and not isinstance(value, bool)
        and not is_ranking_key(key)
    ]


_RANKING_NAMES = {
    "precision": "precision",
    "recall": "recall",
    "ndcg": "NDCG",
    "map": "MAP",
    "hit_rate": "hit rate",
    "coverage": "catalogue coverage",
}


def _ranking_rows(metrics: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(metric@k, model, most-popular) rows, k ascending, from metrics.json's ranking keys."""
    metrics = metrics or {}
    ks = sorted({int(key.split("@")[1]) for key in metrics
                 if "@" in key and key.split("@")[1].isdigit()})
    rows = []
    for k in ks:
        for name, label in _RANKING_NAMES.items():
            if f"{name}@{k}" in metrics:
                rows.append((f"{label}@{k}", _ranking_value(metrics, f"{name}@{k}"),
                             _ranking_value(metrics, f"popular_{name}@{k}")))
    return rows


def _ranking_value(metrics: dict[str, Any], key: str) -> str:
    """``0.2513 ± 0.0094``: a mean over users with its standard error when it has one."""
    value, error = finite(metrics.get(key)), finite(metrics.get(f"{key}_se"))
    if value is None:
        return "n/a"
    return f"{value:.4f}" + (f" ± {error:.4f}" if error is not None else "")


def _ranking_text(metrics: dict[str, Any]) -> str:
    threshold = metrics.get("ranking_threshold")
    users = metrics.get("ranking_users")
    rated = (f"; only items with at least {metrics['ranking_min_item_ratings']} training "
             "ratings are recommended" if metrics.get("ranking_min_item_ratings") else "")
    eligible = metrics.get("ranking_users_eligible")
    who = (f"Each of a random {_number(users)} of the {_number(eligible)} test users"
           if eligible and users != eligible else f"Each of the {_number(users)} test users")
    return (
        f"{who} with a rating of at least {_number(threshold)} gets the top k of the items "
        "they did not rate in training; those test ratings are the items to find. The "
        "most-popular baseline recommends the items rated most often in training to "
        f"everyone{rated}. Higher is better."
    )


def _flat_config(config: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(section, key, value) rows of config.json; top-level scalars in section "run"."""
    rows = []
    for key, value in (config or {}).items():
        if isinstance(value, dict):
            rows += [(key, k, v) for k, v in _flatten(value)]
        else:
            rows.append(("run", key, _config_value(value)))
    return sorted(rows, key=lambda r: r[0] != "run")  # stable: run first, then file order


def _flatten(value: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, item in value.items():
        if isinstance(item, dict):
            rows += _flatten(item, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", _config_value(item)))
    return rows


def _clustering_settings(result: ClusterResult) -> list[tuple[str, str]]:
    """The settings this report's clustering ran with (config.json has those of training)."""
    config = result.config
    rows = [
        ("clusters", _config_value(config.clusters)),
        ("k", str(result.k)),
        (
            "algorithm",
            f"{config.algorithm} ({result.algorithm})"
            if config.algorithm == "auto"
            else config.algorithm,
        ),
        ("normalize", _config_value(config.normalize)),
    ]
    if result.k_selection:
        rows += [("k_min", str(config.k_min)), ("k_max", str(config.k_max))]
    rows += [
        (name, _config_value(getattr(config, name)))
        for name in ("min_item_ratings", "top_items", "seed", "baseline_shuffles")
    ]
    return rows


def _k_edge_note(selection: dict[str, Any]) -> str | None:
    """A warning when the chosen k sits at an end of the range searched."""
    chosen = selection["chosen_k"]
    if chosen == selection["k_min"]:
        return (
            "The best k is the smallest one tried: the silhouette may keep rising below "
            "it, and a flat, low curve means the embeddings have no clear cluster "
            "structure (common for matrix factorisation); try a larger smallest k (k_min) "
            "or a fixed number of clusters."
        )
    if chosen == selection["k_max"]:
        return "The best k is the largest one tried: the silhouette may keep rising above it."
    return None


def _config_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _run_figures_note(run: RunFiles) -> str | None:
    if run.metrics is None and not run.epochs:
        return f"This folder has no {FINAL_METRICS} or {EPOCH_METRICS}: no training figures."
    return None


# --- report.md --------------------------------------------------------------


def render_markdown(
    result: ClusterResult, run: RunFiles, figure_names: list[str], tables: str | None = None
) -> str:
    """report.md: the same content as report.html, figures linked rather than embedded.

    ``tables``: whose item embeddings were clustered (clusters.json ``tables``)."""
    lines = [f"# What the item embeddings learned: {_md_text(run.name)}", "",
             _intro(result, tables), ""]
    metrics = _scalar_metrics(run.metrics)
    if metrics or CURVES_FIGURE in figure_names:
        lines += ["## Training", ""]
    if metrics:
        lines += ["| figure | value |", "| --- | --- |"]
        lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in metrics]
        lines.append("")
    if CURVES_FIGURE in figure_names:
        lines += [f"![Training loss and validation RMSE per epoch]({CURVES_FIGURE})", ""]
    note = _run_figures_note(run)
    if note:
        lines += [note, ""]
    ranking = _ranking_rows(run.metrics)
    if ranking:
        lines += ["## Ranking: the model against most-popular", "", _ranking_text(run.metrics),
                  "", "| metric | model | most-popular |", "| --- | --- | --- |"]
        lines += [f"| {' | '.join(row)} |" for row in ranking]
        lines.append("")

    lines += ["## Does the clustering match genre?", "", _silhouette_text(result), ""]
    if result.genres_known:
        lines += [
            _genre_scope_text(result),
            "",
            "| score | value | chance baseline | std above chance (z) |",
            "| --- | --- | --- | --- |",
        ]
        lines += [f"| {' | '.join(row)} |" for row in _score_rows(result)]
    else:
        lines.append(_NO_GENRES_TEXT)
    lines.append("")

    if result.k_selection:
        sel = result.k_selection
        lines += ["## Choosing k", "", f"Silhouette per k on {sel['sample_size']:,} items:", ""]
        lines += ["| k | silhouette |", "| --- | --- |"]
        for entry in sel["silhouette_by_k"]:
            value = "undefined" if entry["silhouette"] is None else f"{entry['silhouette']:.3f}"
            mark = " (chosen)" if entry["k"] == sel["chosen_k"] else ""
            lines.append(f"| {entry['k']}{mark} | {value} |")
        lines += ["", f"![Silhouette per k]({K_SELECTION_FIGURE})", ""]
        edge = _k_edge_note(sel)
        if edge:
            lines += [edge, ""]

    lines += [
        "## Map of the embeddings",
        "",
        f"![Item embeddings, PCA projection coloured by cluster]({PCA_FIGURE})",
        "",
        "## Clusters",
        "",
        _LIFT_TEXT,
        "",
        "| cluster | size | commonest genres (share, lift) | most over-represented | "
        "most-rated items |",
        "| --- | --- | --- | --- | --- |",
    ]
    for summary in result.clusters:
        common = ", ".join(
            f"{g['genre']} {g['share']:.0%} (×{g['lift']:.1f})"
            for g in summary["genres"][:_MD_GENRES]
        )
        telling = ", ".join(
            f"{g['genre']} ×{g['lift']:.1f}" for g in distinctive_genres(summary, 2)
        )
        titles = "; ".join(item["title"] for item in summary["top_items"][:_MD_TITLES])
        lines.append(
            f"| {summary['cluster']} | {summary['size']:,} | {_cell(common or '-')} | "
            f"{_cell(telling or ('-' if lifts_are_findings(summary) else SMALL_CLUSTER_NOTE))}"
            f" | {_cell(titles or '-')} |"
        )
    lines.append("")

    lines += ["## Configuration", "", "Clustering in this report:", ""]
    lines += ["| setting | value |", "| --- | --- |"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in _clustering_settings(result)]
    lines.append("")
    config_rows = _flat_config(run.config)
    if config_rows:
        lines += [f"Training run ({CONFIG}):", "", "| setting | value |", "| --- | --- |"]
        lines += [
            f"| {_cell(key if section == 'run' else f'{section}.{key}')} | {_cell(value)} |"
            for section, key, value in config_rows
        ]
        lines.append("")
    lines += [
        f"Per-item assignments: `{ITEM_CLUSTERS}`; all figures: `{CLUSTERS}`; "
        f"this report with its figures in one file: `{REPORT_HTML}`.",
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Escape a value for a Markdown table cell (see `_md_text`; a ``|`` would end the cell)."""
    return _md_text(text).replace("|", "\\|")


def _md_text(text: object) -> str:
    """Data (titles, genres, folder names) as inert Markdown text on one line: Markdown
    renderers pass raw HTML through, so ``<script>`` or ``<img onerror=...>`` in a title
    must become text, and ``[...](...)`` must not become a link or a remote image."""
    escaped = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\\[\]])", r"\\\1", escaped)


# --- report.html ------------------------------------------------------------

_CSS = """
:root { --ink: #1d2430; --muted: #5b6573; --line: #dde2e8; --bg: #f6f7f9; --accent: #2b6cb0; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 19px; margin: 0 0 10px; }
p { margin: 6px 0 10px; }
.lede { color: var(--muted); max-width: 900px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 18px 20px; margin: 18px 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr));
  gap: 12px; margin: 18px 0; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; }
.card .sub { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 8px 0; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { color: var(--muted); font-size: 13px; text-align: center; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 3px;
  margin-right: 6px; vertical-align: -1px; }
.genre { display: inline-block; border: 1px solid var(--line); border-radius: 10px;
  padding: 0 7px; margin: 1px 3px 1px 0; font-size: 13px; white-space: nowrap; }
.genre.high { background: #e6f4ea; border-color: #9bd3ab; }
.genre.low { color: var(--muted); }
.titles { color: var(--ink); font-size: 13px; }
.muted { color: var(--muted); }
.grid2 { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr));
  gap: 14px; }
code { background: #eef1f5; padding: 1px 4px; border-radius: 4px; font-size: 13px; }
footer { color: var(--muted); font-size: 13px; margin-top: 20px; }
"""


def render_html(
    result: ClusterResult, summary: dict[str, Any], run: RunFiles, figures: dict[str, bytes]
) -> str:
    """report.html: one file, CSS inline and figures as data URIs, no external reference."""
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>shardmf report: {e(run.name)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>What the item embeddings learned: {e(run.name)}</h1>",
        f'<p class="lede">{e(_intro(result, summary.get("tables")))}</p>',
        _html_cards(result, run),
    ]

    metrics = _scalar_metrics(run.metrics)
    if metrics or CURVES_FIGURE in figures:
        parts.append("<section><h2>Training</h2>")
        if CURVES_FIGURE in figures:
            parts.append(
                _html_figure(figures[CURVES_FIGURE], "Training loss and validation RMSE per epoch")
            )
        if metrics:
            half = math.ceil(len(metrics) / 2)
            tables = [
                f'<table class="metrics"><tr><th>figure ({FINAL_METRICS})</th>'
                '<th class="num">value</th></tr>'
                + "".join(
                    f'<tr><td><code>{e(key)}</code></td><td class="num">{e(value)}</td></tr>'
                    for key, value in chunk
                )
                + "</table>"
                for chunk in (metrics[:half], metrics[half:])
                if chunk
            ]
            parts.append(f'<div class="grid2">{"".join(tables)}</div>')
        parts.append("</section>")
    note = _run_figures_note(run)
    if note:
        parts.append(f'<section><p class="muted">{e(note)}</p></section>')
    ranking = _ranking_rows(run.metrics)
    if ranking:
        parts += [
            "<section><h2>Ranking: the model against most-popular</h2>",
            f"<p>{e(_ranking_text(run.metrics))}</p>",
            '<table class="ranking"><tr><th>metric</th><th class="num">model</th>'
            '<th class="num">most-popular</th></tr>',
        ]
        parts += [
            f'<tr><td>{e(label)}</td><td class="num"><b>{e(model)}</b></td>'
            f'<td class="num">{e(popular)}</td></tr>'
            for label, model, popular in ranking
        ]
        parts += ["</table>", "</section>"]

    parts += [
        "<section><h2>Does the clustering match genre?</h2>",
        f"<p>{e(_silhouette_text(result))}</p>",
    ]
    if result.genres_known:
        parts += [
            f"<p>{e(_genre_scope_text(result))}</p>",
            '<table class="scores"><tr><th>score</th><th class="num">value</th>'
            '<th class="num">chance baseline</th><th class="num">std above chance (z)</th></tr>',
        ]
        parts += [
            f'<tr><td>{e(label)}</td><td class="num"><b>{e(value)}</b></td>'
            f'<td class="num">{e(baseline)}</td><td class="num">{e(z)}</td></tr>'
            for label, value, baseline, z in _score_rows(result)
        ]
        parts.append("</table>")
    else:
        parts.append(f"<p>{e(_NO_GENRES_TEXT)}</p>")
    parts.append("</section>")

    parts += [
        "<section><h2>Map of the embeddings</h2>",
        _html_figure(
            figures[PCA_FIGURE],
            "2-D PCA projection of the clustered item embeddings, coloured by cluster; "
            "the most-rated items are circled and named.",
        ),
        "</section>",
    ]
    if result.k_selection and K_SELECTION_FIGURE in figures:
        sel = result.k_selection
        parts += [
            "<section><h2>Choosing k</h2>",
            f"<p>k={sel['chosen_k']} had the highest mean silhouette of "
            f"k={sel['k_min']}..{sel['k_max']}, each fitted on the same seeded sample of "
            f"{sel['sample_size']:,} items.</p>",
            _html_figure(figures[K_SELECTION_FIGURE], "Mean silhouette per k"),
            f'<p class="muted">{e(_k_edge_note(sel) or "")}</p>',
            "</section>",
        ]

    parts += [_html_clusters(result), _html_config(result, run.config)]
    parts += [
        "<footer>Files beside this report: "
        f"<code>{ITEM_CLUSTERS}</code> (cluster of every item), <code>{CLUSTERS}</code> "
        f"(all figures: {summary['k']} clusters, scores, genre base rates), "
        f"<code>{REPORT_MD}</code> and the PNGs embedded here.</footer>",
        "</main></body></html>",
        "",
    ]
    return "\n".join(p for p in parts if p)


def _html_cards(result: ClusterResult, run: RunFiles) -> str:
    """Headline figures: test RMSE against the bias-only baseline, training, clusters, NMI."""
    metrics = run.metrics or {}
    cards = []
    test = finite(metrics.get("test_rmse"))
    if test is not None:
        baseline = finite(metrics.get("baseline_test_rmse"))
        sub = f"bias-only baseline {baseline:.4f}" if baseline is not None else ""
        cards.append(("test RMSE", f"{test:.4f}", sub))
    ndcg_keys = sorted((key for key in metrics
                        if key.startswith("ndcg@") and key.split("@")[1].isdigit()),
                       key=lambda key: int(key.split("@")[1]))  # not ndcg@10_se
    if ndcg_keys and finite(metrics[ndcg_keys[0]]) is not None:
        key = ndcg_keys[0]
        popular = finite(metrics.get(f"popular_{key}"))
        sub = f"most-popular {popular:.4f}" if popular is not None else ""
        cards.append((f"test {key.replace('ndcg', 'NDCG')}", f"{metrics[key]:.4f}", sub))
    if "epochs" in metrics:
        sub = f"best epoch {metrics['best_epoch']}" if "best_epoch" in metrics else ""
        if "world_size" in metrics:
            processes = metrics["world_size"]
            sub += f"{', ' if sub else ''}{_number(processes)} process"
            sub += "" if processes == 1 else "es"
        cards.append(("epochs", _number(metrics["epochs"]), sub))
    speed = finite(metrics.get("train_ratings_per_s"))
    if speed is not None:
        cards.append(("training speed", f"{speed:,.0f}", "ratings / s"))
    how = "K-Means" if result.algorithm == "kmeans" else "MiniBatchKMeans"
    cards.append(
        ("clusters", str(result.k), f"{how}{', k by silhouette' if result.k_selection else ''}")
    )
    silhouette = result.scores["silhouette"]
    if silhouette is not None:
        cards.append(("silhouette", f"{silhouette:.3f}", f"{len(result.items):,} items"))
    nmi = result.scores.get("nmi")
    if nmi:
        z = "" if nmi["z"] is None else f", z {nmi['z']:.1f}"
        cards.append(
            ("NMI with genre", f"{nmi['score']:.3f}", f"chance {nmi['baseline_mean']:.3f}{z}")
        )
    e = html.escape
    body = "".join(
        f'<div class="card"><div class="label">{e(label)}</div>'
        f'<div class="value">{e(value)}</div><div class="sub">{e(sub)}</div></div>'
        for label, value, sub in cards
    )
    return f'<div class="cards">{body}</div>'


def _html_figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(caption, quote=True)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _html_clusters(result: ClusterResult) -> str:
    e = html.escape
    colours = cluster_colours(result.k)
    rows = [
        "<section><h2>Clusters</h2>",
        f"<p>{e(_LIFT_TEXT)} Green: at least ×1.5.</p>" if result.genres_known else "",
        '<table class="clusters"><tr><th>cluster</th><th class="num">size</th>'
        + ("<th>commonest genres (share, lift)</th>" if result.genres_known else "")
        + "<th>most-rated items (training ratings)</th></tr>",
    ]
    for summary in result.clusters:
        cluster = summary["cluster"]
        genre_cell = ""
        if result.genres_known:
            findings = lifts_are_findings(summary)
            chips = "".join(_genre_chip(g, findings) for g in summary["genres"][:_HTML_GENRES])
            telling = distinctive_genres(summary, 1)
            if telling and telling[0] not in summary["genres"][:_HTML_GENRES]:
                chips += _genre_chip(telling[0])
            if not findings:
                chips += f' <span class="muted">({e(SMALL_CLUSTER_NOTE)})</span>'
            genre_cell = f"<td>{chips or '-'}</td>"
        titles = " · ".join(
            f'{e(item["title"])} <span class="muted">({item["train_ratings"]:,})</span>'
            for item in summary["top_items"][:_HTML_TITLES]
        )
        rows.append(
            f'<tr><td><span class="swatch" style="background:{colours[cluster]}"></span>'
            f'{cluster}</td><td class="num">{summary["size"]:,}</td>{genre_cell}'
            f'<td class="titles">{titles or "-"}</td></tr>'
        )
    rows.append("</table></section>")
    return "\n".join(r for r in rows if r)


def _genre_chip(genre: dict[str, Any], highlight: bool = True) -> str:
    """A genre with its share and lift; coloured by lift unless ``highlight`` is off (a
    cluster too small for lifts to be findings)."""
    level = " high" if genre["lift"] >= 1.5 else " low" if genre["lift"] < 0.8 else ""
    level = level if highlight else ""
    return (
        f'<span class="genre{level}">{html.escape(genre["genre"])} '
        f"{genre['share']:.0%} ×{genre['lift']:.1f}</span>"
    )


def _html_config(result: ClusterResult, config: dict[str, Any] | None) -> str:
    e = html.escape
    sections: dict[str, list[tuple[str, str]]] = {
        "clustering in this report": _clustering_settings(result)
    }
    for section, key, value in _flat_config(config):
        name = f"{section} ({CONFIG})"
        sections.setdefault(name, []).append((key, value))
    tables = [
        f'<div><table><tr><th colspan="2">{e(section)}</th></tr>'
        + "".join(f"<tr><td><code>{e(k)}</code></td><td>{e(v)}</td></tr>" for k, v in entries)
        + "</table></div>"
        for section, entries in sections.items()
    ]
    return (
        '<section><h2>Configuration</h2><p class="muted">The clustering settings of this '
        f"report, then the training run's as recorded in {CONFIG} (its cluster section "
        "holds the settings the training command clustered with).</p>"
        f'<div class="grid2">{"".join(tables)}</div></section>'
    )


# --- formatting -------------------------------------------------------------

def _fixed(value: float, digits: int = 3) -> str:
    """Fixed-point text without the "-0.000" that rounding a tiny negative number gives."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
