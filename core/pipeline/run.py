"""The study as a library call: ``BasicRoutingAnalysis(options).run()`` traces, caches and analyses, and writes one report.

Stages: the embedded model's training (only if it is missing), model and checkpoints, routing
caches (``core.pipeline.targets``; reused across runs), analyses in one pass over the caches
(``core.pipeline.suite``), findings (``core.pipeline.findings``), report (``viz.run_report``),
summary.md (``core.pipeline.summary``). The command line is ``core.commands.basic_routing_analysis``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from core.pipeline.options import OptionsError, RunOptions, make_options, preflight
from core.pipeline.summary import RunSummary, summary_markdown


def _run_name(opts: RunOptions, model_name: str) -> str:
    from core.collection.sweep import model_slug

    name = model_slug(model_name)
    return opts.output.run_name or (name + ("-micro" if opts.micro and "micro" not in name else ""))


def run_folder(opts: RunOptions, model_name: str) -> Path:
    """``<results-dir>/<run>``, refused in one line unless it lies inside the results folder."""
    from core.owned_files import inside

    results = Path(opts.output.results_dir)
    run_dir = results / _run_name(opts, model_name)
    inside(results, run_dir)
    return run_dir


def check_run_folder(run_dir: Path) -> None:
    """An existing run folder that cannot be written (read-only) is found before the analyses, not after them."""
    from core.safe_io import probe_writable

    if run_dir.is_dir():
        try:
            probe_writable(run_dir)
        except OSError as e:
            raise OptionsError(f"cannot write to {run_dir} ({e.strerror or e}); choose another --run-name or "
                               "--results-dir") from None


class BasicRoutingAnalysis:
    """The seed's experiment object: ``BasicRoutingAnalysis(model_name=..., use_wandb=..., wandb_project=...).run()``.

    Any other option of :class:`core.pipeline.options.RunOptions` may be passed as a keyword.
    """

    def __init__(self, model_name: str | None = None, use_wandb: bool = False, wandb_project: str = "moe-routing-study",
                 options: RunOptions | None = None, **kwargs: Any) -> None:
        if options is None:
            options = make_options(model=model_name, wandb=use_wandb, wandb_project=wandb_project, **kwargs)
        self.options = options

    def run(self) -> RunSummary | None:
        """Do the whole job; returns where the report is (None on a torchrun rank other than 0, which only collects)."""
        from core.pipeline import targets
        from core.pipeline.context import RunContext
        from core.pipeline.findings import conclude
        from core.pipeline.launch import start_ranks
        from core.pipeline.model_source import check_model_source
        from core.pipeline.stage_clock import StageClock
        from core.pipeline.suite import run_analyses

        opts = self.options
        check_model_source(opts)  # a folder without weights, an unknown shape or revision: before any file is written
        preflight(opts)  # a missing GPU or an unwritable folder is found now, not after the analyses
        ranks, opts.model.device = start_ranks(opts.model.device)  # under torchrun: this rank's share and device
        opts.output.progress = opts.output.progress and ranks.rank == 0
        t0, clock = time.perf_counter(), StageClock(opts.model.device)
        say = print if opts.output.progress else (lambda *a, **k: None)
        target, wrapper = self._open_model(ranks, clock, say)
        if ranks.rank == 0:
            check_run_folder(run_folder(opts, target.name))
        with clock.stage("datasets tokenized"):  # held-out documents only
            tokenized = targets.load_tokenized(opts, wrapper.tokenizer, exclude=targets.training_exclusion(target))
        say(f"[2/4] collecting routing on {', '.join(f'{n} ({t.num_tokens} tokens)' for n, t in tokenized.items())}")
        with clock.stage("collection"):
            sweep = targets.collect_all(opts, target, tokenized, final_wrapper=wrapper)
        say("[3/4] analysing")
        record = run_analyses(RunContext(opts, wrapper, sweep, tokenized), targets.model_card(target, wrapper, tokenized),
                              clock, ranks)
        if record is None:
            return None  # this rank's share is collected and analysed; rank 0 merges the analyses and writes the report
        with clock.stage("findings"):
            record = conclude(record)
        return self._write(record, lambda t: wrapper.tokenizer.decode([t]), clock, t0, say)

    def _open_model(self, ranks: Any, clock: Any, say: Any) -> tuple[Any, Any]:
        """The model target (the embedded model trained, or random weights written, first if missing) and its final wrapper."""
        from core.model_access.shapes import is_random_spec
        from core.pipeline import targets
        from core.pipeline.launch import rank_zero_first
        from core.pipeline.model_source import check_loaded_model

        opts = self.options
        embedded_run = None
        if opts.model.name is None:
            say("[0/4] the embedded model (trained on the bundled corpus if it is not there yet)")
            with clock.stage("embedded model trained or found"), rank_zero_first(ranks):
                embedded_run = targets.train_embedded_model(opts)
        elif is_random_spec(opts.model.name):
            say(f"[0/4] {opts.model.name}: random weights (written into {opts.model.models_dir}/random/ if not there yet)")
            with clock.stage("random weights written or found"), rank_zero_first(ranks):
                targets.write_random(opts)
        with clock.stage("model loaded"):
            target = targets.resolve_model(opts, embedded_run)
            say(f"[1/4] model {target.name}: {len(target.checkpoints)} checkpoint(s): {', '.join(c.name for c in target.checkpoints)}")
            wrapper = targets.open_wrapper(target, target.final, opts)
        if wrapper.tokenizer is None:
            raise OptionsError(f"model {target.name} has no tokenizer to turn the datasets into tokens")
        check_loaded_model(opts, wrapper)
        return target, wrapper

    def _write(self, record: Any, decode: Any, clock: Any, t0: float, say: Any) -> RunSummary:
        """Every output of the run, from its record: metrics.json (and its arrays), the report, images, W&B, summary.md."""
        from core.array_files import write_metrics
        from core.pipeline.outputs import build_report, log_wandb
        from core.safe_io import atomic_write_text

        opts = self.options
        run_dir = run_folder(opts, record.model["name"])
        run_dir.mkdir(parents=True, exist_ok=True)
        say(f"[4/4] writing {run_dir}")
        with clock.stage("metrics.json"):  # big arrays go to arrays.safetensors beside it (core.array_files)
            metrics_path = write_metrics(run_dir / "metrics.json", record.metrics())
        with clock.stage("report"):
            report, figs = build_report(record, decode)
            report_path = report.write(run_dir)
        if opts.output.static != "none":
            from viz.static_export import export_many

            with clock.stage(f"static images ({opts.output.static})"):
                _, reason = export_many(figs, run_dir / "figures", fmt=opts.output.static)
            if reason:
                record = dataclasses.replace(record, warnings=record.warnings + (f"no static images: {reason}",))
        wandb_dir = None
        if opts.output.wandb:
            with clock.stage("W&B"):
                wandb_dir = log_wandb(record, run_dir, figs, report_path, decode)
        summary = RunSummary(run_dir=run_dir, report=report_path, metrics=metrics_path, headline=dict(record.headline),
                             findings=[f.text for f in record.findings], warnings=list(record.warnings),
                             seconds=time.perf_counter() - t0, wandb_dir=wandb_dir,
                             training_data=record.model.get("training_data"), stages=clock)
        atomic_write_text(run_dir / "summary.md", summary_markdown(summary, record.model["name"]))
        return summary
