"""Healing after pruning: the core every recovery plugin shares.

A recovery method (LoRA, a third party's) only trains; this module does what must be the same for
all of them:

* **training text** -- ``training_windows``: the Hub's WikiText-2 *train* split or C4, or a local
  file (plain text or ``.jsonl`` documents), loaded exactly like calibration text
  (``prunelab.prune.calibration``), cut into non-overlapping windows of ``seqlen`` tokens and shuffled by
  the seed, one epoch after another. A source too short for one batch is a one-line error.
* **masks kept** -- ``heal`` re-applies the pruning masks after the method returns and checks that
  every pruned weight is zero again: a LoRA update ``B @ A`` is dense, so merging it would otherwise
  fill the zeros back in. Without a mask file the zeros already in the decoder's Linear weights are
  the masks (a dense model has none worth speaking of, so nothing is pinned).
* **no leakage** -- ``check_disjoint`` refuses healing text that shares a 13-word sequence with an
  evaluated item (the GPT-3 contamination test), so healing can never train on the test set.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prunelab.errors import PrunelabError
from prunelab.model.adapter import Adapter, adapt, as_adapter
from prunelab.prune.masks import MaskSet, select_targets

HUB_TEXT = {"wikitext2": "WikiText-2 train split (Salesforce/wikitext, wikitext-2-raw-v1)",
            "c4": "C4 English train shard 0 (allenai/c4)"}
NGRAM = 13  # words; the contamination test of GPT-3 (Brown et al. 2020, appendix C)


@dataclass
class RecoveryContext:
    """What a recovery method may use besides the model and its options.

    ``progress(step, loss, tokens_per_s)`` is called after every optimizer step (the CLI draws a
    bar from it; ``tokens_per_s`` is None unless the method reports the tokens it trained on);
    ``adapter_dir`` is where a method that trains an adapter saves it (None: do not save).
    ``teacher`` is the dense model's adapter for a method that declares ``uses_teacher``, and
    ``layer_map[i]`` the teacher's index of student layer ``i`` (a depth-pruned student keeps
    some of the teacher's layers; None when unknown).
    """

    adapter: Adapter
    tokenizer: Any
    seed: int = 0
    masks: MaskSet = field(default_factory=MaskSet)
    progress: Callable[[int, float, float | None], None] | None = None
    adapter_dir: Path | None = None
    teacher: Adapter | None = None
    layer_map: list[int] | None = None
    _clock: list[float] = field(default_factory=list, repr=False)

    def batches(self, source: str, seqlen: int, batch: int, steps: int) -> Iterator[torch.Tensor]:
        """``steps`` batches of ``batch`` windows of ``seqlen`` tokens from ``source`` (see module doc).

        The text is loaded and checked now, so a bad source fails before the method touches the model.
        """
        if self.tokenizer is None:
            raise PrunelabError("healing needs a tokenizer: pass a loaded model")
        bos = self.tokenizer.bos_token_id if self.adapter.adds_bos else None
        windows = training_windows(self.tokenizer, source, seqlen, batch, bos)
        order = window_order(len(windows), batch * steps, self.seed)
        device = next(self.adapter.model.parameters()).device
        return (windows[order[step * batch:(step + 1) * batch]].to(device) for step in range(steps))

    def report_step(self, step: int, loss: float, tokens: int | None = None) -> float | None:
        """Tell the caller a step is done; ``tokens``: trained so far. Returns tokens/s since the first call."""
        now = time.perf_counter()
        if not self._clock:
            self._clock.append(now)
        rate = None
        if tokens is not None and now > self._clock[0]:
            rate = tokens / (now - self._clock[0])
        if self.progress is not None:
            self.progress(step, loss, rate)
        return rate

    def start_clock(self) -> None:
        """Start timing tokens/s now (before the first step), not at the first report."""
        self._clock[:] = [time.perf_counter()]

    def hold_masks(self) -> MaskHold:
        """Keep the pruned weights at zero while training every parameter (see ``MaskHold``)."""
        return MaskHold(self.masks, self.adapter)

    def module_masks(self) -> dict[torch.nn.Module, torch.Tensor]:
        """The keep-mask of each masked module's ``weight``, by module (a LoRA method masks its update)."""
        from prunelab.prune.masks import resolve_parameter

        owners = {id(module.weight): module for module in self.adapter.model.modules()
                  if isinstance(getattr(module, "weight", None), torch.nn.Parameter)}
        found: dict[torch.nn.Module, torch.Tensor] = {}
        for name, keep in self.masks.items():
            param = resolve_parameter(self.adapter, name)
            if id(param) in owners:
                found[owners[id(param)]] = keep.to(param.device)
        return found


