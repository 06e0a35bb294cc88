"""Train the toolkit's own MoE on the bundled corpus, or run seed 002's routing grid.

    uv run exp/train_moe.py                                   # the embedded default run
    uv run exp/train_moe.py --config configs/train_micro.yaml # seconds, for a smoke check
    uv run exp/train_moe.py --set steps=300 --set top_k=1 --run-name my-run
    uv run exp/train_moe.py --grid                            # 4 experts x {top-1, top-2, random-1, random-2}

A run is written to ``<models-dir>/<run_name>/`` (final model, ``step-*`` revisions,
``checkpoints.json``, ``training_log.txt``, ``run_info.json``; see ``core.study_moe.training``). The
grid trains one run per arm and writes ``results/<grid_name>/grid_results.md`` and ``.json``:
test loss, top-3 accuracy, per-layer routing entropy, per-layer utilization standard deviation
and a sample continuing "Once upon a time" (the JSON's rows under ``"rows"``). Both carry the
toolkit's mark, and an existing file without it is never overwritten (``core.owned_files``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from core.owned_files import COMMENT_MARK, JSON_MARK, OwnershipError, check_output_file, marked_json, marked_text
from core.path_names import BadNameError, check_name
from core.safe_io import atomic_write_text
from core.study_moe.config import DEFAULT_CONFIG, TrainConfig

# seed 002's grid: four experts, learned vs random routing, one or two experts per token
GRID_ARMS = (
    ("top1", {"top_k": 1, "routing": "topk"}),
    ("top1-random", {"top_k": 1, "routing": "random"}),
    ("top2", {"top_k": 2, "routing": "topk"}),
    ("top2-random", {"top_k": 2, "routing": "random"}),
)
GRID_EXPERTS = 4


def parse_overrides(items: list[str]) -> dict:
    """``["steps=300", "capacity_factor=1.25"]`` -> ``{"steps": 300, "capacity_factor": 1.25}`` (YAML values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _fmt_list(values: list[float]) -> str:
    return "[" + " ".join(f"{v:.2f}" for v in values) + "]"


def grid_table(rows: list[dict]) -> str:
    """The seed-002 results table in Markdown."""
    lines = [
        "| Model | Test Loss | Top-3 Accuracy | Routing Entropy (per layer) | Utilization Std Dev (per layer) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['test_loss']:.3f} | {100 * r['top3_accuracy']:.2f}% | "
            f"{_fmt_list(r['layer_entropy'])} | {_fmt_list(r['layer_utilization_std'])} |"
        )
    return "\n".join(lines)


def run_grid(base: TrainConfig, models_dir: Path, results_dir: Path, overwrite: bool, progress: bool = True) -> Path:
    """Train the four grid arms from ``base`` and write ``grid_results.{md,json}``; returns the results folder."""
    grid_name = f"{base.run_name}-grid"
    out_dir = results_dir / grid_name
    hint = "choose another --results-dir or --run-name"
    check_output_file(out_dir / "grid_results.md", COMMENT_MARK, hint)  # before any training
    check_output_file(out_dir / "grid_results.json", JSON_MARK, hint)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for arm, changes in GRID_ARMS:
        cfg = TrainConfig.from_dict({**vars(base), **changes, "num_experts": GRID_EXPERTS, "run_name": f"{grid_name}-{arm}"})
        run_dir = models_dir / cfg.run_name
        if overwrite or not (run_dir / "run_info.json").is_file():
            from core.pipeline.training_monitor import study_moe_monitor
            from core.study_moe.training import train

            run_dir = train(cfg, models_dir=models_dir, overwrite=True, progress=progress, monitor=study_moe_monitor())
        info = json.loads((run_dir / "run_info.json").read_text())
        test = info["test"]
        rows.append({
            "arm": arm,
            "run_dir": str(run_dir),
            "test_loss": test["loss"],
            "top3_accuracy": test["top3_accuracy"],
            "accuracy": test["accuracy"],
            "layer_entropy": test["layer_entropy"],
            "layer_utilization_std": test["layer_utilization_std"],
            "routing_acc": test["routing_acc"],
            "unigram_val_loss": info["unigram_val_loss"],
            "sample": info["sample"],
        })
    table = grid_table(rows)
    samples = "\n".join(f"- **{r['arm']}**: {r['sample']!r}" for r in rows)
    md = marked_text(
        f"# Routing grid ({GRID_EXPERTS} experts, base config `{base.run_name}`)\n\n{table}\n\n"
        f"Generated from \"Once upon a time\":\n\n{samples}\n"
    )
    atomic_write_text(out_dir / "grid_results.md", md)
    atomic_write_text(out_dir / "grid_results.json", json.dumps(marked_json({"rows": rows}), indent=2))
    print(md)
    return out_dir


def _train(cfg: TrainConfig, args: argparse.Namespace) -> Path | None:
    """The grid (None: it prints its table) or one run (its folder)."""
    models_dir = Path(args.models_dir)
    if args.grid:
        run_grid(cfg, models_dir, Path(args.results_dir), args.overwrite, progress=not args.no_progress)
        return None
    from core.pipeline.training_monitor import study_moe_monitor
    from core.study_moe.training import train

    monitor = study_moe_monitor(args.monitor_window) if args.monitor_window > 0 else None
    if not args.wandb:
        return train(cfg, models_dir=models_dir, overwrite=args.overwrite, progress=not args.no_progress, monitor=monitor)
    from core.pipeline.training_wandb import WandbTrainingLog

    sink = WandbTrainingLog(cfg, args.wandb_project, Path(args.results_dir) / "wandb-training")
    return sink.run(lambda sinks: train(cfg, models_dir=models_dir, overwrite=args.overwrite, progress=not args.no_progress,
                                        monitor=monitor, sinks=sinks))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training YAML (default: configs/train_default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config field (repeatable)")
    p.add_argument("--run-name", help="name of the run folder (overrides the config's run_name)")
    p.add_argument("--models-dir", default="models", help="where runs are written (default: models/)")
    p.add_argument("--results-dir", default="results", help="where the grid writes its table (default: results/)")
    p.add_argument("--grid", action="store_true", help="run seed 002's grid: 4 experts x top-1/top-2/random-1/random-2")
    p.add_argument("--overwrite", action="store_true", help="retrain runs that already exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--monitor-window", type=int, default=50, metavar="BATCHES",
                   help="routing monitor: diagnose the last BATCHES training batches at each log line (0: off; default 50)")
    p.add_argument("--wandb", action="store_true",
                   help="log every training-log line (losses, routing, the monitor's alarms) to W&B; offline without WANDB_API_KEY")
    p.add_argument("--wandb-project", default="moe-routing-study", help="W&B project (default: moe-routing-study)")
    args = p.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
        if args.run_name is not None:
            overrides["run_name"] = args.run_name
        cfg = TrainConfig.from_yaml(args.config, **overrides)
        check_name("--run-name", cfg.run_name)  # before any training: the name becomes a folder
        if args.wandb and args.grid:
            raise ValueError("--wandb logs one training run; the --grid's four arms are compared in grid_results.md")
        if args.monitor_window < 0:
            raise ValueError(f"--monitor-window must be 0 (off) or a number of batches, not {args.monitor_window}")
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from core.commands.disk_errors import disk_error_line

    try:
        run_dir = _train(cfg, args)
    except (FileExistsError, OwnershipError, BadNameError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(disk_error_line(exc, resumes="an earlier run of the same name is kept"), file=sys.stderr)
        return 1
    if run_dir is None:
        return 0
    info = json.loads((run_dir / "run_info.json").read_text())
    print(f"run: {run_dir}")
    print(f"val loss {info['final_val']['loss']:.3f} (unigram baseline {info['unigram_val_loss']:.3f}), "
          f"test loss {info['test']['loss']:.3f}, {info['train_seconds']:.0f} s")
    print(f"sample: {info['sample']!r}")
    from core.study_moe.training import plateau_line

    print(plateau_line(info["plateau"]))
    from core.study_moe.training_data import training_data_note

    print(f"data: {training_data_note(run_dir)}")
    return 0
