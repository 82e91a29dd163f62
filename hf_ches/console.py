"""What a command prints besides its report (`command_logging`): hf-ches' steps and results, one line each, on
stderr, its warnings as ``warning: ...``, and hf-ches' own progress bars; the libraries' messages and bars only with
``-v``. Every command's ``main`` (`hf_ches.recipes.run_recipe`) sets it up once, after parsing its arguments.
"""

from __future__ import annotations

import logging
import sys

LIBRARIES = ("datasets", "transformers", "huggingface_hub", "evaluate", "accelerate")


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record comes (pytest's capsys swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _PlainFormatter(logging.Formatter):
    """A step or a result as the line itself; anything else with its level in front (``warning: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"


def command_logging(verbose: bool = False, quiet: bool = False) -> None:
    """What a command prints besides its report: hf-ches' steps and results, one line each, on stderr; its warnings
    as ``warning: ...``; and hf-ches' own progress bar, one per scoring pass (`hf_ches.runner.progress_bar`).
    Nothing else: from the libraries (`LIBRARIES`) and Python's ``warnings`` only errors, and none of their progress
    bars (datasets' "Generating train split", "Map", "Saving"; transformers' "Loading weights" and the GGUF reader's,
    `hf_ches.models`; huggingface_hub's downloads and uploads).

    ``verbose`` (``-v``) brings the details back: hf-ches' debug messages (e.g. where the chunks are kept) as
    ``LEVEL name: message``, the libraries' warnings and their progress bars. ``quiet``: errors only and no progress
    bars at all, as on every rank of a launcher but rank 0, which speaks for them all.

    datasets' logger has a handler of its own and also passes its records on to the root's, so a root handler
    (``logging.basicConfig``) printed each of its warnings twice; hf-ches adds none there, and its records still
    reach the root for whoever listens."""
    from datasets.utils import disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import disable_progress_bars as disable_hub_bars
    from huggingface_hub.utils import enable_progress_bars as enable_hub_bars
    from transformers.utils.logging import disable_progress_bar as disable_transformers_bars
    from transformers.utils.logging import enable_progress_bar as enable_transformers_bars

    from hf_ches.runner import show_progress_bars

    package = logging.getLogger("hf_ches")
    handler = next((h for h in package.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr()
        package.addHandler(handler)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose else _PlainFormatter())
    package.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    library_level = logging.WARNING if verbose and not quiet else logging.ERROR
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(library_level)
    logging.captureWarnings(not verbose)  # Python's warnings go to the "py.warnings" logger, which shows errors only
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
    library_bars = verbose and not quiet
    for enable, disable in ((enable_progress_bars, disable_progress_bars), (enable_hub_bars, disable_hub_bars),
                            (enable_transformers_bars, disable_transformers_bars)):
        (enable if library_bars else disable)()
    show_progress_bars(not quiet)
