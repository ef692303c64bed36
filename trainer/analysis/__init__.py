"""What a finished run learned: K-Means on its item embeddings, scored against genre, and
the report. Rank 0 runs it after training (or ``shardmf cluster`` on a run folder); it
reads and writes only the run folder, beside training rather than inside its loop.

    from trainer.analysis import cluster_run
    cluster_run("runs/ml100k", ClusterConfig(clusters="auto"))

`clustering` computes; `report` renders the documents, `figures` the PNGs (`findings`
holds what both read the same way); `post_step` reads the run and writes the files.
Importing this package loads scikit-learn: only code that clusters imports it.
"""

from trainer.analysis.clustering import ClusterResult, cluster_items
from trainer.analysis.post_step import cluster_run, write_cluster_outputs

__all__ = ["ClusterResult", "cluster_items", "cluster_run", "write_cluster_outputs"]
