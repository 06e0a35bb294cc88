"""The routing monitor during training: the toolkit's trainer (micro config) and a transformers Trainer on a tiny OLMoE.

Routing is planted by changing what the routers select (an expert that never wins, one that
always does, uniform random choices), so the monitor's alarms are checked against a known truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from core.pipeline.training_monitor import RoutingMonitorCallback, study_moe_monitor
from core.study_moe.layer import StudyMoeTopKRouter
from core.study_moe.training import TrainConfig, train
from tests.tiny_models import VOCAB, build
from viz.training_log import log_warnings, read_training_log
from viz.training_log_report import training_log_figures

MICRO = Path(__file__).resolve().parents[1] / "configs" / "train_micro.yaml"


# --------------------------------------------------------------------------- the toolkit's trainer
def _train_micro(tmp_path: Path, **overrides) -> list[dict]:
    cfg = TrainConfig.from_yaml(MICRO, num_experts=8, eval_every=20, **overrides)
    run = train(cfg, models_dir=tmp_path, progress=False, monitor=study_moe_monitor(window=20))
    _LOGS[cfg.routing] = read_training_log(run / "training_log.txt")  # the seed-000 reader takes the monitor's key
    return [json.loads(line)["routing_monitor"] for line in (run / "training_log.txt").read_text().splitlines()]


_LOGS: dict = {}  # the last parsed log per routing mode, for the visualizer's checks


def _biased_select(bias: torch.Tensor):
    """Uniform random top-k (a balanced router) plus ``bias``: -inf never wins, a large value always does."""
    def select(self, router_logits):
        n, k = router_logits.shape[0], self.top_k
        idx = (torch.rand(n, self.num_experts) + bias).topk(k, dim=-1).indices
        return torch.full((n, k), 1.0 / k), idx
    return select


def test_trainer_logs_no_alarm_on_random_routing(tmp_path):
    records = _train_micro(tmp_path, routing="random")
    assert records[0]["window_batches"] == 0 and records[0]["layers"] == []  # step 0: nothing trained yet
    last = records[-1]
    assert last["window_batches"] == 20 and last["tokens"] > 0 and len(last["layers"]) == 2
    assert last["alarms"] == 0, last


def test_trainer_calls_a_planted_dead_expert_dead(tmp_path, monkeypatch):
    bias = torch.zeros(8)
    bias[3] = -torch.inf  # expert 3 never wins
    monkeypatch.setattr(StudyMoeTopKRouter, "_select", _biased_select(bias))
    last = _train_micro(tmp_path, routing="random")[-1]
    assert all(r["dead"] == [3] and r["selected"][3] == 0 for r in last["layers"]), last["layers"]
    assert last["alarms"] == 2
    log = _LOGS["random"]  # the seed-000 visualizer: a figure of flagged experts over steps, and the alarms
    figures = {name: df for _, name, _, df in training_log_figures(log)}
    flagged = figures["routing_monitor"]["layer_0"].to_numpy()
    assert np.isnan(flagged[0]) and (flagged[1:] == 1.0).all()  # step 0: no batch yet; then expert 3, dead
    assert [w for w in log_warnings(log) if "routing monitor" in w] == [
        f"routing monitor at training step 40 (last 20 batches): layer {l} imbalanced, dead experts [3]" for l in (0, 1)]


def test_trainer_calls_a_planted_dominant_expert_dominant(tmp_path, monkeypatch):
    bias = torch.zeros(8)
    bias[0] = 0.5  # expert 0 wins for about 3/4 of tokens
    monkeypatch.setattr(StudyMoeTopKRouter, "_select", _biased_select(bias))
    last = _train_micro(tmp_path, routing="random")[-1]
    assert all(r["dominant"] == [0] and r["dead"] == [] and r["state"] != "healthy" for r in last["layers"]), last["layers"]


# --------------------------------------------------------------------------- transformers' Trainer
class _Rows(torch.utils.data.Dataset):
    """Random token rows, the last quarter of every other row padding."""

    def __init__(self, n: int = 64, length: int = 32) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, length), generator=gen)
        self.mask = torch.ones(n, length, dtype=torch.long)
        self.mask[::2, -length // 4:] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.ids[i].masked_fill(self.mask[i] == 0, -100)}


def _plant(model, choose) -> None:
    """Every router returns ``choose(logits) -> indices`` as its selection (weights from its softmax)."""
    for layer in model.model.layers:
        def hook(module, args, out):
            idx = choose(out[0])
            weights = torch.softmax(out[0], dim=-1).gather(-1, idx)
            return out[0], weights / weights.sum(-1, keepdim=True), idx
        layer.mlp.gate.register_forward_hook(hook)


def _hf_train(tmp_path: Path, choose=None) -> tuple[dict, list[dict], list[dict]]:
    model = build("olmoe").train()
    if choose is not None:
        _plant(model, choose)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=8, logging_steps=4, per_device_train_batch_size=8,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows())
    callback = RoutingMonitorCallback(window=8, log_file=tmp_path / "monitor.jsonl").add_to(trainer)
    seen: list[dict] = []
    trainer.callback_handler.callbacks.append(_Spy(seen))
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert callback.hooks is None  # removed at the end of training
    history = [h for h in trainer.state.log_history if "routing_monitor" in h]
    assert [h["step"] for h in history] == [line["step"] for line in lines] == [4, 8]
    seen = [logs for logs in seen if "routing_monitor/alarms" in logs]
    assert len(seen) == 2  # the reporters after the callback received its scalars at both log steps
    return lines[-1]["routing_monitor"], seen, history


class _Spy(TrainerCallback):  # last, after the reporters: what they receive
    def __init__(self, seen: list[dict]) -> None:
        self.seen = seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


def _uniform(logits: torch.Tensor) -> torch.Tensor:
    return torch.rand(logits.shape, device=logits.device).topk(2, dim=-1).indices


def test_callback_no_alarm_on_balanced_top_k_and_padding_left_out(tmp_path):
    record, seen, _ = _hf_train(tmp_path, _uniform)
    real_tokens = int(_Rows().mask.sum())  # 8 batches of 8 rows: every row once, padding left out
    assert record["window_batches"] == 8 and record["tokens"] == real_tokens < _Rows().mask.numel()
    assert [r["layer"] for r in record["layers"]] == [0, 1, 2] and record["alarms"] == 0, record
    assert all(sum(r["selected"]) == 2 * record["tokens"] for r in record["layers"])
    assert seen[-1]["routing_monitor/alarms"] == 0 and "routing_monitor/layer_2/dead" in seen[-1]


@pytest.mark.parametrize("plant, key, expert", [(3, "dead", 3), (0, "dominant", 0)])
def test_callback_alarms_on_a_planted_expert(tmp_path, plant, key, expert):
    sign = -torch.inf if key == "dead" else 30.0

    def choose(logits):
        bias = torch.zeros(logits.shape[-1], device=logits.device)
        bias[plant] = sign
        return (logits + bias).topk(2, dim=-1).indices

    record, seen, history = _hf_train(tmp_path, choose)
    assert all(r[key] == [expert] for r in record["layers"]), record
    assert record["alarms"] == 3 and history[-1]["routing_monitor"]["alarms"] == 3
    assert seen[-1][f"routing_monitor/layer_0/{key}"] == 1
