"""Gradient-kernel pair scores: the empirical NTK of ``ln π(y|x)`` over a chosen parameter subset, per pair.

For any DPO-type loss ``ℓ(u)`` of the pair margin ``u`` (DPO: ``ℓ(u) = −log σ(β u)``), gradient flow on the pair
moves the chosen completion's log-likelihood by (Malladi et al. 2023; Razin et al. 2024, App. E;
``docs/scores.md`` §3.1)

    d/dt ln π(y+|x) = −ℓ′(u) · [K(y+,y+) − K(y+,y−)],    K(a,b) = <∇θ ln π(a|x), ∇θ ln π(b|x)>,

with ``−ℓ′ > 0`` (at DPO's first step, with the reference equal to the policy, ``u = 0`` and ``ℓ′ = −β/2``).
With ``g± = ∇_S ln π(y±|x)``, the gradients w.r.t. a parameter subset ``S``, the columns are

* ``ntk_pp = <g+, g+>``, ``ntk_pm = <g+, g−>``, ``ntk_mm = <g−, g−>``;
* ``ntk_displacement = ntk_pm − ntk_pp``. One SGD step ``θ_S −= η ∇ℓ`` changes ``ln π(y+|x)`` by
  ``η ℓ′ · ntk_displacement + O(η²)``: a positive value predicts likelihood displacement;
* ``ntk_cosine = ntk_pm / sqrt(ntk_pp ntk_mm)``, the scale-free similarity of the two gradients;
* ``signgd_displacement = −<g+, sign(g+ − g−)>``. One sign-GD step (Adam early in training) ``θ_S −= η sign(∇ℓ)``
  ``= θ_S + η sign(g+ − g−)`` changes ``ln π(y+|x)`` by ``−η · signgd_displacement + O(η²)`` (Malladi et al.'s
  asymmetric SignGD kernel, with the sign on the side that makes the update).

CHES and ``entk_w`` (:mod:`hf_ches.scores`) are the output-embedding block and come from the forward pass alone;
these columns cost one backward pass per completion, for any subset (:func:`select_parameters`). For an untied
output embedding, ``parameters="output"`` gives ``ntk_displacement == entk_w``.

>>> import tempfile
>>> from datasets import Dataset
>>> from hf_ches.testing import build_tiny_model, synthetic_pairs
>>> scorer = GradientKernelScorer(build_tiny_model(tempfile.mkdtemp()), parameters="last:1")
>>> ds = scorer.map(Dataset.from_dict(synthetic_pairs(3)))
>>> [c for c in ds.column_names if c.startswith(("ntk", "signgd"))]
['ntk_pp', 'ntk_pm', 'ntk_mm', 'ntk_displacement', 'ntk_cosine', 'signgd_displacement']
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_ches.forward import trunk_of
from hf_ches.loading import Loaded
from hf_ches.batching import PairBatch
from hf_ches.transform import CHESScorer, ScorerConfig

KERNEL_COLUMNS = {
    "ntk": ("ntk_pp", "ntk_pm", "ntk_mm", "ntk_displacement", "ntk_cosine"),
    "signgd": ("signgd_displacement",),
    "logps": ("chosen_logps", "rejected_logps"),
}
PARAMETER_PRESETS = ("output", "all", "trainable", "lora")
_SKETCH_CHUNK = 1 << 24  # coordinates per random draw of the sketch (part of its definition: keep fixed)


@dataclass(frozen=True)
class KernelScorerConfig(ScorerConfig):
    """:class:`ScorerConfig` plus the parameter subset; ``token_budget`` and ``head_bytes`` do not apply here
    (one sequence per backward pass, through the model's own forward)."""

    scores: tuple[str, ...] = ("ntk", "signgd")
    parameters: str = "output"  # see select_parameters: output, all, trainable, lora, last:K, re:<regex>
    projection_dim: int | None = None  # CountSketch size for the ntk_* columns; None: exact inner products
    seed: int = 0  # of the projection

    def __post_init__(self):
        super().__post_init__()
        _parse_parameters(self.parameters)  # fail when the scorer is built, not in a worker
        dim = self.projection_dim
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ValueError(f"projection_dim: expected None or an int >= 1, got {dim!r}")


def _parse_parameters(spec: str) -> tuple[str, Any]:
    """``(kind, argument)`` of a parameter-subset spec, or a ValueError saying what is accepted."""
    if spec in PARAMETER_PRESETS:
        return spec, None
    kind, _, arg = spec.partition(":")
    if kind == "last" and arg.isdigit() and int(arg) >= 1:
        return kind, int(arg)
    if kind == "re":
        try:
            return kind, re.compile(arg)
        except re.error as err:
            raise ValueError(f"parameters={spec!r}: not a regular expression ({err})") from None
    raise ValueError(f"parameters: expected one of {PARAMETER_PRESETS}, 'last:K' (K >= 1) or 're:<regex>', "
                     f"got {spec!r}")


def select_parameters(model: torch.nn.Module, spec: str) -> list[tuple[str, torch.nn.Parameter]]:
    """The ``(name, parameter)`` pairs of ``model`` that ``spec`` selects, in ``named_parameters`` order.

    * ``"output"``: the output embedding matrix. With tied embeddings it is the shared matrix, and its kernel
      includes the input-embedding use (that is what training it does); ``entk_w`` is the output use alone.
    * ``"all"``; ``"trainable"``: those with ``requires_grad`` (the adapters of a PEFT model);
      ``"lora"``: names containing ``lora_``.
    * ``"last:K"``: the last ``K`` transformer blocks (the trunk's largest ``ModuleList``; not the final norm).
    * ``"re:<regex>"``: names matching the regular expression (``re.search``).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
    ...                                      num_attention_heads=2, num_key_value_heads=1))
    >>> [name for name, _ in select_parameters(model, "re:layers\\\\.1\\\\..*norm")]
    ['model.layers.1.input_layernorm.weight', 'model.layers.1.post_attention_layernorm.weight']
    >>> len(select_parameters(model, "last:1")), [name for name, _ in select_parameters(model, "output")]
    (9, ['lm_head.weight'])
    """
    kind, arg = _parse_parameters(spec)
    named = list(model.named_parameters())  # a tied matrix appears once
    if kind == "output":
        weight = model.get_output_embeddings().weight
        chosen = [(n, p) for n, p in named if p is weight]
    elif kind == "all":
        chosen = named
    elif kind == "trainable":
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif kind == "lora":
        chosen = [(n, p) for n, p in named if "lora_" in n]
    elif kind == "last":
        lists = [m for m in trunk_of(model).modules() if isinstance(m, torch.nn.ModuleList)]
        blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=[])
        if arg > len(blocks):
            raise ValueError(f"parameters={spec!r}: {type(model).__name__} has {len(blocks)} transformer blocks")
        wanted = {id(p) for block in blocks[-arg:] for p in block.parameters()}
        chosen = [(n, p) for n, p in named if id(p) in wanted]
    else:
        chosen = [(n, p) for n, p in named if arg.search(n)]
    if not chosen:
        raise ValueError(f"parameters={spec!r} selects no parameter of {type(model).__name__} (its parameter names "
                         f"run from {named[0][0]!r} to {named[-1][0]!r})")
    return chosen


