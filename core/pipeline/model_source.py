"""What ``--model`` and ``--revision`` name, checked before any work, and what the loaded model must allow.

Without these checks a folder with no weights failed as a traceback once the output folders were
made, an unknown ``random:`` shape likewise, and a revision of a model without revisions could be
ignored. Each is one line (an ``OptionsError``) before the first file is written. What only the
loaded model can say (how many decoder layers ``--hidden-layers`` may name) is checked right after
loading, before any data is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.collection.checkpoints import CheckpointError, list_local_checkpoints
from core.model_access.shapes import ShapeError, is_random_spec, shape_config
from core.pipeline.options import OptionsError, RunOptions

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")  # what the run's weights digest reads (core.store.identity.weights_digest)


def check_model_source(opts: RunOptions) -> None:
    """The model the options name exists and can be opened as asked; a one-line ``OptionsError`` otherwise."""
    m = opts.model
    if m.name is None:
        _check_embedded_revision(opts)
    elif is_random_spec(m.name):
        _check_random(opts)
    elif Path(m.name).expanduser().exists():
        _check_folder(Path(m.name).expanduser(), m.revision, m.checkpoints)
    elif _looks_like_path(str(m.name)):
        raise OptionsError(f"--model {m.name}: no such folder (and not a Hub name, which reads owner/name)")


def check_loaded_model(opts: RunOptions, wrapper: Any) -> None:
    """What only the loaded model can say: the decoder layers ``--hidden-layers`` names exist."""
    blocks = len(wrapper.model.layers)
    bad = [h for h in opts.collection.hidden_layers if h >= blocks]
    if bad:
        raise OptionsError(f"--hidden-layers {','.join(map(str, bad))}: the model has {blocks} decoder layers "
                           f"(0 to {blocks - 1})")


def has_weights(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in WEIGHT_PATTERNS)


def _looks_like_path(name: str) -> bool:
    """A name no Hub repository has (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x/``): meant as a folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/")


def _check_folder(folder: Path, revision: str | None, checkpoints: list[str]) -> None:
    """A local model: a training run (its revisions are checkpoints) or a plain folder (one set of weights)."""
    if not folder.is_dir():
        raise OptionsError(f"--model {folder} is a file, not a model folder (config.json and weights)")
    if (folder / "checkpoints.json").exists():
        _check_training_run(folder, revision)
        return
    if revision or checkpoints:
        what = f"--revision {revision}" if revision else f"--checkpoints {','.join(checkpoints)}"
        raise OptionsError(f"{what}: {folder} is a plain model directory with one set of weights and no revisions "
                           "(a training run folder has checkpoints.json; Hub models have branches)")
    _check_model_files(folder, f"--model {folder}")


def _check_model_files(folder: Path, what: str) -> None:
    if not (folder / "config.json").is_file():
        raise OptionsError(f"{what} has no config.json: not a model folder (a Hugging Face model folder holds "
                           "config.json and its weights)")
    if not has_weights(folder):
        raise OptionsError(f"{what} has a config.json but no weights (*.safetensors or *.bin)")


def _check_training_run(run: Path, revision: str | None) -> None:
    """A local training run: ``--revision`` names one of its checkpoints, and the model analysed has its files.

    The checkpoints are read from their own folders; a ``config.json`` at the top that no longer
    matches the final checkpoint's (edited by hand) would be silently ignored, so it is refused.
    """
    try:
        available = list_local_checkpoints(run)
    except CheckpointError as e:
        raise OptionsError(str(e)) from None
    by_name = {c.name: c for c in available}
    if revision and revision not in by_name:
        raise OptionsError(f"--revision {revision}: {run} has no checkpoint {revision}; it has {', '.join(by_name)}")
    analysed = by_name[revision] if revision else available[-1]
    _check_model_files(Path(analysed.path), f"checkpoint {analysed.name} of {run} ({analysed.path})")
    if not has_weights(run):
        raise OptionsError(f"--model {run} has no weights (*.safetensors or *.bin) at the top: the final model of a "
                           "training run is saved there")
    top, last = run / "config.json", Path(available[-1].path) / "config.json"
    if top.is_file() and last.is_file() and _json(top) != _json(last):
        raise OptionsError(f"{top} differs from the final checkpoint's {last}: a training run's checkpoints are read "
                           "from their own folders, so the edit would be ignored; copy the edited model to a folder "
                           "without checkpoints.json to study it")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OptionsError(f"{path} is not readable JSON ({e})") from None


def _check_random(opts: RunOptions) -> None:
    """``random:NAME``: a shape the toolkit can build, with one set of weights (no revisions)."""
    m = opts.model
    if m.revision or m.checkpoints:
        raise OptionsError(f"{m.name} has one set of random weights: it has no revisions or checkpoints")
    try:
        shape_config(m.name, m.layers)
    except ShapeError as e:
        raise OptionsError(f"--model {m.name}: {e}") from None


def _check_embedded_revision(opts: RunOptions) -> None:
    """``--revision`` on the embedded model names one of its checkpoints (the trained run's, else the config's plan)."""
    revision = opts.model.revision
    if not revision:
        return
    from core.pipeline.targets import embedded_config
    from core.study_moe.config import TrainConfig, checkpoint_steps, revision_name

    cfg = TrainConfig.from_yaml(embedded_config(opts))
    run = Path(opts.model.models_dir) / cfg.run_name
    if (run / "checkpoints.json").is_file():
        _check_training_run(run, revision)
        return
    names = [revision_name(s) for s in checkpoint_steps(cfg.steps, cfg.num_checkpoints, cfg.checkpoint_spacing)]
    if revision not in names:
        raise OptionsError(f"--revision {revision}: the embedded model has no checkpoint {revision}; "
                           f"it has {', '.join(names)}")
