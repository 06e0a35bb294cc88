"""Train the toolkit's own MoE on the bundled multi-domain corpus, as one run of revisions.

A run lives in ``models/<run_name>/``:

* the final model, its config and its tokenizer at the top (so the folder opens directly);
* ``step-XXXXXX/`` — one checkpoint per revision (step 0 plus geometric steps, denser early),
  each a complete ``save_pretrained`` folder with tokenizer, so routing can be studied over
  training the way OLMoE's published checkpoints are;
* ``checkpoints.json`` — the revisions (step, tokens seen, relative path), read with
  ``load_checkpoint_list``;
* ``training_log.txt`` — one JSON line per evaluation in seed 000's format (``epoch``,
  ``routing_acc``, ``entropy``, ``utilization``, ``metrics.accuracy``, ``metrics.loss``) plus
  ``step``, ``tokens``, ``layer_entropy``, ``layer_utilization``, ``routing_acc_chance`` and
  ``dropped_fraction`` (see ``core.moe_evaluation`` for the definition of ``routing_acc``);
* ``run_info.json`` — config, corpus sizes, unigram baseline, final/test metrics, wall time.

The run is built in a hidden temporary folder and renamed into place when complete, so a
run folder that exists is a finished run.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from core.moe_layer import ROUTING_MODES
from core.moe_evaluation import evaluate_model, generate_sample, unigram_cross_entropy
from core.moe_model import StudyMoeConfig, StudyMoeForCausalLM
from core.routing_cache import atomic_write_json
from core.tokenizer_training import train_bpe_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "train_default.yaml"
DEFAULT_CORPUS = ("wikitext2:test", "wikitext2:validation", "gsm8k:train", "python_source", "humaneval", "alice", "shakespeare")


@dataclass
class TrainConfig:
    """Everything a run needs; YAML files in ``configs/`` set these fields by name."""

    run_name: str = "study-moe-default"
    seed: int = 0
    # corpus: "name" or "name:split"; max_docs caps each entry (balances the domains)
    corpus: list[str] = field(default_factory=lambda: list(DEFAULT_CORPUS))
    max_docs_per_dataset: int | None = 1500
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
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or null, got {self.capacity_factor}")

    def model_config(self, tokenizer) -> StudyMoeConfig:
        """The ``StudyMoeConfig`` of this run, with the tokenizer's special ids."""
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
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )


# --------------------------------------------------------------------------- schedule
def checkpoint_steps(total_steps: int, num_checkpoints: int) -> list[int]:
    """Step 0 plus ``total / 2**i`` for i < num_checkpoints: dense early, sparse late."""
    if total_steps < 1 or num_checkpoints < 1:
        raise ValueError("total_steps and num_checkpoints must be >= 1")
    return sorted({0} | {max(1, round(total_steps / 2**i)) for i in range(num_checkpoints)})


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


# --------------------------------------------------------------------------- data
def load_corpus(entries: list[str], max_docs: int | None, seed: int) -> list:
    """Bundled documents for ``"name"``/``"name:split"`` entries, with unique doc ids."""
    from data.dataset_loader import DatasetLoader
    from data.documents import renumber_documents
    from data.errors import DatasetSizeWarning

    loader = DatasetLoader(offline=True)
    docs = []
    for entry in entries:
        name, _, split = entry.partition(":")
        with warnings.catch_warnings():  # a cap above a small dataset's size simply takes it all
            warnings.simplefilter("ignore", DatasetSizeWarning)
            docs.extend(loader.load(name, split or None, num_samples=max_docs, seed=seed))
    return renumber_documents(docs)


def split_documents(docs: list, val_fraction: float, test_fraction: float, seed: int) -> tuple[list, list, list]:
    """Shuffle, then split per domain so every split holds every domain in proportion."""
    rng = random.Random(seed)
    train, val, test = [], [], []
    for domain in sorted({d.domain for d in docs}):
        group = [d for d in docs if d.domain == domain]
        rng.shuffle(group)
        n_val = max(1, round(len(group) * val_fraction))
        n_test = max(1, round(len(group) * test_fraction))
        val += group[:n_val]
        test += group[n_val : n_val + n_test]
        train += group[n_val + n_test :]
    for part in (train, val, test):
        rng.shuffle(part)  # packed rows then mix domains, so the first eval rows cover all
    return train, val, test


