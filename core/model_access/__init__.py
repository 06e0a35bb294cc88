"""Model access: open any Hugging Face MoE, find its routers and experts, trace and edit routing.

- ``wrapper``: :class:`MoEModelWrapper`, the one object the rest of the toolkit talks to.
- ``loading``: turning a Hub name or a folder into a model and tokenizer, with one-line errors.
- ``discovery``: where each MoE layer's router and experts live, found generically.
- ``expert_weights``: every expert's gate/up/down matrices in one layout.
- ``generation``: routing recorded at every step of ``generate()`` (key-value cache on), as one ``RoutingData``.
- ``interventions``: in-trace edits of the selection the experts receive (ablation).

Nothing here knows the toolkit's own MoE (``core.study_moe``) or any analysis.
"""
