"""Collection: run tokens through a model and keep its routing on disk, per dataset and checkpoint.

- ``collector``: the traced loop that streams routing into a cache (:class:`ActivationCollector`).
- ``cache_format``: how routing is laid out in a shard and described by a manifest.
- ``cache``: writing (resumable, atomic) and reading (checked, streamed) one cache.
- ``checkpoints``: naming, listing and choosing training checkpoints.
- ``sweep``: one cache per (checkpoint, dataset), plus each checkpoint's router weights.
"""
