"""Distribution of tables across ranks (torch.distributed).

Today: the hash partitioner that assigns every id an owner rank. The sharded table
and optimizer build on it.
"""

from recis.dist.partition import owner_rank

__all__ = ["owner_rank"]
