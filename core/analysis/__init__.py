"""Analyses of routing: each takes routing (a ``RoutingData`` or a stream of them) or weights, returns a result.

Streaming analyses are accumulators with the same two verbs (``update(chunk)``, ``result()``),
folded over a stream by :func:`core.analysis.streaming.fold`, so one pass over a cache feeds all
of them. Every result is a dataclass with ``to_dict()`` that ``viz`` draws.
"""
