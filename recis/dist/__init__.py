"""Tables hash-partitioned across ranks, and the optimizer that updates rows at their owners.

Launch with torchrun (gloo on CPU, NCCL on GPU); see ``ShardedHashTable``,
``sharded_lookup`` (many tables in one exchange) and ``ShardedOptimizer`` for the data flow.
"""

from recis.dist.agreement import ConfigMismatchError
from recis.dist.exchange import PeerError
from recis.dist.partition import owner_rank
from recis.dist.sharded_hashtable import ShardedHashTable
from recis.dist.sharded_lookup import sharded_lookup
from recis.dist.sharded_optimizer import ShardedOptimizer

__all__ = ["ConfigMismatchError", "PeerError", "ShardedHashTable", "ShardedOptimizer", "owner_rank", "sharded_lookup"]
