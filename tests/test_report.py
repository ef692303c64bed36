"""Tests for the run report: report.html is one self-contained file with the run's figures,
scores and clusters; report.md says the same with linked figures. One clustering of a
planted catalogue in a fake run folder is written once and read by every test."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trainer.analysis.clustering import cluster_items
from trainer.analysis.post_step import write_cluster_outputs
from trainer.config import ClusterConfig
from trainer.run_files import read_epochs

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Western"]
METRICS = {
    "test_rmse": 0.8731,
    "test_mae": 0.6822,
    "val_rmse": 0.8702,
    "best_epoch": 4,
    "epochs": 6,
    "world_size": 2,
    "train_seconds": 12.5,
    "train_ratings_per_s": 81234.5,
    "baseline_test_rmse": 0.9512,
}
CONFIG = {
    "shards_dir": "/data/shards",
    "world_size": 2,
    "model": {"dim": 32, "reg": 0.05},
    "optim": {"optimizer": "sgd", "lr": 0.003},
    "train": {"epochs": 6, "seed": 0},
    "cluster": {"clusters": "auto", "min_item_ratings": 20},
}


def planted_catalogue(blobs: int = 7, n_per_blob: int = 12) -> tuple[np.ndarray, pd.DataFrame]:
    """Well-separated blobs in 8-D, blob b's items tagged with genre b; titles to escape."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(blobs, 8)) * 10
    blob = np.repeat(np.arange(blobs), n_per_blob)
    embeddings = centers[blob] + rng.normal(scale=0.1, size=(len(blob), 8))
    n = len(blob)
    titles = [f"Movie {i}" for i in range(n)]
    titles[0] = "<script>alert(1)</script> & Sons"
    items = pd.DataFrame(
        {
            "item_id": np.arange(n, dtype=np.int32),
            "original_item_id": np.arange(1000, 1000 + n, dtype=np.int64),
            "title": titles,
            "genres": [GENRES[b] for b in blob],
            "train_ratings": np.where(np.arange(n) == 0, 5000, rng.integers(20, 500, size=n)),
        }
    )
    return embeddings.astype(np.float32), items


def write_run_files(run_dir: Path) -> None:
    """metrics.json, config.json and a metrics.jsonl as a resumed training run leaves them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(METRICS))
    (run_dir / "config.json").write_text(json.dumps(CONFIG))
    epochs = [
        {"epoch": e, "train_loss": 1.2 / e, "val_rmse": 0.95 - 0.02 * min(e, 4), "seconds": 2.0}
        for e in range(1, 7)
    ]
    lines = [json.dumps(record) for record in epochs[:3]]
    # Resumed after epoch 2: epoch 3 again (the later record wins), a torn line, the rest.
    lines += ["{not json", *(json.dumps(record) for record in epochs[2:])]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder clustered with --clusters auto, metrics read from the folder itself."""
    run = tmp_path_factory.mktemp("report") / "run-42"
    write_run_files(run)
    embeddings, items = planted_catalogue()
    result = cluster_items(embeddings, items, ClusterConfig(clusters="auto"))
    assert result.k == 7
    write_cluster_outputs(result, run)
    return run


class _Tags(HTMLParser):
    """Every start tag with its attributes, and a check that block tags are balanced."""

    CHECKED = ("html", "body", "main", "section", "table", "tr", "figure", "div", "p")

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in self.CHECKED:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.CHECKED:
            assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
            self.open.pop()


def parse(text: str) -> _Tags:
    parser = _Tags()
    parser.feed(text)
    parser.close()
    assert parser.open == [], f"unclosed tags {parser.open}"
    return parser


