from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param

__all__ = ["HashTable", "filter_out_sparse_param"]
