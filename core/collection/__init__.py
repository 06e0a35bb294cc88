"""Collection: run tokens through a model and keep its routing in the store, per dataset and checkpoint.

- ``collector``: the traced loop that streams routing into a cache (:class:`ActivationCollector`).
- ``loaded_identity``: a loaded model's identity (an in-memory model's weights digest, a wrapper's), for the cache header.
- ``checkpoints``: naming, listing and choosing training checkpoints.
- ``sweep``: one cache per (checkpoint, dataset), plus each checkpoint's router weights.
- ``hub_disk``: the disk a sweep of Hub revisions needs, and freeing the revisions it downloaded.

The caches themselves (format, read/write, split parts, identity) are ``core.store``'s.
"""
