"""A rank-0 logger for the library: one format, quiet on other ranks, no print()."""

from __future__ import annotations

import logging
import sys

import torch.distributed as dist

_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "all_ranks", False):
            return True
        return not dist.is_initialized() or dist.get_rank() == 0


def get_logger(name: str) -> logging.Logger:
    """Logger under the `megatron_opdlm` hierarchy; configured once with a rank-0 filter."""
    root = logging.getLogger("megatron_opdlm")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.addFilter(_RankZeroFilter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(
        name if name.startswith("megatron_opdlm") else f"megatron_opdlm.{name}"
    )
