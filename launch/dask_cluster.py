"""The CLI owns the Dask cluster; library code runs on whatever scheduler is current."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


@contextmanager
def dask_client(scheduler: str | None, workers: int | None) -> Iterator[object | None]:
    """A client of a running cluster, a LocalCluster of N processes, or nothing (threads).

    With a remote cluster the workers write the shards themselves: the output folder must
    be on storage that they and this machine share.
    """
    if scheduler and workers:
        raise ValueError("--dask-scheduler and --workers exclude each other: use a running "
                         "cluster or start a local one")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers {workers}: expected at least 1")
    if not scheduler and not workers:
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="15s")
        except OSError as e:
            raise ValueError(f"--dask-scheduler {scheduler}: cannot connect ({e}); is the "
                             "scheduler running and reachable?") from e
        with client:
            log.info("Dask cluster %s, dashboard %s", scheduler, client.dashboard_link)
            yield client
        return
    # Scheduler, workers and dashboard listen on loopback only: a local cluster serves this
    # process, and its dashboard shows file paths to whoever can reach it.
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                      host=LOOPBACK, dashboard_address=f"{LOOPBACK}:0") as cluster, \
            Client(cluster) as client:
        log.info("local Dask cluster of %d workers, dashboard %s", workers,
                 client.dashboard_link)
        yield client
