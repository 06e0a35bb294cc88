"""The main experiment end to end at micro size: every artifact exists, is well formed, and a rerun reuses caches."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.analysis.results import ResultMixin
from core.array_files import load_metrics
from core.store.cache import RoutingCache
from core.safe_io import to_jsonable

from core.commands.basic_routing_analysis import main
from core.pipeline.run import BasicRoutingAnalysis
from core.pipeline.options import OptionsError, parse_options
from core.pipeline.spec import AnalysisSpec, Finding, register, registered, unregister
from tests.compare import assert_same
from tests.shared_runs import micro_models_copy

REPO = Path(__file__).resolve().parents[1]
EXPECTED_ANALYSES = [
    "routing_stats", "routing_stats_by_dataset", "correlation_topk", "correlation_probs", "correlation_by_dataset",
    "correlation_difference", "coactivation", "routing_paths", "domain_specialization", "vocabulary_specialization",
    "routing_consistency", "router_similarity", "router_subspaces", "expert_alignment", "checkpoint_dynamics",
    "router_drift", "collaboration", "ablation", "pruning",
]


# ------------------------------------------------------------------ a toy analysis, registered from this file only
@dataclass
class ToyResult(ResultMixin):
    """Tokens seen, and each layer's share of tokens whose first choice is expert 0."""

    tokens: int
    first_expert_share: np.ndarray


class ToyAccumulator:
    """Counts tokens whose first choice is expert 0, per layer: the smallest accumulator the one pass accepts."""

    def __init__(self) -> None:
        self.tokens, self.hits = 0, None

    def update(self, chunk) -> None:
        hits = (chunk.topk_idx[:, :, 0] == 0).sum(0).numpy()
        self.hits = hits if self.hits is None else self.hits + hits
        self.tokens += chunk.num_tokens

    def merge(self, other: "ToyAccumulator") -> "ToyAccumulator":
        self.tokens += other.tokens
        self.hits = other.hits if self.hits is None else self.hits + (0 if other.hits is None else other.hits)
        return self

    def result(self) -> ToyResult:
        return ToyResult(self.tokens, self.hits / max(self.tokens, 1))


TOY = "toy_first_expert"
TOY_OUTPUTS: dict = {}  # the first run's outputs, kept before the second run (without the toy) rewrites the run folder


def _toy_report(res: ToyResult, record, page) -> None:
    import plotly.graph_objects as go

    page.section("Toy analysis", "A toy analysis registered by a test.")
    page.figure("Toy analysis", "toy_figure", go.Figure(go.Bar(y=res.first_expert_share)), caption="Toy: share of expert 0")


TOY_SPEC = AnalysisSpec(
    TOY, "pass", order=95, build=lambda ctx: ToyAccumulator(),
    headline=lambda res, record: {"toy_tokens": res.tokens},
    findings=lambda res, record: [Finding(TOY, f"Toy analysis: expert 0 is first for {res.first_expert_share.max():.1%} "
                                               f"of {res.tokens} tokens at most.", ("toy_figure",))],
    warnings=lambda res, record: ["toy warning: a test registered this analysis"],
    report=_toy_report,
    wandb_tables=lambda res, record, decode: {"tables/toy": pd.DataFrame({"share": res.first_expert_share})},
)


def _json_metrics(path: Path) -> dict:
    """metrics.json with its arrays read back from arrays.safetensors, as the JSON values it held before they moved out."""
    return to_jsonable(load_metrics(path))


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    micro_models_copy(tmp_path_factory, root / "models")  # the embedded micro model, trained once per session
    kwargs = dict(micro=True, results_dir=str(root / "results"), models_dir=str(root / "models"), progress=False, run_name="micro")
    register(TOY_SPEC)  # the toy analysis of this file: it must reach every output (test_a_registered_analysis_...)
    try:
        first = BasicRoutingAnalysis(use_wandb=True, wandb_project="moe-routing-study-test", **kwargs).run()
    finally:
        unregister(TOY)
    TOY_OUTPUTS.update(metrics=load_metrics(first.run_dir), report=first.report.read_text(),  # before the rerun rewrites them
                       summary=(first.run_dir / "summary.md").read_text())
    manifests = {p: p.stat().st_mtime_ns for p in (root / "results" / "cache").rglob("manifest.json")}
    reads = Counter()
    real_read = RoutingCache._read_checked

    def counting_read(self, i, verify):
        reads[(self.dir, i, verify)] += 1
        return real_read(self, i, verify)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RoutingCache, "_read_checked", counting_read)
        # the one pass is asked for again (an unchanged rerun would take its stored results and read no shard:
        # tests/test_result_reuse.py), so that this rerun shows how the pass reads the caches
        second = BasicRoutingAnalysis(static="none", recompute=["pass"], **kwargs).run()
    return root, first, second, manifests, reads


