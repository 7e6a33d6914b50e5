"""Load and run the bundle's configs: the one way code runs a pipeline.

The configs in ``bundles/covid19_ct_infection/configs`` declare every pipeline. The command line and the batch
runner read them here, with overrides (inputs, output folder, device, knobs), and never re-declare a pipeline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from covid_monai.errors import UsageError
from covid_monai.io import atomic_write_text

__all__ = [
    "TEMPLATE_BUNDLE",
    "bundle_config_files",
    "create_bundle",
    "load_config",
    "parse_overrides",
    "read_knobs",
    "resolve_device",
    "run_workflow",
    "validate_override_value",
]

TEMPLATE_BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "covid19_ct_infection"
"""The bundle template shipped with the project (configs and docs, no weights)."""

_MULTICLASS_CLASSES = "single channel: 0 background, 1 ground-glass opacity, 2 consolidation"
_MULTICLASS_OUTPUT = {
    "num_channels": 3,
    "channel_def": {"0": "background logit", "1": "ground-glass logit", "2": "consolidation logit (softmax: all 3)"},
}


def bundle_config_files(bundle_dir: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Paths of the named config files of a bundle, checking that each exists.

    Args:
        bundle_dir: the bundle folder (holding ``configs/``).
        names: config file names, e.g. ``["train.json", "evaluate.json"]`` (later ones override earlier ones).

    Returns:
        Absolute paths as strings, in the given order.

    Raises:
        FileNotFoundError: naming the bundle and the missing config.

    Example:
        >>> bundle_config_files(TEMPLATE_BUNDLE, ["inference.json"])  # doctest: +ELLIPSIS
        ['.../configs/inference.json']
    """
    configs = Path(bundle_dir) / "configs"
    paths = []
    for name in names:
        path = configs / name
        if not path.is_file():
            raise FileNotFoundError(f"{bundle_dir}: not a covid-monai bundle, {path} is missing")
        paths.append(str(path.resolve()))
    return paths


def validate_override_value(key: str, value: Any) -> Any:
    """Refuse override values that the config parser would execute or dereference.

    Bundle configs evaluate strings starting with ``$`` and resolve ``@``/``%`` references. Values that come from
    a command line are data, never code, so such strings are refused.

    Args:
        key: the config id being overridden (for the message).
        value: the value (JSON types).

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: when a string anywhere in ``value`` starts with ``$``, ``@`` or ``%``.
    """
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise ValueError(f"override {key}={value!r}: values starting with $, @ or % are code or references, not data")
    if isinstance(value, (list, tuple)):
        for item in value:
            validate_override_value(key, item)
    if isinstance(value, Mapping):
        for item in value.values():
            validate_override_value(key, item)
    return value


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """Bundle overrides from ``--key value`` pairs (values parsed as JSON, else kept as strings).

    Values are data only: a string starting with ``$``, ``@`` or ``%`` (code or a reference in bundle configs)
    is refused (:func:`validate_override_value`). Dashes in keys become underscores.

    Args:
        tokens: e.g. ``["--epochs", "5", "--pixdim", "[1.5, 1.5, -1]"]``; ``--key=value`` works too.

    Returns:
        ``{"epochs": 5, "pixdim": [1.5, 1.5, -1]}``.

    Raises:
        covid_monai.errors.UsageError: a token that is not ``--key``, a key without a value, or a code value.

    Example:
        >>> parse_overrides(["--epochs", "3", "--network_norm", "batch"])
        {'epochs': 3, 'network_norm': 'batch'}
    """
    overrides: dict[str, Any] = {}
    items = list(tokens)
    while items:
        token = items.pop(0)
        if not token.startswith("--") or len(token) < 3:
            raise UsageError(f"unexpected argument {token!r} (bundle settings are given as --key value)")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if not items:
                raise UsageError(f"--{key} needs a value")
            value = items.pop(0)
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        try:
            overrides[key.replace("-", "_")] = validate_override_value(key, parsed)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    return overrides


