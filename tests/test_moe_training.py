"""A micro training run of the toolkit's own MoE: loss, log, revisions, wrapper round trip, grid."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.study_moe.evaluation import record_router_outputs
from core.collection.checkpoints import CheckpointError, list_local_checkpoints
from core.study_moe.training import TrainConfig, ensure_default_model
from tests.shared_runs import micro_models_copy
from viz.training_log import read_training_log

MICRO = Path(__file__).resolve().parents[1] / "configs" / "train_micro.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The micro run, trained once per session (tests/shared_runs.py), in a folder of this module's own."""
    return micro_models_copy(tmp_path_factory, tmp_path_factory.mktemp("models")) / "study-moe-micro"


def test_micro_run_lowers_the_loss(run_dir):
    lines = [json.loads(l) for l in (run_dir / "training_log.txt").read_text().splitlines()]
    first, last = lines[0]["metrics"]["loss"], lines[-1]["metrics"]["loss"]
    assert last < first - 0.5
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["final_val"]["loss"] == pytest.approx(last, abs=1e-5)
    assert info["sample"].startswith("Once upon a time")


def test_log_is_in_seed_000_format(run_dir):
    log = read_training_log(run_dir / "training_log.txt")  # the toolkit's seed-000 reader: strict
    assert list(log.epochs) == list(range(1, len(log.epochs) + 1))
    assert log.utilization.shape == (len(log.epochs), 4)
    assert log.utilization.sum(axis=1) == pytest.approx([1.0] * len(log.epochs), abs=1e-4)
    assert log.layer_entropy.shape == (len(log.epochs), 2)
    assert set(log.metrics) == {"accuracy", "loss"}
    raw = json.loads((run_dir / "training_log.txt").read_text().splitlines()[-1])
    assert {"epoch", "routing_acc", "entropy", "utilization", "metrics", "step", "tokens"} <= set(raw)
    assert 0.0 <= raw["routing_acc"] <= 1.0


