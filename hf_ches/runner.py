"""Chunked, resumable scoring: a `CHESScorer` map over a `Dataset`, ``chunk_size`` rows at a time, each finished
chunk kept in a folder, so that an interrupted run resumes where it stopped; and the same chunks shared out among
the processes of a launcher (``torchrun``, ``accelerate launch``), on one node or several.

The folder holds ``manifest.json`` (what the chunks were scored from: the dataset's and the scorer's ``datasets``
fingerprints, the chunk size and the row count) and one Arrow file per finished chunk, ``chunk-00000-of-00003.arrow``
and so on; every file is written under a temporary name in the folder, then renamed (``os.replace``), so a file
that has its name is complete. A rerun scores only the chunks that have no file; one with another dataset, scorer or
chunk size is refused unless ``overwrite=True``. Without a folder, the chunks go to the datasets cache, in a folder
named by the manifest (`cache_folder`), as ``Dataset.map`` names its cache files by fingerprint. The scorer stays a
pure ``datasets.map`` transform: each chunk is ``scorer.map`` of rows ``a:b`` with ``fn_kwargs={"index_offset":
a}``, so errors name dataset row indices.

>>> import tempfile
>>> from datasets import Dataset
>>> from hf_ches import CHESScorer
>>> from hf_ches.testing import build_tiny_model, synthetic_pairs
>>> scorer, folder = CHESScorer(build_tiny_model(tempfile.mkdtemp())), tempfile.mkdtemp()
>>> ds = Dataset.from_dict(synthetic_pairs(5))
>>> scored = score_in_chunks(scorer, ds, folder, chunk_size=2)
>>> len(scored), sorted(p.name for p in Path(folder).iterdir())[:2]
(5, ['chunk-00000-of-00003.arrow', 'chunk-00001-of-00003.arrow'])

Several processes: when the launcher's environment says ``WORLD_SIZE`` > 1, `ranks` starts torch.distributed's
process group (`init_process_group`: nccl on a GPU, gloo on a CPU) unless it is up already. Then rank 0 prepares the
folder and lists the missing chunks, every rank gets that one list (so no chunk is written before all agree on
it), checks that the folder holds its own manifest (the folder must be one that every rank reaches: on several
nodes, a shared filesystem), and scores ``missing[rank::world_size]``, its model on ``cuda:LOCAL_RANK``
(`hf_ches.loading.choose_device`). A barrier waits for every rank; then each returns the whole result, read from
the chunk files, and only rank 0 (`is_main_process`) should save or push it. Rank 0 shows one progress bar, over the
finished chunks of all ranks; the other ranks show none. The chunks depend on ``chunk_size`` alone, never on the
number of processes, so the rows and their scores are those of one process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, is_dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset, DatasetDict, concatenate_datasets
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import Hasher

if TYPE_CHECKING:
    from hf_ches.recipes import ResumeArguments, ScoringArguments

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DEFAULT_CHUNK_SIZE = 4096
CACHE_DIR_NAME = "hf_ches_chunks"  # in the datasets cache: the chunks of a run that names no folder
# A barrier waits while the other ranks score their whole share of the chunks: hours on a large dataset.
PROCESS_GROUP_TIMEOUT = timedelta(hours=24)
# After the barrier every chunk exists, but a network filesystem may show another node's file a little later.
VISIBLE_WITHIN_S = 120.0
POLL_S = 2.0  # how often rank 0 counts the finished chunks for its progress bar


def chunk_names(num_rows: int, chunk_size: int) -> list[str]:
    """The file name of each chunk, in row order.

    >>> chunk_names(5, 2)
    ['chunk-00000-of-00003.arrow', 'chunk-00001-of-00003.arrow', 'chunk-00002-of-00003.arrow']
    """
    count = -(-num_rows // chunk_size)
    return [f"chunk-{i:05d}-of-{count:05d}.arrow" for i in range(count)]


def build_manifest(scorer: Any, dataset: Dataset, chunk_size: int) -> dict[str, Any]:
    """What the chunks depend on: a rerun with other values would mix rows scored differently. The fingerprints
    decide; ``scorer_options`` (the scorer's settings and the identity of its model's weights) say which option
    changed (`changes`)."""
    options = asdict(scorer.config) if is_dataclass(getattr(scorer, "config", None)) else {}
    options["model_identity"] = getattr(scorer, "identity", None)
    return {"dataset_fingerprint": dataset._fingerprint, "scorer_fingerprint": Hasher.hash(scorer),
            "scorer_options": json.loads(json.dumps(options, default=str)), "chunk_size": chunk_size,
            "num_rows": len(dataset)}


def cache_folder(manifest: dict[str, Any]) -> Path:
    """The chunk folder of a run that names none: in the datasets cache (``HF_DATASETS_CACHE``), named by the
    manifest, so that the same inputs find their chunks again and other inputs never meet them.

    >>> folder = cache_folder({"dataset_fingerprint": "f", "scorer_fingerprint": "s", "chunk_size": 2, "num_rows": 5})
    >>> folder.parent.name, folder == cache_folder({"dataset_fingerprint": "f", "scorer_fingerprint": "s",
    ...                                             "chunk_size": 2, "num_rows": 5})
    ('hf_ches_chunks', True)
    """
    from datasets import config

    return Path(config.HF_DATASETS_CACHE, CACHE_DIR_NAME, Hasher.hash(manifest))


@contextmanager
def _ctrl_c() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt at once, as Python's own handler does, and is also remembered in the
    yielded event: one raised inside a finalizer, where Python prints and drops it, stops the run after the
    chunk. Another handler (a launcher's, or none in a thread) is left as it is."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield pressed
        return

    def handler(signum: int, frame: Any) -> None:
        pressed.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Interrupted(Exception):
    """Ctrl-C while chunks were scored: the finished chunks are kept, and the message says where a rerun starts."""


def _write_atomically(path: Path, write: Any) -> None:
    """``write(temporary_path)``, then rename it to ``path``: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


