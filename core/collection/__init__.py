"""Collection: run tokens through a model and keep its routing in the store, per dataset and checkpoint.

- ``collector``: the traced loop that streams routing into a cache (:class:`ActivationCollector`).
- ``checkpoints``: naming, listing and choosing training checkpoints.
- ``sweep``: one cache per (checkpoint, dataset), plus each checkpoint's router weights.
- ``hub_disk``: the disk a sweep of Hub revisions needs, and freeing the revisions it downloaded.

The caches themselves (format, read/write, split parts, identity) are ``core.store``'s.
"""
