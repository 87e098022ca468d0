"""Checkpoints of everything a training run holds, atomic, and loadable at any world size.

``save(path, model, *optimizers, extra=None, keep=None)`` and
``load(path, model, *optimizers) -> extra``; see ``saving`` and ``loading`` for the
protocol, ``manifest`` for the directory layout.
"""

from recis.checkpoint.loading import load
from recis.checkpoint.manifest import CheckpointError
from recis.checkpoint.saving import save

__all__ = ["CheckpointError", "load", "save"]
