"""The ``hf-ches`` command: ``score``, ``filter`` and ``publish`` run `hf_ches.pipeline` (``publish`` is
``hub_scripts/ches_filter.py``); ``demo`` runs `hf_ches.demo`; ``validate`` runs
`hf_ches.validate`. Each command is a `hf_ches.recipes.Recipe` and takes only the options of its groups.

>>> main(["--help"])  # doctest: +ELLIPSIS
usage: hf-ches {score,filter,publish,demo,validate} [options]
...
"""

from __future__ import annotations

import importlib
import sys

from hf_ches.pipeline import DESCRIPTION

COMMANDS = {
    "score": "score the pairs and save_to_disk them to --output_dir",
    "filter": "score if needed, select, and write the repo's files to --output_dir (no push)",
    "publish": "score if needed, select, and --push_to_hub to --repo_id (or --output_dir for a dry run); "
               "the same as hub_scripts/ches_filter.py",
    "demo": "run the built-in demo",
    "validate": "one DPO step per sampled pair: does each score predict the drop of log π(chosen)?",
}
USAGE = "usage: hf-ches {" + ",".join(COMMANDS) + "} [options]"


def _help() -> str:
    lines = [USAGE, "", DESCRIPTION, "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run hf-ches <command> --help for the options of a command (only its own: see hf_ches.recipes); "
              "-v (--verbose) prints the details too."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a command; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        result = importlib.import_module("hf_ches.demo").main(rest)
        return result if isinstance(result, int) else 0
    if command == "validate":
        importlib.import_module("hf_ches.validate").main(rest)
        return 0
    if command not in COMMANDS:
        print(f"{USAGE}\nhf-ches: error: unknown command {command!r}; expected one of {list(COMMANDS)}",
              file=sys.stderr)
        return 2
    from hf_ches.pipeline import main as run_stage

    run_stage(rest, stage=command, prog=f"hf-ches {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
