import os

import pytest


@pytest.fixture(scope="module")
def triton_interpreter():
    """triton also reads TRITON_INTERPRET at launch (and when it lazily imports its own modules)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved
