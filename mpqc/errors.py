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
