"""Train the toolkit's own MoE on the bundled multi-domain corpus, as one run of revisions.

A run lives in ``models/<run_name>/``:

* the final model, its config and its tokenizer at the top (so the folder opens directly);
* ``step-XXXXXX/`` — one checkpoint per revision (step 0 plus geometric steps, denser early),
  each a complete ``save_pretrained`` folder with tokenizer, so routing can be studied over
  training the way OLMoE's published checkpoints are;
* ``checkpoints.json`` — the revisions (step, tokens seen, relative path), read with
  ``core.collection.checkpoints.list_local_checkpoints``;
* ``training_log.txt`` — one JSON line per evaluation in seed 000's format (``epoch``,
  ``routing_acc``, ``entropy``, ``utilization``, ``metrics.accuracy``, ``metrics.loss``) plus
  ``step``, ``tokens``, ``layer_entropy``, ``layer_utilization``, ``routing_acc_chance`` and
  ``dropped_fraction`` (see ``core.study_moe.evaluation`` for the definition of ``routing_acc``),
  and, when the run has a routing monitor, ``routing_monitor``: its record of the training batches
  of the window (``core.analysis.routing_monitor``, handed in by the caller: this room imports no analysis);
* ``run_info.json`` — config, corpus sizes, unigram baseline, final/test metrics, wall time;
* ``training_data.json`` — which documents the run read and which it held out for analysis
  (``core.study_moe.training_data``; the main run analyses only documents not read here).

The run is built in a hidden scratch folder and renamed into place when complete, so a run folder
that exists is a finished run. Its marker (``core.owned_files``) lists the files the run wrote:
retraining (``--overwrite``, or the embedded model found without its record) replaces only those,
and a folder holding anything else (a user's notes, a folder from older code, no marker) is
refused in one line before any training.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from core.owned_files import built_in_scratch, check_replaceable, inside
from core.path_names import check_name
from core.safe_io import atomic_write_json, to_jsonable
from core.study_moe.config import DEFAULT_CONFIG, TrainConfig, checkpoint_steps, learning_rate, revision_name
from core.study_moe.corpus import prepare_data
from core.study_moe.evaluation import evaluate_model, generate_sample, unigram_by_domain, unigram_cross_entropy
from core.study_moe.model import StudyMoeForCausalLM
from core.study_moe.training_data import RECORD_NAME, build_record, write_record


# --------------------------------------------------------------------------- saving
def _save_pretrained(model, tokenizer, folder: Path) -> None:
    """Model and tokenizer into ``folder``, without a "Writing model shards" bar per checkpoint."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
    finally:
        if was_on:  # as it was: a run with --no-progress keeps transformers' bars off
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(folder)


def _logged(value):
    """Floats rounded for a readable log, NaN as null (strict JSON)."""
    return to_jsonable(value, digits=6)


def log_line(epoch: int, step: int, tokens: int, metrics: dict, monitor: dict | None = None) -> dict:
    """One training-log record in seed 000's format (plus per-layer and position keys, and the monitor's record)."""
    line = {
        "epoch": epoch,
        "routing_acc": _logged(metrics["routing_acc"]),
        "entropy": _logged(metrics["entropy"]),
        "utilization": _logged(metrics["utilization"]),
        "metrics": {"accuracy": _logged(metrics["accuracy"]), "loss": _logged(metrics["loss"])},
        "step": step,
        "tokens": tokens,
        "layer_entropy": _logged(metrics["layer_entropy"]),
        "layer_utilization": _logged(metrics["layer_utilization"]),
        "routing_acc_chance": _logged(metrics["routing_acc_chance"]),
        "dropped_fraction": _logged(metrics["dropped_fraction"]),
    }
    if monitor is not None:
        line["routing_monitor"] = monitor
    return line


# --------------------------------------------------------------------------- routing monitor
class SelectionMonitor(Protocol):
    """What the trainer feeds each batch's selected experts to (``core.analysis.routing_monitor.RoutingMonitor``)."""

    def update(self, selected: list[torch.Tensor], token_mask: torch.Tensor | None = None) -> None: ...

    def record(self) -> dict: ...


MonitorFactory = Callable[[TrainConfig], SelectionMonitor]
LogSink = Callable[[dict], None]
PLATEAU_CHANGE = 0.02  # the last two checkpoints' held-out losses within 2% of each other ...
BASELINE_RATIO = 0.8  # ... and every domain's loss at most this share of its unigram baseline


def selected_experts(model: StudyMoeForCausalLM) -> list[torch.Tensor]:
    """Each layer's experts chosen in the last forward ``[B*T, k]``: the actual choice, random routing's included."""
    return [layer.mlp.gate.last_top_k_index for layer in model.model.layers[: model.config.num_hidden_layers]]


# --------------------------------------------------------------------------- training
@dataclass
class _RunState:
    """What the training loop keeps between steps: the checkpoints written and the last evaluation."""

    folder: Path
    tokens_per_step: int
    eval_steps: set[int]
    ckpt_steps: set[int]
    checkpoints: list[dict] = field(default_factory=list)
    epoch: int = 0
    last: dict = field(default_factory=dict)
    monitor: Any = None  # a SelectionMonitor, or None
    sinks: tuple[LogSink, ...] = ()  # each log line is handed to these too (W&B: core.pipeline.training_wandb)