def test_every_artifact_exists_and_is_well_formed(micro_run):
    root, first, second, _, _ = micro_run
    run_dir = root / "results" / "micro"  # the files are the second run's (the cached rerun writes the same folder)
    assert first.run_dir == run_dir
    metrics = load_metrics(run_dir)  # big arrays are in arrays.safetensors beside metrics.json
    assert metrics["correlation_topk"]["corr"].ndim == 2 and (run_dir / "arrays.safetensors").is_file()
    for name in EXPECTED_ANALYSES:
        assert name in metrics, f"{name} missing from metrics.json"
    assert metrics["datasets"] == ["wikitext2", "gsm8k", "humaneval", "shakespeare"]
    assert set(metrics["domain_specialization"]["group_names"]) == {"general", "math", "code", "stories"}
    assert len(metrics["checkpoints"]) >= 3
    assert metrics["headline"]["tokens"] == sum(metrics["tokens"].values())
    assert all(0 < n <= 1500 for n in metrics["tokens"].values())  # micro: at most 1,500 tokens per dataset
    sat = metrics["headline"]["saturation"]
    assert list(sat.values())[-1] == pytest.approx(1.0), "the final checkpoint saturates against itself"
    html = (run_dir / "report.html").read_text()
    assert html.count('class="plotly-graph-div') >= 15
    assert "{&#x27;" not in html  # parameters are small tables, not Python dicts printed into the text
    # pruning: every criterion (the micro model is small enough for the causal one) at every fraction, against random
    pr = metrics["pruning"]
    assert pr["criteria"] == ["weight_mass", "collaboration", "usage", "causal", "random"] and pr["fractions"] == [0.125, 0.25, 0.5]
    assert len(pr["best"]) == 3 and "id='item-pruning'" in html and any(f.startswith("Pruning (") for f in first.findings)
    # the first screen: every finding, with a link to the figure behind it
    learned = html[html.index("<h2>What we learned</h2>"):html.index("<h2>Summary</h2>")]
    links = re.findall(r"href='#item-([^']+)'", learned)
    assert len(links) >= 8 and all(f"id='item-{name}'" in html for name in links), links
    cards = learned.count("<div class='lead-card'>")  # the strongest findings, each with a small figure, then the rest
    assert 1 <= cards <= 4 and cards + learned.count("<li>") == len(second.findings)
    assert "diagnosis_thresholds" in html and "collaboration_parameters" in html
    assert "<script src=\"http" not in html
    data_files = list((run_dir / "data").iterdir())
    assert len(data_files) >= 15 and all(f.stat().st_size > 0 for f in data_files)
    summary = (run_dir / "summary.md").read_text()
    assert "report.html" in summary and "Findings" in summary
    assert "## Stages" in summary and "| collection |" in summary and "| expert_alignment (reused) |" in summary  # seconds, peak memory (the rerun took its stored result)
    assert first.findings and any("Domain specialization" in f for f in first.findings)
    # every headline finding states its interval and its null, and what the model saw is said
    for key in ("Domain specialization", "Cross-layer correlation", "Consecutive tokens", "Router saturation", "Ablation",
                "Load balance", "Router–expert alignment"):
        text = next(f for f in first.findings if f.startswith(key))
        few = "(no interval: each domain's tokens are in too few document blocks)"  # the micro run scores few documents
        assert "95% CI" in text or "95% range" in text or (key == "Ablation" and few in text), text
    for est in metrics["headline"]["estimates"].values():
        assert {"value", "low", "high", "null", "distinguishable"} <= set(est)
    assert "held-out" in metrics["model"]["training_data"] and "Data the model saw" in summary
    assert "data the model saw" in html and "within-document shuffle" in html
    if shutil.which("chromium") or os.environ.get("CI"):  # static images need a browser for kaleido
        pngs = list((run_dir / "figures").glob("*.png"))
        assert len(pngs) >= 15 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_a_registered_analysis_reaches_every_output(micro_run):
    """The toy analysis above was registered from this file alone: it ran in the one pass and every sink wrote it."""
    root, first, second, _, _ = micro_run
    run_dir = root / "results" / "micro"
    metrics = TOY_OUTPUTS["metrics"]
    assert metrics[TOY]["tokens"] == metrics["headline"]["tokens"] == metrics["headline"]["toy_tokens"]
    assert len(metrics[TOY]["first_expert_share"]) == len(metrics["routing_stats"]["moe_layers"])
    toy_finding = next(f for f in first.findings if f.startswith("Toy analysis:"))
    assert toy_finding in metrics["findings"] and "toy warning: a test registered this analysis" in first.warnings
    html = TOY_OUTPUTS["report"]
    assert "<h2>Toy analysis</h2>" in html and "id='item-toy_figure'" in html
    learned = html[html.index("<h2>What we learned</h2>"):html.index("<h2>Summary</h2>")]
    assert "href='#item-toy_figure'" in learned  # the finding links its figure by key, not by its wording
    summary = TOY_OUTPUTS["summary"]
    assert "Toy analysis: expert 0 is first" in summary and "toy warning" in summary
    if shutil.which("chromium") or os.environ.get("CI"):
        assert (run_dir / "figures" / "toy_figure.png").is_file()
    from viz.wandb_logger import read_offline_run

    logged = read_offline_run(first.wandb_dir)
    assert any(k.startswith("tables/toy") for h in logged["history"] for k in h)
    assert "toy_tokens" in json.dumps(logged["summary"], default=str)
    assert TOY not in {s.name for s in registered()}  # unregistered after the run: the second run did not have it
    assert TOY not in load_metrics(second.metrics.parent)


