"""Errors the CLI turns into one line on stderr and a non-zero exit."""

from typing import Any


class GenrlError(Exception):
    """Base class of genrl's own errors."""


class ConfigError(GenrlError, ValueError):
    """An invalid or unknown configuration value."""


class CheckpointError(GenrlError):
    """A missing, incomplete, corrupt or foreign checkpoint."""


class DistributedError(GenrlError):
    """A collective of a data-parallel run failed: another process stopped or timed out
    (``genrl.distributed``); checkpoints already written are intact."""


class NonFiniteLossError(GenrlError):
    """A loss or gradient became NaN/inf, or the weights diverged; training stopped, earlier
    checkpoints are intact."""


#: A weight larger than this in magnitude means training has diverged (networks trained with
#: sane settings stay many orders of magnitude below; a learning rate of 1e9 reaches ~1e9).
DIVERGED_WEIGHT = 1e6


def check_weights(params: "list[Any]", where: str) -> None:
    """NonFiniteLossError if any parameter is non-finite or beyond ``DIVERGED_WEIGHT``."""
    import torch

    with torch.no_grad():
        peak = max((float(p.detach().abs().max()) for p in params if p.numel()), default=0.0)
    if not peak <= DIVERGED_WEIGHT:  # also catches NaN
        raise NonFiniteLossError(f"training diverged {where}: a weight reached {peak:.3g} (limit {DIVERGED_WEIGHT:.0e}); lower the learning rate")