def _optimizer(model: StudyMoeForCausalLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices decay; norms do not
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )


def _evaluate_and_save(step: int, model, tokenizer, val, cfg: TrainConfig, state: _RunState) -> None:
    """At evaluation steps append a log line; at checkpoint steps save a revision and list it."""
    if step in state.eval_steps:
        state.last = evaluate_model(model, val, batch_size=cfg.batch_size)
        state.epoch += 1
        record = state.monitor.record() if state.monitor is not None else None
        line = log_line(state.epoch, step, step * state.tokens_per_step, state.last, record)
        with (state.folder / "training_log.txt").open("a") as f:
            f.write(json.dumps(line) + "\n")
        for sink in state.sinks:
            sink(line)
    if step in state.ckpt_steps:
        rev = revision_name(step)
        _save_pretrained(model, tokenizer, state.folder / rev)  # a new folder of the run's scratch folder
        state.checkpoints.append({"revision": rev, "step": step, "tokens": step * state.tokens_per_step, "path": rev,
                                  "val_loss": _logged(state.last["loss"]),
                                  "val_domain_loss": _logged(state.last["domain_loss"])})
        atomic_write_json(state.folder / "checkpoints.json", state.checkpoints)


def _optimize(model, tokenizer, splits: dict, cfg: TrainConfig, state: _RunState, progress: bool) -> None:
    """The training steps: random packed rows, warm-up + cosine learning rate, clipped AdamW."""
    train_rows, val = splits["train"], splits["val"]
    optim = _optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    _evaluate_and_save(0, model, tokenizer, val, cfg, state)
    bar = tqdm(range(1, cfg.steps + 1), desc=cfg.run_name, disable=not progress)
    for step in bar:
        rows = torch.randint(0, len(train_rows), (cfg.batch_size,), generator=gen)
        ids, mask = train_rows.input_ids[rows], train_rows.attention_mask[rows]
        labels = ids.masked_fill(mask == 0, -100)
        for group in optim.param_groups:
            group["lr"] = learning_rate(step - 1, cfg)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        if state.monitor is not None:
            state.monitor.update(selected_experts(model), mask)
        optim.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optim.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{out.loss.item():.3f}", val=f"{state.last.get('loss', float('nan')):.3f}")
        _evaluate_and_save(step, model, tokenizer, val, cfg, state)
    model.eval()


def train(cfg: TrainConfig, models_dir: str | Path = "models", overwrite: bool = False, progress: bool = True,
          monitor: MonitorFactory | None = None, sinks: tuple[LogSink, ...] = ()) -> Path:
    """Train one run and return its folder ``models_dir/<run_name>``.

    ``monitor(cfg)``: a routing monitor fed every training batch, its record written to each log line.
    ``sinks``: called with every log line as it is written (W&B: ``core.pipeline.training_wandb``).

    Before any training: the run name must be one folder name (``BadNameError``), and an existing
    run folder is replaced only with ``overwrite`` and only if it holds nothing but what a run of
    the toolkit wrote (``OwnershipError`` otherwise, one line).
    """
    models_dir = Path(models_dir)
    run_dir = models_dir / check_name("run name", cfg.run_name)
    inside(models_dir, run_dir)
    if run_dir.exists() and not overwrite:
        raise FileExistsError(f"run {run_dir} already exists; pass overwrite=True (--overwrite) to retrain it")
    hint = "choose another --run-name or --models-dir"
    check_replaceable(run_dir, hint)
    with built_in_scratch(run_dir, hint, scratch=models_dir / f".{cfg.run_name}.tmp") as work:
        _train_into(cfg, work, progress, monitor, sinks)
    return run_dir


def _train_into(cfg: TrainConfig, work: Path, progress: bool, monitor: MonitorFactory | None = None,
                sinks: tuple[LogSink, ...] = ()) -> None:
    """The whole training run, written into the scratch folder ``work``."""
    started = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    tokenizer, splits, corpus = prepare_data(cfg)
    write_record(work, build_record(cfg, corpus, {k: splits[k].num_tokens for k in ("train", "val", "test")}))
    train_rows, val = splits["train"], splits["val"]
    train_ids = train_rows.input_ids[train_rows.attention_mask.bool()]
    unigram = unigram_cross_entropy(
        train_ids, val.input_ids[:, 1:][(val.attention_mask[:, 1:] * val.attention_mask[:, :-1]).bool()], len(tokenizer))
    model = StudyMoeForCausalLM(cfg.model_config(tokenizer))
    ckpt_steps = set(checkpoint_steps(cfg.steps, cfg.num_checkpoints, cfg.checkpoint_spacing))
    state = _RunState(work, cfg.batch_size * cfg.seq_len, ckpt_steps | set(range(0, cfg.steps + 1, cfg.eval_every)), ckpt_steps,
                      monitor=monitor(cfg) if monitor is not None else None, sinks=tuple(sinks))
    _optimize(model, tokenizer, splits, cfg, state, progress)

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
        "plateau": plateau(state.checkpoints, unigram_by_domain(train_ids, val, len(tokenizer))),
        "final_val": state.last,
        "test": test,
        "sample": sample,
        "train_seconds": time.time() - started,
        "checkpoints": [c["revision"] for c in state.checkpoints],
    }
    atomic_write_json(work / "run_info.json", info)


