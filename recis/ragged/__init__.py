"""Ragged tensors (RecIS's ``recis.ragged``): variable-length bags of ids, with weights."""

from recis.ragged.tensor import RaggedTensor

__all__ = ["RaggedTensor"]
