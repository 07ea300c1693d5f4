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

TEXTS = ("emma", "persuasion", "cfi_en")


def load_text(name: str, max_chars: int | None = None) -> str:
    """The text called ``name`` (one of ``TEXTS``), optionally only its first ``max_chars`` characters."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; available: {', '.join(TEXTS)}")
    text = resources.files(__name__).joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return text if max_chars is None else text[:max_chars]


__all__ = ["TEXTS", "load_text"]
