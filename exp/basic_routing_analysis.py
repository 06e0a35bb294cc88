"""The main experiment: trace, cache and analyse how an MoE routes tokens, and write one report.

    uv run exp/basic_routing_analysis.py                      # offline, the embedded model
    uv run exp/basic_routing_analysis.py --model allenai/OLMoE-1B-7B-0924 \\
        --datasets fineweb,gsm8k,humaneval --checkpoints auto --device cuda --dtype bfloat16 --wandb

Stages: the embedded model's training (only if it is missing), model and checkpoints, routing
caches (``exp.collection``; reused across runs), analyses in one pass over the caches
(``exp.analysis_suite``), findings (``exp.findings``), report (``viz.run_report``).
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exp.run_options import OptionsError, RunOptions, make_options, parse_options, preflight  # noqa: E402


@dataclass
class RunSummary:
    """Where a run wrote its outputs, and its headline numbers."""

    run_dir: Path
    report: Path
    metrics: Path
    headline: dict[str, Any]
    findings: list[str]
    warnings: list[str]
    seconds: float
    wandb_dir: Path | None = None
    training_data: str | None = None  # which data the model saw, where the toolkit trained it
    stages: Any = None  # the run's StageClock: seconds and peak memory of each stage


def _run_name(opts: RunOptions, model_name: str) -> str:
    from core.collection.sweep import model_slug

    name = model_slug(model_name)
    return opts.run_name or (name + ("-micro" if opts.micro and "micro" not in name else ""))


class BasicRoutingAnalysis:
    """The seed's experiment object: ``BasicRoutingAnalysis(model_name=..., use_wandb=..., wandb_project=...).run()``.

    Any other option of :class:`exp.run_options.RunOptions` may be passed as a keyword.
    """

    def __init__(self, model_name: str | None = None, use_wandb: bool = False, wandb_project: str = "moe-routing-study",
                 options: RunOptions | None = None, **kwargs: Any) -> None:
        if options is None:
            options = make_options(model=model_name, wandb=use_wandb, wandb_project=wandb_project, **kwargs)
        self.options = options

    def run(self) -> RunSummary | None:
        """Do the whole job; returns where the report is (None on a torchrun rank other than 0, which only collects)."""
        from core.array_files import write_metrics
        from core.safe_io import atomic_write_text
        from exp.analysis_suite import run_analyses
        from exp.collection import (collect_all, load_tokenized, open_wrapper, resolve_model, train_embedded_model,
                                    training_exclusion, write_random)
        from exp.findings import findings, headline_numbers, warnings_of
        from exp.launch import rank_zero_first, start_ranks
        from exp.stage_clock import StageClock
        from core.model_access.shapes import is_random_spec

        opts = self.options
        preflight(opts)  # a missing GPU or an unwritable folder is found now, not after the analyses
        ranks, opts.device = start_ranks(opts.device)  # under torchrun: this rank's share and device
        opts.progress = opts.progress and ranks.rank == 0
        t0 = time.perf_counter()
        clock = StageClock(opts.device)
        say = print if opts.progress else (lambda *a, **k: None)
        embedded_run = None
        if opts.model is None:
            say("[0/4] the embedded model (trained on the bundled corpus if it is not there yet)")
            with clock.stage("embedded model trained or found"), rank_zero_first(ranks):
                embedded_run = train_embedded_model(opts)
        elif is_random_spec(opts.model):
            say(f"[0/4] {opts.model}: random weights (written into {opts.models_dir}/random/ if not there yet)")
            with clock.stage("random weights written or found"), rank_zero_first(ranks):
                write_random(opts)
        with clock.stage("model loaded"):
            target = resolve_model(opts, embedded_run)
            say(f"[1/4] model {target.name}: {len(target.checkpoints)} checkpoint(s): {', '.join(c.name for c in target.checkpoints)}")
            wrapper = open_wrapper(target, target.final, opts)
        if wrapper.tokenizer is None:
            raise OptionsError(f"model {target.name} has no tokenizer to turn the datasets into tokens")
        with clock.stage("datasets tokenized"):
            tokenized = load_tokenized(opts, wrapper.tokenizer, exclude=training_exclusion(target))  # held-out documents only
        say(f"[2/4] collecting routing on {', '.join(f'{n} ({t.num_tokens} tokens)' for n, t in tokenized.items())}")
        with clock.stage("collection"):
            sweep = collect_all(opts, target, tokenized, final_wrapper=wrapper)
        say("[3/4] analysing")
        results = run_analyses(wrapper, sweep, tokenized, ablation=opts.ablation, ablation_tokens=opts.ablation_tokens,
                               collaboration=opts.collaboration, micro=opts.micro, progress=opts.progress,
                               resamples=opts.resamples, seed=opts.seed, clock=clock, ranks=ranks,
                               pruning=opts.pruning_fractions if opts.pruning else (), pruning_tokens=opts.pruning_tokens)
        if results is None:
            return None  # this rank's share is collected and analysed; rank 0 merges the analyses and writes the report
        from core.study_moe.training_data import training_data_note

        results.model.update({"checkpoints": [c.name for c in target.checkpoints], "embedded": target.embedded,
                              "training_data": training_data_note(target.run_dir, tokenized)})
        with clock.stage("findings"):
            headline, found, warns = headline_numbers(results), findings(results), warnings_of(results)

        run_dir = Path(opts.results_dir) / _run_name(opts, target.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        say(f"[4/4] writing {run_dir}")
        with clock.stage("metrics.json"):  # big arrays go to arrays.safetensors beside it (core.array_files)
            metrics = {"options": opts.to_dict(), "headline": headline, "findings": found, "warnings": warns, **results.header(),
                       **results.results}  # the results keep their arrays for the writer
            metrics_path = write_metrics(run_dir / "metrics.json", metrics)
        with clock.stage("report"):
            report_path, figs = self._write_report(run_dir, results, target, tokenized, wrapper, found, warns)
        if opts.static != "none":
            from viz.static_export import export_many

            with clock.stage(f"static images ({opts.static})"):
                _, reason = export_many(figs, run_dir / "figures", fmt=opts.static)
            if reason:
                warns.append(f"no static images: {reason}")
        wandb_dir = None
        if opts.wandb:
            with clock.stage("W&B"):
                wandb_dir = self._log_wandb(run_dir, results, headline, figs, report_path, target.name,
                                            lambda t: wrapper.tokenizer.decode([t]))
        seconds = time.perf_counter() - t0
        summary = RunSummary(run_dir=run_dir, report=report_path, metrics=metrics_path, headline=headline, findings=found,
                             warnings=warns, seconds=seconds, wandb_dir=wandb_dir,
                             training_data=results.model.get("training_data"), stages=clock)
        atomic_write_text(run_dir / "summary.md", _summary_markdown(summary, target.name))
        return summary

    def _write_report(self, run_dir: Path, results: Any, target: Any, tokenized: dict, wrapper: Any,
                      found: list[str], warns: list[str]) -> tuple[Path, dict]:
        from viz.run_report import build_report

        tok = wrapper.tokenizer
        summary = {
            "model": target.name,
            "revision": target.revision or target.final.name,
            "weights digest": target.weights_digest or "(Hub revision)",
            "family": results.model.get("family"),
            "MoE layers": results.model.get("moe_layers"),
            "experts / top-k": f"{results.model.get('num_experts')} / {results.model.get('top_k')}",
            "datasets": ", ".join(results.datasets),
            "tokens": ", ".join(f"{n}: {c}" for n, c in results.tokens.items()),
            "checkpoints": ", ".join(c["name"] for c in results.checkpoints),
            "data the model saw": results.model.get("training_data") or "not recorded by this toolkit (the model's own training data)",
            "intervals": f"95% over documents, {self.options.resamples} bootstrap resamples; nulls from shuffled data",
        }
        report, figs = build_report(results, summary, found, warns, decode=lambda t: tok.decode([t]),
                                    title=f"MoE routing report: {target.name}")
        return report.write(run_dir), figs

    def _log_wandb(self, run_dir: Path, results: Any, headline: dict, figs: dict, report: Path, model: str,
                   decode: Any) -> Path:
        """A W&B run grouped by model: checkpoints as steps, tables, figures, the report as an artifact (``viz.wandb_dashboard``)."""
        from viz.wandb_dashboard import log_run
        from viz.wandb_logger import WandbLogger

        config = {**self.options.to_dict(), "model": model, "datasets": results.datasets,
                  "checkpoints": [c["name"] for c in results.checkpoints]}
        logger = WandbLogger(self.options.wandb_project, run_dir, name=run_dir.name, config=config, group=model)
        try:
            log_run(logger, results, headline, figs, report, run_dir / "metrics.json", decode)
        except BaseException:
            logger.finish(exit_code=1)
            raise
        return logger.finish()


def md_escape(text: object) -> str:
    """Text from the data (names, tokens, findings) with Markdown's inline markup escaped, as the HTML report escapes it."""
    return re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", " ".join(str(text).split("\n")))