class MaskHold:
    """Pruned weights stay exactly zero during full-parameter training, so every step trains the pruned model.

    Two guards: the gradient of a pruned weight is zeroed as it is computed (so AdamW's moments of
    it stay zero and no update reaches it), and ``after_step()`` zeroes the masked weights again
    after each optimizer step (weight decay, a fused optimizer, anything else that writes them).
    ``remove()`` takes the gradient hooks off.
    """

    def __init__(self, masks: MaskSet, adapter: Adapter) -> None:
        from prunelab.prune.masks import resolve_parameter

        self.masks, self.adapter = masks, adapter
        self.params = [(param, keep.to(param.device)) for name, keep in masks.items()
                       for param in [resolve_parameter(adapter, name)]]
        self.handles = [param.register_hook(lambda grad, k=keep: grad.masked_fill(~k, 0))
                        for param, keep in self.params if param.requires_grad]

    @torch.no_grad()
    def after_step(self) -> None:
        for param, keep in self.params:
            param.masked_fill_(~keep, 0)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class HealReport(dict):
    """The JSON-able report of a heal (method, options, seed, seconds, masks, the method's report).

    ``.masks`` is the ``MaskSet`` that was kept, so exporting the healed model saves it again.
    """

    masks: MaskSet | None = None


# ------------------------------------------------------------------------------------ training text
def check_training_source(source: str) -> None:
    """A Hub name or an existing file: checked before any model is loaded (nothing is downloaded)."""
    if source not in HUB_TEXT and not Path(source).expanduser().is_file():
        raise PrunelabError(f"healing data not found: {source} (use 'wikitext2' (train split), 'c4' or a local "
                            "text/.jsonl file)")


def load_training_text(source: str) -> tuple[str | None, list[str] | None]:
    """(one long text, None) or (None, documents) of a Hub name or a local file, like calibration text."""
    from prunelab.prune.calibration import load_source

    check_training_source(source)
    return load_source(source if source in HUB_TEXT else str(Path(source).expanduser()))


