"""Do the kernel-view scores predict what one DPO step does to ``ln π(y+|x)``, and what do they cost? Not a test.

On a few hundred synthetic pairs and a tiny Llama (random, or briefly trained on the synthetic text so that its
next-token distributions are peaked like a real model's), every score is computed once:

* ``ches``, ``ln_ches``, ``entk_w``, ``ln_entk_w``: one forward pass (:class:`hf_ches.CHESScorer`);
* ``ntk[<subset>]``, ``cos[all]``, ``signgd[<subset>]``: gradient kernels (``GradientKernelScorer``), for the
  subsets ``out`` (output embedding), ``last`` (last block) and ``all``.

Then, for each pair alone, from the same weights each time (restored after every pair), one DPO step (β = 0.1, the
reference is the model itself, frozen, so the margin is 0 and ``ℓ′ = −β/2``) and the change ``Δ = ln π(y+|x)`` after
minus before, for these updates:

* ``sgd-all``   SGD on all parameters, ``θ −= η ∇ℓ``;
* ``sgd-out``   SGD on the output embedding only (``entk_w`` is its exact first-order prediction for an untied head);
* ``sign-all``  sign-GD on all parameters, ``θ −= η sign(∇ℓ)`` (Adam's first step).

Each at a small step ``η``, set so that the median first-order ``|Δ|`` is ``--target`` nats, and a 10× larger one.
The table is the Spearman rank correlation of each score with ``−Δ``, the *drop* of the chosen log-likelihood
(every score is oriented so that high predicts displacement). Last, the CPU time per pair of each score relative
to CHES alone.

    python benchmarks/bench_kernels.py                          # 300 pairs, briefly trained tiny Llama
    python benchmarks/bench_kernels.py --pretrain-steps 0       # random weights
    python benchmarks/bench_kernels.py --pairs 100 --vocab 16384 --hidden 256 --layers 4   # a costlier head
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset, disable_progress_bars
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ches import CHESScorer
from hf_ches.displacement import spearman
from hf_ches.forward import encode, inspect_model
from hf_ches.kernels import GradientKernelScorer, select_parameters
from hf_ches.pairs import read_rows, tokenize_pairs
from hf_ches.scores import output_gradient_gram
from hf_ches.testing import build_tiny_model, synthetic_pairs, synthetic_text
from hf_ches.validate import dpo_step

BETA = 0.1
SUBSETS = {"out": "output", "last": "last:1", "all": "all"}


def pretrain(model, tokenizer, steps: int, seed: int = 123) -> None:
    """A few AdamW steps of next-token prediction on synthetic text: peaked, data-like predictions."""
    import random

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        texts = [synthetic_text(rng, rng.randint(10, 40)) for _ in range(16)]
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    print(f"pretrained {steps} steps, final LM loss {loss.item():.2f} nats/token")


def dpo_change(model, params: list[torch.nn.Parameter], pair, eta: float, sign: bool) -> float:
    """``Δ ln π(y+|x)`` after one SGD or sign-GD step on the pair's DPO loss w.r.t. ``params``; weights restored."""
    step = dpo_step(model, params, pair, beta=BETA, learning_rate=eta, optimizer="sign" if sign else "sgd")
    return step["delta_chosen_logps"]


def token_weights(model, pairs) -> dict[str, float]:
    """How far the exact token weights α− (``entk_w``) are from CHES's all-ones, over all pairs' token pairs."""
    head = inspect_model(model)
    same, other = [], []
    for pair in pairs:
        prompt = len(pair.prompt_ids)
        enc = encode(model, [pair.prompt_ids + pair.chosen_ids, pair.prompt_ids + pair.rejected_ids], [prompt] * 2,
                     needs={"states"}, head=head)
        n = len(pair.chosen_ids)
        y = torch.tensor(pair.chosen_ids + pair.rejected_ids)
        alpha = output_gradient_gram(head, torch.cat(enc.states), y, torch.cat(enc.lse), 1 << 24, rows=n)[:, n:]
        match = y[:n, None] == y[None, n:]  # [n+, n−]: same token at k and k'
        same.append(alpha[match].numpy())
        other.append(alpha[~match].numpy())
    same, other = np.concatenate(same), np.concatenate(other)
    everything = np.concatenate([same, other])
    return {"share α− > 0": float(np.mean(everything > 0)), "share of same-token entries": len(same) / len(everything),
            "mean α− (same token)": float(same.mean()), "mean α− (different tokens)": float(other.mean()),
            "mean |α−| (different tokens)": float(np.abs(other).mean())}


