"""Local output folders: each one records which command wrote it, so that no command replaces another's output,
replaces its own without ``--overwrite``, or deletes a file it did not write.

Every command that writes ``--output_dir`` keeps a small record there, `MARKER` (a hidden JSON file, so that
``load_dataset`` and ``load_from_disk`` of the folder do not see it): the command, the source it read, and the
files it wrote. The rule, the same for every command (`check`):

* a missing or empty folder is used;
* a folder with files but no record (not an hf-ches output), or another command's output, is refused, with one
  line that names what is there;
* the same command's earlier output is replaced only with ``overwrite=True`` (``--overwrite``): the files that
  output recorded are deleted first, and nothing else (a file the user added stays);
* ``resume=True`` (``hf-ches score``, whose chunks let the same command resume) takes the same command's output
  over as it is, and so does every command an interrupted attempt of its own (recorded as unfinished).

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp(), "out")
>>> write(folder, "hf-ches filter", "org/prefs", {"a.txt": b"a"})
['a.txt']
>>> write(folder, "hf-ches validate", "org/prefs", {"b.txt": b"b"})  # doctest: +ELLIPSIS
Traceback (most recent call last):
ValueError: output_dir ... holds the output of `hf-ches filter` (from org/prefs); choose another folder
>>> write(folder, "hf-ches filter", "org/prefs", {"a.txt": b"a"})  # doctest: +ELLIPSIS
Traceback (most recent call last):
ValueError: output_dir ... holds an earlier `hf-ches filter` output (from org/prefs); pass --overwrite to replace ...
>>> write(folder, "hf-ches filter", "org/other", {"c.txt": b"c"}, overwrite=True)
['c.txt']
>>> sorted(p.name for p in folder.iterdir())
['.hf-ches-output.json', 'c.txt']
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict
from tqdm.auto import tqdm

from hf_ches.card import RUN_JSON_PATH, RunInfo, scoring_record

MARKER = ".hf-ches-output.json"


@dataclass(frozen=True)
class Record:
    """What `MARKER` says: the command (as a user types it: ``hf-ches score``) and source of the folder's output;
    when ``finished``, the ``files`` it wrote (paths relative to the folder), else the ``others`` (files that were
    there before it, and are not its own)."""

    command: str
    source: str
    finished: bool = False
    files: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)


def _files(folder: Path) -> set[str]:
    """The files under ``folder``, as relative paths, but the record itself."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(MARKER)}