def training_windows(tokenizer, source: str, seqlen: int, batch: int, bos_token_id: int | None = None,
                     max_windows: int = 1 << 16) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens of the source (BOS first when given).

    Documents are joined with a blank line in their file order and read only as far as
    ``max_windows`` windows need (C4's shard is 356k documents). Fewer windows than one batch is an
    error naming the source: training would otherwise repeat one short text.
    """
    from prunelab.prune.calibration import encode_long_text, encode_text

    width = seqlen - (1 if bos_token_id is not None else 0)
    text, documents = load_training_text(source)
    if text is not None:
        ids = encode_long_text(tokenizer, text)
    else:
        pieces, total = [], 0
        for document in documents or []:
            pieces.append(torch.tensor(encode_text(tokenizer, document + "\n\n"), dtype=torch.long))
            total += pieces[-1].numel()
            if total >= width * max_windows:
                break
        ids = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    count = min(ids.numel() // width, max_windows)
    if count < batch:
        raise PrunelabError(f"healing data {source} has {ids.numel()} tokens: {count} window(s) of {seqlen}, "
                            f"fewer than one batch of {batch} (use more text, a smaller batch or seqlen)")
    windows = ids[: count * width].reshape(count, width)
    if bos_token_id is not None:
        windows = torch.cat([torch.full((count, 1), bos_token_id, dtype=torch.long), windows], dim=1)
    return windows


def window_order(count: int, needed: int, seed: int) -> torch.Tensor:
    """``needed`` window indices: whole epochs, each a fresh seeded shuffle of all ``count`` windows."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < needed:
        epoch = list(range(count))
        rng.shuffle(epoch)
        order.extend(epoch)
    return torch.tensor(order[:needed], dtype=torch.long)


# ------------------------------------------------------------------------------------ no leakage
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(words: list[str], n: int = NGRAM) -> Iterator[str]:
    return (" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


def item_texts(data: Any) -> Iterator[str]:
    """Every string inside an item's data (question, choices, answer, the WikiText document)."""
    if isinstance(data, str):
        yield data
    elif isinstance(data, Mapping):
        for value in data.values():
            yield from item_texts(value)
    elif isinstance(data, list | tuple):
        for value in data:
            yield from item_texts(value)


def overlap(training: Iterable[str], evaluation: Mapping[str, Iterable[str]], n: int = NGRAM) -> dict[str, list[str]]:
    """Per task, the ``n``-word sequences (lower-cased words) its texts share with the training text."""
    seen = {hash(gram) for text in training for gram in _ngrams(_words(text), n)}
    shared: dict[str, list[str]] = {}
    for task, texts in evaluation.items():
        hits = [gram for text in texts for gram in _ngrams(_words(text), n) if hash(gram) in seen]
        if hits:
            shared[task] = hits
    return shared


def check_disjoint(source: str, tasks: Iterable[Any]) -> str:
    """Refuse healing text that shares a 13-word sequence with any evaluated item; returns what was checked.

    ``tasks`` are prepared tasks (``evaluator.name`` and ``items``). The Hub sources are their
    train splits, disjoint from the test splits by construction, and are not downloaded to check.
    """
    if source in HUB_TEXT:
        return f"{HUB_TEXT[source]}: a training split, disjoint from the evaluated test splits by construction"
    text, documents = load_training_text(source)
    training = [text] if text is not None else documents or []
    evaluation = {task.evaluator.name: [t for item in task.items for t in item_texts(item.data)] for task in tasks}
    shared = overlap(training, evaluation)
    if shared:
        task, hits = next(iter(shared.items()))
        raise PrunelabError(f"healing data {source} overlaps the evaluation: {len(hits)} {NGRAM}-word sequence(s) of "
                            f"task {task} occur in it, e.g. '{hits[0]}' (heal on other text, e.g. a train split)")
    return f"{source}: no {NGRAM}-word sequence in common with {', '.join(evaluation) or 'no task'}"


# ------------------------------------------------------------------------------------ masks
def zero_masks(adapter: Adapter) -> MaskSet:
    """Keep-masks from the zeros already in the decoder Linear weights (tensors with no zero are left out)."""
    masks = MaskSet()
    for name, weight in select_targets(adapter).items():
        keep = weight.detach() != 0
        if not bool(keep.all()):
            masks[name] = keep.cpu()
    return masks


def masks_of(folder: str | Path | None, adapter: Adapter, choice: str = "auto") -> tuple[MaskSet, str]:
    """The masks to keep and where they came from: ``auto``, ``none``, ``zeros`` or a mask file.

    ``auto``: the folder's ``masks.safetensors``; else, when its ``prunelab.json`` records a weight
    pruning (a sparsity report), the zeros in the weights; else none. Zeros are not guessed for any
    model: a dequantized GGUF has exact zeros that no pruning made.
    """
    from prunelab.model.export import MASKS_FILE, read_recipe

    if choice == "none":
        return MaskSet(), "none"
    if choice == "zeros":
        return zero_masks(adapter), "zeros found in the decoder Linear weights"
    if choice != "auto":
        if not Path(choice).is_file():
            raise PrunelabError(f"masks file not found: {choice}")
        return MaskSet.load(choice), str(choice)
    path = Path(folder) / MASKS_FILE if folder is not None else None
    if path is not None and path.is_file():
        return MaskSet.load(path), str(path)
    recipe = read_recipe(folder) if folder is not None else None
    if recipe and "sparsity" in recipe:
        return zero_masks(adapter), "zeros of the weight-pruned model (its prunelab.json; no masks file)"
    return MaskSet(), "none (no masks file, no weight pruning recorded)"


def masked_nonzeros(masks: MaskSet, adapter: Adapter) -> int:
    """How many weights the masks prune are not zero (0 after ``MaskSet.apply``)."""
    from prunelab.prune.masks import resolve_parameter

    left = 0
    for name, keep in masks.items():
        param = resolve_parameter(adapter, name).detach()
        left += int((param[~keep.to(param.device)] != 0).sum())
    return left


# ------------------------------------------------------------------------------------ the Python API
def validate_recovery(method: str, options: Mapping[str, Any], registry=None) -> tuple[Any, dict[str, Any]]:
    """(the Recovery, its validated options): every mistake fails here, before any model is loaded."""
    from prunelab.registry import default_registry

    recovery = (registry or default_registry()).recovery(method)
    return recovery, recovery.validate(options)


def heal(model_or_loaded, method: str, *, masks: MaskSet | None = None, seed: int = 0, registry=None,
         progress: Callable[[int, float, float | None], None] | None = None,
         adapter_dir: str | Path | None = None, teacher=None, layer_map: list[int] | None = None,
         **options) -> HealReport:
    """Heal a pruned model in place with a registered recovery method; the masks stay zero.

    ``heal(loaded, "lora", masks=report.masks, steps=50, data="train.txt")``. ``masks`` None:
    the zeros of the decoder Linear weights are kept (``zero_masks``). ``teacher`` (a LoadedModel,
    Adapter or model) is required by a method that ``uses_teacher`` and checked against the
    student (``check_teacher``); ``layer_map`` gives the teacher's index of each student layer.
    """
    recovery, validated = validate_recovery(method, options, registry)
    adapter = as_adapter(model_or_loaded)
    teacher_adapter = None
    if recovery.uses_teacher:
        if teacher is None:
            raise PrunelabError(f"recovery '{recovery.name}' learns from a teacher: pass teacher= (the dense model)")
        check_teacher(model_or_loaded, teacher)
        teacher_adapter = as_adapter(teacher)
        if teacher_adapter.model is adapter.model:
            raise PrunelabError(f"recovery '{recovery.name}': the teacher is the model being healed (pass the dense "
                                "model, or a copy of it)")
        if layer_map is not None:
            check_layer_map(layer_map, adapter.num_layers, teacher_adapter.num_layers)
    masks = zero_masks(adapter) if masks is None else masks
    context = RecoveryContext(adapter=adapter, tokenizer=getattr(model_or_loaded, "tokenizer", None), seed=seed,
                              masks=masks, progress=progress,
                              adapter_dir=Path(adapter_dir) if adapter_dir is not None else None,
                              teacher=teacher_adapter, layer_map=list(layer_map) if layer_map is not None else None)
    started = time.perf_counter()
    was_training = adapter.model.training
    result = recovery.recover(adapter.model, validated, context) or {}
    adapter.model.train(was_training)
    healed = adapt(adapter.model)
    if hasattr(model_or_loaded, "adapter") and not isinstance(model_or_loaded, Adapter):
        model_or_loaded.adapter = healed  # LoadedModel: later scoring finds the unwrapped modules
    masks.apply(healed)
    left = masked_nonzeros(masks, healed)
    if left:  # cannot happen unless a method replaced the parameters the masks name
        raise PrunelabError(f"recovery '{method}': {left} pruned weights are not zero after re-masking")
    pinned = sum(int((~keep).sum()) for keep in masks.values())
    from prunelab.registry import default_registry

    report = HealReport(method=recovery.name, plugin=(registry or default_registry()).identity("recovery", recovery.name),
                        options=validated, seed=seed,
                        seconds=round(time.perf_counter() - started, 3),
                        masks={"tensors": len(masks), "pruned_weights_kept_zero": pinned}, **result)
    report.masks = masks
    return report


# ------------------------------------------------------------------------------------ the teacher
def check_teacher(student, teacher) -> None:
    """Refuse a teacher whose distribution is over other tokens: another vocabulary size or tokenizer.

    KL(teacher || student) compares probabilities of the same token ids, so both output heads must
    have the same rows and, where both tokenizers are known, map the same strings to the same ids.
    """
    rows = (as_adapter(student).head.weight.shape[0], as_adapter(teacher).head.weight.shape[0])
    if rows[0] != rows[1]:
        raise PrunelabError(f"the teacher's vocabulary has {rows[1]} tokens, the student's {rows[0]}: "
                            "distillation needs the same vocabulary (use the model this one was pruned from)")
    tokenizers = getattr(student, "tokenizer", None), getattr(teacher, "tokenizer", None)
    if all(t is not None and hasattr(t, "get_vocab") for t in tokenizers):
        vocabularies = [t.get_vocab() for t in tokenizers]
        if vocabularies[0] != vocabularies[1]:
            differ = sorted(set(vocabularies[0].items()) ^ set(vocabularies[1].items()))
            raise PrunelabError(f"the teacher's tokenizer differs from the student's ({len(differ)} token/id "
                                f"pair(s) differ, e.g. {differ[0][0]!r}): distillation needs the same tokenizer")


def check_layer_map(layer_map: list[int], student_layers: int, teacher_layers: int) -> None:
    """A layer map names one teacher layer per student layer, in increasing order, all inside the teacher."""
    if (len(layer_map) != student_layers or any(not 0 <= i < teacher_layers for i in layer_map)
            or any(b <= a for a, b in zip(layer_map, layer_map[1:], strict=False))):
        raise PrunelabError(f"layer map {layer_map} does not fit a student of {student_layers} layers and a "
                            f"teacher of {teacher_layers} (one increasing teacher index per student layer)")


def kept_layers(dropped: Iterable[int], teacher_layers: int) -> list[int]:
    """The teacher's index of each layer left after removing ``dropped`` (the student's layer map)."""
    gone = set(dropped)
    return [i for i in range(teacher_layers) if i not in gone]


@dataclass(frozen=True)
class TeacherSource:
    """Where a pruned folder came from: the dense model's spec, and the chain of layer removals after it."""

    model: str
    recorded_in: str
    removals: tuple[tuple[int, ...], ...] = ()  # dropped_layers of each pruning, first pruning first

    def layer_map(self, teacher_layers: int) -> list[int]:
        """The teacher's index of each student layer, composing every recorded removal."""
        indices = list(range(teacher_layers))
        for dropped in self.removals:
            indices = [indices[position] for position in kept_layers(dropped, len(indices))]
        return indices


def teacher_source(folder: str | Path) -> TeacherSource:
    """The dense model a prunelab folder was made from, following its ``prunelab.json`` chain.

    A healed folder's source is the pruned folder, whose source is the dense model; where a source
    folder is gone, the copy of its recipe kept under ``pruned`` is read instead. A folder without
    a recipe has no recorded teacher: a one-line error asks for ``--teacher``.
    """
    from prunelab.model.export import RECIPE_FILE, read_recipe

    recipe = read_recipe(folder)
    if recipe is None:
        raise PrunelabError(f"no teacher: {folder} has no {RECIPE_FILE} naming the model it was pruned from "
                            "(pass --teacher MODEL)")
    where, removals = str(Path(folder) / RECIPE_FILE), []
    for _ in range(64):  # a chain longer than this is a loop
        removals.append(tuple(recipe.get("dropped_layers") or ()))
        source = (recipe.get("source") or {}).get("model")
        if not isinstance(source, str):
            raise PrunelabError(f"no teacher: {where} records no source model (pass --teacher MODEL)")
        upstream = read_recipe(source) if Path(source).is_dir() else None
        if upstream is None and isinstance(recipe.get("pruned"), dict):
            upstream, source_where = recipe["pruned"], f"{where} (its pruned recipe)"
        else:
            source_where = str(Path(source) / RECIPE_FILE)
        if upstream is None:
            break
        recipe, where = upstream, source_where
    return TeacherSource(source, where, tuple(reversed([r for r in removals if r])))


def healed_recipe(report: HealReport, pruned_recipe: Mapping[str, Any] | None, masks_source: str) -> HealReport:
    """What ``prunelab.json`` of a healed model records: the healing, and the recipe of the pruned input."""
    recipe = HealReport(healing={**report, "masks": {**report["masks"], "source": masks_source}},
                        pruned=dict(pruned_recipe) if pruned_recipe else None)
    recipe.masks = report.masks
    return recipe


# ------------------------------------------------------------------------------------ studies
RECOVERY_KEYS = {"method", "strategies", "control"}


def healed_name(name: str, method: str) -> str:
    """A healed variant's (and strategy's) name: ``drop-block[k=4]+lora``; one place for the convention."""
    return f"{name}+{method}"


def study_recovery(value: Any, strategies: Iterable[str], registry, where: Path, path: Path) -> dict[str, Any] | None:
    """A study file's ``[recovery]`` table, validated: method, the strategies it heals, the method's options.

    ``strategies`` (default: all of the study's) names which strategies' variants get a healed twin;
    a relative ``data`` path is relative to the study file. Nothing is loaded or trained here.
    """
    if value is None:
        return None
    where_text = f"{path} [recovery]"
    if not isinstance(value, dict):
        raise PrunelabError(f"{where_text}: expected a table")
    method = value.get("method", "lora")
    if not isinstance(method, str):
        raise PrunelabError(f"{where_text}: method must be a name, got {method!r}")
    known = list(dict.fromkeys(strategies))
    chosen = value.get("strategies", known)
    chosen = [chosen] if isinstance(chosen, str) else chosen
    if not isinstance(chosen, list) or not chosen or not all(isinstance(s, str) for s in chosen):
        raise PrunelabError(f"{where_text}: strategies must be a list of strategy names, got {chosen!r}")
    missing = [s for s in chosen if s not in known]
    if missing:
        raise PrunelabError(f"{where_text}: strategies {', '.join(missing)} are not in the study "
                            f"(its strategies: {', '.join(known) or 'none'})")
    control = value.get("control", True)
    if not isinstance(control, bool):
        raise PrunelabError(f"{where_text}: control must be true or false (heal the dense model too), got {control!r}")
    options = {k: v for k, v in value.items() if k not in RECOVERY_KEYS}
    try:
        _, validated = validate_recovery(method, options, registry)
    except PrunelabError as exc:
        raise PrunelabError(f"{where_text}: {exc}") from None
    if isinstance(validated.get("data"), str) and validated["data"] not in HUB_TEXT:
        data = Path(os.path.expandvars(validated["data"])).expanduser()
        validated["data"] = str(data if data.is_absolute() else where / data)
        check_training_source(validated["data"])
    return {"method": method, "strategies": list(dict.fromkeys(chosen)), "control": control, "options": validated}
