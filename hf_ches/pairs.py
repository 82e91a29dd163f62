"""Preference rows → token ids, exactly as TRL's ``DPOTrainer`` tokenizes them.

CHES and the DPO log-probabilities describe the tokens DPO trains on, so this module reproduces TRL's rules:

* formats: *standard* (strings) or *conversational* (lists of ``{"role", "content"}`` messages), with an explicit
  ``prompt`` column or an implicit one (only ``chosen``/``rejected``: the prompt is their longest common prefix,
  TRL's ``extract_prompt``);
* other layouts are first converted to TRL's conversational format (:data:`LAYOUTS`): LLaMA-Factory's ShareGPT
  preference rows (``conversations`` of ``{"from", "value"}`` turns, ``chosen``/``rejected`` one such message each)
  become ``prompt`` = the turns as ``{"role", "content"}`` messages (system / user / assistant), ``chosen`` and
  ``rejected`` = ``[assistant message]``; columns under other names are read through :class:`Columns`
  (``prompt_column``, ``chosen_column``, ``rejected_column`` of the scorers and the commands);
* standard rows get the EOS token text appended to ``chosen``/``rejected`` when missing, then
  ``prompt_ids = tok(prompt)`` and ``chosen_ids = tok(prompt + chosen)[len(prompt_ids):]``;
* conversational rows use the chat template: the prompt with ``add_generation_prompt=True``, prompt + completion as
  the full conversation (per-row ``tools`` and ``chat_template_kwargs`` columns are honoured, as TRL does);
* the completion starts where the prompt ids and both prompt+completion ids diverge (TRL 1.16's
  ``prompt_len = min(common_prefix_length(prompt_ids, prompt_chosen_ids), common_prefix_length(prompt_ids,
  prompt_rejected_ids))``). When that is before the end of the prompt ids (a prompt that ends inside a word, as in
  HH-RLHF, or a chat template that renders the prompt alone differently), the last ``prompt_shift`` prompt tokens
  move into the completion: TRL trains on exactly these tokens, so by default (``boundary="trl"``) the row is
  scored that way and only counted; ``boundary="strict"`` makes such rows an error (or a flag, with
  ``on_invalid="flag"``);
* a ``prompt`` column whose format differs from ``chosen``/``rejected`` (a string prompt beside message lists
  that repeat the user turn, as in ``HuggingFaceH4/ultrafeedback_binarized``) is ignored and the prompt is
  extracted from the completions, as TRL's ``maybe_extract_prompt`` does;
* ``max_length`` truncates prompt + completion keeping the start (TRL's ``keep_start``).

Every problem names the row index and the column.

>>> from hf_ches.testing import build_tokenizer
>>> tok = build_tokenizer()
>>> rows = read_rows({"prompt": ["the answer"], "chosen": [" is good"], "rejected": [" is bad"]}, [0])
>>> pair = tokenize_pairs(rows, tok)[0]
>>> tok.decode(pair.chosen_ids), pair.problem
(' is good<|end|>', None)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Literal

OnInvalid = Literal["raise", "flag"]
Boundary = Literal["trl", "strict"]
SHIFT_COLUMN = "prompt_tokens_shifted"  # the scorer's column of TokenizedPair.prompt_shift
SHAREGPT_PROMPT = "conversations"  # LLaMA-Factory's ShareGPT prompt column, read when there is no prompt column
# ShareGPT speakers (LLaMA-Factory's role tags, OpenAI-style names included) -> TRL's chat roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")  # per-row chat template arguments TRL honours
LAYOUTS = (
    "TRL standard: prompt, chosen, rejected strings",
    "TRL conversational: prompt, chosen, rejected lists of {role, content} messages",
    "TRL implicit prompt: chosen and rejected alone (strings or message lists that start with the prompt)",
    "H4: a string prompt beside chosen, rejected message lists that repeat it",
    "LLaMA-Factory ShareGPT: conversations (turns of {from, value}) beside chosen, rejected (one such message each)",
)


class PairError(ValueError):
    """A preference row that cannot be read or tokenized; the message names the row index and the column."""

    def __init__(self, row: int, column: str, message: str):
        self.row, self.column, self.message = row, column, message  # message: what is wrong, without the place
        super().__init__(f"row {row}, column {column!r}: {message}")


@dataclass(frozen=True)
class Columns:
    """The names of a dataset's prompt, chosen and rejected columns (TRL's by default).

    Without its ``prompt`` column a row's prompt is ShareGPT's ``conversations`` when there is one, else it is
    implicit (the start that ``chosen`` and ``rejected`` share).

    >>> Columns(prompt="question").used(["question", "answer_a", "answer_b", "id"])
    Traceback (most recent call last):
    ...
    hf_ches.pairs.PairError: row 0, column 'chosen': no preference pair layout fits the columns ['answer_a', \
'answer_b', 'id', 'question'] (looked for chosen 'chosen', rejected 'rejected', prompt 'question'). Layouts read: \
TRL standard: prompt, chosen, rejected strings; ...
    """

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"

    @classmethod
    def named(cls, keywords: dict[str, str] | None) -> Columns:
        """From the scorers' keywords, ``{"prompt_column": ..., "chosen_column": ..., "rejected_column": ...}``
        (None: TRL's names)."""
        return cls(**{key.removesuffix("_column"): name for key, name in (keywords or {}).items()})

    def used(self, names: Sequence[str], row: int = 0) -> list[str]:
        """The columns of ``names`` that pairs are read from (prompt or ``conversations``, chosen, rejected, the
        chat template's), or the one :class:`PairError` of an unknown layout: it names ``row``, the columns found
        and the layouts read."""
        missing = [column for column in (self.chosen, self.rejected) if column not in names]
        if self.prompt != "prompt" and self.prompt not in names:
            missing.append(self.prompt)
        if missing:
            looked = f"chosen {self.chosen!r}, rejected {self.rejected!r}, prompt {self.prompt!r}"
            raise PairError(row, missing[0], f"no preference pair layout fits the columns {sorted(names)} (looked "
                            f"for {looked}). Layouts read: {'; '.join(LAYOUTS)}. Name your columns with "
                            "--prompt_column, --chosen_column, --rejected_column (prompt_column=, ... in Python)")
        prompt = self.prompt if self.prompt in names else SHAREGPT_PROMPT if SHAREGPT_PROMPT in names else None
        return [c for c in (prompt, self.chosen, self.rejected, *TEMPLATE_COLUMNS) if c is not None and c in names]


@dataclass(frozen=True)
class Row:
    """One preference row after format checks and prompt extraction (strings or message lists)."""

    index: int
    prompt: Any
    chosen: Any
    rejected: Any
    template_kwargs: dict = field(default_factory=dict)
    problem: str | None = None  # a cell that cannot be read, with on_invalid="flag": the row is flagged, not scored

    def sizes(self) -> tuple[int, int]:
        """Characters of prompt + chosen and of prompt + rejected: a guess at the sequences' lengths before
        tokenization (token counts follow character counts closely), to order the work longest first."""
        if self.problem is not None:
            return 0, 0
        prompt = _characters(self.prompt)
        return prompt + _characters(self.chosen), prompt + _characters(self.rejected)


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair, split where the completion starts.

    ``prompt_shift`` counts the tokens of the tokenized prompt that moved into the completions (TRL's boundary
    rule, module docstring; 0 for a clean split). ``problem`` says why the row is flagged (``None`` when clean);
    ``scorable`` is False when no score can be computed at all (a completion with no tokens).
    """

    index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    problem: str | None = None
    prompt_shift: int = 0

    @property
    def scorable(self) -> bool:
        return len(self.prompt_ids) > 0 and len(self.chosen_ids) > 0 and len(self.rejected_ids) > 0


def _characters(value: str | list[dict]) -> int:
    return len(value) if isinstance(value, str) else sum(len(str(m.get("content", ""))) for m in value)


def _describe(value: Any) -> str:
    return "None" if value is None else f"{type(value).__name__} {repr(value)[:60]}"


def _chatml(message: dict, row: int, column: str) -> dict:
    """A ShareGPT ``{"from", "value"}`` message as TRL's ``{"role", "content"}`` one; a TRL message as it is."""
    if message.get("role") is not None or message.get("from") is None:
        return message
    speaker = message["from"]
    if speaker not in SHAREGPT_ROLES:
        raise PairError(row, column, f"ShareGPT speaker {speaker!r} is not one of {sorted(SHAREGPT_ROLES)} (tool "
                        "turns, observation and function_call, need your chat template's tool messages: convert "
                        "them to TRL's conversational format first)")
    return {"role": SHAREGPT_ROLES[speaker], "content": message.get("value")}


def _cell(value: Any, row: int, column: str) -> Any:
    """One cell in TRL's format: a string, or a list of ``{"role", "content"}`` messages (a single message, as
    LLaMA-Factory's ``chosen``/``rejected``, becomes a list of one; ShareGPT's messages are converted)."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return [_chatml(m, row, column) for m in value]
    return value


def _value_format(value: Any, row: int, column: str) -> str:
    """Return ``"standard"`` or ``"conversational"`` for one cell (after :func:`_cell`), or raise naming the row and
    column."""
    if isinstance(value, str):
        return "standard"
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        for m in value:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise PairError(row, column, f"each message needs string 'role' and 'content', found {m!r}")
        return "conversational"
    raise PairError(row, column, f"expected a string or a non-empty list of messages, found {_describe(value)}")


def extract_prompt(example: dict[str, Any]) -> dict[str, Any]:
    """Split an implicit-prompt row into prompt and completions, with TRL's ``extract_prompt`` rule.

    The prompt is the longest common prefix of ``chosen`` and ``rejected`` (characters for strings, messages for
    conversations); a space just before the divergence stays with the completions.

    >>> extract_prompt({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"})
    {'prompt': 'Q: sky? A:', 'chosen': ' blue', 'rejected': ' green'}
    """
    chosen, rejected = example["chosen"], example["rejected"]
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # remove space before the prompt
                idx -= 1
            break
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def read_rows(batch: dict[str, list], indices: Sequence[int], on_invalid: OnInvalid = "raise",
              columns: Columns = Columns()) -> list[Row]:
    """Check a batch of preference rows (a ``Dataset.map`` batch) and return one :class:`Row` per input row.

    ``columns`` names the prompt, chosen and rejected columns; a layout other than TRL's is converted first (module
    docstring, :data:`LAYOUTS`). ``chosen`` and ``rejected`` of all rows must share one format; conversational
    completions must hold an assistant turn. The prompt is the prompt column when it has the completions' format,
    else it is extracted from the completions (TRL's ``maybe_extract_prompt``): a string prompt beside message lists
    that repeat the user turn is ignored. A cell that is not a string or a list of messages (a CSV's missing value
    is None) raises a :class:`PairError` that names every such row of the batch, or with ``on_invalid="flag"`` gives
    a flagged row (``problem`` set). Errors name the dataset's own columns.

    >>> [row.problem for row in read_rows({"prompt": ["a", "b"], "chosen": [None, "x"], "rejected": ["y", "z"]},
    ...                                   [3, 4], on_invalid="flag")]
    ["column 'chosen': expected a string or a non-empty list of messages, found None", None]

    >>> read_rows({"chosen": ["Q: hi A: yes"], "rejected": ["Q: hi A: no"]}, [7])[0].prompt
    'Q: hi A:'
    >>> user, yes, no = ({"role": r, "content": c} for r, c in [("user", "hi"), ("assistant", "y"), ("assistant", "n")])
    >>> read_rows({"prompt": ["hi"], "chosen": [[user, yes]], "rejected": [[user, no]]}, [7])[0].prompt
    [{'role': 'user', 'content': 'hi'}]
    >>> row = read_rows({"conversations": [[{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"}]],
    ...                  "chosen": [{"from": "gpt", "value": "y"}], "rejected": [{"from": "gpt", "value": "n"}]}, [7])[0]
    >>> [m["role"] for m in row.prompt], row.chosen
    (['system', 'user'], [{'role': 'assistant', 'content': 'y'}])
    >>> read_rows({"q": ["hi"], "good": [" yes"], "bad": [" no"]}, [7], columns=Columns("q", "good", "bad"))[0].chosen
    ' yes'
    >>> read_rows({"prompt": ["hi"], "chosen": [None], "rejected": ["no"]}, [7])
    Traceback (most recent call last):
    ...
    hf_ches.pairs.PairError: row 7, column 'chosen': expected a string or a non-empty list of messages, found None
    """
    first = indices[0] if len(indices) else 0
    used = columns.used(list(batch), first)
    prompt_column = used[0] if used[0] not in (columns.chosen, columns.rejected) else None
    n = len(batch[columns.chosen])
    if n == 0:
        raise PairError(first, columns.chosen, "no rows to score (empty dataset or batch)")
    rows, batch_format, format_origin, bad = [], None, None, []
    for i in range(n):
        idx = int(indices[i])
        try:
            cells = {"chosen": _cell(batch[columns.chosen][i], idx, columns.chosen),
                     "rejected": _cell(batch[columns.rejected][i], idx, columns.rejected)}
            formats = [(columns.chosen, _value_format(cells["chosen"], idx, columns.chosen)),
                       (columns.rejected, _value_format(cells["rejected"], idx, columns.rejected))]
            prompt = _cell(batch[prompt_column][i], idx, prompt_column) if prompt_column else None
            prompt_format = _value_format(prompt, idx, prompt_column) if prompt_column else None
        except PairError as err:
            bad.append(err)
            rows.append(Row(idx, None, None, None, problem=f"column {err.column!r}: {err.message}"))
            continue
        for column, fmt in formats:
            if batch_format is None:
                batch_format, format_origin = fmt, (idx, column)
            elif fmt != batch_format:
                raise PairError(
                    idx, column, f"{fmt} value, but row {format_origin[0]} column {format_origin[1]!r} is "
                    f"{batch_format}: chosen and rejected of every row must share one format (strings or message "
                    "lists)"
                )
        if prompt_format == batch_format:
            cells["prompt"] = prompt
        else:
            cells = extract_prompt(cells)
            if batch_format == "conversational" and not cells["prompt"]:
                ignored = (f" (the {prompt_column!r} column, in another format, is ignored as TRL does)"
                           if prompt_column else "")
                raise PairError(idx, prompt_column or columns.prompt, "no prompt: chosen and rejected share no "
                                f"leading message{ignored}; give a prompt column of messages, or start chosen and "
                                "rejected with the prompt's messages")
        if batch_format == "conversational":
            for column, name in (("chosen", columns.chosen), ("rejected", columns.rejected)):
                if not any(m["role"] == "assistant" for m in cells[column]):
                    raise PairError(idx, name, "conversational completion without an assistant turn")
        rows.append(Row(idx, cells["prompt"], cells["chosen"], cells["rejected"], _template_kwargs(batch, i)))
    if bad and on_invalid == "raise":
        others = (f"; rows {[err.row for err in bad[1:]]} cannot be read either (pass on_invalid='flag' to flag "
                  "such rows and go on)") if len(bad) > 1 else ""
        raise PairError(bad[0].row, bad[0].column, bad[0].message + others)
    return rows


def _template_kwargs(batch: dict[str, list], i: int) -> dict:
    """Per-row chat template arguments TRL honours: a ``tools`` column (list or JSON) and ``chat_template_kwargs``."""
    kwargs = dict(batch["chat_template_kwargs"][i] or {}) if "chat_template_kwargs" in batch else {}
    if "tools" in batch and batch["tools"][i] is not None:
        tools = batch["tools"][i]
        kwargs["tools"] = json.loads(tools) if isinstance(tools, str) else tools
    return kwargs


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _texts(rows: list[Row], tokenizer) -> tuple[list[str], list[str], list[str], bool]:
    """Render prompt, prompt+chosen, prompt+rejected texts; return them and whether special tokens are in the text."""
    if isinstance(rows[0].prompt, str):
        eos = tokenizer.eos_token
        if eos is None:
            raise PairError(rows[0].index, "chosen", "the tokenizer has no EOS token to append to completions")

        def add_eos(text: str) -> str:
            return text if text.endswith(eos) else text + eos

        prompts = [r.prompt for r in rows]
        chosen = [r.prompt + add_eos(r.chosen) for r in rows]
        rejected = [r.prompt + add_eos(r.rejected) for r in rows]
        return prompts, chosen, rejected, False

    if not tokenizer.chat_template:
        raise PairError(rows[0].index, "prompt", "conversational rows need a chat template and this model's tokenizer "
                        "has none (a base model?); pass one: --chat_template TEMPLATE_OR_FILE on the command line, "
                        "chat_template=... to CHESScorer")

    def render(messages: list[dict], row: Row, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **row.template_kwargs
        )

    prompts = [render(r.prompt, r, True) for r in rows]
    chosen = [render(r.prompt + r.chosen, r, False) for r in rows]
    rejected = [render(r.prompt + r.rejected, r, False) for r in rows]
    return prompts, chosen, rejected, True


def tokenize_pairs(
    rows: list[Row], tokenizer, max_length: int | None = None, on_invalid: OnInvalid = "raise",
    boundary: Boundary = "trl",
) -> list[TokenizedPair]:
    """Tokenize checked rows into :class:`TokenizedPair` with TRL's split and ``keep_start`` truncation.

    A row whose prompt ids are not a prefix of its prompt+completion ids is split where they diverge and counted in
    ``prompt_shift`` (``boundary="trl"``), or is a problem (``boundary="strict"``). A problem (that, or no
    completion token left) raises :class:`PairError` with ``on_invalid="raise"``; with ``"flag"`` the row is
    returned with ``problem`` set.

    >>> from hf_ches.testing import build_tokenizer
    >>> tok = build_tokenizer()
    >>> rows = read_rows({"prompt": ["the answer is go"], "chosen": ["od"], "rejected": ["ne"]}, [3])
    >>> pair = tokenize_pairs(rows, tok)[0]
    >>> pair.prompt_shift, tok.decode(pair.chosen_ids)
    (2, ' good<|end|>')
    >>> tokenize_pairs(rows, tok, boundary="strict")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hf_ches.pairs.PairError: row 3, column 'prompt': the tokenized prompt is not a prefix ...
    """
    flagged = {row.index: TokenizedPair(row.index, [], [], [], problem=row.problem) for row in rows if row.problem}
    if flagged:  # rows that could not be read are flagged as they are; the others are tokenized together
        readable = [row for row in rows if not row.problem]
        clean = iter(tokenize_pairs(readable, tokenizer, max_length, on_invalid, boundary) if readable else [])
        return [flagged[row.index] if row.problem else next(clean) for row in rows]
    prompts, chosen, rejected, templated = _texts(rows, tokenizer)
    encode = dict(add_special_tokens=False) if templated else {}
    ids = tokenizer(prompts + chosen + rejected, **encode)["input_ids"]
    n = len(rows)
    pairs = []
    for i, row in enumerate(rows):
        prompt_ids, full_c, full_r = ids[i], ids[n + i], ids[2 * n + i]
        split = min(_common_prefix_length(prompt_ids, full_c), _common_prefix_length(prompt_ids, full_r))
        problem, column = None, "prompt"
        if split < len(prompt_ids) and boundary == "strict":
            problem = (
                f"the tokenized prompt is not a prefix of the tokenized prompt+completion (they diverge at token "
                f"{split} of {len(prompt_ids)}: {tokenizer.decode(prompt_ids[split:])!r}); TRL trains this row on "
                "a shortened prompt (boundary='trl' scores it so). End the prompt on a token boundary or fix the "
                "chat template"
            )
        truncated = False
        if max_length is not None:
            truncated = max(len(full_c), len(full_r)) > max_length
            full_c, full_r = full_c[:max_length], full_r[:max_length]
            if split >= max_length:
                problem = f"the prompt alone has {split} tokens >= max_length={max_length}: no completion token left"
        pair = TokenizedPair(row.index, prompt_ids[:split], full_c[split:], full_r[split:], truncated, problem,
                             len(prompt_ids) - split)
        if problem is None and not pair.scorable:
            column = "chosen" if not pair.chosen_ids else "rejected" if not pair.rejected_ids else "prompt"
            problem = f"{column} has no tokens: no hidden state predicts the first completion token"
            pair = replace(pair, problem=problem)
        if problem is not None and on_invalid == "raise":
            raise PairError(row.index, column, problem + " (pass on_invalid='flag' to flag such rows and go on)")
        pairs.append(pair)
    return pairs


class PendingPairs(Sequence[TokenizedPair]):
    """``tokenize_pairs`` of ``rows`` running ahead on worker threads; ``pairs[i]`` waits only for row ``i``.

    Rows are tokenized in slices of ``slice_rows``, longest first (by :meth:`Row.sizes`), on ``threads`` threads: a
    fast tokenizer releases the GIL, so a consumer that needs the longest sequences first (the packing order of
    :func:`hf_ches.forward.encode`) can start on them while the rest are still being tokenized. A slice's
    :class:`PairError` is raised to whoever asks for one of its rows.

    >>> from hf_ches.testing import build_tokenizer
    >>> rows = read_rows({"prompt": ["a", "b"], "chosen": [" yes", " no"], "rejected": [" maybe so", " no"]}, [0, 1])
    >>> pairs = PendingPairs(rows, build_tokenizer())
    >>> [pair.index for pair in pairs], len(pairs[0].rejected_ids) > len(pairs[1].rejected_ids)
    ([0, 1], True)
    """

    def __init__(self, rows: list[Row], tokenizer, max_length: int | None = None, on_invalid: OnInvalid = "raise",
                 threads: int = 1, slice_rows: int = 8, boundary: Boundary = "trl"):
        self._sizes = [row.sizes() for row in rows]
        self._order = order = sorted(range(len(rows)), key=lambda i: (-max(self._sizes[i]), i))
        self._where: list = [None] * len(rows)  # row -> (future of its slice, position in the slice)
        tokenizer("")  # a call may reset the backend's truncation/padding state; the threads must only read it
        pool = ThreadPoolExecutor(max_workers=threads)
        for start in range(0, len(order), slice_rows):
            part = order[start : start + slice_rows]
            future = pool.submit(tokenize_pairs, [rows[i] for i in part], tokenizer, max_length, on_invalid, boundary)
            for k, i in enumerate(part):
                self._where[i] = (future, k)
        pool.shutdown(wait=False)  # the threads finish the submitted slices, then exit

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, i: int) -> TokenizedPair:
        future, k = self._where[i]
        return future.result()[k]

    def sequence_order(self) -> list[int]:
        """The chosen sequences (``i``) and the rejected ones (``len(self) + i``), longest first by characters.

        Packed in this order, each sequence's row is tokenized before any row whose sequences all come later.
        """
        sizes = [size for column in zip(*self._sizes) for size in column]  # chosen sizes, then rejected sizes
        return sorted(range(len(sizes)), key=lambda j: (-sizes[j], j))

    def pair_order(self) -> list[int]:
        """The pairs in the order they are tokenized: longest first by characters (the prefix-shared forward packs
        whole pairs in this order)."""
        return self._order
