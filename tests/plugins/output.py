"""What a command printed, as the tests read it."""

from __future__ import annotations

import re


def error_line(stderr: str) -> str:
    """The one error line a command printed on ``stderr``, its last; raises AssertionError when it printed anything
    else than that, progress bars and hf-ches' own one-line steps (a traceback, an indented or a second error line).

    >>> error_line("Scoring train: 100%|##| 4/4 [00:01<00:00, 3.1 examples/s]\\nPublishing to me/x\\nx: error: y")
    'x: error: y'
    """
    lines = [line for line in stderr.replace("\r", "\n").splitlines()
             if line.strip() and not re.search(r"\[\d\d:\d\d", line)]
    others = [line for line in lines[:-1] if line[0].isspace() or "Traceback" in line or ": error" in line.lower()]
    assert lines and ": error: " in lines[-1] and not others, lines
    return lines[-1]