TEMPORARY = (".chunk-*.tmp-*", f".{MANIFEST}.tmp-*")  # `_write_atomically`'s files before their rename


def _remove(folder: Path, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for path in folder.glob(pattern):
            path.unlink()


# How `changes` names what changed: the command-line option of a setting, or what a fingerprint stands for.
CHANGE_NAMES = {"chunk_size": "--chunk_size", "num_rows": "the number of rows", "model": "--model_name_or_path",
                "revision": "--model_revision", "dtype": "--dtype", "device": "--device",
                "token_budget": "--token_budget", "max_length": "--max_length", "on_invalid": "--on_invalid",
                "boundary": "--boundary", "model_identity": "the model's weights (its files changed)"}
DATA_CHANGED = "the data (another --dataset_name, --dataset_config or split, or its files changed)"


def changes(then: dict[str, Any], now: dict[str, Any]) -> str | None:
    """What differs between an earlier manifest and this run's, named as the options a user sets (with both
    values) or, for the data, in words; None when nothing does.

    >>> changes({"chunk_size": 4, "num_rows": 9}, {"chunk_size": 8, "num_rows": 9})
    '--chunk_size (4 then, 8 now)'
    >>> changes({"scorer_fingerprint": "a", "scorer_options": {"max_length": None}},
    ...         {"scorer_fingerprint": "b", "scorer_options": {"max_length": 512}})
    '--max_length (None then, 512 now)'
    """
    def named(key: str, old: Any, new: Any) -> str:
        return f"{CHANGE_NAMES.get(key, key)} ({old!r} then, {new!r} now)"

    changed = []
    for key, value in now.items():
        if key == "scorer_options" or then.get(key) == value:
            continue
        if key == "dataset_fingerprint":
            changed.append(DATA_CHANGED)
        elif key == "scorer_fingerprint":
            old, new = then.get("scorer_options") or {}, now.get("scorer_options") or {}
            options = [named(k, old.get(k), new[k]) for k in new if old.get(k) != new[k]]
            changed += options or ["the scorer (another hf-ches version or scorer)"]
        else:
            changed.append(named(key, then.get(key), value))
    return "; ".join(changed) or None


def prepare_folder(folder: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Create ``folder`` with ``manifest``, or check that its earlier manifest is the same and remove the files a
    killed run left half-written (``overwrite``: clear what a runner wrote there instead: chunks, manifest and
    temporary files, nothing else). Raises ValueError naming what changed."""
    path = folder / MANIFEST
    if path.is_file() and not overwrite:
        changed = changes(json.loads(path.read_text(encoding="utf-8")), manifest)
        if changed:
            raise ValueError(f"{folder} holds chunks scored with other options: {changed}. Rerun with "
                             "--overwrite_chunks to score afresh, or choose another --output_dir")
        _remove(folder, TEMPORARY)
        return
    folder.mkdir(parents=True, exist_ok=True)
    _remove(folder, ("chunk-*.arrow", MANIFEST, *TEMPORARY))
    _write_atomically(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8"))


def _write_arrow(scored: Dataset, tmp: Path) -> None:
    with ArrowWriter(features=scored.features, path=str(tmp)) as writer:
        writer.write_table(scored.data.table)
        writer.finalize()


def score_chunk(scorer: Any, dataset: Dataset, rows: range, path: Path, map_kwargs: dict[str, Any]) -> None:
    """Score ``dataset[rows]`` in memory, with dataset row indices in errors, and write it to ``path``."""
    chunk = dataset.select(rows)
    scored = scorer.map(chunk, warn=False, keep_in_memory=True, fn_kwargs={"index_offset": rows.start}, **map_kwargs)
    _write_atomically(path, lambda tmp: _write_arrow(scored, tmp))


# ---- processes ----------------------------------------------------------------------------------------------------
def init_process_group() -> None:
    """Start torch.distributed's default process group from the launcher's environment (``env://``): nccl with
    this rank's GPU (the one its model goes to, ``cuda:LOCAL_RANK``) when there is one, else gloo; with
    `PROCESS_GROUP_TIMEOUT`, since a barrier waits while the other ranks score."""
    import torch
    import torch.distributed as dist

    from hf_ches.loading import choose_device

    if torch.cuda.is_available():
        device = choose_device(None, None)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=PROCESS_GROUP_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)


def ranks() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: torch.distributed's when its process group is up; else, when the
    launcher's environment says ``WORLD_SIZE`` > 1 (``torchrun``, ``accelerate launch``), after starting it
    (`init_process_group`); else ``(0, 1)``, a process on its own.

    >>> ranks()
    (0, 1)
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        init_process_group()
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """Whether this process writes and pushes what the processes computed together: rank 0, or a process on its
    own (accelerate's ``is_main_process``).

    >>> is_main_process()
    True
    """
    return ranks()[0] == 0


def _from_rank_0(value: Any, world_size: int) -> Any:
    """Rank 0's ``value``, on every rank."""
    if world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main_process(function: Callable[[], Any]) -> Any:
    """``function()``, called by rank 0 alone, and its value (or its error, raised) on every rank: for what every
    rank needs to know but one process should ask, such as the Hub's read-only checks before any work. A process
    on its own just calls it.

    >>> on_main_process(lambda: 42)
    42
    """
    rank, world_size = ranks()
    outcome: tuple[Any, Exception | None] = (None, None)
    if rank == 0:
        try:
            outcome = (function(), None)
        except Exception as error:  # raised on every rank below, so that none waits for the others forever
            outcome = (None, error)
    value, error = _from_rank_0(outcome, world_size)
    if error is not None:
        raise error
    return value


def _wait_for(paths: list[Path], what: str) -> None:
    """Return once every path is a file; raise ValueError after `VISIBLE_WITHIN_S` without one (only a folder that
    is not shared by every rank shows a file that late)."""
    deadline = time.monotonic() + VISIBLE_WITHIN_S
    while missing := [path for path in paths if not path.is_file()]:
        if time.monotonic() > deadline:
            raise ValueError(f"{missing[0]} is missing after {what}: the chunk folder must be one folder that every "
                             "rank reaches (on several nodes, a shared filesystem)")
        time.sleep(0.5)


def plan(folder: Path, manifest: dict[str, Any], names: list[str], overwrite: bool) -> list[int]:
    """The chunks still to score, the same list on every rank: rank 0 prepares ``folder`` (`prepare_folder`) and
    lists the chunks without a file, every rank gets that list (or rank 0's error, raised everywhere), and each of
    the other ranks checks that the folder's manifest is its own."""
    def missing() -> list[int]:
        prepare_folder(folder, manifest, overwrite)
        return [i for i, name in enumerate(names) if not (folder / name).is_file()]

    found = on_main_process(missing)
    rank = ranks()[0]
    if rank != 0:
        _wait_for([folder / MANIFEST], "rank 0 wrote it")
        changed = changes(json.loads((folder / MANIFEST).read_text(encoding="utf-8")), manifest)
        if changed:
            raise ValueError(f"rank {rank} would score other inputs than rank 0 in {folder}: {changed}; every rank "
                             "must read the same dataset with the same scorer")
    return found


@contextmanager
def progress_bars_off() -> Iterator[bool]:
    """datasets' progress bars off for the block, then as they were; yields whether they were on."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    were_on = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield were_on
    finally:
        if were_on:
            enable_progress_bars()


_bars_shown = True  # hf-ches' own bars, one per scoring pass (`show_progress_bars`)


def show_progress_bars(shown: bool) -> None:
    """Show hf-ches' progress bars (`progress_bar`), or not: the commands hide them on every rank but rank 0."""
    global _bars_shown
    _bars_shown = shown


def progress_bar(total: int, desc: str, iterable: Any = None, shown: bool = True, unit: str = " examples") -> Any:
    """The one bar of a pass over ``total`` rows (a tqdm bar, over ``iterable`` when given); hidden when not
    ``shown`` or after ``show_progress_bars(False)``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not (shown and _bars_shown))


@contextmanager
def counted_pass(total: int, desc: str, count_rows: bool = True) -> Iterator[Any]:
    """One progress bar over a scoring pass of ``total`` rows, with datasets' own bars (one per map, per chunk)
    off; ``count_rows``: moved by every map batch this process scores (`hf_ches.transform.counting_rows`); full
    when the block ends without an error. Yields the bar."""
    from hf_ches.transform import counting_rows

    with progress_bars_off(), progress_bar(total, desc) as bar:
        with counting_rows(bar.update) if count_rows else nullcontext():
            yield bar
        bar.update(total - bar.n)  # the pass is done: rows that a cache or a forked worker served count too


@contextmanager
def _progress(paths: list[Path], sizes: list[int], desc: str) -> Iterator[Any]:
    """The pass's one bar, on rank 0 alone, over the rows of all chunks, those scored earlier included; yields a
    function that moves it to the chunk files that exist. One process: the bar also follows each map batch
    (`counted_pass`). Several: rank 0 counts the chunk files of all ranks every `POLL_S` seconds, so that the bar
    shows the rate and the time left of all ranks together."""
    rank, world_size = ranks()

    def done() -> int:
        return sum(size for path, size in zip(paths, sizes) if path.is_file())

    if rank != 0:
        with progress_bars_off():
            yield lambda: None
        return
    several = world_size > 1
    with counted_pass(sum(sizes), desc + (f" ({world_size} processes)" if several else ""), not several) as bar:

        def sync() -> None:
            bar.update(max(0, done() - bar.n))

        sync()
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(POLL_S):
                sync()

        thread = threading.Thread(target=poll, daemon=True) if several else None
        if thread:
            thread.start()
        try:
            yield sync
        finally:
            stop.set()
            if thread:
                thread.join()
            sync()


def score_in_chunks(scorer: Any, dataset: Dataset, folder: str | Path | None = None, *,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, overwrite: bool = False, **map_kwargs: Any) -> Dataset:
    """``scorer.map(dataset, **map_kwargs)``, scored ``chunk_size`` rows at a time into ``folder`` (the datasets
    cache when None: `cache_folder`), by every process of a launcher (module docstring): only the chunks without a
    file are scored, and a finished folder returns without loading the model. The rows come back in input order,
    on every rank, with the columns and features of ``scorer.map``; the values are the same when ``batch_size``
    divides ``chunk_size`` (the map batches are then the same rows)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, found {chunk_size!r}")
    if len(dataset) == 0:
        return scorer.map(dataset, **map_kwargs)  # raises: an empty dataset has nothing to score
    manifest = build_manifest(scorer, dataset, chunk_size)
    folder = Path(folder) if folder is not None else cache_folder(manifest)
    names = chunk_names(len(dataset), chunk_size)
    rank, world_size = ranks()
    if world_size > 1 and (map_kwargs.get("num_proc") or 1) > 1:
        raise ValueError("num_proc (--dataset_num_proc): under a launcher each rank scores in one process (on its "
                         "own GPU); leave it unset")
    missing = plan(folder, manifest, names, overwrite)
    desc = map_kwargs.pop("desc", "Scoring preference pairs")
    if rank == 0:
        logger.debug("%s: %d of %d chunks of %d rows to score%s", folder, len(missing), len(names), chunk_size,
                     f", by {world_size} processes" if world_size > 1 else "")
        if len(missing) < len(names):
            logger.info("%s: %d of %d chunks scored earlier, %d to score", desc, len(names) - len(missing),
                        len(names), len(missing))
    rows = [range(i * chunk_size, min((i + 1) * chunk_size, len(dataset))) for i in range(len(names))]
    paths = [folder / name for name in names]
    try:
        with _progress(paths, [len(r) for r in rows], desc) as sync, _ctrl_c() as pressed:
            for i in missing[rank::world_size]:  # disjoint shares, whichever chunks are missing
                score_chunk(scorer, dataset, rows[i], paths[i], map_kwargs)
                sync()
                if pressed.is_set():  # a Ctrl-C that a library swallowed
                    raise KeyboardInterrupt
            if world_size > 1:
                import torch.distributed as dist

                dist.barrier()
    except KeyboardInterrupt:  # the chunk being written is removed (`_write_atomically`); the finished ones stay
        first = next(i for i, path in enumerate(paths) if not path.is_file())
        raise Interrupted(f"interrupted; the same command resumes from chunk {first + 1} of {len(names)}") from None
    _wait_for(paths, "every rank scored its chunks")
    scored = concatenate_datasets([Dataset.from_file(str(path)) for path in paths])
    if missing and rank == 0:  # once for the run, as scorer.map does (a finished folder loads no model)
        scorer.warn_shifted(dataset, scored)
    return scored


def score_splits(scorer: Any, dataset: DatasetDict, scoring: ScoringArguments, resume: ResumeArguments,
                 chunks_dir: str | Path | None = None) -> DatasetDict:
    """`score_in_chunks` of every split, as a command's options say (``--chunk_size``, ``--overwrite_chunks``, the
    map's ``--batch_size`` and processes): the chunks under ``chunks_dir``/<split>, or in the datasets cache when
    ``chunks_dir`` is None; under a launcher, every rank scores its share."""
    return DatasetDict({split: score_in_chunks(scorer, rows, Path(chunks_dir, split) if chunks_dir else None,
                                               chunk_size=resume.chunk_size, overwrite=resume.overwrite_chunks,
                                               **scoring.map_options(f"Scoring {split}"))
                        for split, rows in dataset.items()})