def read(folder: str | Path) -> Record | None:
    """The record of ``folder``, or None where there is none (no folder, or not an hf-ches output)."""
    try:
        return Record(**json.loads(Path(folder, MARKER).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def check(folder: str | Path, command: str, *, overwrite: bool = False, resume: bool = False) -> Record | None:
    """Raise ValueError unless ``command`` may write ``folder`` (module docstring); returns its record (None for a
    new or empty folder). Commands call it before any slow step, and `claim` calls it again before writing."""
    folder = Path(folder)
    if folder.is_file():
        raise ValueError(f"output_dir {str(folder)!r} is a file; expected a folder")
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    record = read(folder)
    if record is None:
        raise ValueError(f"output_dir {str(folder)!r} is not empty and holds no hf-ches output; choose a new or "
                         "empty folder")
    if record.command != command:
        raise ValueError(f"output_dir {str(folder)!r} holds the output of `{record.command}` (from "
                         f"{record.source}); choose another folder")
    if record.finished and not (overwrite or resume):
        raise ValueError(f"output_dir {str(folder)!r} holds an earlier `{command}` output (from "
                         f"{record.source}); pass --overwrite to replace it, or choose another folder")
    return record


def _save(folder: Path, record: Record) -> None:
    """Write the record whole or not at all (the ranks of a launcher read it while rank 0 writes)."""
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(asdict(record), indent=1) + "\n", encoding="utf-8")
    tmp.replace(folder / MARKER)


def _clear(folder: Path, record: Record) -> list[str]:
    """Delete the files of ``record``'s output (and the folders that leaves empty); returns the files that stay."""
    ours = set(record.files) if record.finished else _files(folder) - set(record.others)
    for name in ours:
        (folder / name).unlink(missing_ok=True)
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return sorted(_files(folder))


def begin(folder: str | Path, command: str, source: str, *, overwrite: bool = False,
          resume: bool = False) -> Record:
    """Start ``command``'s output in ``folder``: check it, delete the earlier output it replaces (with
    ``overwrite``, or an interrupted attempt without ``resume``), and record the output as unfinished (returned,
    for `finish`). ``resume`` keeps what the same command wrote before (``hf-ches score``'s chunks)."""
    folder = Path(folder)
    earlier = check(folder, command, overwrite=overwrite, resume=resume)
    folder.mkdir(parents=True, exist_ok=True)
    if earlier is not None and resume and not overwrite:
        return earlier  # taken over as it is: a resumed run that writes nothing leaves the folder untouched
    others = sorted(_files(folder)) if earlier is None else _clear(folder, earlier)
    record = Record(command, source, finished=False, others=others)
    _save(folder, record)
    return record


def finish(folder: str | Path, record: Record) -> None:
    """Record ``folder``'s output, started by `begin`, as finished, with the files it holds now that are its own."""
    folder = Path(folder)
    done = Record(record.command, record.source, finished=True, files=sorted(_files(folder) - set(record.others)),
                  others=record.others)
    if done != read(folder):
        _save(folder, done)


@contextmanager
def claim(folder: str | Path, command: str, source: str, *, overwrite: bool = False) -> Iterator[Path]:
    """`begin` ``folder``, yield it, and `finish` it when the block ends without an error."""
    record = begin(folder, command, source, overwrite=overwrite)
    yield Path(folder)
    finish(folder, record)


def write(folder: str | Path, command: str, source: str, files: Mapping[str, bytes | Dataset], *,
          overwrite: bool = False) -> list[str]:
    """Write ``files`` (a `Dataset` as parquet, bytes as they are) into ``folder`` at their relative paths, as
    ``command``'s output read from ``source`` (`claim`); returns the paths, sorted. The dry run of a publication
    (`hf_ches.hub.Publication.local_files`), the ranking-accuracy report and ``validate`` write through here."""
    from hf_ches.hub import quiet_writes

    with claim(folder, command, source, overwrite=overwrite) as folder:
        tables = {path: data for path, data in files.items() if isinstance(data, Dataset)}
        with quiet_writes():
            for path, data in tqdm(tables.items(), desc="Writing parquet files", disable=None):
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                data.to_parquet(str(folder / path))
        for path, content in files.items():
            if path not in tables:
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                (folder / path).write_bytes(content)
    return sorted(files)


CHUNKS_DIR = "chunks"  # hf-ches score's finished chunks, one hf_ches.runner folder per split


def write_scored(dataset: DatasetDict, info: RunInfo, folder: str | Path) -> None:
    """`hf-ches score`'s output: ``save_to_disk`` of the scored splits, and beside them ``RUN_JSON_PATH`` with
    `scoring_record` (and the command), so that a later filter of this folder keeps the scores' provenance. The
    finished chunks (`CHUNKS_DIR`) stay, so that the same command run again scores nothing (and, `holds_save`,
    writes nothing). The folder is claimed by `begin` first."""
    folder = Path(folder)
    dataset.save_to_disk(str(folder))
    (folder / RUN_JSON_PATH).parent.mkdir(parents=True, exist_ok=True)
    record = scoring_record(info) | {"command": info.command}
    (folder / RUN_JSON_PATH).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def holds_save(folder: str | Path, dataset: DatasetDict) -> bool:
    """Whether ``folder`` holds ``dataset`` as `write_scored` saved it: its ``RUN_JSON_PATH`` (written last, so the
    save finished) and the same splits with the same ``datasets`` fingerprints (a dataset read from chunk files has
    the fingerprint of those files and their modification times, so rescored chunks make another one).

    >>> holds_save("no-such-folder", DatasetDict())
    False
    """
    folder = Path(folder)
    try:
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        saved = {split: json.loads((folder / split / "state.json").read_text(encoding="utf-8"))["_fingerprint"]
                 for split in splits}
    except (OSError, ValueError, KeyError):
        return False
    return (folder / RUN_JSON_PATH).is_file() and saved == {split: ds._fingerprint for split, ds in dataset.items()}
