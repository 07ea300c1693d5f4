"""Real English text shipped with the package, for conversion, quality recovery and demos.

Three plain UTF-8 slices (sources and licences in ``README.md`` beside this file; rebuilt by
``scripts/make_corpus.py``):

* ``"emma"``        Jane Austen, *Emma* (1815): the training text.
* ``"persuasion"``  Jane Austen, *Persuasion* (1817): held-out text, same author and style.
* ``"cfi_en"``      Linus Walleij, *Copyright Does Not Exist* (English translation): out-of-domain text.

Example::

    from power_transformers.data import load_text
    held_out = load_text("persuasion", max_chars=16_000)
"""

from __future__ import annotations

from importlib import resources

import torch

TEXTS = ("emma", "persuasion", "cfi_en")


def load_text(name: str, max_chars: int | None = None) -> str:
    """The text called ``name`` (one of ``TEXTS``), optionally only its first ``max_chars`` characters."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; available: {', '.join(TEXTS)}")
    text = resources.files(__name__).joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return text if max_chars is None else text[:max_chars]


def byte_ids(text: str) -> torch.Tensor:
    """The UTF-8 bytes of `text` as token ids [n] (a 256-id vocabulary, no tokenizer needed)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


class TokenWindows(torch.utils.data.Dataset):
    """Consecutive windows of `window` token ids (the tail that does not fill one is dropped), as
    causal-LM examples {"input_ids": [window], "labels": [window]}."""

    def __init__(self, ids: torch.Tensor, window: int):
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        self.windows = ids[: len(ids) // window * window].view(-1, window)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


__all__ = ["TEXTS", "TokenWindows", "byte_ids", "load_text"]
