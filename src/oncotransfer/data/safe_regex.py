"""A user's regular expression (``data.patient_regex``) applied to many names with a time limit.

Python's ``re`` backtracks and cannot be interrupted (not even by Ctrl-C): ``^(a+)+$`` on a name of 60 ``a``
would run for centuries. The matching runs in a child interpreter that is killed past ``REGEX_SECONDS``, so a
catastrophic pattern is one error line that names it, never a hang.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

from oncotransfer.errors import DataError
from oncotransfer.limits import MAX_REGEX_CHARS, REGEX_SECONDS

_CHILD = """
import json, re, sys
job = json.load(sys.stdin)
pat = re.compile(job["regex"])
out = []
for name in job["names"]:
    m = pat.search(name)
    out.append(None if m is None else (m.group(1) if m.groups() else m.group(0)))
json.dump(out, sys.stdout)
"""


def compile_user_regex(regex: str, what: str = "patient regex (data.patient_regex / --patient-regex)") -> re.Pattern:
    """The compiled pattern; ``DataError`` (one line) when it is too long or not a regular expression."""
    if len(regex) > MAX_REGEX_CHARS:
        raise DataError(f"{what} is {len(regex):,} characters long, above the limit of {MAX_REGEX_CHARS:,}")
    try:
        return re.compile(regex)
    except (re.error, RecursionError, OverflowError) as e:
        raise DataError(f"{what} {regex!r} is not a valid regular expression: {e}") from None


def search_all(regex: str, names: list[str], seconds: float = REGEX_SECONDS,
               what: str = "patient regex (data.patient_regex / --patient-regex)") -> list[str | None]:
    """For each name, group 1 of the first match (group 0 without groups), or None where it does not match;
    ``DataError`` when the pattern takes longer than ``seconds`` over all names (catastrophic backtracking)."""
    compile_user_regex(regex, what)
    if not names:
        return []
    try:
        p = subprocess.run([sys.executable, "-I", "-S", "-c", _CHILD], input=json.dumps({"regex": regex,
                           "names": names}), capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        raise DataError(f"{what} {regex!r} was still matching after {seconds:g} s on {len(names)} file names: "
                        "catastrophic backtracking (nested quantifiers such as (a+)+ or (a|aa)+); write it "
                        "without a repeated group inside a repeat, e.g. '^(P\\d+)_'") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1][:120]
        raise DataError(f"{what} {regex!r} could not be applied ({last})")
    return json.loads(p.stdout)