def _summary_markdown(s: RunSummary, model: str) -> str:
    lines = [f"# Routing analysis of {md_escape(model)}", "", f"Report: [{s.report.name}]({s.report.name})  ",
             f"Metrics: [{s.metrics.name}]({s.metrics.name})", "", "## Findings", ""] + [f"- {md_escape(f)}" for f in s.findings]
    if s.training_data:
        lines += ["", f"Data the model saw: {md_escape(s.training_data)}"]
    if s.warnings:
        lines += ["", "## Warnings", ""] + [f"- {md_escape(w)}" for w in s.warnings]
    lines += ["", f"Run time: {s.seconds:.1f} s"]
    if s.stages is not None and s.stages.rows:
        lines += ["", "## Stages", "", "Seconds and peak memory of each stage (resident set; the one pass's analyses "
                  "are listed under it, with the seconds each took).", "", s.stages.markdown()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_options(argv)  # before the heavy imports: --help and option errors answer at once
    except OptionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from core.store.cache_format import CacheError
    from core.collection.checkpoints import CheckpointError
    from core.model_access.discovery import NoRoutersError
    from core.model_access.loading import ModelLoadError
    from data import DataError

    from exp.launch import stop_ranks

    try:
        summary = BasicRoutingAnalysis(options=opts).run()
    except (OptionsError, ModelLoadError, NoRoutersError, CacheError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)  # what is wrong, in one line, not a stack trace
        return 2
    except KeyboardInterrupt:  # every write is atomic: finished shards stay, the next run resumes from them
        print("\ninterrupted: finished cache shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:
        import torch.distributed as dist

        if not isinstance(e, dist.DistError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # a peer that died, or a collective that timed out
        print(f"error: rank {os.environ.get('RANK', 0)}: another process of this torchrun stopped answering ({first[:200]}); "
              "finished caches are kept: run the same command again to resume", file=sys.stderr)
        return 1
    finally:
        stop_ranks()
    if summary is None:
        print(f"rank {os.environ.get('RANK')}: its share of the caches is collected and analysed; rank 0 writes the report")
        return 0
    print()
    print(f"Done in {summary.seconds:.1f} s.")
    for f in summary.findings:
        print(f"- {f}")
    for w in summary.warnings:
        print(f"! {w}")
    print(f"\nReport: {summary.report.resolve()}")
    print(f"Summary: {(summary.run_dir / 'summary.md').resolve()}")
    if summary.wandb_dir:
        print(f"W&B run: {summary.wandb_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
