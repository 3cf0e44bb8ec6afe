"""Rules: each file here registers one rule in ``RULES``; importing this package loads them all.

A rule is a plain function ``rule(evidence, **params) -> list[Finding | ClassFinding]``:
numbers first, severity from thresholds given as params, and a sentence anyone can read.
"""
import importlib
import pkgutil

from auditor.registry import RULES

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["RULES"]
