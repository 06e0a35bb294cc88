"""The toolkit's trainer on W&B: each training-log line as one W&B step, the routing monitor's alarms with it.

Why here: the trainer (``core.study_moe.training``) hands every log line to its sinks and knows
nothing of W&B; viz's logger is imported only by the study's layer and the command lines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from core.analysis.routing_monitor import monitor_scalars


def training_scalars(line: dict) -> dict[str, float]:
    """The numbers of one training-log line, flat: held-out loss and accuracy, routing, and the monitor's scalars."""
    out: dict[str, float] = {
        "val/loss": line["metrics"]["loss"],
        "val/accuracy": line["metrics"]["accuracy"],
        "routing/routing_acc": line["routing_acc"],
        "routing/routing_acc_chance": line["routing_acc_chance"],
        "routing/entropy": line["entropy"],
        "routing/dropped_fraction": line["dropped_fraction"],
        "tokens": line["tokens"],
    }
    for layer, value in enumerate(line["layer_entropy"]):
        out[f"routing/entropy/L{layer}"] = value
    if line.get("routing_monitor") is not None:
        out.update(monitor_scalars(line["routing_monitor"]))
    return {k: v for k, v in out.items() if v is not None}  # NaN was logged as null: W&B gets no value


class WandbTrainingLog:
    """A trainer sink: ``sink(line)`` logs the line's scalars at its training step; ``finish(info)`` adds the run's summary.

    The W&B run starts at the first line, so a sink handed to a trainer that finds its model
    already trained (``ensure_default_model``) starts none.
    """

    def __init__(self, cfg: Any, project: str, run_dir: str | Path, mode: str | None = None) -> None:
        self.cfg, self.project, self.run_dir, self.mode = cfg, project, Path(run_dir), mode
        self.logger = None

    def __call__(self, line: dict) -> None:
        if self.logger is None:
            from viz.wandb_logger import WandbLogger

            self.logger = WandbLogger(self.project, self.run_dir, name=self.cfg.run_name, config=asdict(self.cfg),
                                      mode=self.mode, tags=("training", "study_moe"), group=f"train/{self.cfg.run_name}")
        self.logger.log_metrics(training_scalars(line), step=line["step"])

    def run(self, train: Callable[[tuple["WandbTrainingLog"]], Path]) -> Path:
        """``train(sinks)`` with this sink, then the W&B run finished: with the run's summary, or failed on an error."""
        try:
            run_dir = train((self,))
        except BaseException:
            self.finish(exit_code=1)
            raise
        self.finish(json.loads((run_dir / "run_info.json").read_text()))
        return run_dir

    def finish(self, info: dict | None = None, exit_code: int = 0) -> Path | None:
        """End the run, with the final and test losses and the plateau verdict as its summary; its folder (None: no run)."""
        if self.logger is None:
            return None
        if info is not None:
            plateau = info.get("plateau", {})
            summary = {
                "final_val_loss": info["final_val"]["loss"], "test_loss": info["test"]["loss"],
                "unigram_val_loss": info["unigram_val_loss"], "train_seconds": info["train_seconds"],
                "plateau/holds": int(bool(plateau.get("holds"))), "plateau/relative_change": plateau.get("relative_change"),
            }
            self.logger.log_summary({k: v for k, v in summary.items() if v is not None})
        return self.logger.finish(exit_code=exit_code)