def test_wandb_offline_run_holds_what_was_logged(micro_run):
    from viz.wandb_logger import read_offline_run

    _, first, _, _, _ = micro_run
    assert first.wandb_dir is not None and first.wandb_dir.exists()
    logged = read_offline_run(first.wandb_dir)
    text = json.dumps(logged, default=str)
    assert "tokens" in text and "figures/utilization" in text
    # a dashboard, not an archive: checkpoints as W&B steps, results as tables, runs grouped by model
    metrics = json.loads(first.metrics.read_text())
    steps = [c["step"] for c in metrics["checkpoints"]]
    series = [h for h in logged["history"] if "training/saturation_mean" in h]
    assert [h["_step"] for h in series] == steps and len(steps) >= 3
    assert series[-1]["training/saturation_mean"] == pytest.approx(1.0)  # the final checkpoint against itself
    assert all(f"training/utilization_entropy_norm/L{l}" in series[0] for l in metrics["routing_stats"]["moe_layers"])
    fields = {k: v for h in logged["history"] for k, v in h.items() if k.startswith("tables/")}  # W&B nests a table's fields
    kinds = {k.rsplit("/", 1)[0]: v for k, v in fields.items() if k.endswith("/_type")}
    assert {"tables/expert_utilization", "tables/domain_expert_share", "tables/ablation", "tables/vocabulary",
            "tables/pruning"} <= set(kinds)
    assert set(kinds.values()) == {"table-file"} and all(fields[f"{name}/nrows"] > 0 for name in kinds)
    assert logged["group"] == logged["config"]["model"] and f"MoE routing report: {logged['group']}" in first.report.read_text()
    assert logged["config"]["datasets"] == metrics["datasets"] and logged["config"]["checkpoints"] == [c["name"] for c in metrics["checkpoints"]]
    [artifact] = [a for a in logged["artifacts"] if a["type"] == "report"]  # (W&B stores each table as one too)
    assert {"report.html", "metrics.json", "arrays.safetensors"} <= set(artifact["files"])


