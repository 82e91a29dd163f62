"""Shared fixtures: tiny random models (tests/plugins/models.py) and the loopback Hub (tests/plugins/hub.py).

Every test process gets its own datasets cache (set before anything imports datasets, and inherited by
subprocesses), so no run reads what an earlier run left in ``~/.cache/huggingface/datasets``.
"""

import os
import tempfile

_DATASETS_CACHE = tempfile.TemporaryDirectory(prefix="hf-ches-tests-datasets-")  # removed when the process exits
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE.name

pytest_plugins = ["tests.plugins.models", "tests.plugins.hub"]
