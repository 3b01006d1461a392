"""Errors a user can cause and fix: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (file, option, budget, data): the message names the problem and the fix."""

    exit_code = 2


class InfeasibleError(UserError):
    """The budgets leave no assignment; the message names the smallest feasible value of each budget."""


def out_of_memory_summary(e: BaseException) -> str:
    """The first sentence of a device's out-of-memory error ("CUDA out of memory"), for a one-line message."""
    return str(e).strip().split(". ")[0][:120] or "out of memory"


def first_line(e: BaseException | None, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), cut to ``limit`` characters:
    what a one-line error quotes of a library's multi-line one."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]
