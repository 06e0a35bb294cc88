"""Hostile and careless config values and model inputs (issue 28): a one-line error before any work, or a correct result.

Every command runs inside a :class:`tests.canary.CanaryTree`: an error found before any work must
leave the tree exactly as it was (nothing owned), and a run may write only its results folder.
The trained micro model is shared by the module; errors before work take milliseconds.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from core.array_files import load_metrics
from core.commands.basic_routing_analysis import main
from core.pipeline.options import OptionsError, _base, _item_type, make_options, option_table
from core.store.identity import weights_digest
from tests.canary import CanaryTree
from tests.shared_runs import micro_models_copy

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--micro", "--static", "none", "--no-progress", "--resamples", "0", "--datasets", "gsm8k", "--max-checkpoints", "2"]


@pytest.fixture(scope="module")
def micro_models(tmp_path_factory) -> Path:
    """A models folder holding the trained embedded micro model (a copy of the session's one training)."""
    return micro_models_copy(tmp_path_factory, tmp_path_factory.mktemp("hostile") / "models")


@pytest.fixture(autouse=True)
def loading_bars_on():
    """transformers' bars start on, as for a user: with --no-progress the command itself must keep its stderr to one line."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the command; it must exit 2 with exactly one line on stderr and no traceback. Returns that line.

    Python warnings count as stderr lines too (pytest would otherwise hide them from capsys).
    """
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert not caught, [str(w.message) for w in caught]
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def untouched(root: Path) -> CanaryTree:
    """A canary tree where the command owns nothing: an error before any work must leave it exactly as it was."""
    return CanaryTree(root, owned=[])


def dirs(root: Path, models: Path | None = None) -> list[str]:
    return ["--results-dir", str(root / "results"), "--models-dir", str(models or root / "models")]


# ================================================================== config values
@pytest.mark.parametrize("yaml_text, says", [
    ('ablation: "no"', "ablation must be true or false, not 'no'"),
    ("ablation: 0", "ablation must be true or false, not 0"),
    ('batch_size: "four"', "batch-size must be a whole number, not 'four'"),
    ('shard_tokens: "many"', "shard-tokens must be a whole number, not 'many'"),
    ('resamples: "lots"', "resamples must be a whole number, not 'lots'"),
    ('seed: "abc"', "seed must be a whole number, not 'abc'"),
    ("seed: -1", "seed must be 0 or more, not -1"),
    ("max_tokens: 1.5", "max-tokens must be a whole number, not 1.5"),
    ("resamples: -5", "resamples must be 0 or more, not -5"),
    ('pruning_fractions: [0.5, "half"]', "pruning-fractions must be a number, not 'half'"),
    ("hidden_layers: [-1]", "hidden-layers must be 0 or more, not -1"),
    ("storage: 3", "storage must be one of full, compact, not '3'"),
    ("static: [png]", "static must be a name or text, not ['png']"),
    ("device: yes", "device must be a name or text, not True"),
    ("model: [a, b]", "model must be a name or text, not ['a', 'b']"),
    ("datasets: [[gsm8k]]", "datasets must be a name or text, not ['gsm8k']"),
    ("datasets: {gsm8k: 1}", "datasets must be a list or comma-separated values"),
    ("datasets: [gsm8k, gsm8k]", "datasets repeat: gsm8k, gsm8k"),
    ("nosuch_option: 1", "unknown options ['nosuch_option']"),
    ("analysis: 5", "analysis must hold a mapping of option: value"),
])
def test_a_wrong_value_in_a_config_file_is_one_line_before_any_work(tmp_path, capsys, yaml_text, says):
    cfg = tmp_path / "study.yaml"
    cfg.write_text("micro: true\n" + yaml_text + "\n")
    tree = untouched(tmp_path)
    err = one_line_error(capsys, ["--config", str(cfg), "--no-progress"] + dirs(tmp_path))
    assert says in err, err
    tree.check()


@pytest.mark.parametrize("flags, says", [
    (["--seed", "abc"], "seed must be a whole number, not 'abc'"),
    (["--layers", "0", "--model", "random:olmoe-1b-7b"], "layers must be a whole number of at least 1, not 0"),
    (["--hidden-layers", "1,x"], "hidden-layers must be a whole number, not 'x'"),
    (["--datasets", "gsm8k,gsm8k"], "datasets repeat"),
])
def test_a_wrong_value_on_the_command_line_is_one_line_before_any_work(tmp_path, capsys, flags, says):
    tree = untouched(tmp_path)
    assert says in one_line_error(capsys, ["--micro", "--no-progress"] + dirs(tmp_path) + flags)
    tree.check()


def test_every_declared_option_refuses_a_value_of_the_wrong_type():
    """The check is driven by the declarations: an option is type-checked because it is declared.

    A mapping is no option's type, so every kind (text, number, flag, list) must refuse it by name.
    """
    for key in option_table():
        with pytest.raises(OptionsError, match=f"^{key.replace('_', '-')} must be"):
            make_options(**{key: {"a": 1}})


def test_every_whole_number_option_declares_its_lowest_value_and_is_held_to_it():
    """A new whole-number option must say its lowest value (``opt(..., low=)``); below it is a one-line error."""
    for key, (_, f, tp) in option_table().items():
        base, _ = _base(tp)
        item = _item_type(tp) if base is list else base
        if item is not int:
            continue
        low = f.metadata.get("low")
        assert low is not None, f"{key} declares no lowest value"
        extra = {"model": "random:olmoe-1b-7b"} if key == "layers" else {}
        with pytest.raises(OptionsError, match=f"^{key.replace('_', '-')} must be .*not {low - 1}$"):
            make_options(**extra, **{key: [low - 1] if base is list else low - 1})


def test_yaml_booleans_are_booleans_and_are_recorded_as_such(tmp_path, capsys, micro_models):
    """ablation: false in YAML skips the ablation and metrics.json records false (not the string "no")."""
    cfg = tmp_path / "study.yaml"
    cfg.write_text("micro: true\nanalysis: {ablation: false, pruning: false, collaboration: false}\n")
    tree = CanaryTree(tmp_path, owned=["results"])
    assert main(["--config", str(cfg), "--run-name", "booleans"] + QUICK + dirs(tmp_path, micro_models)) == 0
    tree.check()
    metrics = load_metrics(tmp_path / "results" / "booleans")
    assert metrics["options"]["analysis"]["ablation"] is False and "ablation" in metrics["skipped"]
    assert "ablation" not in metrics and metrics["options"]["seed"] == 0


def test_hidden_layers_beyond_the_model_are_one_line_before_any_data(tmp_path, capsys, micro_models):
    tree = CanaryTree(tmp_path, owned=["results"])
    err = one_line_error(capsys, QUICK + dirs(tmp_path, micro_models) + ["--hidden-layers", "0,7"])
    assert "--hidden-layers 7: the model has 2 decoder layers (0 to 1)" in err, err
    tree.check()
    assert not list((tmp_path / "results").glob("*/manifest.json")) and not (tmp_path / "results" / "cache" / "embedded").exists()


# ================================================================== model inputs
def test_a_folder_that_is_no_model_is_one_line_before_any_work(tmp_path, capsys):
    empty, no_weights, a_file = tmp_path / "empty", tmp_path / "no-weights", tmp_path / "weights.safetensors"
    empty.mkdir()
    no_weights.mkdir()
    (no_weights / "config.json").write_text('{"model_type": "olmoe"}')
    a_file.write_bytes(b"\x00" * 16)
    tree = untouched(tmp_path)
    cases = [(empty, "has no config.json: not a model folder"), (no_weights, "has a config.json but no weights"),
             (a_file, "is a file, not a model folder"), (tmp_path / "nowhere" / "model", "no such folder")]
    for folder, says in cases:
        err = one_line_error(capsys, ["--model", str(folder)] + QUICK + dirs(tmp_path))
        assert says in err and str(folder) in err, err
    tree.check()


def test_a_random_model_of_an_unknown_shape_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tree = untouched(tmp_path)
    err = one_line_error(capsys, ["--model", "random:nobody/no-such-moe"] + QUICK + dirs(tmp_path))
    assert "--model random:nobody/no-such-moe: no shape for 'nobody/no-such-moe'" in err, err
    err = one_line_error(capsys, ["--model", "random:olmoe-1b-7b", "--layers", "99"] + QUICK + dirs(tmp_path))
    assert "layers must be a whole number from 1 to 16" in err, err
    err = one_line_error(capsys, ["--model", "random:olmoe-1b-7b", "--revision", "main"] + QUICK + dirs(tmp_path))
    assert "has one set of random weights: it has no revisions" in err, err
    tree.check()
    assert not (tmp_path / "models" / "random").exists()


class _Payload:
    """A pickle that would create a file when unpickled: loading must refuse it, never run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_with_code_are_refused_in_one_line(tmp_path, capsys):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    folder, marker = tmp_path / "pickled", tmp_path / "payload-ran"
    cfg = OlmoeConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    cfg.save_pretrained(folder)
    state = dict(OlmoeForCausalLM(cfg).state_dict(), payload=_Payload(marker))
    torch.save(state, folder / "pytorch_model.bin")
    tree = CanaryTree(tmp_path, owned=["results"])
    err = one_line_error(capsys, ["--model", str(folder)] + QUICK + dirs(tmp_path))
    assert "refused to open model" in err and "pickled weights" in err, err
    tree.check()
    assert not marker.exists(), "the pickle's code ran"


@pytest.fixture
def study_moe_unknown(monkeypatch):
    """transformers as a fresh process sees it: the ``study_moe`` type unregistered (training registered it in this one)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from core.study_moe.model import StudyMoeConfig

    monkeypatch.delitem(CONFIG_MAPPING._extra_content, "study_moe")
    monkeypatch.delitem(MODEL_FOR_CAUSAL_LM_MAPPING._extra_content, StudyMoeConfig)
    with pytest.raises(ValueError):  # the precondition holds, or the tests below would pass for nothing
        AutoConfig.for_model("study_moe")


def test_the_toolkits_own_model_opens_from_a_copied_folder(tmp_path, capsys, micro_models, study_moe_unknown):
    """A copy of the trained micro run elsewhere is a local training run; the model type is known in any folder."""
    copy = shutil.copytree(micro_models / "study-moe-micro", tmp_path / "elsewhere" / "my-copy")
    tree = CanaryTree(tmp_path, owned=["results"])
    assert main(["--model", str(copy), "--run-name", "copy"] + QUICK + dirs(tmp_path)) == 0
    tree.check()
    metrics = load_metrics(tmp_path / "results" / "copy")
    assert metrics["model"]["family"] == "study_moe" and metrics["model"]["final_checkpoint"] == "step-000040"
    assert [c["name"] for c in metrics["checkpoints"]] == ["step-000000", "step-000040"]
    assert "held-out" in metrics["model"]["training_data"]  # the copy keeps its record of the documents it read


def test_an_edited_config_of_a_copied_checkpoint_is_what_is_analysed(tmp_path, capsys, micro_models, study_moe_unknown):
    """One checkpoint copied out and its config.json edited (top-1 routing): the run studies the edited model."""
    folder = shutil.copytree(micro_models / "study-moe-micro" / "step-000040", tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "study_moe" and config["num_experts_per_tok"] == 2
    (folder / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 1}))
    tree = CanaryTree(tmp_path, owned=["results"])
    assert main(["--model", str(folder), "--run-name", "edited"] + QUICK + dirs(tmp_path)) == 0
    tree.check()
    metrics = load_metrics(tmp_path / "results" / "edited")
    assert metrics["model"]["family"] == "study_moe" and metrics["model"]["top_k"] == 1


