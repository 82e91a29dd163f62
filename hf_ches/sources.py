"""Where the pairs come from: reading a source (a Hub dataset, a ``save_to_disk`` folder, a dataset folder, data
files or a packaged builder), checking it exists on the Hub before any work, naming it in what is published, its
provenance and the scoring model's (`model_provenance`), the push target checked against it (`push_target`), and a
seeded sample of its rows. Every command reads its pairs through here (`load_source`), as TRL's
scripts read theirs through ``trl/scripts/utils.py``; none reads another command's module for them.

>>> import tempfile
>>> from datasets import Dataset
>>> from hf_ches.recipes import DataArguments
>>> folder = tempfile.mkdtemp()
>>> _ = Dataset.from_dict({"prompt": list("abcd"), "chosen": list("efgh"), "rejected": list("ijkl")}).to_json(
...     f"{folder}/pairs.jsonl")
>>> pairs = load_source(DataArguments(f"{folder}/pairs.jsonl"))
>>> sample(pairs, 2, seed=0)["train"]["row_index"][:]
[2, 3]
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from huggingface_hub import DatasetCard

from hf_ches.card import RUN_JSON_PATH, SCORING_FIELDS, public_name
from hf_ches.hub import check_repo, check_target
from hf_ches.models import check_model, loaded_as, model_commit
from hf_ches.runner import on_main_process

if TYPE_CHECKING:
    from hf_ches.recipes import DataArguments, HubArguments
    from hf_ches.transform import CHESScorer

logger = logging.getLogger(__name__)

DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
ROW_INDEX = "row_index"  # the row's position in its split before sampling


def _is_hub_id(name: str) -> bool:
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return (not os.path.exists(name) and not glob.has_magic(name) and Path(name).suffix not in DATA_FILE_BUILDERS
            and name not in _PACKAGED_DATASETS_MODULES)


def folder_data_files(folder: str, config: str | None) -> dict[str, list[str]] | None:
    """The data files per split of ``config`` (default: the card's default config) of a local dataset folder, as
    its card's YAML ``configs`` declare them; None when it declares none.

    Loading such a folder by its path would be cached by the folder's name and the config alone (datasets 5.2): an
    earlier folder of the same name would come back, or fail to cast. Its files, given as ``data_files``, are
    cached by what they are. An hf-ches output holds the kept pairs in ``default`` and every pair in ``scored``, so
    there the config must be named.
    """
    readme = Path(folder, "README.md")
    configs = (DatasetCard.load(readme).data.to_dict().get("configs") or []) if readme.is_file() else []
    if not configs:
        return None
    names = [c["config_name"] for c in configs]
    if config is None and Path(folder, RUN_JSON_PATH).is_file():
        raise ValueError(f"--dataset_name {folder!r} is an hf-ches output: pass --dataset_config scored (every pair, "
                         "to select again) or default (the kept pairs)")
    default = [c["config_name"] for c in configs if c.get("default") or c["config_name"] == "default"]
    wanted = config or (default[0] if default else None)
    if wanted not in names:
        raise ValueError(f"--dataset_name {folder!r}: " + (f"no config {config!r}" if config else "no default config")
                         + f"; pass --dataset_config with one of {names}")
    (entry,) = [c for c in configs if c["config_name"] == wanted]
    declared = entry.get("data_files") or []
    if not (isinstance(declared, list) and declared and isinstance(declared[0], dict)):
        declared = [{"split": "train", "path": declared}]  # the short forms: one pattern or a list of them
    files = {}
    for item in declared:
        patterns = [item["path"]] if isinstance(item["path"], str) else item["path"]
        files[item["split"]] = sorted(f for p in patterns for f in glob.glob(os.path.join(folder, p)))
    return files


def data_builder(name: str, files: dict[str, list[str]]) -> str:
    """The `datasets` builder of data files, from their suffix (one kind per dataset).

    >>> data_builder("x", {"train": ["x/data/train-00000-of-00001.parquet"]})
    'parquet'
    """
    suffixes = sorted({Path(f).suffix for split_files in files.values() for f in split_files})
    if len(suffixes) != 1 or suffixes[0] not in DATA_FILE_BUILDERS:
        raise ValueError(f"--dataset_name {name!r}: unknown data file type {', '.join(map(repr, suffixes)) or 'none'}; "
                         f"expected files of one type in {sorted(DATA_FILE_BUILDERS)}")
    return DATA_FILE_BUILDERS[suffixes[0]]


def check_hub_ids(data: DataArguments, models: list[tuple[str | None, str | None]]) -> None:
    """Before any work, one Hub request each: the dataset, when it is a Hub id, and each ``(model, revision)`` exist
    (`hf_ches.hub.check_repo`, `hf_ches.models.check_model`); a missing one, or a Hub out of reach, is one line."""
    if _is_hub_id(data.dataset_name):
        check_repo(data.dataset_name, "dataset", data.dataset_revision, data.token)
    for name, revision in models:
        if name:
            check_model(name, revision, data.token)


def load_source(args: DataArguments) -> DatasetDict:
    """The requested splits of ``--dataset_name`` (Hub id, ``save_to_disk`` folder, dataset folder, data files, or
    a packaged builder such as ``json``), with ``--data_dir`` and ``--data_files`` passed to ``load_dataset``."""
    name, within = args.dataset_name, dict(data_dir=args.data_dir, data_files=args.data_files)
    saved = os.path.isdir(name) and (Path(name, "dataset_dict.json").is_file() or Path(name, "state.json").is_file())
    if (saved or os.path.isfile(name)) and any(within.values()):
        raise ValueError(f"--dataset_name {name!r} is {'a saved dataset' if saved else 'a data file'}: --data_dir and "
                         "--data_files choose files within a Hub dataset or a folder (or give --dataset_name json "
                         "--data_files FILE ...)")
    if saved:
        loaded: Any = load_from_disk(name)
    elif any(within.values()):
        loaded = load_dataset(name, args.dataset_config, revision=args.dataset_revision, token=args.token, **within)
    elif os.path.isfile(name) or glob.has_magic(name) or Path(name).suffix in DATA_FILE_BUILDERS:
        files = sorted(glob.glob(name))
        empty = [f for f in files if os.path.getsize(f) == 0]
        if not files or empty:
            raise ValueError(f"--dataset_name {name!r}: " + (f"split 'train' has no rows (empty file(s) {empty})"
                                                             if files else "no file matches"))
        loaded = load_dataset(data_builder(name, {"train": files}), data_files=files)
    elif os.path.isdir(name) and (files := folder_data_files(name, args.dataset_config)) is not None:
        loaded = load_dataset(data_builder(name, files), data_files=files)
    else:
        loaded = load_dataset(name, args.dataset_config, revision=args.dataset_revision, token=args.token)
    dataset = DatasetDict({"train": loaded}) if isinstance(loaded, Dataset) else loaded
    if not isinstance(dataset, DatasetDict):
        raise ValueError(f"--dataset_name {name!r}: expected a map-style dataset, got {type(dataset).__name__}")
    wanted = args.dataset_splits or list(dataset)
    missing = [split for split in wanted if split not in dataset]
    if missing:
        raise ValueError(f"--dataset_splits: {missing} not in {name!r}; available splits: {list(dataset)}")
    logger.info("Read %s: %s", name, ", ".join(f"{split} {len(dataset[split])} pairs" for split in wanted))
    return DatasetDict({split: dataset[split] for split in wanted})


def source_name(args: DataArguments) -> str:
    """The data's name in what is published: ``--pretty_name``, the Hub id, or a local source's file or folder name
    (`hf_ches.card.public_name`); a publication of the same source replaces an earlier one by this name."""
    return public_name(args.dataset_name, args.pretty_name)


def source_metadata(args: DataArguments, dataset: DatasetDict) -> dict[str, Any]:
    """Source fields of `RunInfo`: the data files read (``--data_dir``, ``--data_files``) and the pair's columns when
    not TRL's names; for a Hub dataset the commit sha and the license of the card at that commit; for local data the
    license in its dataset info."""
    read = {"source_data_dir": args.data_dir, "source_data_files": args.data_files,
            "source_columns": args.pair_columns()}
    if not _is_hub_id(args.dataset_name):
        license_ = next((ds.info.license for ds in dataset.values() if ds.info.license), None)
        return read | {"source_is_hub": False, "source_license": license_}
    from huggingface_hub import HfApi

    api, found = HfApi(token=args.token), read | {"source_is_hub": True}
    try:  # provenance is best effort: the data itself loaded fine
        found["source_revision"] = api.dataset_info(args.dataset_name, revision=args.dataset_revision).sha
        readme = api.hf_hub_download(args.dataset_name, "README.md", repo_type="dataset",
                                     revision=found["source_revision"])
        license_ = DatasetCard.load(readme).data.license
        found["source_license"] = license_ if isinstance(license_, str) else None
    except Exception as error:
        logger.warning("Could not read the %s of %s: %s", "license" if found.get("source_revision") else "commit",
                       args.dataset_name, error)
    return found


def inherited_scoring(args: DataArguments) -> dict[str, Any]:
    """The model fields of `RunInfo` recorded with already-scored data (``RUN_JSON_PATH`` of an hf-ches output
    folder or Hub repo), so that filtering again keeps where the scores came from; empty when there is none."""
    name = args.dataset_name
    try:
        if _is_hub_id(name):
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(name, RUN_JSON_PATH, repo_type="dataset", revision=args.dataset_revision,
                                   token=args.token)
        else:
            path = Path(name, RUN_JSON_PATH)
        scoring = json.loads(Path(path).read_text(encoding="utf-8"))["scoring"]
    except Exception:  # no record (most data): the provenance says the scores came with the input
        return {}
    return {key: scoring.get(key) for key in SCORING_FIELDS}


def model_provenance(scorer: CHESScorer) -> dict[str, Any]:
    """What identifies a scorer's model wherever a command records it (the publication's ``ches/run.json`` and card,
    the ranking-accuracy report, ``validate``'s results): its public name (`hf_ches.card.public_name`), revision and
    commit, its weights fingerprint (the scorer's identity, a GGUF file's included), its tokenizer and chat template,
    the dtype and device it was loaded with (rank 0's under a launcher; resolved, never None) and whether it shared
    prefixes. The model is loaded once per process, so a process that scored with it loads nothing more."""
    config, loaded = scorer.config, scorer.load()
    template = loaded.tokenizer.chat_template if isinstance(loaded.tokenizer.chat_template, str) else None
    return {"name_or_path": public_name(config.model), "revision": config.revision,
            "commit": model_commit(config.model, config.revision), "fingerprint": scorer.identity,
            "tokenizer": public_name(config.model),  # the model's own, read from its files (a GGUF file holds it too)
            "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
            **loaded_as(loaded.model), "prefix_sharing": scorer.shares_prefixes(loaded)}


def push_target(data: DataArguments, hub: HubArguments, overwrite: bool, **record: Any) -> str | None:
    """Before any scoring, with ``--push_to_hub``: ``--repo_id`` as `hf_ches.hub.check_target` resolves it (a bare
    name goes to the token's user; a namespace the token cannot write, or a repo holding a record, ``record_path``
    read by ``record_source``, of another source than ``data``'s, is refused unless ``overwrite``); None without
    ``--push_to_hub``. Under a launcher rank 0 asks and every rank gets the answer."""
    if not hub.push_to_hub:
        return None
    return on_main_process(lambda: check_target(hub.repo_id, data.token, (source_name(data), data.dataset_config),
                                                overwrite=overwrite, revision=hub.revision, **record))


# ---- a seeded sample -------------------------------------------------------------------------------------------
def subsample(dataset: Dataset, num_samples: int | None = None, seed: int = 0) -> Dataset:
    """``num_samples`` rows drawn as the paper's code draws them, ``np.random.default_rng(seed).choice(n,
    num_samples, replace=False)``, in draw order, with their position in the split in a ``row_index`` column.

    All rows, in order, when ``num_samples`` is None or not below the number of rows.

    >>> rows = Dataset.from_dict({"prompt": list("abcdef")})
    >>> subsample(rows, 3)["row_index"][:], subsample(rows)["row_index"][:]
    ([4, 5, 3], [0, 1, 2, 3, 4, 5])
    """
    if ROW_INDEX in dataset.column_names:
        raise ValueError(f"column {ROW_INDEX!r}: a sample adds it (each row's position in its split), but the "
                         f"dataset already has it; rename or remove that column")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples: expected an integer >= 1, found {num_samples}")
    n = len(dataset)
    if num_samples is None or num_samples >= n:
        return dataset.add_column(ROW_INDEX, list(range(n)))
    indices = np.random.default_rng(seed).choice(n, num_samples, replace=False).tolist()
    return dataset.select(indices).add_column(ROW_INDEX, indices)


def sample(dataset: DatasetDict, num_samples: int | None, seed: int) -> DatasetDict:
    """`subsample` of every split, with a warning for a split that has fewer rows than asked for."""
    for split, rows in dataset.items():
        if num_samples is not None and num_samples > len(rows):
            logger.warning("split %r has %d rows, fewer than --num_samples %d: using all of them", split, len(rows),
                           num_samples)
    return DatasetDict({split: subsample(rows, num_samples, seed) for split, rows in dataset.items()})