def test_second_run_reuses_every_cache(micro_run):
    root, first, second, manifests, _ = micro_run
    assert manifests, "the first run wrote no cache"
    for path, mtime in manifests.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten by the second run"
    assert second.headline["tokens"] == first.headline["tokens"]
    assert second.headline["saturation"] == first.headline["saturation"]


def test_cached_run_reads_every_shard_exactly_once(micro_run):
    """All routing analyses share one pass: each shard of every cache is read (and its checksum checked) once."""
    root, _, second, _, reads = micro_run
    shards = {(RoutingCache.open(m.parent).dir, i)
              for m in (root / "results" / "cache").rglob("manifest.json")
              for i in range(RoutingCache.open(m.parent).num_shards)}
    assert len(shards) > 9, "expected several shards per cache"
    assert {(d, i) for d, i, _ in reads} == shards, "every shard of every cache is analysed"
    assert all(n == 1 for n in reads.values()), f"shards read more than once: {[k for k, n in reads.items() if n > 1]}"
    assert all(verify for _, _, verify in reads), "each shard's checksum is verified on its one read"
    timings = json.loads(second.metrics.read_text())["timings_s"]
    assert timings["reading"] > 0 and "routing_stats" in timings  # the one pass says what it spent reading


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("CI"), reason="Debian chromium not installed")
def test_report_draws_in_a_real_browser(micro_run, browser):
    from viz.browser_check import check_page

    root, first, _, _, _ = micro_run
    result, (text,) = check_page(first.report, evaluate=[ROUTED_TEXT_JS], browser=browser)
    assert result.ok, result
    assert result.figures_total >= 15
    text = json.loads(text)  # the coloured text: the run's documents decoded, recoloured by the layer menu, hovered
    assert text["docs"] >= 2 and text["tokens"] > 20 and text["layers"] >= 2
    assert text["first"] != text["second"] and "expert" in text["tip"] and "layer" in text["tip"]


# The micro run's coloured text: documents and tokens drawn, the colours at two layers, one token's hover.
ROUTED_TEXT_JS = """(() => {
  const root = document.getElementById('routed-text');
  const spans = Array.from(root.querySelectorAll('.rt-tok')), sel = root.querySelector('.rt-layer');
  const colours = () => spans.map(s => getComputedStyle(s).backgroundColor).join(';');
  const first = colours();
  sel.value = String(sel.options.length - 1); sel.dispatchEvent(new Event('change'));
  spans[3].dispatchEvent(new MouseEvent('mouseover', {bubbles: true, clientX: 5, clientY: 5}));
  return JSON.stringify({docs: root.querySelectorAll('.rt-doc').length, tokens: spans.length, layers: sel.options.length,
                         first: first, second: colours(), tip: root.querySelector('.rt-tip').textContent});
})()"""


def test_options_from_yaml_with_cli_override(tmp_path):
    cfg = tmp_path / "study.yaml"
    cfg.write_text("model: allenai/OLMoE-1B-7B-0924\ndatasets: [fineweb, gsm8k]\nmax_tokens: 1000\ndevice: cuda\n")
    opts = parse_options(["--config", str(cfg), "--max-tokens", "5000", "--datasets", "gsm8k,humaneval"])
    assert opts.model.name == "allenai/OLMoE-1B-7B-0924" and opts.model.device == "cuda"
    assert opts.data.max_tokens == 5000 and opts.data.datasets == ["gsm8k", "humaneval"]
    cfg.write_text("modle: typo\n")
    with pytest.raises(OptionsError, match="unknown options \\['modle'\\]"):
        parse_options(["--config", str(cfg)])