def load_config(
    bundle_dir: str | os.PathLike,
    names: Sequence[str] = ("inference.json",),
    overrides: Mapping[str, Any] | None = None,
) -> ConfigParser:
    """Read a bundle's configs into a :class:`monai.bundle.ConfigParser`, ``bundle_root`` set and overrides applied.

    Args:
        bundle_dir: the bundle folder.
        names: config files to merge, in order.
        overrides: config ids (``"a#b"`` for nested ones) and their new values.

    Returns:
        The parser; call ``get_parsed_content(id)`` to instantiate components.

    Example:
        >>> parser = load_config(TEMPLATE_BUNDLE, ["inference.json"], {"device": "cpu"})
        >>> parser["slice_batch_size"]
        16
    """
    parser = ConfigParser()
    parser.read_config(bundle_config_files(bundle_dir, names))
    parser["bundle_root"] = str(Path(bundle_dir).resolve())
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser


def run_workflow(parser: ConfigParser, run_ids: Sequence[str] = ("initialize", "run", "finalize")) -> None:
    """Run the expressions listed under ``initialize``, ``run`` and ``finalize`` (those present), in order.

    Args:
        parser: a parser from :func:`load_config`.
        run_ids: the config ids holding lists of expressions to run.
    """
    for run_id in run_ids:
        if run_id in parser:
            parser.get_parsed_content(run_id, lazy=True)


def read_knobs(bundle_dir: str | os.PathLike, name: str = "inference.json") -> dict[str, Any]:
    """The top-level plain values (not expressions or components) of a bundle config.

    Args:
        bundle_dir: the bundle folder.
        name: the config file.

    Returns:
        ``{id: value}`` for top-level ids whose values are JSON data.
    """
    config = json.loads(Path(bundle_config_files(bundle_dir, [name])[0]).read_text())
    return {k: v for k, v in config.items() if not _is_code(v)}


def _is_code(value: Any) -> bool:
    if isinstance(value, str):
        return value[:1] in ("$", "@", "%")
    if isinstance(value, Mapping):
        return "_target_" in value or any(_is_code(v) for v in value.values())
    if isinstance(value, list):
        return any(_is_code(v) for v in value)
    return False


def create_bundle(
    out_dir: str | os.PathLike, knobs: Mapping[str, Any] | None = None, template: str | os.PathLike = TEMPLATE_BUNDLE
) -> Path:
    """Create a bundle folder from the template, with top-level knobs written into every config that defines them.

    A trained model is a bundle folder: its configs carry the knobs it was trained with (spacing, HU window,
    network width...), so ``inference.json`` in it rebuilds exactly the trained pipeline.

    Args:
        out_dir: the new bundle folder; an existing bundle there keeps its weights, its configs are rewritten.
        knobs: top-level ids and plain values, e.g. ``{"network_width": 16, "pixdim": [1.5, 1.5, -1]}``.
        template: the bundle to copy configs and docs from.

    Returns:
        The bundle folder.

    Raises:
        ValueError: when a knob is defined by none of the configs (a typo must not pass silently).
    """
    out = Path(out_dir)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    knobs = {k: validate_override_value(k, v) for k, v in (knobs or {}).items()}
    used: set[str] = set()
    for src in sorted((Path(template) / "configs").iterdir()):
        dst = out / "configs" / src.name
        if src.suffix == ".json" and src.name != "datalist.json":
            config = json.loads(src.read_text())
            for key, value in knobs.items():
                if key in config:
                    config[key] = value
                    used.add(key)
            if src.name == "metadata.json" and knobs.get("labels") == "multiclass":  # describe the 3-class network
                config.update(label_classes=_MULTICLASS_CLASSES, pred_classes=_MULTICLASS_CLASSES)
                config["network_data_format"]["outputs"]["pred"].update(_MULTICLASS_OUTPUT)
            atomic_write_text(dst, json.dumps(config, indent=4) + "\n")
        elif src.is_file() and src.name != "datalist.json":
            shutil.copyfile(src, dst)
    unknown = sorted(set(knobs) - used)
    if unknown:
        raise ValueError(f"unknown bundle setting(s): {', '.join(unknown)} (not a top-level id of any config)")
    docs = Path(template) / "docs"
    if docs.is_dir():
        shutil.copytree(docs, out / "docs", dirs_exist_ok=True)
    return out


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU; otherwise ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ValueError: for an unknown name or a CUDA device that is not there.
    """
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(f"device {name} is not available on this machine")
    return device
