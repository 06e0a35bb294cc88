"""The routing store: routing caches on disk, written and read without ever touching a model.

- ``cache_format``: how routing is laid out in a shard and described by a manifest (and the cache errors).
- ``cache``: writing (resumable, atomic) and reading (checked, streamed) one cache.
- ``split_cache``: one cache written as parts by several torchrun processes, joined by one.
- ``identity``: what makes two caches the same routing (model, dtype, device type, data, settings).

The collectors that fill it live in ``core.collection``; the store imports no model code.
"""
