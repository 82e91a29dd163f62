"""Forward pass: per-sequence sums of the hidden states that produce each completion token's logits.

For a sequence of prompt length ``P`` and total length ``L``, the states at positions ``P-1 … L-2`` are the exact
input of the output embedding (``model.get_output_embeddings()``) for the completion tokens ``P … L-1`` (EOS
included). We run only the model *trunk* (everything before the output embedding) over length-sorted, right-padded
micro-batches, gather those states once, and from the same gathered states

* accumulate ``S = Σ_k h_k`` in float32 (CHES needs nothing else),
* optionally apply the output embedding **only at completion positions, in chunks**, for the completion-token
  log-probabilities DPO trains on. ``[batch, seq, vocab]`` logits are never materialised;
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

from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass

import numpy as np
import torch

from hf_ches.batching import completion_positions, longest_first, pack, pad_right

# What a caller may ask :func:`encode` for beyond the sums and token counts (the fields of :class:`Encoded`).
NEEDS = frozenset({"logps", "last_hidden", "states"})


class UnsupportedModelError(ValueError):
    """The model's logits are not ``post(output_embedding(trunk(x)))`` for a post-processing we know."""


@dataclass(frozen=True)
class OutputHead:
    """The output embedding and the elementwise processing that turns its output into the model's logits."""

    weight: torch.Tensor  # [V, d]
    bias: torch.Tensor | None  # [V]
    scale: float = 1.0  # logits *= scale (Cohere's logit_scale, 1/Granite's logits_scaling)
    softcap: float | None = None  # logits = softcap * tanh(logits / softcap) (Gemma 2/3)

    def logits(self, h: torch.Tensor, vocab: slice = slice(None)) -> torch.Tensor:
        """Float32 logits ``[N, V]`` for hidden states ``h`` ``[N, d]`` (or only the entries ``vocab``: ``[N, c]``)."""
        bias = None if self.bias is None else self.bias[vocab]
        z = torch.nn.functional.linear(h, self.weight[vocab], bias).float()  # [N, c]
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def slope(self, z: torch.Tensor) -> torch.Tensor | float:
        """``d logits / d (W h + b)`` from the logits ``z``: ``scale``, times ``1 − (z/softcap)²`` if capped.

        The gradient of a log-prob w.r.t. the output embedding goes through it: ``((e_y − p) ⊙ slope) hᵀ``.

        >>> OutputHead(torch.zeros(1, 1), None, scale=2.0, softcap=4.0).slope(torch.tensor([0.0, 2.0])).tolist()
        [2.0, 1.5]
        """
        return self.scale if self.softcap is None else self.scale * (1 - (z / self.softcap) ** 2)

    def token_logps(self, h: torch.Tensor, targets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``log softmax(logits(h))[targets]`` and ``logsumexp(logits(h))``, ``[N]`` float32, ``chunk`` rows a pass."""
        logps = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty_like(logps)
        for start in range(0, h.shape[0], chunk):
            z = self.logits(h[start : start + chunk])  # [c, V]
            t = targets[start : start + chunk, None]  # [c, 1]
            lse[start : start + chunk] = torch.logsumexp(z, dim=-1)
            logps[start : start + chunk] = z.gather(1, t).squeeze(1) - lse[start : start + chunk]
        return logps, lse


@dataclass(frozen=True)
class Encoded:
    """Per-sequence results of :func:`encode`, on CPU, in the order of the input sequences."""

    sums: torch.Tensor  # [N, d] float32: S = sum of completion-predicting hidden states
    num_tokens: torch.Tensor  # [N] long: number of completion tokens (= summed states)
    logps: torch.Tensor | None  # [N] float64: sum of completion-token log-probs
    last_hidden: torch.Tensor | None  # [N, d] float32: the state predicting the last completion token
    states: tuple[torch.Tensor, ...] | None = None  # per sequence [n_i, d] float32 (float64 for float64 models)
    lse: tuple[torch.Tensor, ...] | None = None  # per sequence [n_i] float32: logsumexp of each state's logits


def trunk_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module that maps token ids to the input of the output embedding (``model.model`` for Llama)."""
    return getattr(model, model.base_model_prefix)


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
    return OutputHead(embedding.weight, getattr(embedding, "bias", None), scale, float(softcap) if softcap else None)


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
    if not captured or not torch.allclose(captured[0].float(), h.float(), **tol):
        raise UnsupportedModelError(
            f"{name}: the trunk `model.{model.base_model_prefix}` does not produce the input of the output embedding"
        )
    # Appending tokens moves every state of a non-causal trunk far beyond rounding; in a causal one only the rounding
    # moves, which in bfloat16 can be large at a few positions, hence the median.
    longer = trunk_of(model)(input_ids=torch.cat([ids, ids[:, :4]], 1), use_cache=False).last_hidden_state
    moved = ((longer[0, :8] - h[0]).float().norm(dim=-1) / h[0].float().norm(dim=-1)).median()
    if moved > (1e-3 if h.dtype == torch.float32 else 5e-2):
        raise UnsupportedModelError(f"{name}: later tokens change the trunk's earlier states (not causal)")
    if not torch.allclose(head.logits(h[0]), logits[0], **tol):
        raise UnsupportedModelError(
            f"{name}: its logits get a post-processing after the output embedding that hf-ches does not know "
            "(supported: none, final_logit_softcapping, logit_scale, output_multiplier, lm_head_multiplier, "
            "logits_scaling)"
        )
    return head


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
    head_chunk: int = 1024,
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
        head_chunk: completion positions per output-embedding chunk (memory: ``head_chunk × V`` floats).
    """
    if not needs <= NEEDS:
        raise ValueError(f"needs: expected a subset of {sorted(NEEDS)}, got {sorted(needs)}")
    head = head or output_head(model)
    trunk, device = trunk_of(model), head.weight.device
    if order is None:
        order = longest_first([len(s) for s in sequences])
    out = _Results(len(sequences), head.weight.shape[1], device, needs)
    for group in pack(order, lambda i: len(sequences[i]), token_budget, first_budget):
        batch = _MicroBatch.build([sequences[i] for i in group], [prompt_lens[i] for i in group], group, pad_id,
                                  device)
        # right padding and a causal model: real tokens never attend to padding, so no attention mask is needed
        h = trunk(input_ids=batch.ids, use_cache=False).last_hidden_state  # [B, T, d]
        out.add(batch, h, head, head_chunk)
    return out.encoded()


@dataclass(frozen=True)
class _MicroBatch:
    """One padded micro-batch on the device, with where each sequence's completion-predicting states are."""

    ids: torch.Tensor  # [B, T] right-padded token ids
    rows: torch.Tensor  # [M]: row of each completion-predicting position P-1 … L-2, row by row
    cols: torch.Tensor  # [M]: its column; the state there predicts ids[rows, cols + 1]
    group: torch.Tensor  # [B]: the sequence index of each row
    ends: torch.Tensor  # [B]: the column of each row's last completion-predicting state (L - 2)
    members: list[int]  # the sequence index of each row, on the host (reading ``group`` back would wait)
    counts: list[int]  # completion tokens per row, on the host

    @classmethod
    def build(cls, batch: list, prompts: list[int], group: list[int], pad_id: int, device) -> "_MicroBatch":
        lengths, prompts_np = np.array([len(s) for s in batch]), np.array(prompts)
        rows, cols = completion_positions(lengths, prompts_np)
        ids, rows, cols, group_d, ends = _to_device(device, pad_right(batch, pad_id), rows, cols, np.array(group),
                                                    lengths - 2)
        return cls(ids, rows, cols, group_d, ends, group, (lengths - prompts_np).tolist())


class _Results:
    """The per-sequence results of :func:`encode`, filled in one micro-batch at a time."""

    def __init__(self, n: int, d: int, device: torch.device, needs: Set[str]):
        self.needs = needs
        self.num_tokens = torch.zeros(n, dtype=torch.long)
        self.sums = torch.zeros(n, d, dtype=torch.float32, device=device)
        self.logps = torch.zeros(n, dtype=torch.float64, device=device) if "logps" in needs else None
        self.last = torch.zeros_like(self.sums) if "last_hidden" in needs else None
        self.states: list = [None] * n
        self.lse: list = [None] * n

    def add(self, batch: _MicroBatch, h: torch.Tensor, head: OutputHead, head_chunk: int) -> None:
        """Reduce the trunk's states ``h`` ``[B, T, d]`` of ``batch`` into its sequences' results."""
        self.num_tokens[batch.members] = torch.tensor(batch.counts)
        sel = h[batch.rows, batch.cols]  # [M, d]: the completion-predicting states of every row, flattened
        seq_ids = batch.group[batch.rows]  # [M]: the sequence each state belongs to
        self.sums.index_add_(0, seq_ids, sel.float())
        if self.needs & {"logps", "states"}:
            token_logps, token_lse = head.token_logps(sel, batch.ids[batch.rows, batch.cols + 1], head_chunk)
            if self.logps is not None:
                self.logps.index_add_(0, seq_ids, token_logps.double())
            if "states" in self.needs:
                keep = torch.promote_types(sel.dtype, torch.float32)
                for i, h_i, lse_i in zip(batch.members, sel.split(batch.counts), token_lse.split(batch.counts)):
                    self.states[i], self.lse[i] = h_i.to("cpu", keep), lse_i.cpu()  # [n_i, d], [n_i]
        if self.last is not None:
            self.last[batch.group] = h[torch.arange(len(batch.counts), device=h.device), batch.ends].float()

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