@contextlib.contextmanager
def _tracking_only(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Let autograd track exactly ``params`` (no activation is kept for other gradients); restore afterwards."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    selected = {id(p) for p in params}
    try:
        for p, _ in before:
            p.requires_grad_(id(p) in selected)
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def sequence_logp(model: torch.nn.Module, ids: Sequence[int], prompt_len: int) -> torch.Tensor:
    """``ln π(completion | prompt)`` of one unpadded sequence from the model's own logits (scalar, differentiable).

    The logits of positions ``P-1 … L-2`` only (``logits_to_keep``), so any soft-capping or scaling the model
    applies is in, exactly as in training; float32 at least.
    """
    x = torch.as_tensor([list(ids)], device=model.device)  # [1, L]
    z = model(input_ids=x, use_cache=False, logits_to_keep=x.shape[1] - prompt_len + 1).logits[0, :-1]  # [n, V]
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    return (z.gather(1, x[0, prompt_len:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)).sum()


def sequence_gradients(
    model: torch.nn.Module, named: Sequence[tuple[str, torch.nn.Parameter]], ids: Sequence[int], prompt_len: int
) -> tuple[list[torch.Tensor], float]:
    """``(∇ ln π(completion | prompt)`` w.r.t. each parameter of ``named``, ``ln π)`` for one sequence."""
    params = [p for _, p in named]
    with torch.enable_grad(), _tracking_only(model, params):
        logp = sequence_logp(model, ids, prompt_len)
        grads = torch.autograd.grad(logp, params, allow_unused=True)
    unused = [name for (name, _), g in zip(named, grads) if g is None]
    if unused:
        raise ValueError(f"parameter {unused[0]!r} does not affect ln π(y|x): choose a subset without it")
    return list(grads), logp.item()


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b>`` with products in float32 at least, summed pairwise by ``sum``: pairwise summation keeps the
    rounding error of millions of terms near one float32 ulp, where the running sum of a ``torch.dot`` grows with
    the number of terms."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    return float((a.to(dtype) * b.to(dtype)).sum())


def ntk_pair(g_plus: Sequence[torch.Tensor], g_minus: Sequence[torch.Tensor]) -> tuple[float, float, float]:
    """``(K_pp, K_pm, K_mm)`` of one pair from its gradients (or sketches), given tensor by tensor.

    >>> ntk_pair([torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -1.0])])
    (5.0, 1.0, 10.0)
    """
    pp = sum(_dot(a, a) for a in g_plus)
    pm = sum(_dot(a, b) for a, b in zip(g_plus, g_minus, strict=True))
    mm = sum(_dot(b, b) for b in g_minus)
    return pp, pm, mm


def signgd_displacement(g_plus: Sequence[torch.Tensor], g_minus: Sequence[torch.Tensor]) -> float:
    """``−<g+, sign(g+ − g−)>``: minus the first-order change of ``ln π(y+|x)`` per unit of sign-GD step size.

    >>> signgd_displacement([torch.tensor([1.0, 2.0, 0.5])], [torch.tensor([3.0, -1.0, 0.5])])   # −(−1 + 2 + 0)
    -1.0
    """
    return -sum(_dot(a, torch.sign(a - b)) for a, b in zip(g_plus, g_minus, strict=True))


def count_sketch(grads: Sequence[torch.Tensor], dim: int, seed: int) -> torch.Tensor:
    """Seeded sparse random projection ``R g`` ``[dim]`` float64 of the concatenated tensors (CountSketch).

    Each coordinate of tensor ``j`` goes to a random bucket with a random sign, drawn from a generator seeded by
    ``(seed, j)`` on the tensor's device (so the same ``R`` for every gradient of one subset on one device type).
    ``E[<R a, R b>] = <a, b>`` with variance at most ``2 ||a||² ||b||² / dim``: inner products are preserved in
    expectation, single coordinates and their signs are not, so the sign-GD score never uses it. Costs ``O(|S|)``
    per gradient and lets the scorer keep ``dim`` numbers instead of a second full gradient.

    >>> a, b = [torch.tensor([1.0, 2.0, -1.0])], [torch.tensor([0.5, 1.0, 3.0])]     # <a, b> = -0.5
    >>> est = [float(count_sketch(a, 16, s) @ count_sketch(b, 16, s)) for s in range(4000)]
    >>> abs(sum(est) / len(est) - -0.5) < 0.15     # unbiased: the mean over seeds (its std here is < 0.05)
    True
    """
    out = torch.zeros(dim, dtype=torch.float64, device=grads[0].device)
    for j, g in enumerate(grads):
        generator = torch.Generator(device=g.device).manual_seed(seed * 1_000_003 + j)
        flat = g.reshape(-1)
        for start in range(0, flat.numel(), _SKETCH_CHUNK):
            part = flat[start : start + _SKETCH_CHUNK].double()  # [c]
            draw = torch.randint(2 * dim, part.shape, generator=generator, device=g.device)  # [c]: bucket and sign
            out.index_add_(0, draw % dim, torch.where(draw < dim, part, -part))
    return out


class GradientKernelScorer(CHESScorer):
    """Adds gradient-kernel pair scores to preference rows; use with ``Dataset.map(batched=True)`` or :meth:`map`.

    Same loading, tokenization, errors and stable ``datasets`` fingerprint as :class:`CHESScorer` (it pickles to
    its settings and the model identity; the model loads lazily in each worker).

    Args:
        model, tokenizer, fingerprint: as for :class:`CHESScorer`.
        scores: any of ``"ntk"`` (``ntk_pp``, ``ntk_pm``, ``ntk_mm``, ``ntk_displacement``, ``ntk_cosine``),
            ``"signgd"`` (``signgd_displacement``, exact gradients always) and ``"logps"`` (the log-probs of the same
            forward pass); default ``("ntk", "signgd")``.
        parameters: the subset ``S``, see :func:`select_parameters` (default ``"output"``).
        projection_dim: sketch the gradients to this many numbers for the ``ntk_*`` columns (:func:`count_sketch`),
            e.g. for large subsets; ``None`` (default) keeps exact inner products.
        seed: of the sketch.
        Other keyword arguments are the fields of :class:`ScorerConfig` (``dtype``, ``device``, ``max_length``,
        ``chat_template``, ``on_invalid``, ``column_prefix``, ...).

    Cost per pair: two forward and two backward passes over the unpadded sequences, and two gradients of ``S`` in
    memory (one plus the sketch with ``projection_dim`` and without ``"signgd"``).
    """

    config_class = KernelScorerConfig
    score_columns = KERNEL_COLUMNS

    def _compute(self, batch: PairBatch, loaded: Loaded) -> dict[str, list]:
        cfg, names, model = self.config, self.config.scores, loaded.model
        named = select_parameters(model, cfg.parameters)

        def reduce(grads: list[torch.Tensor]) -> list[torch.Tensor]:  # what the ntk_* columns are computed from
            return [count_sketch(grads, cfg.projection_dim, cfg.seed)] if cfg.projection_dim else grads

        rows = []
        for pair in batch.pairs:
            if not pair.scorable:
                rows.append(dict.fromkeys(self.columns(), math.nan))
                continue
            prompt_len = len(pair.prompt_ids)
            g_c, logp_c = sequence_gradients(model, named, pair.prompt_ids + pair.chosen_ids, prompt_len)
            r_c = reduce(g_c)
            if "signgd" not in names:
                g_c = None  # with a sketch, only the sketch stays in memory during the second backward pass
            g_r, logp_r = sequence_gradients(model, named, pair.prompt_ids + pair.rejected_ids, prompt_len)
            row = {"chosen_logps": logp_c, "rejected_logps": logp_r}
            if "signgd" in names:
                row["signgd_displacement"] = signgd_displacement(g_c, g_r)
            if "ntk" in names:
                pp, pm, mm = ntk_pair(r_c, reduce(g_r))
                if pp * mm == 0:
                    raise ValueError(f"row {pair.index}: a completion's gradient w.r.t. parameters="
                                     f"{cfg.parameters!r} is zero, so ntk_cosine is undefined")
                row |= {"ntk_pp": pp, "ntk_pm": pm, "ntk_mm": mm, "ntk_displacement": pm - pp,
                        "ntk_cosine": pm / math.sqrt(pp * mm)}
            rows.append(row)
        return {name: [row[name] for row in rows] for name in self.columns()}