def test_revisions_are_dense_early_and_each_opens(run_dir):
    ckpts = list_local_checkpoints(run_dir)
    steps = [c.step for c in ckpts]
    assert len(ckpts) >= 6 and steps[0] == 0 and steps[-1] == TrainConfig.from_yaml(MICRO).steps
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert gaps == sorted(gaps), "checkpoints must be denser early"
    assert [c.tokens for c in ckpts] == [s * 8 * 32 for s in steps]
    for c in ckpts:
        path = Path(c.path)
        assert path.is_absolute() and (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    first = AutoModelForCausalLM.from_pretrained(ckpts[0].path)
    final = AutoModelForCausalLM.from_pretrained(run_dir)
    w0, w1 = first.model.layers[0].mlp.gate.weight, final.model.layers[0].mlp.gate.weight
    assert not torch.equal(w0, w1)


def test_ensure_default_model_reuses_a_finished_run(run_dir):
    before = (run_dir / "run_info.json").stat().st_mtime
    assert ensure_default_model(run_dir.parent, config=MICRO, progress=False) == run_dir
    assert (run_dir / "run_info.json").stat().st_mtime == before


def test_ensure_default_model_retrains_when_the_config_changed(run_dir, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(run_dir, models / run_dir.name)  # the finished micro run, as a user's models/ holds it
    edited = tmp_path / "micro.yaml"
    edited.write_text(MICRO.read_text().replace("steps: 40", "steps: 8"))  # any change retrains; 8 steps is quick
    again = ensure_default_model(models, config=edited, progress=False)
    assert json.loads((again / "run_info.json").read_text())["config"]["steps"] == 8
    assert [c["step"] for c in json.loads((again / "checkpoints.json").read_text())][-1] == 8
    before = (again / "run_info.json").stat().st_mtime
    assert ensure_default_model(models, config=edited, progress=False) == again  # the same config: reused
    assert (again / "run_info.json").stat().st_mtime == before


def test_listing_a_missing_run_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        list_local_checkpoints(tmp_path / "nope")


def test_saved_checkpoint_opens_through_wrapper_with_same_routing(run_dir):
    from core.model_access.wrapper import MoEModelWrapper

    path = list_local_checkpoints(run_dir)[-2].path
    wrapper = MoEModelWrapper(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    enc = wrapper.tokenizer(["Once upon a time there was", "def f(x): return x"], return_tensors="pt", padding=True)
    routing = wrapper.trace_routing(enc["input_ids"], enc["attention_mask"])
    assert wrapper.moe_layers == [0, 1] and wrapper.num_experts == 4 and wrapper.top_k == 2
    with torch.no_grad(), record_router_outputs(model) as records:
        model(**enc)
    keep = enc["attention_mask"].reshape(-1).bool()
    logits = torch.stack([r[0][keep] for r in records], dim=1)
    weights = torch.stack([r[1][keep] for r in records], dim=1)
    index = torch.stack([r[2][keep] for r in records], dim=1)
    assert routing.num_tokens == int(keep.sum())
    assert torch.allclose(routing.router_logits, logits, atol=1e-5)
    assert torch.equal(routing.topk_idx, index)
    assert torch.allclose(routing.topk_weight, weights, atol=1e-6)


def test_grid_writes_the_seed_002_table(tmp_path):
    from core.commands.train_moe import GRID_ARMS, run_grid

    base = TrainConfig.from_yaml(MICRO, steps=6, num_checkpoints=2, eval_every=6, run_name="g")
    out = run_grid(base, tmp_path / "models", tmp_path / "results", overwrite=False, progress=False)
    rows = json.loads((out / "grid_results.json").read_text())["rows"]
    assert [r["arm"] for r in rows] == [a for a, _ in GRID_ARMS]
    for r in rows:
        assert len(r["layer_entropy"]) == 2 and len(r["layer_utilization_std"]) == 2
        assert 0 <= r["top3_accuracy"] <= 1 and r["sample"].startswith("Once upon a time")
    md = (out / "grid_results.md").read_text()
    assert "Top-3 Accuracy" in md and md.count("\n| top") == 4
    cfg = json.loads((tmp_path / "models" / "g-grid-top1-random" / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["routing"]) == (4, 1, "random")


def test_cli_overrides_parse_as_yaml():
    from core.commands.train_moe import main, parse_overrides

    assert parse_overrides(["steps=300", "capacity_factor=1.25", "routing=random", "capacity_factor=null"]) == {
        "steps": 300, "capacity_factor": None, "routing": "random"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["steps"])
    assert main(["--set", "stepz=3"]) == 2  # one line on stderr, no training


def test_the_seed_decides_the_weights(tmp_path):
    """Same seed, same model bit for bit; another seed, another model (data split and initialisation)."""
    from safetensors.torch import load_file

    def weights(seed, name):
        cfg = TrainConfig.from_yaml(MICRO, seed=seed, steps=3, warmup_steps=1, eval_every=3, num_checkpoints=2,
                                    run_name=name)
        from core.study_moe.training import train

        return load_file(train(cfg, tmp_path, progress=False) / "model.safetensors")

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].shape == c[k].shape)


def test_per_domain_loss_averages_to_the_loss_and_the_plateau_is_recorded(run_dir):
    info = json.loads((run_dir / "run_info.json").read_text())
    final = info["final_val"]
    assert set(final["domain_loss"]) == set(info["domain_names"])
    ckpts = json.loads((run_dir / "checkpoints.json").read_text())
    assert ckpts[-1]["val_loss"] == pytest.approx(final["loss"], abs=1e-5)
    assert all(l < info["unigram_val_loss"] + 1 for l in final["domain_loss"].values())
    record = info["plateau"]
    assert record["checkpoints"] == [c["revision"] for c in ckpts[-2:]]
    assert set(record["domain_unigram"]) == set(info["domain_names"])
    assert record["holds"] == (abs(record["relative_change"]) <= 0.02 and max(record["domain_ratio"].values()) <= 0.8)


def test_train_moe_logs_each_line_to_wandb_with_the_monitor(tmp_path, monkeypatch, capsys):
    from core.commands.train_moe import main
    from viz.wandb_logger import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["--config", str(MICRO), "--models-dir", str(tmp_path / "m"), "--results-dir", str(tmp_path / "r"),
                 "--no-progress", "--monitor-window", "5", "--wandb",
                 "--set", "steps=12", "--set", "eval_every=4"]) == 0  # lines at 0, 4, 8, 12: more than 40 steps gave
    assert "plateau" in capsys.readouterr().out
    runs = list((tmp_path / "r" / "wandb-training").glob("wandb/offline-run-*"))
    assert len(runs) == 1
    logged = read_offline_run(runs[0])
    lines = [json.loads(l) for l in (tmp_path / "m" / "study-moe-micro" / "training_log.txt").read_text().splitlines()]
    rows = [h for h in logged["history"] if "val/loss" in h]
    assert [h["_step"] for h in rows] == [l["step"] for l in lines]
    assert [h["val/loss"] for h in rows] == pytest.approx([l["metrics"]["loss"] for l in lines])
    assert all("routing_monitor/alarms" in h for h in rows)
    assert all("routing_monitor/layer_1/dead" in h for h in rows[1:])  # step 0 has seen no training batch yet
    assert logged["config"]["num_experts"] == 4 and logged["group"] == "train/study-moe-micro"
    assert "final_val_loss" in logged["summary"] and "plateau/holds" in logged["summary"]
