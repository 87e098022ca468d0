"""Modules: the HashTable embedding, its initializers and its differentiable lookup."""