def plateau(checkpoints: list[dict], unigram: dict[str, float]) -> dict:
    """Whether the run has settled, from its checkpoints' held-out losses.

    It has when the last two checkpoints' validation losses are within ``PLATEAU_CHANGE`` of each
    other and every domain's loss is at most ``BASELINE_RATIO`` of its add-one unigram baseline
    (the model must know far more than token frequencies). Both parts are kept, with their numbers.
    """
    if len(checkpoints) < 2:
        return {"holds": False, "reason": "fewer than two checkpoints"}
    before, last = checkpoints[-2], checkpoints[-1]
    change = (before["val_loss"] - last["val_loss"]) / before["val_loss"]
    ratios = {d: last["val_domain_loss"][d] / u for d, u in unigram.items() if d in last["val_domain_loss"]}
    settled, beats = abs(change) <= PLATEAU_CHANGE, bool(ratios) and max(ratios.values()) <= BASELINE_RATIO
    return {"holds": bool(settled and beats), "settled": bool(settled), "beats_unigram": bool(beats),
            "checkpoints": [before["revision"], last["revision"]], "val_loss": [before["val_loss"], last["val_loss"]],
            "relative_change": change, "max_change": PLATEAU_CHANGE, "domain_loss": last["val_domain_loss"],
            "domain_unigram": unigram, "domain_ratio": ratios, "max_ratio": BASELINE_RATIO}


def plateau_line(record: dict) -> str:
    """The plateau criterion in one line, printed at the end of training."""
    if "val_loss" not in record:
        return f"plateau: not measured ({record.get('reason', 'no record')})"
    (a, b), (ra, rb) = record["val_loss"], record["checkpoints"]
    domains = ", ".join(f"{d} {record['domain_loss'][d]:.2f}/{u:.2f}" for d, u in record["domain_unigram"].items()
                        if d in record["domain_loss"])
    verdict = "holds" if record["holds"] else "does NOT hold"
    return (f"plateau {verdict}: held-out loss {a:.3f} at {ra} -> {b:.3f} at {rb} ({100 * record['relative_change']:+.1f}%, "
            f"limit {100 * record['max_change']:.0f}%); per domain, loss/unigram: {domains} "
            f"(limit {record['max_ratio']:.2f} of the baseline)")


def _active_parameters(model: StudyMoeForCausalLM) -> int:
    """Parameters one token touches: everything except the unselected experts' weights."""
    cfg = model.config
    expert_params = 3 * cfg.hidden_size * cfg.intermediate_size
    idle = (cfg.num_experts - cfg.num_experts_per_tok) * expert_params * cfg.num_hidden_layers
    return sum(p.numel() for p in model.parameters()) - idle


def _why_retrain(run_dir: Path, cfg: TrainConfig) -> str | None:
    """Why the run folder cannot serve as the run ``cfg`` describes (None: it can): files missing, or another config."""
    needed = ("checkpoints.json", "config.json", "run_info.json", RECORD_NAME)
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if missing:
        return f"lacks {', '.join(missing)}"
    try:
        trained = json.loads((run_dir / "run_info.json").read_text()).get("config")
    except (OSError, ValueError):
        return "has an unreadable run_info.json"
    want = json.loads(json.dumps(asdict(cfg)))  # as JSON reads it back: tuples are lists
    if trained != want:
        changed = sorted(k for k in want if not isinstance(trained, dict) or trained.get(k, object()) != want[k])
        return f"was trained with another config ({', '.join(changed[:6]) or 'format'} differ)"
    return None


def ensure_default_model(models_dir: str | Path = "models", config: str | Path = DEFAULT_CONFIG, progress: bool = True,
                         monitor: MonitorFactory | None = None, sinks: tuple[LogSink, ...] = ()) -> Path:
    """The embedded default run's folder, training it first if it is not there yet.

    A run from older code, which did not record its training documents (and read the documents
    the main run analyses), is retrained: the main run needs to know what is held out. So is a
    run trained with another config than ``config`` (the default changed, or the YAML was edited). Only a
    folder all of whose files the toolkit wrote is replaced; any other is refused in one line
    (``OwnershipError``) before training.
    """
    cfg = TrainConfig.from_yaml(config)
    run_dir = Path(models_dir) / check_name("run name", cfg.run_name)
    stale = _why_retrain(run_dir, cfg)
    if stale is None:
        return run_dir
    check_replaceable(run_dir, f"pass another --models-dir (the embedded model there {stale} and must be retrained)")
    run_dir = train(cfg, models_dir=models_dir, overwrite=True, progress=progress, monitor=monitor, sinks=sinks)
    if progress:  # the run's own verdict on whether it trained long enough, where the bars were
        print(plateau_line(json.loads((run_dir / "run_info.json").read_text())["plateau"]), flush=True)
    return run_dir