def test_html_is_self_contained_and_well_formed(run_dir: Path) -> None:
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    tags = parse(text)

    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.IGNORECASE)
    assert "http://" not in text and "https://" not in text
    assert "<link" not in text and "<script" not in text  # styles inline, no code at all
    assert "url(" not in text  # no CSS fetches either
    images = [attrs for tag, attrs in tags.tags if tag == "img"]
    assert len(images) == 3  # training curves, PCA map, silhouette per k
    for attrs in images:
        assert attrs["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(attrs["src"].split(",", 1)[1], validate=True)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert attrs["alt"]


def test_html_embeds_the_figures_written_beside_it(run_dir: Path) -> None:
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    for name in ("training_curves.png", "clusters_pca.png", "silhouette_by_k.png"):
        data = base64.b64encode((run_dir / name).read_bytes()).decode("ascii")
        assert f"data:image/png;base64,{data}" in text, name


def test_html_holds_the_run_the_scores_and_the_clusters(run_dir: Path) -> None:
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    clusters = json.loads((run_dir / "clusters.json").read_text())

    assert "<title>shardmf report: run-42</title>" in text
    # Run figures from metrics.json, headline and table.
    assert "0.8731" in text and "bias-only baseline 0.9512" in text
    assert "<code>train_ratings_per_s</code>" in text and "81,234" in text
    assert "best epoch 4, 2 processes" in text
    # Configuration from config.json, and the settings this clustering ran with.
    assert "/data/shards" in text and "<code>optimizer</code>" in text
    assert "clustering in this report" in text and "auto (kmeans)" in text
    # Scores with their baselines.
    for label in ("NMI (primary genre)", "Adjusted Rand index", "Multi-label purity"):
        assert label in text
    nmi = clusters["scores"]["nmi"]
    assert f"{nmi['baseline_mean']:.3f} ± {nmi['baseline_std']:.3f}" in text
    assert "std above chance" in text
    # k chosen by silhouette, one table row per cluster with a colour swatch.
    assert "k=7 had the highest mean silhouette of k=4..30" in text
    assert text.count('class="swatch"') == 7
    # Every cluster's genre with its lift (one genre per blob: 7 times the base rate).
    assert text.count("100% ×7.0") == 7
    # Titles are escaped, not markup.
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Sons" in text
    assert "<script>" not in text


def test_markdown_report_links_figures_and_quotes_the_same_figures(run_dir: Path) -> None:
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    for name in ("training_curves.png", "clusters_pca.png", "silhouette_by_k.png"):
        assert f"]({name})" in report
        assert (run_dir / name).is_file()
    assert "| test_rmse | 0.8731 |" in report
    assert "| 7 (chosen) |" in report
    assert "| model.dim | 32 |" in report
    assert "std above chance" in report
    assert "`report.html`" in report


def test_metrics_jsonl_is_read_in_epoch_order_skipping_bad_lines(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    epochs = read_epochs(run_dir / "metrics.jsonl")
    assert [record["epoch"] for record in epochs] == [1, 2, 3, 4, 5, 6]
    assert "line 4: not JSON" in caplog.text
    assert read_epochs(run_dir / "absent.jsonl") == []


def test_a_run_without_training_files_still_gets_both_reports(tmp_path: Path) -> None:
    embeddings, items = planted_catalogue(blobs=3, n_per_blob=5)
    result = cluster_items(embeddings, items, ClusterConfig(clusters=3))
    write_cluster_outputs(result, tmp_path)

    assert not (tmp_path / "training_curves.png").exists()
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    parse(text)
    assert text.count("<img ") == 1  # the PCA map only
    assert "no metrics.json or metrics.jsonl" in text
    assert "](training_curves.png)" not in (tmp_path / "report.md").read_text()


def _chromium() -> str | None:
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None
    )


def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    shot = tmp_path / "shot.png"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        (run_dir / "report.html").resolve().as_uri(),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert shot.is_file(), f"no screenshot; chromium said:\n{completed.stderr[-2000:]}"

    from matplotlib.image import imread

    pixels = imread(shot)  # (2000, 1200, 3 or 4) floats in 0..1
    assert pixels.shape[:2] == (2000, 1200)
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1])[::7], axis=0)
    # A blank or error page has a handful of colours; text, charts and tables have hundreds.
    assert len(colours) > 200, f"{len(colours)} distinct colours: the page looks blank"
    assert pixels[..., :3].std() > 0.05


def test_lifts_of_small_clusters_are_not_findings() -> None:
    from trainer.analysis.figures import legend_label
    from trainer.analysis.findings import distinctive_genres

    summary = {"cluster": 0, "size": 6, "genres": [{"genre": "Horror", "share": 0.5,
                                                    "lift": 4.0}]}
    assert distinctive_genres(summary, 1) == [] and legend_label(summary) == "0 (6)"
    assert distinctive_genres({**summary, "size": 10}, 1)[0]["genre"] == "Horror"


def test_markdown_report_escapes_titles(run_dir: Path) -> None:
    """Markdown renderers pass raw HTML through: a title's <script> must stay text."""
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "<script>" not in report
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Sons" in report


def test_ranking_rows_carry_standard_errors() -> None:
    """A mean over users shows its standard error; coverage (of the catalogue) has none,
    and an ``_se`` key is never taken for a list length of its own."""
    from trainer.analysis.report import _ranking_rows

    rows = _ranking_rows({"ndcg@10": 0.25, "ndcg@10_se": 0.01, "popular_ndcg@10": 0.1,
                          "popular_ndcg@10_se": 0.005, "coverage@10": 0.3,
                          "popular_coverage@10": 0.04})
    assert ("NDCG@10", "0.2500 ± 0.0100", "0.1000 ± 0.0050") in rows
    assert ("catalogue coverage@10", "0.3000", "0.0400") in rows
    assert len(rows) == 2
