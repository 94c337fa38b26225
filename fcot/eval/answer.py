"""Final-answer extraction for chain-of-thought outputs.

``fcot data synth --cot`` and post-training teach answers of the form ``rationale\\nAnswer: X``;
scoring the whole text would compare the rationale with the reference. :func:`extract_answer`
takes the text after the LAST ``Answer:`` (case-insensitive, to the end of that line) as the
answer to score; text without one is scored whole (a model that answers directly). The
predictions file keeps the raw generated text next to the scored answer.

The pattern is configurable (``fcot eval --answer-pattern REGEX``): a regular expression with
exactly one capturing group (or a group named ``answer``); its last match's group is the
answer. ``--answer-pattern none`` scores the raw text.
"""

from __future__ import annotations

import re

DEFAULT_ANSWER_PATTERN = r"(?i)\banswer\s*:[ \t]*([^\n]*)"
"""The text after the last ``Answer:`` on its line (``Answer:``, ``answer :``, ``ANSWER:`` ...)."""


def compile_answer_pattern(pattern: str | re.Pattern | None) -> re.Pattern | None:
    """The compiled pattern; None for ``None``/``"none"`` (no extraction). A pattern that does not
    compile or has no usable group is a ValueError naming ``answer_pattern``."""
    if pattern is None or (isinstance(pattern, str) and pattern.lower() == "none"):
        return None
    if isinstance(pattern, re.Pattern):
        compiled = pattern
    elif isinstance(pattern, str):
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"answer_pattern={pattern!r} is not a regular expression ({e})") from None
    else:
        raise TypeError(f"answer_pattern={pattern!r}: expected a regular expression string, or 'none'")
    if "answer" not in compiled.groupindex and compiled.groups != 1:
        raise ValueError(f"answer_pattern={compiled.pattern!r} has {compiled.groups} capturing groups: give exactly one "
                         "(or a group named 'answer') around the final answer")
    return compiled


def extract_answer(text: str, pattern: str | re.Pattern | None = DEFAULT_ANSWER_PATTERN) -> tuple[str, bool]:
    """``(answer, found)``: the stripped group of the pattern's last match in ``text``, or the
    stripped text itself (``found=False``) when nothing matches or extraction is off."""
    if not isinstance(text, str):
        raise TypeError(f"text={text!r}: expected a str")
    compiled = compile_answer_pattern(pattern)
    if compiled is None:
        return text.strip(), False
    last = None
    for last in compiled.finditer(text):
        pass
    if last is None:
        return text.strip(), False
    group = last.group("answer") if "answer" in compiled.groupindex else last.group(1)
    return (group or "").strip(), True


__all__ = ["DEFAULT_ANSWER_PATTERN", "compile_answer_pattern", "extract_answer"]
