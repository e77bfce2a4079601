"""Save a pruned model as a normal Hugging Face checkpoint plus the recipe that reproduces it.

The folder holds what ``save_pretrained`` writes (safetensors weights, config, generation config)
and the tokenizer, so plain ``AutoModelForCausalLM.from_pretrained`` loads it without prunelab,
and ``prunelab eval --model DIR`` evaluates it. ``prunelab.json`` records strategy, options, seed,
calibration source, the source model and its fingerprint, the achieved sparsity and the package
versions; ``masks.safetensors`` keeps the pruning masks (to re-mask after fine-tuning).

The folder is written under a temporary name and renamed when complete, so an interrupted export
never leaves a half-written model that looks finished, and an existing folder is never overwritten
unless asked.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prunelab.errors import PrunelabError
from prunelab.readers import staging_folder, writing
from prunelab.versions import PRUNING_PACKAGES, package_versions

RECIPE_FILE = "prunelab.json"
MASKS_FILE = "masks.safetensors"


def build_recipe(loaded, report: Mapping[str, Any]) -> dict[str, Any]:
    """The ``prunelab.json`` content: the prune report plus where the model came from."""
    from prunelab.model.loading import source_fingerprint

    try:
        fingerprint = source_fingerprint(loaded.source)
    except PrunelabError:  # e.g. the source folder was moved since loading
        fingerprint = None
    return {
        "format": "prunelab-recipe/1",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source": {"model": loaded.source, "kind": loaded.kind, "fingerprint": fingerprint},
        "dtype": loaded.dtype_name,
        **dict(report),
        "versions": package_versions(PRUNING_PACKAGES),
    }


def read_recipe(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The recipe of an exported folder, or None for a model prunelab did not write."""
    from prunelab.readers import read_json

    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return None
    recipe = read_json(path, "invalid prunelab recipe")
    if not isinstance(recipe.get("format"), str) or not recipe["format"].startswith("prunelab-recipe/"):
        raise PrunelabError(f"{path}: invalid prunelab recipe: no 'format': 'prunelab-recipe/N'")
    return recipe


def save_pruned(loaded, out_dir: str | os.PathLike, report: Mapping[str, Any], *,
                overwrite: bool = False, save_masks: bool = True,
                extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write model, tokenizer, ``prunelab.json`` (and the masks, if any) into ``out_dir``; returns it.

    ``extra_files(folder)`` writes more files (a healing adapter) into the folder before it is renamed
    into place, so they are part of the same all-or-nothing write.
    """
    target = Path(out_dir).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise PrunelabError(f"output {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise PrunelabError(f"output folder {target} is not empty (choose another --out, or overwrite)")
    # a folder left by an interrupted prune (``.<name>.<host>.<pid>-*.partial``) is removed here
    with staging_folder(target) as staging, writing(target):
        loaded.model.save_pretrained(staging)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(staging)
        masks = getattr(report, "masks", None)
        if save_masks and masks:
            masks.save(staging / MASKS_FILE)
        if extra_files is not None:
            extra_files(staging)
        recipe = build_recipe(loaded, report)
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target
