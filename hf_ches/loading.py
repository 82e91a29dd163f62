"""The scorer's model inside one process: identities, one load per process and settings, the device, forked workers.

A scorer carries settings and an identity, never weights (:mod:`hf_ches.transform`), so each process that runs it
gets the model from here:

* an identity names the weights cheaply: :func:`hf_ches.models.model_fingerprint` for a model id or path,
  :func:`in_memory_identity` for a model handed over as an object;
* :func:`load` keeps one loaded model per identity and load settings in a process-wide table. In-memory models are
  put there when the scorer is built, so forked ``num_proc`` workers inherit them; models from a path are loaded
  on first use, on the device :func:`choose_device` picks (``cuda:rank % n_gpus`` with ``with_rank=True``), or
  split across devices as ``accelerate`` loads big models (:func:`split_options`: under a launcher, over this
  process's own group of GPUs, :func:`gpu_group`);
* a forked CPU worker runs torch on one thread: torch's CPU thread pool (GNU OpenMP) is not fork-safe, and the
  first parallel matmul in a fork can hang forever.

>>> import tempfile
>>> from hf_ches.testing import build_tiny_model
>>> from hf_ches.transform import ScorerConfig
>>> path = build_tiny_model(tempfile.mkdtemp())
>>> config = ScorerConfig(model=path)
>>> loaded = load(config, identify(path, None, config))
>>> loaded.model.training, type(loaded.head).__name__, loaded.sharing is not None
(False, 'OutputHead', True)
>>> load(config, identify(path, None, config)) is loaded
True
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import torch

from hf_ches.forward import OutputHead, SharedAttention, inspect_model, inspect_sharing

IN_MEMORY = "<in-memory>"  # the ``model`` setting of a scorer built from a model object

# The pid that imported this module. A forked ``num_proc`` worker inherits it and so knows it is a fork.
_IMPORT_PID = os.getpid()

# Models by identity (in-memory) or by identity and load settings (from a path); forked workers inherit it.
_MODELS: dict[str, tuple[Any, Any]] = {}
_LOADED: dict[str, "Loaded"] = {}  # the same models, eval mode and checked output head
_TOKENIZERS: dict[str, Any] = {}  # tokenizers of models from a path, by identity and tokenizer settings


class ModelSettings(Protocol):
    """The load settings a scorer's config carries (:class:`hf_ches.transform.ScorerConfig` has them)."""

    model: str
    revision: str | None
    dtype: str | None
    device: str | None
    gguf_file: str | None
    chat_template: str | None


class SplitSettings(Protocol):
    """How a scorer splits its model across devices (:class:`hf_ches.transform.RunOptions` has these): the
    ``device_map``, ``max_memory`` and ``offload_folder`` of ``from_pretrained``; ``device_map`` None: one device."""

    device_map: str | Mapping[str, int | str] | None
    max_memory: Mapping[int | str, int | str] | None
    offload_folder: str | None


class Loaded(NamedTuple):
    """A model ready to score: in eval mode, with its tokenizer, the output head :func:`inspect_model` checked and
    how it takes prefix-shared rows (:func:`inspect_sharing`; ``None`` when it cannot)."""

    model: torch.nn.Module
    tokenizer: Any
    head: OutputHead
    sharing: SharedAttention | None


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


def identify(model: str | torch.nn.Module, tokenizer: Any, settings: ModelSettings, fingerprint: str | None = None
             ) -> str:
    """The identity of ``model`` (a path or id, or a loaded model that is then registered for :func:`load`).

    ``fingerprint`` replaces the computed identity (it names the weights when the caller knows better).
    """
    if isinstance(model, str):
        from hf_ches.models import model_fingerprint

        return fingerprint or model_fingerprint(model, settings.revision, settings.gguf_file)
    identity = fingerprint or in_memory_identity(model, tokenizer)
    _MODELS[identity] = (model, tokenizer)
    return identity


