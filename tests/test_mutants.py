"""The list of planted bugs (tests/mutants.py) still fits the code.

`nox -s mutants` runs by hand, not in CI; this keeps its list from going stale
between runs: a change to a line a mutant plants its bug in fails here, at once,
and the mutant is moved with it.
"""

from __future__ import annotations

import tomllib

import pytest

from tests.mutants import CANARY, MUTANTS, PACKAGES, ROOT, Mutant, check_mutant


def test_names_are_unique() -> None:
    names = [m.name for m in (CANARY, *MUTANTS)]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("mutant", [CANARY, *MUTANTS], ids=lambda m: m.name)
def test_each_mutant_plants_its_bug_once_in_code_that_compiles(mutant: Mutant) -> None:
    assert check_mutant(mutant, ROOT) is None


def test_the_copy_links_every_package_of_the_distribution() -> None:
    # A package missing here is imported from the checkout, not the mutated copy, and
    # every mutant planted in it survives.
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    folders = config["tool"]["setuptools"]["package-dir"]
    ours = {name.removeprefix("protoserve."): folder for name, folder in folders.items() if name}
    generated = {p.name: f"gen/protoserve/{p.name}" for p in (ROOT / "gen/protoserve").iterdir()}
    generated = {n: f for n, f in generated.items() if (ROOT / f / "__init__.py").exists()}
    assert {**ours, **generated} == PACKAGES
