"""Options by stage: the command line and YAML are made from the dataclasses, and the collection stage is a cache's identity."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from core.pipeline.options import (STAGES, CollectionOptions, OptionsError, RunOptions, build_parser, load_yaml, make_options,
                                   option_table, parse_options)

REPO = Path(__file__).resolve().parents[1]


def test_every_option_field_has_a_flag_and_help():
    help_text = build_parser().format_help()
    for key, (stage, f, _) in option_table().items():
        flag = ("--no-" if f.default is True else "--") + key.replace("_", "-")
        assert flag in help_text, flag
        assert f.metadata.get("help"), key
    assert len(option_table()) == sum(len(fields(c)) for c in STAGES.values()) + 2  # + seed, micro


def test_nested_and_flat_yaml_give_the_same_options(tmp_path):
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("model: allenai/OLMoE-1B-7B-0924\nmax_tokens: 1000\nbatch_size: 4\n")
    nested.write_text("model: {model: allenai/OLMoE-1B-7B-0924}\ndata: {max_tokens: 1000}\ncollection: {batch_size: 4}\n")
    a, b = parse_options(["--config", str(flat)]), parse_options(["--config", str(nested)])
    assert a == b and a.model.name == "allenai/OLMoE-1B-7B-0924" and a.data.max_tokens == 1000 and a.collection.batch_size == 4


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        parse_options(["--micro", "--max-tokens", "777", "--no-ablation", "--print-config"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text)["data"]["max_tokens"] == 777
    cfg = tmp_path / "printed.yaml"
    cfg.write_text(text)
    assert parse_options(["--config", str(cfg)]) == parse_options(["--micro", "--max-tokens", "777", "--no-ablation"])


def test_every_config_of_the_repository_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name.startswith("train_"):
            continue  # the toolkit's own MoE: core.study_moe.config reads those
        opts = make_options(**load_yaml(path))
        assert isinstance(opts, RunOptions), path


def test_the_seed_keywords_still_work():
    opts = make_options(model="allenai/OLMoE-1B-7B-0924", wandb=True, wandb_project="p", max_tokens="500", datasets="a,b")
    assert (opts.model.name, opts.output.wandb, opts.output.wandb_project) == ("allenai/OLMoE-1B-7B-0924", True, "p")
    assert opts.data.max_tokens == 500 and opts.data.datasets == ["a", "b"]


@pytest.mark.parametrize("bad, message", [
    ({"batch_size": "four"}, "batch-size must be a whole number, not 'four'"),
    ({"shard_tokens": "many"}, "shard-tokens must be a whole number"),
    ({"resamples": "lots"}, "resamples must be a whole number"),
    ({"seed": "abc"}, "seed must be a whole number"),
    ({"ablation": "no"}, "ablation must be true or false, not 'no'"),
    ({"pruning_fractions": "a,b"}, "pruning-fractions must be a number"),
    ({"storage": "tiny"}, "storage must be one of full, compact"),
    ({"max_tokens": 0}, "max-tokens must be a whole number of at least 1"),
])
def test_wrong_values_are_one_line_errors_before_any_work(bad, message):
    with pytest.raises(OptionsError, match=message):
        make_options(micro=True, **bad)


def test_the_collection_stage_is_exactly_what_a_cache_records(tmp_path):
    """The settings in a cache's manifest are the collection options, field for field (other settings: other caches)."""
    from core.collection.collector import ActivationCollector
    from tests.fakes import FakeWrapper, make_rows

    opts = CollectionOptions(batch_size=3, storage="compact", shard_tokens=32, logits_dtype="float32", hidden_layers=[])
    settings = opts.settings()
    assert set(settings) == {"batch_size", "storage", "shard_tokens", "dtype", "hidden_layers"}
    assert len(settings) == len(fields(CollectionOptions))
    cache = ActivationCollector(FakeWrapper()).collect(make_rows(), tmp_path / "c", **settings)
    recorded = json.loads((cache.dir / "manifest.json").read_text())["settings"]
    assert {k: recorded[k] for k in settings} == settings
