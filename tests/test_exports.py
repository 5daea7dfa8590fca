"""The curated public surface: ``__all__`` is sorted, complete and names what exists.

After httpx's ``tests/test_exported_members.py``.
"""

from __future__ import annotations

import types

import pytest

import streamsvc
import streamsvc.operators

MODULES = {"streamsvc": streamsvc, "streamsvc.operators": streamsvc.operators}


def public_names(module: types.ModuleType) -> set[str]:
    """What the module's namespace offers: no underscore, not a submodule or a future import."""
    return {
        name for name, value in vars(module).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"
    }


@pytest.mark.parametrize("module", MODULES.values(), ids=MODULES.keys())
def test_all_is_sorted_and_unique(module: types.ModuleType) -> None:
    assert module.__all__ == sorted(module.__all__)
    assert len(set(module.__all__)) == len(module.__all__)


@pytest.mark.parametrize("module", MODULES.values(), ids=MODULES.keys())
def test_every_name_in_all_exists(module: types.ModuleType) -> None:
    for name in module.__all__:
        assert hasattr(module, name), f"{module.__name__}.__all__ names missing {name!r}"


@pytest.mark.parametrize("module", MODULES.values(), ids=MODULES.keys())
def test_nothing_public_is_missing_from_all(module: types.ModuleType) -> None:
    missing = public_names(module) - set(module.__all__)
    assert not missing, f"public in {module.__name__} but not in __all__: {sorted(missing)}"


def test_exported_members_say_where_they_belong() -> None:
    # Like httpx: re-exported classes and functions are defined inside streamsvc.
    for name in streamsvc.__all__:
        value = getattr(streamsvc, name)
        module = getattr(value, "__module__", None)
        if module is not None and not isinstance(value, str):
            assert module.startswith("streamsvc"), f"{name} comes from {module}"


def test_version_matches_the_package_metadata() -> None:
    from importlib.metadata import version

    assert streamsvc.__version__ == version("streamsvc")


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from streamsvc import *", namespace)  # noqa: S102
    assert set(namespace) - {"__builtins__"} == set(streamsvc.__all__)
