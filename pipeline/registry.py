"""Registries filled by discovery: every module of a package that defines `SPEC` of the given type
is registered under the spec's name, so adding a family or an objective is adding a file."""
from __future__ import annotations

import importlib
import pkgutil


def discover(package: str, path, spec_type: type, key: str) -> dict:
    """{getattr(SPEC, key): SPEC} for the modules of `package` (its __path__ is `path`)."""
    specs = {}
    for info in pkgutil.iter_modules(path):
        spec = getattr(importlib.import_module(f"{package}.{info.name}"), "SPEC", None)
        if isinstance(spec, spec_type):
            specs[getattr(spec, key)] = spec
    return specs
