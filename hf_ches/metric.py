"""Ranking accuracy (Chen et al. 2024) as an `evaluate` metric.

This module is the only home of the `RankingAccuracy` class. `metrics/ranking_accuracy/ranking_accuracy.py`
re-exports it, which makes `evaluate.load("metrics/ranking_accuracy")` (or any path to that folder) and
`from hf_ches.metric import RankingAccuracy` give the same class. evaluate's import scanner reads that script, sees
`hf_ches` as a library dependency and imports it, and `import_main_class` picks up the re-exported class. The math
lives in `hf_ches.ranking`; `_compute` is one call into it.

`add_batch` (which `compute(**inputs)` calls) hands whole columns to pyarrow. evaluate's own `add_batch` encodes
every value in Python (`Features.encode_batch`); pyarrow converts the same lists or arrays in C, with the same
result (`docs/speed.md` §5; timings in `benchmarks/README.md`).
"""

import dataclasses
import difflib

import datasets
import evaluate
import numpy as np
import pyarrow as pa

from hf_ches import ranking

_CITATION = """\
@inproceedings{chen2024preference,
    title = {Preference Learning Algorithms Do Not Learn Preference Rankings},
    author = {Chen, Angelica and Malladi, Sadhika and Zhang, Lily H. and Chen, Xinyi and Zhang, Qiuyi and
              Ranganath, Rajesh and Cho, Kyunghyun},
    booktitle = {Advances in Neural Information Processing Systems},
    year = {2024},
    eprint = {2405.19534},
    archivePrefix = {arXiv},
}
"""

_DESCRIPTION = """\
Ranking accuracy is the share of preference pairs in which the model gives the preferred (chosen) response at least
the likelihood of the rejected one: R = 1[π(chosen|x) >= π(rejected|x)] (Chen et al. 2024, Def. 2.3). Ties count
as correct. Inputs are per-sequence log-probabilities, i.e. sums of completion-token log-probs such as
`CHESScorer` writes to the `chosen_logps` / `rejected_logps` columns. Configurations:
"default" (pairs), "length_normalized" (also compares mean log-probs per token), "idealized" (with reference-model
log-probs and rater agreement: the accuracy a perfect DPO optimum would reach, the alignment gap, DPO reward accuracy
and the loss each wrongly ranked pair must reach to flip) and "listwise" (several responses per prompt, correct only
when the whole ranking matches the human one). Every accuracy comes with a seeded bootstrap confidence interval.
"""

