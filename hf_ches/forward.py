"""Forward pass: per-sequence sums of the hidden states that produce each completion token's logits.

For a sequence of prompt length ``P`` and total length ``L``, the states at positions ``P-1 … L-2`` are the exact
input of the output embedding (``model.get_output_embeddings()``) for the completion tokens ``P … L-1`` (EOS
included). We run only the model *trunk* (everything before the output embedding) over length-sorted, right-padded
micro-batches (:func:`encode`), or over rows of whole pairs that compute each prompt once for both answers
(:func:`encode_shared`, where :func:`inspect_sharing` finds the model's attention takes that layout), gather those
states once, and from the same gathered states

* accumulate ``S = Σ_k h_k`` in float32 (float64 for a float64 model; CHES needs nothing else),
* optionally apply the output embedding **only at completion positions, in slices** of about ``head_bytes``
  bytes of float32 logits (:data:`HEAD_BYTES`: a few positions for a 262,144-token vocabulary, hundreds for a small
  one), for the completion-token log-probabilities DPO trains on. Logits are never held for a whole micro-batch;
* optionally keep the gathered states themselves and their logits' log-sum-exp, per sequence, which is all the
  exact output-layer eNTK (:func:`hf_ches.scores.output_entk`) needs besides the output embedding.

Models whose logits get extra processing after the output embedding are supported when the processing is one of
final logit soft-capping (Gemma 2/3) or a logit scale (Cohere, Falcon-H1, Granite, ...: the attributes TRL's
fused LM head reads); :func:`inspect_model`
checks on a short input that trunk + head reproduce the model's own logits and raises
:class:`UnsupportedModelError` otherwise, so an architecture we do not understand can never give silent numbers.

>>> import tempfile, torch
>>> from transformers import AutoModelForCausalLM
>>> from hf_ches.testing import build_tiny_model
>>> model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tempfile.mkdtemp()))
>>> out = encode(model, [[1, 5, 6, 7], [1, 5, 9]], prompt_lens=[2, 2], needs={"logps"})
>>> out.sums.shape, out.num_tokens.tolist(), out.logps.shape
(torch.Size([2, 64]), [2, 1], torch.Size([2]))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass

import numpy as np
import torch

from hf_ches.batching import PairBatch, SharedRows, completion_positions, longest_first, pack, pack_rows, pad_right
from hf_ches.pairs import TokenizedPair

logger = logging.getLogger(__name__)

# What a caller may ask :func:`encode` for beyond the sums and token counts (the fields of :class:`Encoded`).
NEEDS = frozenset({"logps", "last_hidden", "states"})

# Bytes of logits computed at once, whatever the vocabulary and the micro-batch: positions × vocabulary
# entries per slice of the output embedding (host or device memory: a few times this with the slice's temporaries).
HEAD_BYTES = 64 << 20


class UnsupportedModelError(ValueError):
    """The model's logits are not ``post(output_embedding(trunk(x)))`` for a post-processing we know."""