def prepare_data(cfg: TrainConfig):
    """Corpus -> tokenizer -> ``TokenizedDataset`` splits: packed train/test, domain-balanced val."""
    from data.tokenization import tokenize_documents

    docs = load_corpus(cfg.corpus, cfg.max_docs_per_dataset, cfg.seed)
    train_docs, val_docs, test_docs = split_documents(docs, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    sample, chars = [], 0
    for d in train_docs:  # already shuffled: the sample covers every domain
        if chars >= cfg.tokenizer_train_chars:
            break
        sample.append(d.text)
        chars += len(d.text)
    tokenizer = train_bpe_tokenizer(sample, vocab_size=cfg.vocab_size)
    domains = sorted({d.domain for d in docs})
    datasets = sorted({d.dataset for d in docs})
    splits = {
        name: tokenize_documents(part, tokenizer, cfg.seq_len, pack=True, domain_names=domains, dataset_names=datasets)
        for name, part in (("train", train_docs), ("test", test_docs))
    }
    # evaluation during training: the same few documents of every domain, one row each
    eval_docs = [d for dom in domains for d in [v for v in val_docs if v.domain == dom][: cfg.eval_docs_per_domain]]
    splits["val"] = tokenize_documents(eval_docs, tokenizer, cfg.seq_len, pack=False, domain_names=domains, dataset_names=datasets)
    return tokenizer, splits


# --------------------------------------------------------------------------- saving
def _save_pretrained(model, tokenizer, folder: Path) -> None:
    """Model and tokenizer into ``folder``, without a "Writing model shards" bar per checkpoint."""
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)