def test_an_edited_top_config_of_a_training_run_is_refused_not_ignored(tmp_path, capsys, micro_models):
    """A run's checkpoints load from their own folders: an edit at the top would be silently ignored, so it is an error."""
    copy = shutil.copytree(micro_models / "study-moe-micro", tmp_path / "run-copy")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 1}))
    tree = untouched(tmp_path)
    err = one_line_error(capsys, ["--model", str(copy)] + QUICK + dirs(tmp_path))
    assert "differs from the final checkpoint's" in err and "step-000040" in err, err
    tree.check()


def test_revision_of_the_embedded_model_analyses_that_checkpoint(tmp_path, capsys, micro_models):
    """The embedded model has checkpoints: --revision step-000001 loads that one and the report says so."""
    tree = CanaryTree(tmp_path, owned=["results"])
    assert main(["--revision", "step-000001", "--run-name", "rev"] + QUICK + dirs(tmp_path, micro_models)) == 0
    tree.check()
    run = tmp_path / "results" / "rev"
    metrics = load_metrics(run)
    run_dir = micro_models / "study-moe-micro"
    assert metrics["model"]["final_checkpoint"] == "step-000001"
    assert [c["name"] for c in metrics["checkpoints"]] == ["step-000000", "step-000001"]
    assert metrics["model"]["weights_digest"] == weights_digest(run_dir / "step-000001") != weights_digest(run_dir)
    assert "<th>revision</th><td>step-000001</td>" in (run / "report.html").read_text().replace("\n", "")
    # the routing is the checkpoint's own: step 1's saturation against itself is 1 (it is the model analysed)
    assert list(metrics["headline"]["saturation"].values())[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("trained", [True, False])
def test_an_unknown_revision_of_the_embedded_model_is_one_line_before_any_work(tmp_path, capsys, micro_models, trained):
    """Known from the trained run's checkpoints, or from the training config's plan before training: nothing is trained."""
    models = micro_models if trained else tmp_path / "models"
    tree = untouched(tmp_path)
    err = one_line_error(capsys, ["--revision", "step-000003"] + QUICK + dirs(tmp_path, models))
    assert "--revision step-000003:" in err and "no checkpoint step-000003" in err and "step-000040" in err, err
    tree.check()
    assert trained or not (tmp_path / "models" / "study-moe-micro").exists()


def test_revision_on_models_without_revisions_is_one_line_before_any_work(tmp_path, capsys, micro_models):
    plain = shutil.copytree(micro_models / "study-moe-micro" / "step-000040", tmp_path / "plain")
    tree = untouched(tmp_path)
    err = one_line_error(capsys, ["--model", str(plain), "--revision", "step-000001"] + QUICK + dirs(tmp_path))
    assert "plain model directory with one set of weights and no revisions" in err, err
    err = one_line_error(capsys, ["--revision", "step-000001", "--checkpoints", "step-000040"] + QUICK
                         + dirs(tmp_path, micro_models))
    assert "come after --revision step-000001" in err, err
    tree.check()


# ------------------------------------------------------------------ an empty corpus says what happened
def _registry_with(name: str, texts: list[str]):
    """The default registry with ``name``'s documents replaced by ``texts`` (a dataset that gives nothing)."""
    import dataclasses

    from data.registry import default_registry

    reg = default_registry()
    reg[name] = dataclasses.replace(reg[name], parse=lambda rows: [(t, {}) for t in texts])
    return reg


@pytest.mark.parametrize("texts, says", [
    (["", "   ", "\n"], "dataset gsm8k (test split, bundled) gave no documents: all 3 of its documents are empty"),
    ([], "dataset gsm8k (test split, bundled) gave no documents: it holds none"),
])
def test_a_dataset_that_gives_no_documents_says_why(tmp_path, capsys, micro_models, monkeypatch, texts, says):
    import data.dataset_loader as loader_module

    monkeypatch.setattr(loader_module, "default_registry", lambda: _registry_with("gsm8k", texts))
    tree = CanaryTree(tmp_path, owned=["results"])
    err = one_line_error(capsys, QUICK + dirs(tmp_path, micro_models))
    assert says in err and "training corpus" not in err, err
    tree.check()


def test_a_dataset_wholly_in_the_training_corpus_says_so(micro_models):
    from data import DataError, DatasetLoader, text_digest
    from core.pipeline.targets import load_tokenized

    everything = DatasetLoader(offline=True).load("gsm8k")
    opts = make_options(micro=True, datasets=["gsm8k"])
    with pytest.raises(DataError) as e:
        load_tokenized(opts, None, exclude={text_digest(d.text) for d in everything})
    assert str(e.value).startswith(f"dataset gsm8k (test split, bundled) gave no documents to analyse: all {len(everything)} "
                                   "of its non-empty documents were in the model's training corpus")


def test_documents_that_give_no_tokens_say_which_dataset():
    from tokenizers import Regex, Tokenizer, models, normalizers

    from data import DataError
    from core.pipeline.targets import load_tokenized

    silent = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    silent.normalizer = normalizers.Replace(Regex(r"[\s\S]"), "")  # every character removed: no token at all
    opts = make_options(micro=True, datasets=["gsm8k"])
    with pytest.raises(DataError, match=r"^dataset gsm8k: 12 documents, but the tokenizer produced no tokens"):
        load_tokenized(opts, silent)


def test_a_negative_monitor_window_is_one_line_before_training(tmp_path, capsys):
    """--monitor-window -5 turned the routing monitor off without a word; it is refused before any training."""
    from core.commands import train_moe
    from core.paths import CONFIGS

    tree = CanaryTree(tmp_path, owned=["models"])
    code = train_moe.main(["--config", str(CONFIGS / "train_micro.yaml"), "--monitor-window", "-5",
                           "--models-dir", str(tmp_path / "models"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "error: --monitor-window must be 0 (off) or a number of batches, not -5", err
    assert not (tmp_path / "models" / "study-moe-micro").exists()
    tree.check()
