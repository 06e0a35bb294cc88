"""The toolkit's own small MoE: layer, model, tokenizer, corpus, training and evaluation.

``training_data`` records which documents a training run read (``training_data.json``), so the
main run analyses held-out documents only and can say what the model saw.

Importing ``core.study_moe.model`` registers the ``study_moe`` model type with transformers'
``Auto*`` classes (``register_with_auto``), so a saved run opens with ``AutoModelForCausalLM``
(and so with ``MoEModelWrapper``) from any folder: the run calls it before opening any model. The generic model
access in ``core.model_access`` never imports it. The package itself imports nothing heavy, so
reading a training config (``core.study_moe.config``) does not load transformers' models.
"""

from importlib import import_module
from typing import Any

_MODEL_NAMES = ("StudyMoeConfig", "StudyMoeForCausalLM", "StudyMoeModel")


def __getattr__(name: str) -> Any:
    if name in _MODEL_NAMES:
        return getattr(import_module("core.study_moe.model"), name)
    raise AttributeError(f"module 'core.study_moe' has no attribute {name!r}")
