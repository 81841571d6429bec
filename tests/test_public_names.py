"""Every name a package module lists in ``__all__`` (lazily imported ones included) resolves to an object."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import dit_optimum

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(dit_optimum.__path__, prefix="dit_optimum.") if "__main__" not in name
)


@pytest.mark.parametrize("module_name", ["dit_optimum", *MODULES])
def test_every_listed_public_name_resolves(module_name):
    module = importlib.import_module(module_name)
    missing = [name for name in getattr(module, "__all__", ()) if getattr(module, name, None) is None]
    assert not missing, f"{module_name}.__all__ lists names that do not resolve: {missing}"