_KWARGS_DESCRIPTION = """
Args:
    chosen_logps (`list` of `float`): log π(chosen | prompt), summed over completion tokens. Not in "listwise".
    rejected_logps (`list` of `float`): log π(rejected | prompt), summed likewise. Not in "listwise".
    chosen_num_tokens (`list` of `int`): "length_normalized" only: number of completion tokens of `chosen`.
    rejected_num_tokens (`list` of `int`): "length_normalized" only: the same for `rejected`.
    ref_chosen_logps (`list` of `float`): "idealized" only: log πref(chosen | prompt) of the reference model.
    ref_rejected_logps (`list` of `float`): "idealized" only: log πref(rejected | prompt).
    preference_probs (`list` of `float`): "idealized" only: α, the share of raters preferring `chosen`. Below 0.5
        the raters prefer `rejected`, so the correct order flips; 0.5 is a human tie; α is clipped to
        [0.001, 0.999], which turns 0 and 1 into 0.001 and 0.999 as the paper's code does.
    logps (`list` of `list` of `float`): "listwise" only: log-probs of every response to one prompt.
    scores (`list` of `list` of `float`): "listwise" only: human scores of those responses (higher is better).
    tie_margin (`float`, defaults to 0): pairs whose log-probs differ by at most this much are model ties. They
        count as correct, as the paper's `>=` does. Does not apply to "listwise".
    human_tie_epsilon (`float`, defaults to 0.01): "idealized": a pair with α = 0.5 is correct when the log-probs
        differ by less than this (Def. C.1).
    beta (`float` or `list` of `float`, defaults to [0.01, 0.1, 1, 5, 10]): "idealized": DPO β values.
    return_per_example (`bool`, defaults to False): also return per-example flags, in input order.
    n_resamples (`int`, defaults to 1000), confidence_level (`float`, defaults to 0.95), seed (`int`, defaults
        to 0): settings of the percentile bootstrap behind every `*_ci`.
Returns:
    ranking_accuracy (`float`): share of examples ranked correctly; `ranking_accuracy_ci` is [low, high].
    num_pairs (`int`) and num_ties (`int`, pairs within `tie_margin`), or num_lists (`int`) for "listwise".
    length_normalized_ranking_accuracy (`float`, with `_ci`) and length_normalized_num_ties: "length_normalized".
    "idealized" adds: beta, num_human_ties, idealized_ranking_accuracy (one per β, with `_ci`) and its `_min`,
        `_median` and `_max`, alignment_gap (median idealized minus observed, with `_ci`), reward_accuracy (one
        per β, with `_ci`: DPO implicit reward strictly higher for the preferred response), num_reference_wrong
        and flip_loss_threshold_mean / _q25 / _median / _q75 (one per β: the DPO loss, softplus(-β c), that
        each wrongly ranked pair must get below, c = log πref(yl) - log πref(yw)).
    "listwise" adds num_human_ties (lists with equal human scores, which count as correct only if the model's
        log-probs tie exactly).
    With return_per_example: `correct` and `tie` lists (and more per config; see `hf_ches.ranking`).
Examples:
    The default config. Pair 2 is a tie (counted correct), pair 3 is wrong:

    >>> from hf_ches.metric import RankingAccuracy
    >>> metric = RankingAccuracy()  # the same as evaluate.load("metrics/ranking_accuracy")
    >>> results = metric.compute(chosen_logps=[-10.0, -12.0, -9.0, -20.0],
    ...                          rejected_logps=[-11.0, -12.0, -8.0, -25.0], return_per_example=True)
    >>> results["ranking_accuracy"], results["num_pairs"], results["num_ties"], results["correct"]
    (0.75, 4, 1, [True, True, False, True])
    >>> low, high = results["ranking_accuracy_ci"]
    >>> bool(0 <= low <= 0.75 <= high <= 1)
    True

    Length-normalized: the mean log-prob per token can disagree with the sum.

    >>> metric = RankingAccuracy(config_name="length_normalized")
    >>> results = metric.compute(chosen_logps=[-10.0, -12.0, -9.0, -20.0],
    ...                          rejected_logps=[-11.0, -12.0, -8.0, -25.0],
    ...                          chosen_num_tokens=[5, 4, 3, 10], rejected_num_tokens=[11, 4, 2, 20])
    >>> results["ranking_accuracy"], results["length_normalized_ranking_accuracy"]
    (0.75, 0.5)

    Idealized: all raters prefer chosen in pair 1 (α = 1, clipped to 0.999); 3 of 4 do in pair 2.

    >>> metric = RankingAccuracy(config_name="idealized")
    >>> results = metric.compute(chosen_logps=[-10.0, -5.0], rejected_logps=[-9.0, -6.0],
    ...                          ref_chosen_logps=[-11.0, -5.0], ref_rejected_logps=[-9.0, -6.0],
    ...                          preference_probs=[1.0, 0.75], beta=[0.1, 10.0])
    >>> results["ranking_accuracy"], results["idealized_ranking_accuracy"], results["alignment_gap"]
    (0.5, [1.0, 0.5], 0.25)
    >>> results["reward_accuracy"], results["num_reference_wrong"]
    ([0.5, 0.5], 1)
    >>> [round(value, 4) for value in results["flip_loss_threshold_median"]]
    [0.5981, 0.0]

    Listwise: the second prompt has two equally scored responses, which the model does not tie:

    >>> metric = RankingAccuracy(config_name="listwise")
    >>> results = metric.compute(logps=[[-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0], [-2.0, -1.0]],
    ...                          scores=[[9.0, 5.0, 1.0], [9.0, 9.0, 1.0], [1.0, 2.0]])
    >>> results["ranking_accuracy"], results["num_lists"], results["num_human_ties"]
    (0.6666666666666666, 3, 1)
"""

