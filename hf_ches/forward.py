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
>>> out = encode(model, [[1, 5, 6, 7], [1, 5, 9]], prompt_lens=[2, 2], want_logps=True)
>>> out.sums.shape, out.num_tokens.tolist()
(torch.Size([2, 64]), [2, 1])
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hf_ches.batching import completion_positions, pack, pad_right


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
    want_logps: bool = False,
    want_last: bool = False,
    want_states: bool = False,
    pad_id: int = 0,
    head: OutputHead | None = None,
    head_chunk: int = 1024,
) -> Encoded:
    """Run the trunk over ``sequences`` (prompt + completion ids) and reduce each to its completion statistics.

    Args:
        model: a causal LM (``AutoModelForCausalLM``); its device and dtype are used as they are.
        sequences: full token ids per sequence; ``prompt_lens[i]`` of them are prompt. A sequence without a prompt
            token or a completion token has no state to sum: it gets zeros and ``num_tokens`` 0.
        order: the order in which sequences are packed into micro-batches (default: by length, longest first).
            ``sequences`` and ``prompt_lens`` are read in this order, so they may be lazy (e.g. backed by
            :class:`hf_ches.pairs.PendingPairs`) when ``order`` comes from a guess at the lengths.
        token_budget: most ``rows × padded length`` tokens per micro-batch.
        first_budget: most tokens in the first micro-batch (default ``token_budget``): with a lazy ``order``, a small
            first micro-batch starts the model after a few sequences are ready.
        want_logps: also compute the summed completion-token log-probs (applies the output embedding).
        want_last: also return the state predicting the last completion token (a baseline of the paper).
        want_states: also return every completion-predicting state and its logits' log-sum-exp, per sequence
            (applies the output embedding; host memory: ``completion tokens × d`` floats).
        head: the checked output head (default: :func:`output_head` of ``model``, unchecked).
        head_chunk: completion positions per output-embedding chunk (memory: ``head_chunk × V`` floats).
    """
    head = head or output_head(model)
    trunk, device = trunk_of(model), head.weight.device
    n = len(sequences)
    if order is None:
        order = sorted(range(n), key=lambda i: (-len(sequences[i]), i))
    num_tokens = torch.zeros(n, dtype=torch.long)
    sums = torch.zeros(n, head.weight.shape[1], dtype=torch.float32, device=device)
    logps = torch.zeros(n, dtype=torch.float64, device=device) if want_logps else None
    last = torch.zeros_like(sums) if want_last else None
    states: list = [None] * n
    lse: list = [None] * n
    scorable = (i for i in order if 0 < prompt_lens[i] < len(sequences[i]))
    for group in pack(scorable, lambda i: len(sequences[i]), token_budget, first_budget):
        batch = [sequences[i] for i in group]
        lengths = np.array([len(s) for s in batch])
        prompts = np.array([prompt_lens[i] for i in group])
        num_tokens[group] = torch.from_numpy(lengths - prompts)
        rows, cols = completion_positions(lengths, prompts)  # [M], [M]
        ids, rows, cols, group_d, ends = _to_device(
            device, pad_right(batch, pad_id), rows, cols, np.array(group), lengths - 2
        )
        # right padding and a causal model: real tokens never attend to padding, so no attention mask is needed
        h = trunk(input_ids=ids, use_cache=False).last_hidden_state  # [B, T, d]
        sel = h[rows, cols]  # [M, d]: the states at P-1 … L-2 of every row, flattened; they predict ids[rows, cols+1]
        seq_ids = group_d[rows]  # [M]: the sequence each state belongs to
        sums.index_add_(0, seq_ids, sel.float())
        if want_logps or want_states:
            token_logps, token_lse = head.token_logps(sel, ids[rows, cols + 1], head_chunk)  # [M], [M]
            if want_logps:
                logps.index_add_(0, seq_ids, token_logps.double())
            if want_states:
                keep = torch.promote_types(sel.dtype, torch.float32)
                split = (lengths - prompts).tolist()
                for i, h_i, lse_i in zip(group, sel.split(split), token_lse.split(split)):
                    states[i], lse[i] = h_i.to("cpu", keep), lse_i.cpu()  # [n_i, d], [n_i]
        if want_last:
            last[group_d] = h[torch.arange(len(group), device=device), ends].float()
    return Encoded(
        sums=sums.cpu(),
        num_tokens=num_tokens,
        logps=logps.cpu() if want_logps else None,
        last_hidden=last.cpu() if want_last else None,
        states=tuple(states) if want_states else None,
        lse=tuple(lse) if want_states else None,
    )
