import os

# Triton runs on CPU only through its interpreter, and only if this is set before any
# @triton.jit is applied: set it before anything imports the kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def short_decode_tail(monkeypatch):
    """A decode tail of 4 tokens (64 in use), so that every test that decodes a few tokens
    crosses several folds of the tail into the state."""
    from power_transformers.kernels import reference

    monkeypatch.setattr(reference, "DECODE_TAIL", 4)