def _save_model(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` model and tokenizer into ``folder`` via a temp folder + rename."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_pretrained(model, tokenizer, tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def load_checkpoint_list(run_dir: str | Path) -> list[dict]:
    """The run's revisions, oldest first: ``{"revision", "step", "tokens", "path"}`` (absolute path)."""
    run_dir = Path(run_dir)
    index = run_dir / "checkpoints.json"
    if not index.is_file():
        raise FileNotFoundError(f"{run_dir} is not a trained run: {index.name} is missing")
    entries = json.loads(index.read_text())
    return [{**e, "path": str((run_dir / e["path"]).resolve())} for e in sorted(entries, key=lambda e: e["step"])]


def _clean(value, digits: int = 6):
    """Round floats for a readable log and turn NaN into null (strict JSON)."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    if isinstance(value, list):
        return [_clean(v, digits) for v in value]
    return value


def log_line(epoch: int, step: int, tokens: int, metrics: dict) -> dict:
    """One training-log record in seed 000's format (plus per-layer and position keys)."""
    return {
        "epoch": epoch,
        "routing_acc": _clean(metrics["routing_acc"]),
        "entropy": _clean(metrics["entropy"]),
        "utilization": _clean(metrics["utilization"]),
        "metrics": {"accuracy": _clean(metrics["accuracy"]), "loss": _clean(metrics["loss"])},
        "step": step,
        "tokens": tokens,
        "layer_entropy": _clean(metrics["layer_entropy"]),
        "layer_utilization": _clean(metrics["layer_utilization"]),
        "routing_acc_chance": _clean(metrics["routing_acc_chance"]),
        "dropped_fraction": _clean(metrics["dropped_fraction"]),
    }


# --------------------------------------------------------------------------- training
def train(cfg: TrainConfig, models_dir: str | Path = "models", overwrite: bool = False, progress: bool = True) -> Path:
    """Train one run and return its folder ``models_dir/<run_name>``."""
    models_dir = Path(models_dir)
    run_dir = models_dir / cfg.run_name
    if run_dir.exists() and not overwrite:
        raise FileExistsError(f"run {run_dir} already exists; pass overwrite=True (--overwrite) to retrain it")
    work = models_dir / f".{cfg.run_name}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    tokenizer, splits = prepare_data(cfg)
    train_rows, val = splits["train"], splits["val"]
    unigram = unigram_cross_entropy(
        train_rows.input_ids[train_rows.attention_mask.bool()],
        val.input_ids[:, 1:][(val.attention_mask[:, 1:] * val.attention_mask[:, :-1]).bool()],
        len(tokenizer),
    )
    model = StudyMoeForCausalLM(cfg.model_config(tokenizer))
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices decay; norms do not
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    ckpt_steps = checkpoint_steps(cfg.steps, cfg.num_checkpoints)
    eval_steps = sorted(set(ckpt_steps) | set(range(0, cfg.steps + 1, cfg.eval_every)))
    gen = torch.Generator().manual_seed(cfg.seed)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    checkpoints, log_path, epoch, last = [], work / "training_log.txt", 0, {}

    def evaluate_and_save(step: int) -> None:
        nonlocal epoch, last
        if step in eval_steps:
            last = evaluate_model(model, val, batch_size=cfg.batch_size)
            epoch += 1
            with log_path.open("a") as f:
                f.write(json.dumps(log_line(epoch, step, step * tokens_per_step, last)) + "\n")
        if step in ckpt_steps:
            rev = f"step-{step:06d}"
            _save_model(model, tokenizer, work / rev)
            checkpoints.append({"revision": rev, "step": step, "tokens": step * tokens_per_step, "path": rev})
            atomic_write_json(work / "checkpoints.json", checkpoints)

    evaluate_and_save(0)
    bar = tqdm(range(1, cfg.steps + 1), desc=cfg.run_name, disable=not progress)
    for step in bar:
        rows = torch.randint(0, len(train_rows), (cfg.batch_size,), generator=gen)
        ids, mask = train_rows.input_ids[rows], train_rows.attention_mask[rows]
        labels = ids.masked_fill(mask == 0, -100)
        for group in optim.param_groups:
            group["lr"] = learning_rate(step - 1, cfg)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        optim.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{out.loss.item():.3f}", val=f"{last.get('loss', float('nan')):.3f}")
        evaluate_and_save(step)

    model.eval()
    test = evaluate_model(model, splits["test"], batch_size=cfg.batch_size, max_rows=cfg.test_max_rows)
    sample = generate_sample(model, tokenizer, max_new_tokens=cfg.sample_tokens, seed=cfg.seed)
    _save_pretrained(model, tokenizer, work)
    info = {
        "config": asdict(cfg),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "active_parameters_per_token": _active_parameters(model),
        "corpus_tokens": {k: v.num_tokens for k, v in splits.items()},
        "domain_names": train_rows.domain_names,
        "unigram_val_loss": unigram,
        "final_val": last,
        "test": test,
        "sample": sample,
        "train_seconds": time.time() - started,
        "checkpoints": [c["revision"] for c in checkpoints],
    }
    atomic_write_json(work / "run_info.json", info)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    os.replace(work, run_dir)
    return run_dir


def _active_parameters(model: StudyMoeForCausalLM) -> int:
    """Parameters one token touches: everything except the unselected experts' weights."""
    cfg = model.config
    expert_params = 3 * cfg.hidden_size * cfg.intermediate_size
    idle = (cfg.num_experts - cfg.num_experts_per_tok) * expert_params * cfg.num_hidden_layers
    return sum(p.numel() for p in model.parameters()) - idle


def ensure_default_model(models_dir: str | Path = "models", config: str | Path = DEFAULT_CONFIG, progress: bool = True) -> Path:
    """The embedded default run's folder, training it first if it is not there yet."""
    cfg = TrainConfig.from_yaml(config)
    run_dir = Path(models_dir) / cfg.run_name
    if (run_dir / "checkpoints.json").is_file() and (run_dir / "config.json").is_file():
        return run_dir
    return train(cfg, models_dir=models_dir, overwrite=True, progress=progress)