def timed_map(scorer, ds: Dataset) -> tuple[Dataset, float]:
    """The scored dataset and the best wall time of the map (of 3 runs when one takes under 10 s; no model load)."""
    scorer.load()
    scorer.map(ds.select(range(4)))  # warm-up
    times = []
    while not times or (len(times) < 3 and times[0] < 10):
        start = time.perf_counter()
        out = scorer.map(ds)
        times.append(time.perf_counter() - start)
    return out, min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--pretrain-steps", type=int, default=300, help="0: random weights")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=None, help="output-embedding rows (default: the tokenizer's 600)")
    parser.add_argument("--target", type=float, default=0.02,
                        help="each update's small step η makes the median first-order |Δ ln π(y+)| this many nats")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    disable_progress_bars()
    torch.manual_seed(args.seed)

    path = build_tiny_model(tempfile.mkdtemp(), "llama", args.vocab, hidden_size=args.hidden, num_layers=args.layers)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    if args.pretrain_steps:
        pretrain(model, tokenizer, args.pretrain_steps)
    rows = synthetic_pairs(args.pairs, seed=args.seed)
    ds = Dataset.from_dict(rows)
    pairs = tokenize_pairs(read_rows(rows, range(args.pairs)), tokenizer)

    # --- scores, timed ---
    scores, seconds = {}, {}
    base, seconds["ches"] = timed_map(CHESScorer(model, tokenizer, scores=("ches", "ln_ches")), ds)
    scores |= {"ches": base["ches"], "ln_ches": base["ln_ches"]}
    _, seconds["ches+logps"] = timed_map(CHESScorer(model, tokenizer), ds)
    entk, seconds["entk_w"] = timed_map(CHESScorer(model, tokenizer, scores=("ches", "ln_ches", "entk_w")), ds)
    scores |= {"entk_w": entk["entk_w"], "ln_entk_w": entk["ln_entk_w"]}
    for short, spec in SUBSETS.items():
        out, seconds[f"ntk+signgd[{short}]"] = timed_map(
            GradientKernelScorer(model, tokenizer, parameters=spec, scores=("ntk", "signgd")), ds
        )
        scores[f"ntk[{short}]"], scores[f"signgd[{short}]"] = out["ntk_displacement"], out["signgd_displacement"]
        if short == "all":
            scores["cos[all]"] = out["ntk_cosine"]
    _, seconds["ntk[all], 512-sketch"] = timed_map(
        GradientKernelScorer(model, tokenizer, parameters="all", scores=("ntk",), projection_dim=512), ds
    )

    # --- measured change of ln π(y+|x) after one DPO step on each pair alone ---
    params = {short: [p for _, p in select_parameters(model, spec)] for short, spec in SUBSETS.items()}
    # update -> (subset, sign?, first-order Δ per unit step: η ℓ′ ntk_displacement or −η signgd_displacement)
    updates = {
        "sgd-all": ("all", False, -BETA / 2 * np.array(scores["ntk[all]"])),
        "sgd-out": ("out", False, -BETA / 2 * np.array(scores["ntk[out]"])),
        "sign-all": ("all", True, -np.array(scores["signgd[all]"])),
    }
    targets = {}
    print(f"\n{args.pairs} pairs. At the small steps, Δ ln π(y+) against its first-order prediction:")
    for label, (subset, sign, per_unit_step) in updates.items():
        eta = args.target / np.median(np.abs(per_unit_step))
        first_order = eta * per_unit_step
        for scale in (1, 10):
            change = np.array([dpo_change(model, params[subset], pair, scale * eta, sign) for pair in pairs])
            targets[f"{label} η={scale * eta:.1e}"] = -change  # the drop: high = displacement
            if scale == 1:  # per pair: the kernels are heavy-tailed, so a few pairs leave the linear regime first
                err = np.abs(change - first_order) / np.maximum(np.abs(first_order), 1e-9)  # 0/0: same completions
                print(f"  {label:9s} η={eta:.1e}: median |Δ| = {np.median(np.abs(change)):.3g} nats; "
                      f"|Δ − first order| / |first order|: median {np.median(err):.2g}, "
                      f"{np.mean(err < 0.1):.0%} of pairs < 0.1, max {err.max():.2g}")

    print("\nToken weights α−[k,k'] = <e − p+_k, e − p−_k'> of entk_w (CHES sets them all to 1):")
    for name, value in token_weights(model, pairs).items():
        print(f"  {name:30s} {value:8.3f}")

    # --- the table ---
    names = list(targets)
    print("\nSpearman ρ(score, −Δ ln π(y+|x)):\n")
    print(f"{'score':12s} " + " ".join(f"{n:>20s}" for n in names))
    for score, values in scores.items():
        values = np.asarray(values)
        print(f"{score:12s} " + " ".join(f"{spearman(values, targets[n]):20.3f}" for n in names))
    shares = {n: float(np.mean(targets[n] > 0)) for n in names}
    print(f"{'(share Δ<0)':12s} " + " ".join(f"{shares[n]:20.2f}" for n in names))

    print(f"\nCPU time per pair, relative to CHES alone ({1e3 * seconds['ches'] / args.pairs:.2f} ms/pair):\n")
    for name, s in seconds.items():
        print(f"  {name:22s} {1e3 * s / args.pairs:8.2f} ms/pair   {s / seconds['ches']:7.1f}x")


if __name__ == "__main__":
    main()