def choose_device(device: str | None, rank: int | None) -> torch.device:
    """``device`` when set; else ``cuda:rank % n_gpus`` when CUDA is available, else the CPU. ``rank``: the map
    worker's with ``with_rank``; when None, the launcher's ``LOCAL_RANK`` (``torchrun``, ``accelerate launch``: this
    process's rank on its node), else 0.

    >>> choose_device("cuda:1", None), choose_device("cpu", 3)
    (device(type='cuda', index=1), device(type='cpu'))
    """
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", "0")) if rank is None else rank
        return torch.device(f"cuda:{rank % torch.cuda.device_count()}")
    return torch.device("cpu")


def gpu_group(local_rank: int, processes: int, gpus: int) -> list[int]:
    """The GPUs that process ``local_rank`` of the ``processes`` on a node with ``gpus`` GPUs splits its model over:
    ``gpus // processes`` consecutive ones, so that the processes' groups are disjoint (none when there is no GPU).

    >>> gpu_group(0, 1, 8), gpu_group(1, 2, 8), gpu_group(3, 4, 8), gpu_group(0, 2, 0)
    ([0, 1, 2, 3, 4, 5, 6, 7], [4, 5, 6, 7], [6, 7], [])
    """
    per_process = gpus // processes
    if gpus and not per_process:
        raise ValueError(f"{processes} processes on this node share {gpus} GPU(s): a model split across devices "
                         "takes at least one GPU per process; start fewer processes (--nproc_per_node)")
    return list(range(local_rank * per_process, (local_rank + 1) * per_process))


