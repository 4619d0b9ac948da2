"""The public API: everything in ``pipeline.__all__`` imports from ``pipeline``, every public
error is there too, and the client's public methods say what they do."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys

import pytest

import pipeline
from pipeline import errors
from tests.conftest import ROOT


def test_all_is_sorted_without_duplicates() -> None:
    assert pipeline.__all__ == sorted(set(pipeline.__all__))


@pytest.mark.parametrize("name", pipeline.__all__)
def test_every_public_name_is_importable_from_pipeline(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from pipeline import {name}", namespace)
    assert namespace[name] is getattr(pipeline, name)


def test_star_import_in_a_fresh_interpreter_gives_every_public_name() -> None:
    code = ("from pipeline import *\n"
            "import pipeline\n"
            "missing = [n for n in pipeline.__all__ if n not in globals()]\n"
            "assert not missing, missing\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_every_public_error_is_importable_from_pipeline_and_from_errors() -> None:
    missing = [name for name in errors.__all__ if name not in pipeline.__all__]
    assert missing == []
    assert all(getattr(pipeline, name) is getattr(errors, name) for name in errors.__all__)


def test_every_public_class_and_function_is_in_all() -> None:
    """A class or function that ``pipeline`` binds at top level is public: in ``__all__``."""
    bound = {name for name, obj in vars(pipeline).items()
             if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))}
    assert bound <= set(pipeline.__all__)


@pytest.mark.parametrize("cls", [pipeline.Pipeline, pipeline.Run, pipeline.RunResult],
                         ids=lambda c: c.__name__)
def test_every_public_method_of_the_client_is_documented(cls: type) -> None:
    undocumented = []
    for name, member in vars(cls).items():
        if name.startswith("_") and (name != "__init__" or dataclasses.is_dataclass(cls)):
            continue  # a dataclass's __init__ takes the fields its docstring describes
        fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        if callable(fn) and not (fn.__doc__ or "").strip():
            undocumented.append(name)
    assert undocumented == []
