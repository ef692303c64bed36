"""shardmf for Python users: ``from shardmf import MatrixFactorization``.

A re-export only; the estimator lives in ``launch/estimator.py`` (the one package that
may use both ``data_shards`` and ``trainer``).
"""

from launch.estimator import MatrixFactorization

__all__ = ["MatrixFactorization"]