@dataclass(frozen=True)
class OutputHead:
    """The output embedding and the elementwise processing that turns its output into the model's logits."""

    weight: torch.Tensor  # [V, d]
    bias: torch.Tensor | None  # [V]
    scale: float = 1.0  # logits *= scale (Cohere's logit_scale, 1/Granite's logits_scaling)
    softcap: float | None = None  # logits = softcap * tanh(logits / softcap) (Gemma 2/3)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the logits and of what is summed from the states: float32, or float64 for a float64 model."""
        return torch.promote_types(self.weight.dtype, torch.float32)

    def logits(self, h: torch.Tensor, vocab: slice = slice(None)) -> torch.Tensor:
        """Logits ``[N, V]`` (:attr:`dtype`) for hidden states ``h`` ``[N, d]`` (or only the entries ``vocab``:
        ``[N, c]``)."""
        bias = None if self.bias is None else self.bias[vocab]
        z = torch.nn.functional.linear(h, self.weight[vocab], bias).to(self.dtype)  # [N, c], a new tensor
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:  # in place: a [N, V] slice is the largest tensor of a pass
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        return z

    def slope(self, z: torch.Tensor) -> torch.Tensor | float:
        """``d logits / d (W h + b)`` from the logits ``z``: ``scale``, times ``1 − (z/softcap)²`` if capped.

        The gradient of a log-prob w.r.t. the output embedding goes through it: ``((e_y − p) ⊙ slope) hᵀ``.

        >>> OutputHead(torch.zeros(1, 1), None, scale=2.0, softcap=4.0).slope(torch.tensor([0.0, 2.0])).tolist()
        [2.0, 1.5]
        """
        if self.softcap is None:
            return self.scale
        slope = (z / self.softcap).square_().neg_().add_(1)  # 1 − (z/softcap)², one new [N, c] tensor
        return slope.mul_(self.scale) if self.scale != 1.0 else slope

    def token_logps(self, h: torch.Tensor, targets: torch.Tensor, max_bytes: int = HEAD_BYTES
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log softmax(logits(h))[targets]`` and ``logsumexp(logits(h))``, ``[N]`` :attr:`dtype`, from slices of rows
        whose logits take at most ``max_bytes`` (at least one row a slice).

        >>> head = OutputHead(torch.eye(3), None)
        >>> logps, lse = head.token_logps(torch.eye(3), torch.tensor([0, 2, 2]), max_bytes=1)  # one row a slice
        >>> [round(x, 4) for x in logps.tolist()], round(float(lse[0]), 4)
        ([-0.5514, -1.5514, -0.5514], 1.5514)
        """
        chunk = max(1, max_bytes // (self.dtype.itemsize * self.weight.shape[0]))
        logps = torch.empty(h.shape[0], dtype=self.dtype, device=h.device)
        lse = torch.empty_like(logps)
        for start in range(0, h.shape[0], chunk):
            z = self.logits(h[start : start + chunk])  # [c, V]
            picked = z.gather(1, targets[start : start + chunk, None]).squeeze(1)
            # torch.logsumexp's own steps, bit for bit, in place in z: no second [c, V] tensor
            top = z.amax(-1, keepdim=True)
            top.masked_fill_(top.abs() == math.inf, 0)
            lse[start : start + chunk] = z.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(1))
            logps[start : start + chunk] = picked - lse[start : start + chunk]
        return logps, lse


@dataclass(frozen=True)
class Encoded:
    """Per-sequence results of :func:`encode`, on CPU, in the order of the input sequences."""

    sums: torch.Tensor  # [N, d] float32 (float64 for float64 models): S = sum of completion-predicting states
    num_tokens: torch.Tensor  # [N] long: number of completion tokens (= summed states)
    logps: torch.Tensor | None  # [N] float64: sum of completion-token log-probs
    last_hidden: torch.Tensor | None  # [N, d] as sums: the state predicting the last completion token
    states: tuple[torch.Tensor, ...] | None = None  # per sequence [n_i, d] float32 (float64 for float64 models)
    lse: tuple[torch.Tensor, ...] | None = None  # per sequence [n_i] as sums: logsumexp of each state's logits


def trunk_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module that maps token ids to the input of the output embedding (``model.model`` for Llama)."""
    return getattr(model, model.base_model_prefix)


def _weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module``'s weight and bias. A module that ``accelerate`` offloads to the CPU or the disk (a model split
    across devices) holds them on the ``meta`` device, and its hook puts them in place for each of its own calls;
    the output head applies them outside those calls, so it gets the offloaded values, once, on the device the hook
    computes on."""
    weight, bias = module.weight, getattr(module, "bias", None)
    hook = getattr(module, "_hf_hook", None)
    if weight.device.type != "meta" or getattr(hook, "weights_map", None) is None:
        return weight, bias
    device = hook.execution_device
    return hook.weights_map["weight"].to(device), None if bias is None else hook.weights_map["bias"].to(device)


def output_head(model: torch.nn.Module) -> OutputHead:
    """Read the output embedding and the known logit post-processing from ``model`` and its config."""
    config = model.config.get_text_config()
    embedding = model.get_output_embeddings()
    # the same attributes TRL's fused LM head reads: a multiplier under one of three names, or Granite's divisor
    scale = next((getattr(config, a) for a in ("logit_scale", "output_multiplier", "lm_head_multiplier")
                  if getattr(config, a, None) is not None), None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
    scale = 1.0 if scale is None else float(scale)
    softcap = getattr(config, "final_logit_softcapping", None)
    return OutputHead(*_weights(embedding), scale, float(softcap) if softcap else None)


@torch.inference_mode()
def inspect_model(model: torch.nn.Module) -> OutputHead:
    """Check on a short input that trunk + :class:`OutputHead` give the model's own hidden states and logits.

    The input of the output embedding is captured with a forward pre-hook during a normal forward pass and compared
    with the trunk's output; the model's logits are compared with the head's; and appending tokens must leave the
    earlier states alone (a causal trunk), which is what lets :func:`encode` right-pad without an attention mask.
    Raises :class:`UnsupportedModelError` naming the architecture when any of these fails.
    """
    head = output_head(model)
    device = head.weight.device
    ids = torch.arange(3, 11, device=device)[None] % head.weight.shape[0]  # [1, 8]
    captured = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()  # [1, 8, V]
    finally:
        hook.remove()
    h = trunk_of(model)(input_ids=ids, use_cache=False).last_hidden_state  # [1, 8, d]
    name = type(model).__name__
    tol = dict(rtol=1e-3, atol=1e-3) if h.dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    # all on the head's device (in a model split across devices the last layer may be on another)
    h, captured, logits = h.to(device), [state.to(device) for state in captured], logits.to(device)
    if not captured or not torch.allclose(captured[0].float(), h.float(), **tol):
        raise UnsupportedModelError(
            f"{name}: the trunk `model.{model.base_model_prefix}` does not produce the input of the output embedding"
        )
    # Appending tokens moves every state of a non-causal trunk far beyond rounding; in a causal one only the rounding
    # moves, which in bfloat16 can be large at a few positions, hence the median.
    longer = trunk_of(model)(input_ids=torch.cat([ids, ids[:, :4]], 1), use_cache=False).last_hidden_state
    moved = ((longer[0, :8].to(device) - h[0]).float().norm(dim=-1) / h[0].float().norm(dim=-1)).median()
    if moved > (1e-3 if h.dtype == torch.float32 else 5e-2):
        raise UnsupportedModelError(f"{name}: later tokens change the trunk's earlier states (not causal)")
    if not torch.allclose(head.logits(h[0]).float(), logits[0], **tol):
        raise UnsupportedModelError(
            f"{name}: its logits get a post-processing after the output embedding that hf-ches does not know "
            "(supported: none, final_logit_softcapping, logit_scale, output_multiplier, lm_head_multiplier, "
            "logits_scaling)"
        )
    return head


@dataclass(frozen=True)
class SharedAttention:
    """How a model takes the attention layout of prefix-shared rows (:func:`encode_shared`), as a 4D mask that
    ``transformers`` passes to every attention layer as it is.

    ``additive``: the eager implementation adds the mask to the attention scores, so it gets 0 where a token may
    attend and the dtype's minimum elsewhere; ``None``: SDPA, which takes the boolean mask. ``layer_types``: models
    whose layers differ (``config.layer_types``, e.g. Gemma 2's alternating sliding-window layers) get one mask per
    type, in a dict. ``window``: the sliding window (``config.sliding_window``) of the ``"sliding_attention"`` layers,
    or of every layer when there are no layer types (Mistral).

    >>> segments, branch = torch.tensor([[0, 0, 0, 0, 1]]), torch.tensor([[0, 1, 2, 2, 0]])
    >>> positions = torch.tensor([[0, 1, 1, 2, 0]])
    >>> SharedAttention().mask(segments, branch, positions)[0, 0].int().tolist()
    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    >>> SharedAttention(window=2).mask(segments, branch, positions)[0, 0, 3].int().tolist()  # position 2 sees 1 and 2
    [0, 0, 1, 1, 0]
    """

    additive: torch.dtype | None = None
    layer_types: tuple[str, ...] = ()
    window: int | None = None

    def mask(self, segments: torch.Tensor, branch: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | dict:
        """``[B, 1, T, T]`` from the layout of :class:`~hf_ches.batching.SharedRows`: query ``q`` sees key ``k`` when
        both are in one segment, ``k`` is not after ``q``, and not (``q`` rejected and ``k`` chosen); in a
        sliding-window layer, also ``position(q) - position(k) < window``."""
        index = torch.arange(segments.shape[1], device=segments.device)
        allowed = ((segments[:, :, None] == segments[:, None, :]) & (index[None, None, :] <= index[None, :, None])
                   & ~((branch[:, :, None] == 2) & (branch[:, None, :] == 1)))[:, None]
        kinds = set(self.layer_types) or {"sliding_attention" if self.window else "full_attention"}
        masks = {kind: self._form(allowed if kind == "full_attention" or segments.shape[1] <= self.window
                                  else allowed & (positions[:, :, None] - positions[:, None, :] < self.window)[:, None])
                 for kind in kinds}
        return masks if self.layer_types else masks.popitem()[1]

    def _form(self, allowed: torch.Tensor) -> torch.Tensor:
        if self.additive is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=self.additive, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(self.additive).min)


@torch.inference_mode()
def inspect_sharing(model: torch.nn.Module, head: OutputHead) -> SharedAttention | None:
    """How ``model`` takes prefix-shared rows, checked on two short pairs against :func:`encode`; ``None``, with one
    info line saying why, when it cannot (then the scorer runs :func:`encode`).

    The attention implementation must take a custom 4D mask (``sdpa`` or ``eager``; not ``flash_attention_2``) and
    every layer must be of a type the mask covers (full or sliding-window attention).
    """
    config = model.config.get_text_config()
    implementation = getattr(config, "_attn_implementation", None)
    layer_types = tuple(getattr(config, "layer_types", None) or ())
    if implementation not in ("sdpa", "eager"):
        reason = f"its attention implementation {implementation!r} takes no custom mask (sdpa and eager do)"
    elif set(layer_types) - {"full_attention", "sliding_attention"}:
        reason = f"it has layers of types {sorted(set(layer_types))} (full and sliding-window attention are covered)"
    else:
        attention = SharedAttention(model.dtype if implementation == "eager" else None, layer_types,
                                    getattr(config, "sliding_window", None))

        def ids(*tokens: int) -> list[int]:
            return [t % head.weight.shape[0] for t in tokens]

        batch = PairBatch([TokenizedPair(0, ids(3, 4, 5), ids(6, 7, 8), ids(9, 10)),
                           TokenizedPair(1, ids(4, 5), ids(11), ids(7, 3, 6))])
        try:
            shared = encode_shared(model, batch, attention, head=head).sums
            plain = encode(model, batch.sequences, batch.prompt_lens, head=head).sums
            moved = float((shared - plain).norm() / plain.norm())
            tolerance = 1e-4 if model.dtype == torch.float32 else 3e-2
            reason = None if moved < tolerance else f"a shared pass moves its states by {moved:.1e} (relative)"
        except Exception as err:  # an architecture whose attention does not take the layout as given
            reason = f"a shared pass fails: {type(err).__name__}: {err}"
        if reason is None:
            return attention
    logger.info("prefix sharing is off for %s: %s; every sequence runs whole", type(model).__name__, reason)
    return None


def _to_device(device: torch.device, *arrays: np.ndarray) -> list[torch.Tensor]:
    """The integer ``arrays`` as ``int64`` tensors on ``device``, in one copy that does not block the host.

    A copy from ordinary (pageable) host memory makes the host wait for the device to finish all queued work; from
    pinned memory with ``non_blocking=True`` it does not, so the host prepares the next micro-batch while the
    accelerator still runs this one. (PyTorch keeps the pinned buffer alive until the copy is done.)
    """
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(np.int64, copy=False))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    return [part.view(a.shape) for part, a in zip(flat.split([a.size for a in arrays]), arrays)]


@torch.inference_mode()
def encode(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    prompt_lens: Sequence[int],
    *,
    order: Iterable[int] | None = None,
    token_budget: int = 16384,
    first_budget: int | None = None,
    needs: Set[str] = frozenset(),
    pad_id: int = 0,
    head: OutputHead | None = None,
    head_bytes: int = HEAD_BYTES,
) -> Encoded:
    """Run the trunk over ``sequences`` (prompt + completion ids) and reduce each to its completion statistics.

    Args:
        model: a causal LM (``AutoModelForCausalLM``); its device and dtype are used as they are.
        sequences: full token ids per sequence; ``prompt_lens[i]`` of them are prompt.
        order: the sequences to run, in the order in which they are packed into micro-batches (default: all, by
            :func:`~hf_ches.batching.longest_first`). Each needs a prompt token and a completion token
            (:meth:`hf_ches.batching.PairBatch.runnable` keeps those); a sequence left out gets zeros and
            ``num_tokens`` 0. ``sequences`` and ``prompt_lens`` are read in this order, so they may be lazy (e.g.
            a :class:`~hf_ches.batching.PairBatch` still tokenizing) when ``order`` comes from a guess at the
            lengths.
        token_budget: most ``rows × padded length`` tokens per micro-batch.
        first_budget: most tokens in the first micro-batch (default ``token_budget``): with a lazy ``order``, a small
            first micro-batch starts the model after a few sequences are ready.
        needs: what to compute beyond the sums, any of :data:`NEEDS`: ``"logps"``, the summed completion-token
            log-probs (applies the output embedding); ``"last_hidden"``, the state predicting the last completion
            token (a baseline of the paper); ``"states"``, every completion-predicting state and its logits'
            log-sum-exp, per sequence (applies the output embedding; host memory: ``completion tokens × d`` floats).
        head: the checked output head (default: :func:`output_head` of ``model``, unchecked).
        head_bytes: most bytes of logits at once (:data:`HEAD_BYTES`): the output embedding runs over
            ``head_bytes / (4 V)`` completion positions at a time (float32), however large the micro-batch.
    """
    head = head or output_head(model)
    if order is None:
        order = longest_first([len(s) for s in sequences])
    groups = pack(order, lambda i: len(sequences[i]), token_budget, first_budget)
    micro = (_MicroBatch.padded([sequences[i] for i in group], [prompt_lens[i] for i in group], group, pad_id,
                                head.weight.device) for group in groups)
    return _reduce(model, head, micro, len(sequences), needs, head_bytes)


@torch.inference_mode()
def encode_shared(
    model: torch.nn.Module,
    batch: PairBatch,
    attention: SharedAttention,
    *,
    order: Iterable[int] | None = None,
    token_budget: int = 16384,
    first_budget: int | None = None,
    needs: Set[str] = frozenset(),
    pad_id: int = 0,
    head: OutputHead | None = None,
    head_bytes: int = HEAD_BYTES,
) -> Encoded:
    """:func:`encode` of ``batch.sequences``, computing each pair's prompt once (prefix sharing) and without padding
    between pairs.

    Each pair is one segment ``[prompt | chosen | rejected]`` (:meth:`~hf_ches.batching.PairBatch.shared_rows`):
    the rejected tokens take the positions they have after the prompt and see the prompt but not the chosen tokens,
    so every state equals the one of the pair's own sequence, to rounding, and a pass computes ``P + C + R`` tokens
    where :func:`encode` computes ``2P + C + R`` plus padding. Segments are packed side by side in rows
    (:func:`~hf_ches.batching.pack_rows`, under ``token_budget``), each seeing only itself. ``attention`` is the
    model's :func:`inspect_sharing`. ``order``: pair indices (default: the runnable pairs, longest first); the
    other arguments and the result are those of :func:`encode`, in ``batch``'s sequence layout.

    >>> import tempfile
    >>> from transformers import AutoModelForCausalLM
    >>> from hf_ches.batching import PairBatch
    >>> from hf_ches.pairs import TokenizedPair
    >>> from hf_ches.testing import build_tiny_model
    >>> model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tempfile.mkdtemp()))
    >>> batch = PairBatch([TokenizedPair(0, [1, 5], [6, 7], [9]), TokenizedPair(1, [1], [8], [4, 2])])
    >>> shared = encode_shared(model, batch, inspect_sharing(model, output_head(model)), needs={"logps"})
    >>> plain = encode(model, batch.sequences, batch.prompt_lens, needs={"logps"})
    >>> shared.num_tokens.tolist(), torch.allclose(shared.sums, plain.sums, atol=1e-5)
    ([2, 1, 1, 2], True)
    """
    head = head or output_head(model)
    if order is None:
        order = batch.runnable(longest_first(batch.segment_lengths))
    rows = pack_rows(order, batch.segment_lengths.__getitem__, token_budget, first_budget)
    micro = (_MicroBatch.shared(batch.shared_rows(r, pad_id), attention, head.weight.device) for r in rows)
    return _reduce(model, head, micro, 2 * len(batch), needs, head_bytes)


def _reduce(model: torch.nn.Module, head: OutputHead, micro_batches: Iterable[_MicroBatch], n: int, needs: Set[str],
            head_bytes: int) -> Encoded:
    """Run the trunk over each micro-batch and reduce its states into the results of ``n`` sequences."""
    if not needs <= NEEDS:
        raise ValueError(f"needs: expected a subset of {sorted(NEEDS)}, got {sorted(needs)}")
    trunk = trunk_of(model)
    out = _Results(n, head.weight.shape[1], head.weight.device, head.dtype, needs)
    for batch in micro_batches:
        h = trunk(input_ids=batch.ids, position_ids=batch.positions, attention_mask=batch.mask,
                  use_cache=False).last_hidden_state  # [B, T, d]
        out.add(batch, h, head, head_bytes)
    return out.encoded()


@dataclass(frozen=True)
class _MicroBatch:
    """One micro-batch on the device, with where each sequence's completion-predicting states are."""

    ids: torch.Tensor  # [B, T] token ids
    positions: torch.Tensor | None  # [B, T] position ids (None: 0 … T-1 in every row)
    mask: torch.Tensor | dict | None  # the attention layout (None: causal, which right padding needs no more than)
    rows: torch.Tensor  # [M]: row of each completion-predicting state, sequence by sequence
    cols: torch.Tensor  # [M]: its column
    targets: torch.Tensor  # [M]: the token it predicts
    seq: torch.Tensor  # [M]: the sequence it belongs to
    ends: torch.Tensor  # [S]: the index in M of each sequence's last state (it predicts the last completion token)
    members: list[int]  # the sequence of each block of M, on the host (reading ``seq`` back would wait)
    counts: list[int]  # completion tokens per block, on the host

    @classmethod
    def padded(cls, batch: list, prompts: list[int], group: list[int], pad_id: int, device) -> "_MicroBatch":
        """One sequence per row, right-padded: real tokens never attend to padding, so no attention mask is needed."""
        lengths, prompts_np = np.array([len(s) for s in batch]), np.array(prompts)
        ids = pad_right(batch, pad_id)
        rows, cols = completion_positions(lengths, prompts_np)
        counts = (lengths - prompts_np).tolist()
        ids, rows_d, cols_d, targets, seq, ends = _to_device(
            device, ids, rows, cols, ids[rows, cols + 1], np.array(group)[rows], np.cumsum(counts) - 1)
        return cls(ids, None, None, rows_d, cols_d, targets, seq, ends, group, counts)

    @classmethod
    def shared(cls, packed: SharedRows, attention: SharedAttention, device) -> "_MicroBatch":
        """Pairs as prefix-shared segments (:meth:`hf_ches.batching.PairBatch.shared_rows`)."""
        ids, positions, segments, branch, rows, cols, targets, seq, ends = _to_device(
            device, packed.ids, packed.positions, packed.segments, packed.branch, packed.rows, packed.cols,
            packed.targets, np.repeat(packed.sequences, packed.counts), np.cumsum(packed.counts) - 1)
        mask = attention.mask(segments, branch, positions)
        return cls(ids, positions, mask, rows, cols, targets, seq, ends, packed.sequences, packed.counts)


