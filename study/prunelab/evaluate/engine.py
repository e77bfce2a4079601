"""The one batched scoring and generation engine every evaluator uses.

Three request kinds, as in lm-evaluation-harness: log-likelihoods of continuations, greedy
generations with stop strings, and token NLLs of fixed windows (perplexity). What makes it fast:

* each prompt is tokenized whole, exactly as lm-eval does, and the longest common *token* prefix
  of a group (an MMLU subject's few-shot block, GSM8K's shared examples) is encoded once; its KV
  cache is shared by every micro-batch as an expanded view (no per-question copy);
* micro-batches are sorted by length and sized by a token budget, so padding is small;
* the output head runs only at the scored positions;
* GSM8K rows that hit a stop string leave the batch, so long answers do not drag short ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from prunelab.model.adapter import Adapter, output_logits
from prunelab.plugin import GenerationRequest, LoglikelihoodRequest, Progress

__all__ = [  # the request types live with the plugin API; scripts may import them from here too
    "DenseHead", "DenseReference", "Engine", "GenerationRequest", "LoglikelihoodRequest", "WindowScores", "head_fingerprint",
    "kl_from_logits", "right_padded", "window_token_scores", "expanded_cache", "request_groups",
]

@dataclass
class _Sequence:
    """One token sequence to run, and which positions/tokens of it are scored."""

    tokens: list[int]
    targets: list[int] = field(default_factory=list)  # scored tokens (the last len(targets) inputs predict them)
    owner: tuple[int, int] = (0, 0)  # (request index, continuation index)


class Engine:
    """Scores and generates with one model; see the module docstring for the speed-ups."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        adapter: Adapter,
        *,
        batch_tokens: int | None = None,
        max_batch: int = 64,
        prefix_cache: bool = True,
        chat_template: bool = False,
        enable_thinking: bool = False,
        max_length: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.device = next(model.parameters()).device
        self.batch_tokens = batch_tokens or (32768 if self.device.type == "cuda" else 4096)
        self.max_batch = max_batch
        self.prefix_cache = prefix_cache
        self.chat_template = chat_template
        self.enable_thinking = enable_thinking
        self.max_length = max_length or _model_max_length(adapter, tokenizer)

    # ------------------------------------------------------------------ tokenization
    def encode(self, text: str) -> list[int]:
        """Tokenize as lm-evaluation-harness does: no special tokens, except BOS where the model needs it."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if self.adapter.adds_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def render(self, context: str) -> str:
        """Wrap a prompt in the model's chat template when asked (Qwen3: thinking off by default)."""
        if not self.chat_template:
            return context
        kwargs = {"enable_thinking": self.enable_thinking}
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True, **kwargs
        )

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's ``_encode_pair``: move trailing spaces into the continuation, split the whole encoding."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self.encode(context + continuation)
        context_ids = self.encode(context) if context else [self._prefix_token()]
        return context_ids, whole[len(context_ids):] if context else whole

    def _prefix_token(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    # ------------------------------------------------------------------ log-likelihoods
    @torch.inference_mode()
    def loglikelihoods(
        self, requests: Sequence[LoglikelihoodRequest], progress: Progress | None = None
    ) -> list[list[float]]:
        """Summed log-probability of every continuation of every request."""
        results: list[list[float]] = [[0.0] * len(r.continuations) for r in requests]
        for indices in request_groups(requests):
            for (i, k), value in self._score(self._scoring_sequences(requests, indices)):
                results[i][k] = value
            if progress:
                progress(len(indices))
        return results

    def _scoring_sequences(self, requests, indices: list[int]) -> list[_Sequence]:
        """One sequence per request when every continuation is one token (one pass scores all)."""
        sequences: list[_Sequence] = []
        for i in indices:
            request = requests[i]
            context = self.render(request.context)
            pairs = [self.encode_pair(context, c) for c in request.continuations]
            contexts_equal = all(p[0] == pairs[0][0] for p in pairs)
            if contexts_equal and all(len(p[1]) == 1 for p in pairs):
                tokens = self._truncate(pairs[0][0])
                sequences.append(_Sequence(tokens, [p[1][0] for p in pairs], (i, -1)))
                continue
            for k, (ctx, cont) in enumerate(pairs):
                tokens = self._truncate(ctx + cont)[:-1]
                sequences.append(_Sequence(tokens, list(cont), (i, k)))
        return sequences

    def _truncate(self, tokens: list[int]) -> list[int]:
        return tokens[-(self.max_length + 1):] if len(tokens) > self.max_length + 1 else tokens

    def _score(self, sequences: list[_Sequence]) -> list[tuple[tuple[int, int], float]]:
        """Run the sequences (sharing their common prefix); log-prob of each (request, continuation)."""
        prefix_len = self._shared_prefix_length([s.tokens for s in sequences])
        prefix = self._encode_prefix(sequences[0].tokens[:prefix_len])
        scored: list[tuple[tuple[int, int], float]] = []
        order = sorted(range(len(sequences)), key=lambda j: -len(sequences[j].tokens))
        for batch in self._micro_batches(order, [len(s.tokens) - prefix_len for s in sequences], prefix_len):
            suffixes = [sequences[j].tokens[prefix_len:] for j in batch]
            hidden = self._forward_right_padded(suffixes, prefix, prefix_len)
            for row, j in enumerate(batch):
                scored.extend(self._target_logprobs(hidden[row], len(suffixes[row]), sequences[j]))
        return scored

    def _target_logprobs(self, hidden: torch.Tensor, length: int, seq: _Sequence):
        """Log-probs of a sequence's targets from its hidden states (the head runs on those rows only)."""
        request, continuation = seq.owner
        if continuation == -1:  # every continuation is one token after the same context
            logits = self.adapter.head_logits(hidden[length - 1 : length]).float()
            logprobs = torch.log_softmax(logits, dim=-1)[0]
            return [((request, k), logprobs[t].item()) for k, t in enumerate(seq.targets)]
        n = len(seq.targets)
        logits = self.adapter.head_logits(hidden[length - n : length]).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(seq.targets, device=logprobs.device)
        return [((request, continuation), logprobs.gather(1, targets[:, None]).sum().item())]

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest], progress: Progress | None = None) -> list[str]:
        """Greedy continuations, cut at the first stop string (lm-eval's ``until``)."""
        outputs = [""] * len(requests)
        for indices in request_groups(requests):
            contexts = [self._truncate_for_generation(self.encode(self.render(requests[i].context)),
                                                      requests[i].max_new_tokens) for i in indices]
            prefix_len = self._shared_prefix_length(contexts)
            prefix = self._encode_prefix(contexts[0][:prefix_len])
            order = sorted(range(len(indices)), key=lambda j: -len(contexts[j]))
            lengths = [len(c) - prefix_len + requests[indices[j]].max_new_tokens for j, c in enumerate(contexts)]
            for batch in self._micro_batches(order, lengths, prefix_len, equal_width=self._has_sliding_window()):
                texts = self._generate_batch(
                    [contexts[j][prefix_len:] for j in batch], [requests[indices[j]] for j in batch],
                    prefix, prefix_len,
                )
                for j, text in zip(batch, texts, strict=True):
                    outputs[indices[j]] = text
                if progress:
                    progress(len(batch))
        return outputs

    def _truncate_for_generation(self, tokens: list[int], max_new: int) -> list[int]:
        keep = self.max_length - max_new
        return tokens[-keep:] if len(tokens) > keep else tokens

    def _end_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    def _generate_batch(self, suffixes, requests, prefix, prefix_len: int) -> list[str]:
        """Left-pad suffixes after the shared prefix, then decode greedily; finished rows leave."""
        width = max(len(s) for s in suffixes)
        batch = len(suffixes)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for row, suffix in enumerate(suffixes):
            ids[row, width - len(suffix):] = torch.tensor(suffix)
            mask[row, prefix_len + width - len(suffix):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix_len:]
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = expanded_cache(prefix, batch, self.model.config)
        end_ids = self._end_token_ids()
        alive = list(range(batch))
        generated: list[list[int]] = [[] for _ in range(batch)]
        texts = [""] * batch
        max_new = max(r.max_new_tokens for r in requests)
        for step in range(max_new):
            out = self.adapter.decoder(
                input_ids=ids, attention_mask=mask, position_ids=positions,
                cache=cache, use_cache=True,
            )
            cache = out.cache
            next_ids = self.adapter.head_logits(out.last_hidden_state[:, -1]).argmax(-1).tolist()
            keep: list[int] = []
            for slot, row in enumerate(alive):
                token = next_ids[slot]
                done = token in end_ids
                if not done:
                    generated[row].append(token)
                    texts[row] = self.tokenizer.decode(generated[row], skip_special_tokens=True)
                    done = any(s and s in texts[row] for s in requests[row].stop)
                    done = done or len(generated[row]) >= requests[row].max_new_tokens or step + 1 >= max_new
                if not done:
                    keep.append(slot)
            if not keep:
                break
            if len(keep) < len(alive):
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                mask = mask.index_select(0, index)
                next_tensor = torch.tensor([next_ids[s] for s in keep], device=self.device)
                positions = positions.index_select(0, index)[:, -1:] + 1
                alive = [alive[s] for s in keep]
            else:
                next_tensor = torch.tensor(next_ids, device=self.device)
                positions = positions[:, -1:] + 1
            ids = next_tensor[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return [_cut_at_stops(text, r.stop) for text, r in zip(texts, requests, strict=True)]

    # ------------------------------------------------------------------ perplexity
    @torch.inference_mode()
    def window_nll(self, windows: torch.Tensor, progress: Progress | None = None,
                   head_chunk: int = 512) -> tuple[list[float], list[int]]:
        """Sum of token NLLs and token count for each window (row) of token ids, scored independently."""
        scores = self.window_scores(windows, progress=progress, head_chunk=head_chunk)
        return scores.nll_sums, scores.counts

    @torch.inference_mode()
    def window_scores(self, windows: torch.Tensor, *, reference: DenseReference | None = None,
                      keep_hidden: bool = False, progress: Progress | None = None,
                      head_chunk: int = 512) -> WindowScores:
        """NLL of each window; with ``reference`` also per-token KL(dense || this model) and top-1 agreement.

        ``keep_hidden`` returns each window's final hidden states: the dense model's are the
        reference its variants are compared against (see ``DenseReference``).
        """
        dense_logits = None
        if reference is not None:
            reference.check(self.adapter, windows)
            dense_logits = reference.dense_logits(self.adapter)
        scores = WindowScores()
        for w, window in enumerate(windows):
            ids = window[None].to(self.device)
            hidden = self.adapter.decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
            dense = reference.hidden[w] if reference is not None else None
            scores.add(*window_token_scores(self.adapter, hidden, ids[0], head_chunk, dense, dense_logits),
                       hidden if keep_hidden else None)
            if progress:
                progress(1)
        return scores

    def _window_total_nll(self, hidden: torch.Tensor, ids: torch.Tensor, head_chunk: int) -> float:
        """Summed NLL of ids[1:] given hidden states; the head runs in chunks because the vocab is large."""
        return window_token_scores(self.adapter, hidden, ids, head_chunk)[0]

    # ------------------------------------------------------------------ shared machinery
    def _shared_prefix_length(self, token_lists: list[list[int]]) -> int:
        """Longest common token prefix, leaving at least one token of every sequence to run."""
        if not self.prefix_cache or len(token_lists) < 2:
            return 0
        first = token_lists[0]
        limit = min(len(t) for t in token_lists) - 1
        length = 0
        while length < limit and all(t[length] == first[length] for t in token_lists):
            length += 1
        return length if length >= 16 else 0  # a tiny prefix is not worth a cache

    def _encode_prefix(self, tokens: list[int]) -> DynamicCache | None:
        if not tokens:
            return None
        ids = torch.tensor([tokens], device=self.device)
        out = self.adapter.decoder(input_ids=ids, use_cache=True, cache=DynamicCache(config=self.model.config))
        return out.cache

    def _has_sliding_window(self) -> bool:
        """Sliding-window layers measure distance in cache slots, so padding between prefix and suffix would shift them."""
        return "sliding_attention" in (getattr(self.adapter.text_config, "layer_types", None) or [])

    def _micro_batches(
        self, order: list[int], lengths: list[int], prefix_len: int, equal_width: bool = False
    ) -> list[list[int]]:
        """Consecutive runs of the length-sorted order whose padded size fits the token budget."""
        batches: list[list[int]] = []
        current: list[int] = []
        for j in order:
            width = max([lengths[k] for k in current] + [lengths[j]])
            cost = (len(current) + 1) * (width + prefix_len // 4)
            ragged = equal_width and bool(current) and lengths[current[0]] != lengths[j]
            if current and (ragged or cost > self.batch_tokens or len(current) >= self.max_batch):
                batches.append(current)
                current = []
            current.append(j)
        if current:
            batches.append(current)
        return batches

    def _forward_right_padded(self, suffixes: list[list[int]], prefix, prefix_len: int) -> torch.Tensor:
        """Hidden states of right-padded suffixes after the shared prefix (pads come last: causal, harmless)."""
        ids = right_padded(suffixes).to(self.device)
        positions = torch.arange(prefix_len, prefix_len + ids.shape[1], device=self.device).expand(len(suffixes), -1)
        cache = expanded_cache(prefix, len(suffixes), self.model.config)
        out = self.adapter.decoder(input_ids=ids, position_ids=positions, cache=cache, use_cache=cache is not None)
        return out.last_hidden_state


@dataclass
class WindowScores:
    """Per window: summed NLL and scored token count; with a reference, per-token KL and top-1 agreement."""

    nll_sums: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)  # float32 per scored token, nats
    agree: list[torch.Tensor] = field(default_factory=list)  # bool per scored token
    hidden: list[torch.Tensor] = field(default_factory=list)  # final hidden states (keep_hidden)

    def add(self, nll: float, count: int, kl: torch.Tensor | None, agree: torch.Tensor | None,
            hidden: torch.Tensor | None) -> None:
        self.nll_sums.append(nll)
        self.counts.append(count)
        if kl is not None:
            self.kl.append(kl)
            self.agree.append(agree)
        if hidden is not None:
            self.hidden.append(hidden.detach().cpu())


@dataclass
class DenseHead:
    """The dense model's output head, kept apart from the model: the dense logits of stored hidden states
    for a variant whose own head differs (width's ``hidden`` axis, ``include_head`` pruning).

    ``logits`` goes through the function the adapter's ``head_logits`` uses (``output_logits``), so the
    dense logits a variant is compared with are the dense model's own, soft-capping included.
    ``fingerprint`` is the dense adapter's ``head_fingerprint``: what the stored file is keyed by.
    """

    weight: torch.Tensor  # (vocab, hidden_size), the model's dtype
    bias: torch.Tensor | None
    softcap: float | None
    fingerprint: str

    @classmethod
    def of(cls, adapter: Adapter) -> DenseHead | None:
        """The adapter's head (views of its tensors, no copy); None for a head that is not a plain Linear
        (its computation is not weight and bias alone, so it cannot be kept as tensors)."""
        head = adapter.head
        if type(head) is not torch.nn.Linear:
            return None
        bias = head.bias.detach() if head.bias is not None else None
        return cls(head.weight.detach(), bias, adapter.logit_softcap, head_fingerprint(adapter))

    def to(self, device: torch.device, dtype: torch.dtype) -> DenseHead:
        """The same head on the scoring model's device and dtype (no copy where they already match)."""
        bias = self.bias.to(device, dtype) if self.bias is not None else None
        return DenseHead(self.weight.to(device, dtype), bias, self.softcap, self.fingerprint)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return output_logits(self._linear, hidden, self.softcap)

    def _linear(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


@dataclass
class DenseReference:
    """The dense model's final hidden states on the same windows: its exact logits, recomputed per chunk.

    Storing every dense logit would take windows x seqlen x vocab floats (64 x 511 x 151,936 x 4 B =
    18.5 GiB for Qwen2.5); the hidden states that produce them take windows x seqlen x hidden (112 MiB),
    and the dense output head turns them back into the exact dense distribution one head chunk at a
    time. ``head`` fingerprints the head the hidden states were made with. A variant with the same
    head recomputes the dense logits with its own; one whose head differs (width's ``hidden`` axis,
    ``include_head``) needs ``dense_head``, the dense head itself (stored once per run beside the
    references), and without it is refused, not misread.
    """

    hidden: torch.Tensor  # (windows, seqlen, hidden_size)
    windows: torch.Tensor  # (windows, seqlen) token ids
    head: str
    dense_head: DenseHead | None = None

    def check(self, adapter: Adapter, windows: torch.Tensor) -> None:
        from prunelab.errors import PrunelabError

        if self.windows.shape != windows.shape or not torch.equal(self.windows.cpu(), windows.cpu()):
            raise PrunelabError("the dense reference was computed on other windows (evaluation settings differ)")
        if self.dense_head is not None and self.dense_head.fingerprint != self.head:
            raise PrunelabError("the dense head kept with this reference is another model's (its fingerprint differs)")
        if self.dense_head is None and self.head != head_fingerprint(adapter):
            raise PrunelabError("this model's output head differs from the dense model's and the dense head was not "
                                "kept: KL to dense cannot be recomputed from stored hidden states")

    def dense_logits(self, adapter: Adapter) -> Callable[[torch.Tensor], torch.Tensor]:
        """What turns the stored hidden states into dense logits: the kept dense head, else this model's own
        (``check`` has made sure that it is the dense one)."""
        if self.dense_head is None:
            return adapter.head_logits
        weight = adapter.head.weight
        return self.dense_head.to(weight.device, weight.dtype).logits


def head_fingerprint(adapter: Adapter) -> str:
    """A cheap identity of the output head (shape, sum, zero count, soft-capping): pruning changes it.

    Summed in row blocks: a float64 copy of a 151k-row head at once would take a gigabyte.
    """
    weight = adapter.head.weight.detach()
    total, zeros = 0.0, 0
    for start in range(0, weight.shape[0], 8192):
        block = weight[start : start + 8192]
        total += float(block.double().sum())
        zeros += int((block == 0).sum())
    bias = getattr(adapter.head, "bias", None)
    bias_sum = float(bias.detach().double().sum()) if bias is not None else 0.0
    return f"{tuple(weight.shape)}:{total:.12g}:{zeros}:{bias_sum:.12g}:{adapter.logit_softcap}"


KL_ROWS = 128  # positions per KL step: two (rows x vocab) float32 log-prob tables live at once


def window_token_scores(adapter: Adapter, hidden: torch.Tensor, ids: torch.Tensor, head_chunk: int,
                        dense_hidden: torch.Tensor | None = None,
                        dense_logits: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """(summed NLL of ids[1:], count, per-token KL(dense || model) or None, per-token top-1 agreement or None).

    The head runs in chunks because the vocabulary is large; the dense log-probabilities are
    recomputed from ``dense_hidden`` a few rows at a time, never all at once, by ``dense_logits``
    (``DenseReference.dense_logits``): the dense head, by default this model's own (the same head).
    """
    dense_logits = dense_logits or adapter.head_logits
    total = 0.0
    kls: list[torch.Tensor] = []
    agrees: list[torch.Tensor] = []
    positions = ids.shape[0] - 1
    for start in range(0, positions, head_chunk):
        end = min(start + head_chunk, positions)
        logits = adapter.head_logits(hidden[start:end]).float()
        total += torch.nn.functional.cross_entropy(logits, ids[start + 1 : end + 1], reduction="sum").item()
        if dense_hidden is None:
            continue
        for row in range(0, end - start, KL_ROWS):
            model_logits = logits[row : row + KL_ROWS]
            dense_rows = dense_hidden[start + row : min(start + row + KL_ROWS, end)].to(hidden.device, hidden.dtype)
            dense_logp = torch.log_softmax(dense_logits(dense_rows).float(), dim=-1)
            kls.append(kl_from_logits(dense_logp, model_logits).cpu())
            agrees.append((dense_logp.argmax(-1) == model_logits.argmax(-1)).cpu())
    if dense_hidden is None:
        return total, positions, None, None
    return total, positions, torch.cat(kls), torch.cat(agrees)


def kl_from_logits(base_logp: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || other) per row, from base log-probabilities and the other model's raw logits.

    sum p (log p - log q) = sum p log p - sum p * logits_q + logsumexp(logits_q): two reductions and
    a logsumexp, without materialising the other model's log-softmax and the difference table (the
    vocabulary is 151k wide). The sums accumulate in float64; a float32 logsumexp leaves ~1e-6 nats of
    rounding, far below any divergence worth reporting.
    """
    p = torch.exp(base_logp)
    neg_entropy = torch.where(p > 0, p * base_logp, torch.zeros_like(p)).sum(-1, dtype=torch.float64)
    cross = (p * other_logits).sum(-1, dtype=torch.float64) - torch.logsumexp(other_logits, dim=-1).double()
    return (neg_entropy - cross).clamp_min(0.0).float()


def expanded_cache(prefix: DynamicCache | None, batch: int, config) -> DynamicCache | None:
    """A fresh cache whose layers view the prefix's keys/values expanded to ``batch`` rows (no copy)."""
    if prefix is None:
        return None
    cache = DynamicCache(config=config)
    for source, target in zip(prefix.layers, cache.layers, strict=True):
        keys = source.keys.expand(batch, *source.keys.shape[1:])
        values = source.values.expand(batch, *source.values.shape[1:])
        target.lazy_initialization(keys, values)
        target.keys, target.values = keys, values
        for attr in ("cumulative_length",):
            if hasattr(source, attr):
                setattr(target, attr, getattr(source, attr))
    return cache


def right_padded(suffixes: list[list[int]]) -> torch.Tensor:
    """Token rows padded on the right with 0: causal attention never lets a real token see a pad."""
    ids = torch.zeros((len(suffixes), max(len(s) for s in suffixes)), dtype=torch.long)
    for row, suffix in enumerate(suffixes):
        ids[row, : len(suffix)] = torch.tensor(suffix)
    return ids


def _cut_at_stops(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def request_groups(requests) -> list[list[int]]:
    """Request indices grouped by ``group``, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request.group, []).append(i)
    return list(groups.values())


def _model_max_length(adapter: Adapter, tokenizer) -> int:
    """The context the engine may use: the model's window, capped (never 40960-token windows by accident)."""
    window = getattr(adapter.text_config, "max_position_embeddings", None) or 2048
    return min(int(window), 8192)
