"""Every code block of README.md, the guides in docs/ and the metric card runs as written, against a loopback Hub.

The Hub (`hf_ches.testing.local_hub.LocalHub`) belongs to user ``you`` with the orgs the blocks name, and holds
what they load: `HUB_MODELS` (each a tiny random model) and `HUB_DATASETS` (small synthetic pairs). So the blocks run
unchanged; the only text substituted is the token placeholder ``hf_...``. ``python`` blocks of one file run in
order in one namespace (a ``>>>`` block as a doctest); ``bash`` blocks run with ``bash -e`` and this environment's
``python`` and ``hf-ches`` first on the PATH, in a scratch folder that links ``hub_scripts``, ``metrics`` and
``.venv`` (this environment). A block that cannot run here must say so with ``<!-- readme-test: skip (reason) -->``
on the line above it: it is reported as skipped with that reason. A new block that names a model or dataset missing here fails with that name:
add it to `HUB_MODELS` or `HUB_DATASETS`.
"""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from huggingface_hub import HfApi

from hf_ches.testing.local_hub import LocalHub, clients_pointed_at
from hf_ches.testing import synthetic_pairs

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/guide.md", "docs/validation.md", "metrics/ranking_accuracy/README.md")
RUNNABLE = ("python", "bash")
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
HUB_MODELS = ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B", "you/Qwen2.5-0.5B-DPO", "my/model")
HUB_DATASETS = {"trl-lib/ultrafeedback_binarized": {"train": 8, "test": 6}}
TOKEN_PLACEHOLDER = "hf_..."


def code_blocks(text: str, document: str) -> list[tuple[str, int, str, str, str | None]]:
    r"""``(document, line, language, code, skip reason)`` of each fenced block of ``text`` whose language is
    `RUNNABLE`.

    >>> text = "# T\n<!-- readme-test: skip (slow) -->\n```bash\nmake\n```\n```\nx = y\n```\n```python\n1\n```\n"
    >>> code_blocks(text, "R.md")
    [('R.md', 3, 'bash', 'make\n', 'slow'), ('R.md', 9, 'python', '1\n', None)]
    """
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) in RUNNABLE:
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            skip = SKIP.fullmatch(before.strip())
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((document, line, match.group(1), match.group(2), skip.group(1) if skip else None))
    return blocks


BLOCKS = [block for document in DOCUMENTS for block in code_blocks((ROOT / document).read_text("utf-8"), document)]


@pytest.fixture(scope="module")
def hub(tiny_model, tmp_path_factory):
    """The loopback Hub of the blocks, the clients pointed at it, and a scratch working folder."""
    root = tmp_path_factory.mktemp("readme")
    work = root / "work"
    work.mkdir()
    for name in ("hub_scripts", "metrics"):
        (work / name).symlink_to(ROOT / name)
    (work / ".venv").symlink_to(sys.prefix)  # `.venv/bin/python`, as README writes the environment's python
    with LocalHub(data_dir=root / "hub", user="you", orgs=("Qwen", "trl-lib", "my")) as server, \
            clients_pointed_at(server.endpoint, server.token, root / "hf_home"):
        api = HfApi(token=server.token)
        for repo_id in HUB_MODELS:
            api.create_repo(repo_id)
            api.upload_folder(folder_path=tiny_model, repo_id=repo_id)
        for repo_id, sizes in HUB_DATASETS.items():
            DatasetDict({split: Dataset.from_dict(synthetic_pairs(n, seed=i)) for i, (split, n) in
                         enumerate(sizes.items())}).push_to_hub(repo_id, token=server.token)
        cwd = os.getcwd()
        os.chdir(work)
        try:
            yield server, work
        finally:
            os.chdir(cwd)


@pytest.fixture(scope="module")
def namespaces() -> dict[str, dict]:
    """One namespace per document, shared by its python blocks in order. The metric card's blocks compute on a
    scored dataset ``ds`` that they take as given."""
    logps = {name: [-12.0, -8.5, -20.0, -7.25] for name in ("chosen_logps", "ref_chosen_logps")}
    logps |= {name: [-11.0, -9.0, -25.0, -7.5] for name in ("rejected_logps", "ref_rejected_logps")}
    return {"README.md": {}, "docs/guide.md": {}, "docs/validation.md": {}, "metrics/ranking_accuracy/README.md": {
        "ds": Dataset.from_dict(logps | {"alpha": [1.0, 0.75, 0.5, 0.25]})}}


@pytest.mark.parametrize("document, line, language, code, skip", BLOCKS,
                         ids=[f"{block[0]}:{block[1]}-{block[2]}" for block in BLOCKS])
def test_code_block_runs_as_written(hub, namespaces, document, line, language, code, skip):
    if skip:
        pytest.skip(f"{document}:{line}: {skip}")
    server, work = hub
    name = f"{document}:{line}"
    if language == "bash":
        env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        done = subprocess.run(["bash", "-e", "-c", code.replace(TOKEN_PLACEHOLDER, server.token)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    elif ">>> " in code:
        test = doctest.DocTestParser().get_doctest(code, namespaces[document], name, document, line)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert runner.run(test).failed == 0, f"{name}: a doctest failed (see the output above)"
    else:
        exec(compile(code, name, "exec"), namespaces[document])


def test_every_runnable_block_is_run_or_says_why_not():
    """The guard: a block that is skipped names its reason, and the documents have blocks to run at all."""
    assert all(skip is None or skip.strip() for *_, skip in BLOCKS)
    for document in DOCUMENTS:
        assert any(block[0] == document and block[4] is None for block in BLOCKS), document