class _Results:
    """The per-sequence results of :func:`encode`, filled in one micro-batch at a time."""

    def __init__(self, n: int, d: int, device: torch.device, dtype: torch.dtype, needs: Set[str]):
        self.needs = needs
        self.num_tokens = torch.zeros(n, dtype=torch.long)
        self.sums = torch.zeros(n, d, dtype=dtype, device=device)
        self.logps = torch.zeros(n, dtype=torch.float64, device=device) if "logps" in needs else None
        self.last = torch.zeros_like(self.sums) if "last_hidden" in needs else None
        self.states: list = [None] * n
        self.lse: list = [None] * n

    def add(self, batch: _MicroBatch, h: torch.Tensor, head: OutputHead, head_bytes: int) -> None:
        """Reduce the trunk's states ``h`` ``[B, T, d]`` of ``batch`` into its sequences' results."""
        self.num_tokens[batch.members] = torch.tensor(batch.counts)
        # [M, d]: the completion-predicting states of every sequence, flattened; gathered on the device of the last
        # layer, then on the output head's (they differ in a model split across devices)
        sel = h[batch.rows.to(h.device), batch.cols.to(h.device)].to(self.sums.device)
        self.sums.index_add_(0, batch.seq, sel.to(self.sums.dtype))
        if self.needs & {"logps", "states"}:
            token_logps, token_lse = head.token_logps(sel, batch.targets, head_bytes)
            if self.logps is not None:
                self.logps.index_add_(0, batch.seq, token_logps.double())
            if "states" in self.needs:
                for i, h_i, lse_i in zip(batch.members, sel.split(batch.counts), token_lse.split(batch.counts)):
                    self.states[i], self.lse[i] = h_i.to("cpu", self.sums.dtype), lse_i.cpu()  # [n_i, d], [n_i]
        if self.last is not None:
            self.last[batch.seq[batch.ends]] = sel[batch.ends].to(self.last.dtype)

    def encoded(self) -> Encoded:
        states = "states" in self.needs
        return Encoded(
            sums=self.sums.cpu(),
            num_tokens=self.num_tokens,
            logps=None if self.logps is None else self.logps.cpu(),
            last_hidden=None if self.last is None else self.last.cpu(),
            states=tuple(self.states) if states else None,
            lse=tuple(self.lse) if states else None,
        )
