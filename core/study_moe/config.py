"""The settings of one training run of the toolkit's own MoE, and its learning-rate and checkpoint schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:  # the model module loads transformers: imported only where a model is built
    from core.study_moe.model import StudyMoeConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "train_default.yaml"
DEFAULT_CORPUS = ("wikitext2:test", "wikitext2:validation", "gsm8k:train", "python_source", "humaneval", "alice", "shakespeare")
# The last n documents of these splits are never read by training, so the main run, which studies
# WikiText-2 (prose), GSM8K (math), HumanEval (code) and Shakespeare (literature), can analyse text the
# model has not seen (core.study_moe.training_data).
DEFAULT_HELD_OUT = {"wikitext2:test": 200, "gsm8k:test": 200, "humaneval:test": 64, "shakespeare:train": 200}


@dataclass
class TrainConfig:
    """Everything a run needs; YAML files in ``configs/`` set these fields by name."""

    run_name: str = "study-moe-default"
    seed: int = 0
    # corpus: "name" or "name:split"; max_docs caps each entry (balances the domains)
    corpus: list[str] = field(default_factory=lambda: list(DEFAULT_CORPUS))
    max_docs_per_dataset: int | None = 1500
    # "name:split" -> n: the split's last n documents are kept out of training, for analysis
    held_out: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_HELD_OUT))
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    tokenizer_train_chars: int = 2_000_000
    vocab_size: int = 4096
    seq_len: int = 128
    # model
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    routing: str = "topk"
    capacity_factor: float | None = None
    router_jitter_noise: float = 0.0
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    hidden_act: str = "silu"
    expert_dispatch: str = "loop"  # "loop" (reference, default) or "grouped": core.study_moe.dispatch
    # optimisation
    steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # evaluation and checkpoints
    eval_every: int = 250
    eval_docs_per_domain: int = 16  # validation documents per domain (first seq_len tokens each)
    test_max_rows: int | None = 256  # packed test rows scored at the end (None: all)
    threads: int | None = None  # torch CPU threads (None: torch's default)
    num_checkpoints: int = 7  # geometric checkpoints, plus step 0
    checkpoint_spacing: float = 2.0  # the ratio of consecutive checkpoints' steps
    sample_tokens: int = 60

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Read a YAML config; unknown keys are an error (a typo must not be silently ignored)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"training config {path} must be a YAML mapping of field: value, got a {type(raw).__name__}")
        return cls.from_dict({**raw, **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys: {sorted(known)}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("steps and batch_size must be >= 1 and seq_len >= 2")
        if not 0 < self.val_fraction < 1 or not 0 < self.test_fraction < 1 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
        if self.num_checkpoints < 1:
            raise ValueError(f"num_checkpoints must be >= 1, got {self.num_checkpoints}")
        if not self.checkpoint_spacing > 1:
            raise ValueError(f"checkpoint_spacing must be > 1, got {self.checkpoint_spacing}")
        if not isinstance(self.held_out, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in self.held_out.items()
        ):
            raise ValueError(f"held_out must map 'name:split' to a document count >= 0, got {self.held_out!r}")
        from core.study_moe.layer import ROUTING_MODES  # here, not at import: it loads transformers

        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or null, got {self.capacity_factor}")
        from core.study_moe.dispatch import check_dispatch

        check_dispatch(self.expert_dispatch)

    def model_config(self, tokenizer) -> StudyMoeConfig:
        """The ``StudyMoeConfig`` of this run, with the tokenizer's special ids."""
        from core.study_moe.model import StudyMoeConfig

        return StudyMoeConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            max_position_embeddings=max(512, self.seq_len),
            num_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            routing=self.routing,
            capacity_factor=self.capacity_factor,
            router_jitter_noise=self.router_jitter_noise,
            router_aux_loss_coef=self.router_aux_loss_coef,
            router_z_loss_coef=self.router_z_loss_coef,
            hidden_act=self.hidden_act,
            expert_dispatch=self.expert_dispatch,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )


# --------------------------------------------------------------------------- schedule
def checkpoint_steps(total_steps: int, num_checkpoints: int, spacing: float = 2.0) -> list[int]:
    """Step 0 plus ``total / spacing**i`` for i < num_checkpoints: log-spaced, dense early, sparse late."""
    if total_steps < 1 or num_checkpoints < 1:
        raise ValueError("total_steps and num_checkpoints must be >= 1")
    if spacing <= 1:
        raise ValueError(f"checkpoint spacing must be > 1 (the ratio of consecutive checkpoints' steps), got {spacing}")
    return sorted({0} | {max(1, round(total_steps / spacing**i)) for i in range(num_checkpoints)})


def revision_name(step: int) -> str:
    """A checkpoint's revision (its folder and its name in ``checkpoints.json``): what ``--revision`` names."""
    return f"step-{step:06d}"


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)
