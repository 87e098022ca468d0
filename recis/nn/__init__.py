"""Modules: the HashTable embedding, the pooled feature embeddings built on it
(EmbeddingOption, DynamicEmbedding, EmbeddingEngine), initializers, hooks.

``from recis.nn import HashTable, EmbeddingOption, DynamicEmbedding, EmbeddingEngine``
works as in RecIS.
"""

from recis.nn.modules.embedding import DynamicEmbedding, EmbeddingOption
from recis.nn.modules.embedding_engine import EmbeddingEngine
from recis.nn.modules.hashtable import HashTable, filter_out_sparse_param

__all__ = ["DynamicEmbedding", "EmbeddingEngine", "EmbeddingOption", "HashTable", "filter_out_sparse_param"]