def test_bad_inputs_get_one_line_errors(tmp_path, capsys):
    assert main(["--model", "allenai/OLMoE-1B-7B-0924", "--results-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: could not fetch") and "'allenai/OLMoE-1B-7B-0924'" in err and "\n" not in err
    assert main(["--micro", "--datasets", "nosuchdata", "--results-dir", str(tmp_path), "--models-dir", str(tmp_path / "m"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nosuchdata" in err and "wikitext2" in err
    assert not (tmp_path / "m").exists()  # found before the embedded model is trained


def test_summary_markdown_escapes_text_from_the_data(tmp_path):
    from core.pipeline.summary import RunSummary, summary_markdown

    s = RunSummary(run_dir=tmp_path, report=tmp_path / "report.html", metrics=tmp_path / "metrics.json", headline={},
                   findings=["dataset <b>x</b> and *y* in [z](u)"], warnings=["a|b"], seconds=1.0, training_data="_docs_")
    text = summary_markdown(s, "org/model_name")
    assert "- dataset \\<b\\>x\\</b\\> and \\*y\\* in \\[z\\](u)" in text and "- a\\|b" in text
    assert "# Routing analysis of org/model\\_name" in text and "Data the model saw: \\_docs\\_" in text
    assert "[report.html](report.html)" in text  # the toolkit's own links stay links


def test_a_rank_whose_peer_stops_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    import torch.distributed as dist

    def peer_gone(self):
        raise dist.DistBackendError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500\nmore")

    monkeypatch.setattr(BasicRoutingAnalysis, "run", peer_gone)
    monkeypatch.setenv("RANK", "1")
    assert main(["--micro", "--results-dir", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: rank 1: another process of this torchrun stopped answering") and "\n" not in err
    assert "Connection closed by peer" in err and "run the same command again" in err


SCRIPTS = sorted(p.name for p in (REPO / "exp").glob("*.py") if p.name != "__init__.py")


def test_the_main_script_has_help_from_a_fresh_interpreter():
    """As a person runs it: a new Python, the file's path."""
    out = subprocess.run([sys.executable, str(REPO / "exp" / "basic_routing_analysis.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help(script, capsys, monkeypatch):
    """Every file in exp/, run as __main__ with --help (in this process: a new interpreter per script cost 2.4 s each)."""
    import runpy

    monkeypatch.setattr(sys, "argv", [str(REPO / "exp" / script), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "exp" / script), run_name="__main__")
    assert done.value.code in (0, None), capsys.readouterr().err
    assert "usage" in capsys.readouterr().out.lower()


def _tiny_olmoe_folder(root: Path, folder: Path) -> Path:
    """A tiny random OLMoE saved with the embedded micro model's tokenizer: a Hugging Face MoE in a local folder."""
    from transformers import AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

    tok = AutoTokenizer.from_pretrained(root / "models" / "study-moe-micro")
    cfg = OlmoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None)
    OlmoeForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_hugging_face_moe_from_a_local_directory_and_through_a_simulated_ndif_request(micro_run, tmp_path):
    """The path a researcher takes with OLMoE, on a tiny random OLMoE saved with the embedded tokenizer; with
    --remote local, collection and ablation go through nnsight's simulation of an NDIF request: the same study."""
    model_dir = _tiny_olmoe_folder(micro_run[0], tmp_path / "tiny-olmoe")
    kw = dict(model_name=str(model_dir), micro=True, offline=True, static="none", progress=False, resamples=20)
    summary = BasicRoutingAnalysis(results_dir=str(tmp_path / "here"), **kw).run()
    metrics = json.loads(summary.metrics.read_text())
    assert metrics["model"]["family"] == "olmoe" and metrics["model"]["moe_layers"] == [0, 1]
    assert "checkpoint_dynamics" in metrics["skipped"] and "ablation" in metrics and "expert_alignment" in metrics
    assert summary.report.exists()
    sim = BasicRoutingAnalysis(results_dir=str(tmp_path / "sim"), remote="local", **kw).run()
    a, b = (_json_metrics(s.metrics) for s in (summary, sim))
    assert a["headline"] == b["headline"] and a["ablation"] == b["ablation"]


def test_retrained_local_weights_get_new_caches(tmp_path):
    """Caches are filed under the weights' digest, so a retrained local model never reads stale routing."""
    from core.pipeline.targets import weights_digest

    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 1000)
    first = weights_digest(tmp_path)
    assert weights_digest(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")
    assert weights_digest(tmp_path) != first
    big = weights_digest(tmp_path, whole_file_limit=10)  # large files: size, head and tail
    assert len(big) == 12 and big != first
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_digest(tmp_path / "nowhere")


def test_unreachable_checkpoint_listing_is_one_line(tmp_path, capsys):
    assert main(["--model", "allenai/OLMoE-1B-7B-0924", "--checkpoints", "auto", "--results-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "allenai/OLMoE-1B-7B-0924" in err and "\n" not in err


def test_checkpoint_and_revision_names_are_checked(micro_run, tmp_path, capsys):
    """A checkpoint or revision that does not exist is a one-line error naming what does, never a silent fallback."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from core.pipeline.targets import resolve_model

    root, _, _, _, _ = micro_run
    run_dir = root / "models" / "study-moe-micro"
    base = ["--micro", "--models-dir", str(root / "models"), "--results-dir", str(tmp_path), "--no-progress"]
    assert main(base + ["--checkpoints", "step-999999"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint step-999999" in err and "step-000000" in err
    names = [c.name for c in resolve_model(parse_options(base + ["--checkpoints", "step-000000"]), run_dir).checkpoints]
    assert names[0] == "step-000000" and len(names) == 2  # the named one, and the final one to compare against
    plain = tmp_path / "plain-olmoe"
    OlmoeForCausalLM(OlmoeConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)).save_pretrained(plain)
    capsys.readouterr()  # saving printed a progress bar
    for flag in (["--checkpoints", "nosuchrev"], ["--revision", "nosuchrev"]):
        assert main(["--model", str(plain), "--results-dir", str(tmp_path), "--no-progress"] + flag) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "plain model directory" in err, err


@pytest.mark.parametrize("flags, says", [
    (["--batch-size", "0"], "batch-size must be a whole number of at least 1"),
    (["--max-checkpoints", "-1"], "max-checkpoints"),
    (["--max-tokens", "0"], "max-tokens"),
    (["--dtype", "float8"], "dtype must be one of"),
    (["--device", "gpu0"], "device must be cpu, cuda"),
    (["--resamples", "-5"], "resamples must be 0 or more"),
    (["--pruning-fractions", "0.25,1.5"], "pruning-fractions must be shares between 0 and 1"),
    (["--pruning-fractions", "half"], "pruning-fractions must be a number, not 'half'"),
    (["--batch-size", "four"], "batch-size must be a whole number, not 'four'"),
    (["--pruning-tokens", "0"], "pruning-tokens must be a whole number of at least 1"),
])
def test_bad_option_values_are_one_line_errors(tmp_path, capsys, flags, says):
    assert main(["--results-dir", str(tmp_path), "--no-progress"] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err


def test_missing_device_and_unwritable_folders_are_found_before_any_work(tmp_path, capsys):
    import torch

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["--results-dir", str(blocker / "results"), "--models-dir", str(tmp_path / "m"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write to" in err and not (tmp_path / "m").exists()
    if not torch.cuda.is_available():
        assert main(["--device", "cuda", "--results-dir", str(tmp_path), "--models-dir", str(tmp_path / "m"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "CUDA device" in err and not (tmp_path / "m").exists()


def test_ctrl_c_exits_130_and_the_rerun_resumes(micro_run, tmp_path, monkeypatch, capsys):
    from core.store.cache import RoutingCache, RoutingCacheWriter

    root, _, _, _, _ = micro_run
    args = ["--micro", "--models-dir", str(root / "models"), "--results-dir", str(tmp_path), "--no-progress",
            "--no-ablation", "--no-collaboration", "--static", "none", "--max-checkpoints", "2"]
    real = RoutingCacheWriter.write_shard
    shards = []

    def interrupted(self, *a, **k):
        if len(shards) == 3:
            raise KeyboardInterrupt
        shards.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(RoutingCacheWriter, "write_shard", interrupted)
    assert main(args) == 130
    assert "interrupted" in capsys.readouterr().err
    manifests = list((tmp_path / "cache").rglob("manifest.json"))
    assert manifests
    for m in manifests:  # every cache on disk is valid: complete, or incomplete and resumable
        RoutingCache.open(m.parent, allow_incomplete=True)
    monkeypatch.setattr(RoutingCacheWriter, "write_shard", real)
    assert main(args) == 0


def _torchrun_micro(root: Path, results: Path) -> tuple[list[str], dict[str, str]]:
    """The micro study with 2 CPU processes under torchrun (gloo), on the fixture's embedded model, and its environment."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "exp" / "basic_routing_analysis.py"), "--micro", "--static", "none", "--no-progress",
           "--results-dir", str(results), "--models-dir", str(root / "models"), "--run-name", "micro"]
    return cmd, {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


ONE_PASS_RESULTS = ("routing_stats", "routing_stats_by_dataset", "correlation_topk", "correlation_probs",
                    "correlation_by_dataset", "coactivation", "routing_paths", "domain_specialization",
                    "dataset_specialization", "vocabulary_specialization", "routing_consistency", "collaboration")


def test_torchrun_splits_one_cache_over_ranks(micro_run, tmp_path):
    """One checkpoint and one dataset with 2 processes: both trace shards of the one cache, which equals one process's."""
    root, _, _, _, _ = micro_run
    results = tmp_path / "results"
    cmd, env = _torchrun_micro(root, results)
    # the cache and the one pass are what the ranks share: ablation, pruning and generated text are left out (both runs)
    only = ["--checkpoints", "step-000040", "--datasets", "wikitext2", "--no-ablation", "--no-pruning", "--generate-tokens", "0"]
    out = subprocess.run(cmd + only, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    [manifest] = (results / "cache").rglob("manifest.json")
    shards = json.loads(manifest.read_text())["shards"]
    assert {(s["written_by"]["rank"], s["written_by"]["world_size"]) for s in shards} == {(0, 2), (1, 2)}
    alone = tmp_path / "alone"  # one process collects the same cache afresh
    one = BasicRoutingAnalysis(micro=True, static="none", progress=False, results_dir=str(alone), checkpoints=["step-000040"],
                               datasets=["wikitext2"], ablation=False, pruning=False, generate_tokens=0,
                               models_dir=str(root / "models"), run_name="one").run()
    twin = alone / manifest.relative_to(results)
    same = lambda ss: [(s["first_row"], s["num_rows"], s["num_tokens"], s["bytes"], s["sha256"]) for s in ss]  # noqa: E731
    assert same(shards) == same(json.loads(twin.read_text())["shards"])  # byte for byte the shards one process wrote
    split = _json_metrics(results / "micro" / "metrics.json")
    assert _json_metrics(one.metrics)["headline"] == split["headline"]
    assert split["processes"]["world_size"] == 2


def test_remote_ndif_needs_its_key_and_a_hub_name(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    assert main(["--model", "allenai/OLMoE-1B-7B-0924", "--remote", "ndif", "--results-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "NDIF_API_KEY" in err and "\n" not in err
    assert main(["--remote", "ndif", "--results-dir", str(tmp_path), "--no-progress"]) == 2
    assert "Hub name" in capsys.readouterr().err


def test_a_run_without_the_weights_skips_weight_analyses_and_reports(micro_run, tmp_path, monkeypatch):
    """What --remote ndif leaves out (the weights stay on NDIF): the weight analyses say so, the rest is reported."""
    import core.pipeline.targets as collection

    root, _, _, _, _ = micro_run
    real = collection.sweep_checkpoints
    monkeypatch.setattr(collection, "sweep_checkpoints", lambda *a, **k: real(*a, **{**k, "router_weights": False}))
    summary = BasicRoutingAnalysis(micro=True, static="none", progress=False, ablation=False, resamples=20,
                                   results_dir=str(tmp_path), models_dir=str(root / "models")).run()
    metrics = json.loads(summary.metrics.read_text())
    for name in ("router_similarity", "router_subspaces", "expert_alignment", "router_drift"):
        assert "NDIF" in metrics["skipped"][name] and name not in metrics
    assert summary.report.exists() and "routing_stats" in metrics


def _rank_pids(parent: int) -> dict[int, int]:
    """``{rank: pid}`` of torchrun's workers (read from each child process's environment)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env and "TORCHELASTIC_RUN_ID" in env and int(stat[1]) in {parent, *out.values()}:
            out[int(env["RANK"])] = int(proc.name)
    return out


def _kill_rank_one_after_its_first_shard(cmd: list[str], env: dict[str, str], results: Path) -> None:
    """Start the torchrun study and SIGKILL rank 1 as soon as a manifest names a shard it wrote; torchrun then stops."""
    import signal
    import time as _time

    run = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = _time.time() + 300
    killed = False
    while not killed and run.poll() is None and _time.time() < deadline:
        for m in (results / "cache").rglob("manifest.json") if (results / "cache").exists() else []:
            try:
                shards = json.loads(m.read_text())["shards"]
            except (OSError, ValueError):
                continue
            if any(s["written_by"]["rank"] == 1 for s in shards):
                pid = _rank_pids(run.pid).get(1)
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed = True
                break
        _time.sleep(0.02)
    err = run.communicate(timeout=300)[1]
    assert killed and run.returncode != 0, err[-2000:]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' processes through /proc")
def test_torchrun_resumes_a_killed_rank_and_its_ranks_share_the_study_of_one_process(micro_run, tmp_path):
    """2 CPU processes (gloo). SIGKILL rank 1 after its first shard: the same command finishes only what is missing.

    The finished run's ranks each wrote and analysed a share, and rank 0's results equal the one-process run's.
    (One torchrun run killed and resumed serves both guarantees: two runs cost 20 s each on 2 cores.)
    """
    root, first, _, _, _ = micro_run
    results = tmp_path / "results"
    cmd, env = _torchrun_micro(root, results)
    _kill_rank_one_after_its_first_shard(cmd, env, results)
    done = {}
    for m in (results / "cache").rglob("manifest.json"):
        body = json.loads(m.read_text())
        done[m] = (body["complete"], m.stat().st_mtime_ns)
    alone = load_metrics(first.metrics)
    expected = len(alone["checkpoints"]) * len(alone["datasets"])
    assert sum(c for c, _ in done.values()) < expected, "the run finished before rank 1 was killed"
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    for m, (complete, stamp) in done.items():
        if complete:
            assert m.stat().st_mtime_ns == stamp, f"{m} was complete and got rewritten"
    _ranks_share_the_study_of_one_process(results, alone, root)


def _ranks_share_the_study_of_one_process(results: Path, alone: dict, root: Path) -> None:
    """Both ranks collected and analysed a share; every analysis of the one pass equals one process's; a lost cache
    is collected again by one process, alone."""
    metrics = load_metrics(results / "micro" / "metrics.json")
    headline = to_jsonable(metrics["headline"])
    assert headline == to_jsonable(alone["headline"])
    assert metrics["processes"]["world_size"] == 2 and min(metrics["processes"]["tokens_per_process"]) > 0
    assert sum(metrics["processes"]["tokens_per_process"]) == sum(alone["processes"]["tokens_per_process"])
    for name in ONE_PASS_RESULTS:
        assert_same(metrics[name], alone[name], name)
    manifests = sorted((results / "cache").rglob("manifest.json"))
    writers = {m: {(s["written_by"]["rank"], s["written_by"]["world_size"]) for s in json.loads(m.read_text())["shards"]}
               for m in manifests}
    assert set().union(*writers.values()) == {(0, 2), (1, 2)}  # both ranks wrote, and the manifests say so
    # a cache lost (its folder gone): one process then collects only that one, and reuses the rest. (Removing only
    # its manifest leaves shards no record names, which the toolkit refuses to overwrite: tests/test_hostile_files.py)
    lost = next(m for m, w in writers.items() if (1, 2) in w)
    shutil.rmtree(lost.parent)
    stamps = {m: m.stat().st_mtime_ns for m in manifests if m != lost}
    again = BasicRoutingAnalysis(micro=True, static="none", progress=False, results_dir=str(results),
                                 models_dir=str(root / "models"), run_name="again").run()
    assert all(m.stat().st_mtime_ns == t for m, t in stamps.items())
    assert {s["written_by"]["world_size"] for s in json.loads(lost.read_text())["shards"]} == {1}
    assert _json_metrics(again.metrics)["headline"] == headline
