"""The list of planted bugs (tests/mutants.py) still fits the code.

`nox -s mutants` runs by hand, not in CI; this keeps its list from going stale
between runs: a change to a line a mutant plants its bug in fails here, at once,
and the mutant is moved with it.
"""

from __future__ import annotations

import pytest

from tests.mutants import CANARY, MUTANTS, ROOT, Mutant, check_mutant


def test_names_are_unique() -> None:
    names = [m.name for m in (CANARY, *MUTANTS)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("mutant", [CANARY, *MUTANTS], ids=lambda m: m.name)
def test_each_mutant_plants_its_bug_once_in_code_that_compiles(mutant: Mutant) -> None:
    assert check_mutant(mutant, ROOT) is None
