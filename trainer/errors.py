"""Re-export of the shared user-error type (shardmf/errors.py)."""

from shardmf.errors import InputError

__all__ = ["InputError"]
