"""Chunked, resumable scoring: a `CHESScorer` map over a `Dataset`, ``chunk_size`` rows at a time, each finished
chunk kept in a folder, so that an interrupted run resumes where it stopped.

The folder holds ``manifest.json`` (what the chunks were scored from: the dataset's and the scorer's ``datasets``
fingerprints, the chunk size and the row count) and one Arrow file per finished chunk, ``chunk-00000-of-00003.arrow``
and so on; every file is written under a temporary name in the folder, then renamed (``os.replace``), so a file
that has its name is complete. A rerun scores only the chunks that have no file; one with another dataset, scorer or
chunk size is refused unless ``overwrite=True``. The scorer stays a pure ``datasets.map`` transform: each chunk is
``scorer.map`` of rows ``a:b`` with ``fn_kwargs={"index_offset": a}``, so errors name dataset row indices.

>>> import tempfile
>>> from datasets import Dataset
>>> from hf_ches import CHESScorer
>>> from hf_ches.testing import build_tiny_model, synthetic_pairs
>>> scorer, folder = CHESScorer(build_tiny_model(tempfile.mkdtemp())), tempfile.mkdtemp()
>>> ds = Dataset.from_dict(synthetic_pairs(5))
>>> scored = score_in_chunks(scorer, ds, folder, chunk_size=2)
>>> len(scored), sorted(p.name for p in Path(folder).iterdir())[:2]
(5, ['chunk-00000-of-00003.arrow', 'chunk-00001-of-00003.arrow'])

Multi-process or multi-node scoring of the chunks (``torchrun`` ranks) is not done yet.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import Hasher

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DEFAULT_CHUNK_SIZE = 4096


def chunk_names(num_rows: int, chunk_size: int) -> list[str]:
    """The file name of each chunk, in row order.

    >>> chunk_names(5, 2)
    ['chunk-00000-of-00003.arrow', 'chunk-00001-of-00003.arrow', 'chunk-00002-of-00003.arrow']
    """
    count = -(-num_rows // chunk_size)
    return [f"chunk-{i:05d}-of-{count:05d}.arrow" for i in range(count)]


def build_manifest(scorer: Any, dataset: Dataset, chunk_size: int) -> dict[str, Any]:
    """What the chunks depend on: a rerun with other values would mix rows scored differently."""
    return {"dataset_fingerprint": dataset._fingerprint, "scorer_fingerprint": Hasher.hash(scorer),
            "chunk_size": chunk_size, "num_rows": len(dataset)}


def _write_atomically(path: Path, write: Any) -> None:
    """``write(temporary_path)``, then rename it to ``path``: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _clear(folder: Path) -> None:
    """Remove what a runner wrote in ``folder`` (chunks, manifest, temporary files), nothing else."""
    for pattern in ("chunk-*.arrow", MANIFEST, ".chunk-*.tmp-*", f".{MANIFEST}.tmp-*"):
        for path in folder.glob(pattern):
            path.unlink()


def prepare_folder(folder: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    """Create ``folder`` with ``manifest``, or check that its earlier manifest is the same (``overwrite``: clear it
    instead). Raises ValueError naming what changed."""
    path = folder / MANIFEST
    if path.is_file() and not overwrite:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        changed = [key for key in manifest if earlier.get(key) != manifest[key]]
        if changed:
            raise ValueError(f"{folder} holds chunks scored with another {', '.join(changed)} "
                             f"({', '.join(f'{k}: {earlier.get(k)!r} then, {manifest[k]!r} now' for k in changed)}); "
                             "pass overwrite=True (--overwrite) to score afresh, or choose another folder")
        return
    folder.mkdir(parents=True, exist_ok=True)
    _clear(folder)
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


def score_in_chunks(scorer: Any, dataset: Dataset, folder: str | Path, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    overwrite: bool = False, **map_kwargs: Any) -> Dataset:
    """``scorer.map(dataset, **map_kwargs)``, scored ``chunk_size`` rows at a time into ``folder`` (module
    docstring): only the chunks without a file are scored, and a finished folder returns without loading the
    model. The rows come back in input order with the columns and features of ``scorer.map``; the values are the
    same when ``batch_size`` divides ``chunk_size`` (the map batches are then the same rows)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an integer >= 1, found {chunk_size!r}")
    if len(dataset) == 0:
        return scorer.map(dataset, **map_kwargs)  # raises: an empty dataset has nothing to score
    folder = Path(folder)
    prepare_folder(folder, build_manifest(scorer, dataset, chunk_size), overwrite)
    names = chunk_names(len(dataset), chunk_size)
    missing = [i for i, name in enumerate(names) if not (folder / name).is_file()]
    logger.info("%s: %d of %d chunks of %d rows to score", folder, len(missing), len(names), chunk_size)
    desc = map_kwargs.pop("desc", "Scoring preference pairs")
    for i in missing:
        rows = range(i * chunk_size, min((i + 1) * chunk_size, len(dataset)))
        chunk_desc = f"{desc}, chunk {i + 1}/{len(names)}"
        score_chunk(scorer, dataset, rows, folder / names[i], map_kwargs | {"desc": chunk_desc})
    scored = concatenate_datasets([Dataset.from_file(str(folder / name)) for name in names])
    if missing:  # once for the run, as scorer.map does (a finished folder loads no model)
        scorer.warn_shifted(dataset, scored)
    return scored