def split_options(split: SplitSettings, gpus: list[int], free: Mapping[int | str, int] | None = None
                  ) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments that split the model over the GPUs ``gpus`` (this process's group,
    :func:`gpu_group`), the CPU and the disk as ``split`` asks. GPU ``i`` in ``split.device_map`` and
    ``split.max_memory`` is ``gpus[i]``, the ``i``-th GPU of the group, as if the process saw its GPUs alone; a
    device map by name (``"auto"``, ``"balanced"``, ...) without ``max_memory`` gets the ``free`` memory
    (``accelerate.utils.get_max_memory()``: device -> bytes) of the group's GPUs and of the CPU, when the group is
    not every GPU.

    >>> from types import SimpleNamespace as Split
    >>> split_options(Split(device_map="auto", max_memory={0: "70GiB", "cpu": "100GiB"}, offload_folder=None), [2, 3])
    {'device_map': 'auto', 'max_memory': {2: '70GiB', 'cpu': '100GiB'}, 'offload_folder': None}
    >>> split_options(Split(device_map={"model": 1, "lm_head": "cpu"}, max_memory=None, offload_folder="off"), [2, 3])
    {'device_map': {'model': 3, 'lm_head': 'cpu'}, 'max_memory': None, 'offload_folder': 'off'}
    >>> split_options(Split(device_map="auto", max_memory=None, offload_folder=None), [1], {0: 80, 1: 80, "cpu": 9})
    {'device_map': 'auto', 'max_memory': {1: 80, 'cpu': 9}, 'offload_folder': None}
    """

    def gpu(device: int | str) -> int | str:
        if isinstance(device, str) and device.startswith("cuda"):
            device = int(device.partition(":")[2] or 0)
        if not isinstance(device, int):
            return device  # "cpu", "disk"
        if not 0 <= device < len(gpus):
            raise ValueError(f"device_map/max_memory: GPU {device}, but this process splits its model over "
                             f"{len(gpus)} GPU(s) (GPU i is the i-th of its own group: {gpus})")
        return gpus[device]

    device_map, max_memory = split.device_map, split.max_memory
    if isinstance(device_map, Mapping):
        device_map = {module: gpu(device) for module, device in device_map.items()}
    if max_memory is not None:
        max_memory = {gpu(device): size for device, size in max_memory.items()}
    elif isinstance(device_map, str) and free is not None and sorted(k for k in free if isinstance(k, int)) != gpus:
        max_memory = {device: size for device, size in free.items() if device in gpus or device == "cpu"}
    return {"device_map": device_map, "max_memory": max_memory, "offload_folder": split.offload_folder}


def process_split(split: SplitSettings) -> dict[str, Any]:
    """:func:`split_options` for this process: its group of GPUs is :func:`gpu_group` of its ``LOCAL_RANK`` among
    the launcher's ``LOCAL_WORLD_SIZE`` processes on this node (``torchrun``, ``accelerate launch``), or every GPU
    for a process on its own; under a launcher its offloaded weights go to a folder of its own, ``rank-<RANK>`` in
    ``offload_folder`` (the processes would write the same files at the same time)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    group = gpu_group(int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1")), gpus)
    free = None
    if gpus and split.max_memory is None and isinstance(split.device_map, str):
        from accelerate.utils import get_max_memory

        free = get_max_memory()
    options = split_options(split, group, free)
    if options["offload_folder"] is not None and "RANK" in os.environ:
        options["offload_folder"] = os.path.join(options["offload_folder"], f"rank-{os.environ['RANK']}")
    return options


def load(settings: ModelSettings, identity: str, rank: int | None = None, split: SplitSettings | None = None
         ) -> Loaded:
    """The model of ``identity`` in this process, loaded once per load settings and checked once; split across
    devices as ``split`` says (:func:`process_split`) when its ``device_map`` is set."""
    if os.getpid() != _IMPORT_PID and not torch.cuda.is_available():
        torch.set_num_threads(1)  # a forked CPU worker: one thread each, and no OpenMP deadlock
    if settings.model == IN_MEMORY:
        if identity not in _MODELS:
            raise RuntimeError("this scorer wraps an in-memory model that is not in this process (a spawned "
                               "worker?); build the scorer from a model id or path to use spawned workers")
        key = f"{identity}|{settings.device}"
        if key not in _LOADED and settings.device:  # moved once, on first use, not at every map batch
            _MODELS[identity][0].to(settings.device)
        _MODELS.setdefault(key, _MODELS[identity])
    else:
        device = choose_device(settings.device, rank)
        splits = split is not None and split.device_map is not None
        # the split as asked, not as resolved: the free memory it is resolved with changes once a model is loaded
        where = (split.device_map, split.max_memory, split.offload_folder) if splits else device
        key = f"{identity}|{settings.revision}|{settings.dtype}|{where}|{settings.gguf_file}|{settings.chat_template}"
        if key not in _MODELS:  # scorers of the same model in one process (policy and report, splits) share it
            from hf_ches.models import load_model_and_tokenizer

            _MODELS[key] = load_model_and_tokenizer(
                settings.model, revision=settings.revision, dtype=settings.dtype, gguf_file=settings.gguf_file,
                chat_template=settings.chat_template, **(process_split(split) if splits else {"device": device}),
            )
        _TOKENIZERS.setdefault(_tokenizer_key(settings, identity), _MODELS[key][1])
    if key not in _LOADED:
        model, tokenizer = _MODELS[key]
        head = inspect_model(model.eval())
        _LOADED[key] = Loaded(model, tokenizer, head, inspect_sharing(model, head))
    return _LOADED[key]


def _tokenizer_key(settings: ModelSettings, identity: str) -> str:
    return f"{identity}|{settings.revision}|{settings.gguf_file}|{settings.chat_template}"


def tokenizer(settings: ModelSettings, identity: str) -> Any:
    """The tokenizer of ``identity`` in this process, without loading the model: the loaded model's when there is
    one (a large vocabulary's tokenizer takes hundreds of MB), else loaded alone, once."""
    if settings.model == IN_MEMORY:
        return load(settings, identity).tokenizer
    key = _tokenizer_key(settings, identity)
    if key not in _TOKENIZERS:
        from hf_ches.models import load_tokenizer

        _TOKENIZERS[key] = load_tokenizer(settings.model, revision=settings.revision, gguf_file=settings.gguf_file,
                                          chat_template=settings.chat_template)
    return _TOKENIZERS[key]