_FLOAT = datasets.Value("float64")
_FEATURES = {
    "default": {"chosen_logps": _FLOAT, "rejected_logps": _FLOAT},
    "length_normalized": {
        "chosen_logps": _FLOAT,
        "rejected_logps": _FLOAT,
        "chosen_num_tokens": datasets.Value("int64"),
        "rejected_num_tokens": datasets.Value("int64"),
    },
    "idealized": {
        "chosen_logps": _FLOAT,
        "rejected_logps": _FLOAT,
        "ref_chosen_logps": _FLOAT,
        "ref_rejected_logps": _FLOAT,
        "preference_probs": _FLOAT,
    },
    "listwise": {"logps": datasets.Sequence(_FLOAT), "scores": datasets.Sequence(_FLOAT)},
}
_COLUMN = getattr(datasets.arrow_dataset, "Column", ())  # what `ds[name]` returns in datasets >= 4
COMPUTE = {  # the pure function of hf_ches.ranking behind each config
    "default": ranking.ranking_accuracy,
    "length_normalized": ranking.ranking_accuracy,
    "idealized": ranking.idealized_ranking_accuracy,
    "listwise": ranking.listwise_ranking_accuracy,
}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RankingAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in _FEATURES:
            raise ValueError(f"config_name: expected one of {list(_FEATURES)}, found {self.config_name!r}")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(_FEATURES[self.config_name]),
            # Arrow columns, which `_from_arrow` turns into float64/int64 arrays: datasets' numpy formatter would
            # cast float64 to float32 (merging near-ties of log-prob sums), and Python lists are slow to build.
            # evaluate allows a format only when every feature is a Value, so "listwise" gets lists.
            format=None if self.config_name == "listwise" else "arrow",
            reference_urls=["https://arxiv.org/abs/2405.19534"],
            codebase_urls=["https://github.com/angie-chen55/pref-learning-ranking-acc"],
        )

    def compute(self, **kwargs):
        """`evaluate.Metric.compute`, after `check_inputs`: a misspelt or missing input is a one-line error.

        Given every input in one call, in one process, with no batch added before, it computes straight from them:
        pyarrow converts each column to its declared type in C (the values evaluate would store: floats, ints,
        None as null, NaN kept), and `_compute` runs on that, without evaluate's round trip through an Arrow cache
        file, which encodes every value in Python and costs more than the math (``benchmarks/bench_metric.py``).
        Anything else (batches added, several processes, inputs pyarrow refuses) is evaluate's own ``compute``, with
        its coercions and error messages. A dataset column (`ds["chosen_logps"]`, a lazy `Column` in datasets >= 4)
        is read in one slice rather than row by row.
        """
        check_inputs(self.config_name, kwargs, batches_added=self.writer is not None)
        kwargs = {name: values[:] if isinstance(values, _COLUMN) else values for name, values in kwargs.items()}
        inputs = {name: kwargs.pop(name) for name in list(self.features) if name in kwargs}
        columns = self._arrow_columns(inputs) if self.writer is None and self.num_process == 1 else None
        if columns is None:
            return super().compute(**inputs, **kwargs)
        read = {name: pa.chunked_array([column]) if self.info.format == "arrow" else column.to_pylist()
                for name, column in columns.items()}  # as evaluate reads its cache back
        return self._compute(**read, **kwargs)

    def add_batch(self, **inputs) -> None:
        """`evaluate.Metric.add_batch`, after `check_inputs`; a dataset column is read in one slice."""
        check_inputs(self.config_name, inputs, options=False)
        return super().add_batch(**{name: values[:] if isinstance(values, _COLUMN) else values
                                    for name, values in inputs.items()})

    def _arrow_columns(self, inputs: dict) -> dict[str, pa.Array] | None:
        """`inputs` as pyarrow arrays of the declared types, or None when pyarrow cannot take them as they are."""
        names = list(self.features)
        if set(inputs) != set(names) or not all(isinstance(inputs[n], (list, tuple, np.ndarray)) for n in names):
            return None
        schema = self.features.arrow_schema
        try:
            columns = {name: pa.array(inputs[name], type=schema.field(name).type) for name in names}
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return None
        return columns if len({len(column) for column in columns.values()}) == 1 else None

    def _compute(self, **inputs_and_options) -> dict:
        inputs = {name: _from_arrow(inputs_and_options.pop(name)) for name in list(self.features)}
        return COMPUTE[self.config_name](**inputs, options=ranking.RankingOptions(**inputs_and_options))


def check_inputs(config_name: str, names: dict | list, batches_added: bool = False, options: bool = True) -> None:
    """Raise a one-line ValueError for a keyword that is neither an input of ``config_name`` nor (with ``options``)
    a `RankingOptions` field, or for an input of the config that is missing. Without this, evaluate reports a
    misspelt input as a missing cache file, and a missing one as a TypeError deep in the computation.
    ``batches_added``: inputs came through ``add_batch`` already, so ``compute`` may pass none.

    >>> check_inputs("default", ["chosen_logp", "rejected_logps"])
    Traceback (most recent call last):
    ...
    ValueError: chosen_logp: not an input of the 'default' config (did you mean 'chosen_logps'?); its inputs are ['chosen_logps', 'rejected_logps']
    >>> check_inputs("length_normalized", ["chosen_logps", "rejected_logps"])
    Traceback (most recent call last):
    ...
    ValueError: the 'length_normalized' config needs chosen_num_tokens, rejected_num_tokens too; pass them to compute() or add_batch()
    """
    inputs = list(_FEATURES[config_name])
    known = inputs + ([f.name for f in dataclasses.fields(ranking.RankingOptions)] if options else [])
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{name}: not an input of the {config_name!r} config{hint}; its inputs are {inputs}")
    given = [name for name in names if not isinstance(names, dict) or names[name] is not None]
    missing = [name for name in inputs if name not in given]
    if missing and not (batches_added and len(missing) == len(inputs)):
        raise ValueError(f"the {config_name!r} config needs {', '.join(missing)} too; pass them to compute() or "
                         "add_batch()")


def _from_arrow(column: pa.ChunkedArray | list) -> np.ndarray | list:
    """A stored input column as `hf_ches.ranking` takes it: an Arrow column as a numpy array of its own dtype (null
    becomes NaN, which `ranking` reports by index); the Python lists of "listwise" as they are.

    >>> _from_arrow(pa.chunked_array([[-1.5, None]])), _from_arrow([[1.0, 2.0]])
    (array([-1.5,  nan]), [[1.0, 2.0]])
    """
    return column.to_numpy() if isinstance(column, pa.ChunkedArray) else column
