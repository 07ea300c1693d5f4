"""Build the text slices shipped in ``power_transformers/data/`` from two Debian packages.

Sources (both public domain texts; see ``power_transformers/data/README.md``):

* ``r-cran-janeaustenr`` -- Jane Austen's six novels, stored in R's lazy-load database
  ``data/Rdata.rdx`` / ``data/Rdata.rdb``. The index (``.rdx``) is a gzipped R serialization of a
  list whose ``variables`` element maps each object name to ``(offset, length)`` in the ``.rdb``;
  each ``.rdb`` entry is a 4-byte big-endian length followed by a zlib stream holding one
  serialized character vector (one element per line of the Gutenberg text). R is not needed:
  this file reads the XDR serialization format itself.
* ``cfi-en`` -- "Copyright Free Iron", an English public-domain book in HTML; we keep its prose.

Usage (Debian/Ubuntu, no root needed)::

    mkdir -p /tmp/corpus && cd /tmp/corpus
    apt-get download r-cran-janeaustenr cfi-en
    for f in *.deb; do dpkg-deb -x "$f" x; done
    python scripts/make_corpus.py /tmp/corpus/x power_transformers/data
"""

from __future__ import annotations

import argparse
import gzip
import html
import re
import struct
import zlib
from pathlib import Path

# --------------------------------------------------------------------------------------------
# A minimal reader of R's XDR serialization (format versions 2 and 3): enough for lists,
# pairlists, symbols and atomic vectors, which is all a lazy-load database of data sets holds.
# --------------------------------------------------------------------------------------------

NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241


class RReader:
    """Decode one R object from serialized bytes (``X\\n`` header, big-endian XDR)."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError(f"not an XDR R serialization (header {data[:2]!r})")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer and minimal reader versions
        if version == 3:
            encoding_length = self.int()  # then the native encoding's name, skipped
            self.pos += encoding_length
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP, NILSXP):
            return None
        if kind == REFSXP:
            index = (flags >> 8) or self.int()
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == LISTSXP:  # pairlist -> dict (tagged) of its elements
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            head = {tag: self.item()}
            tail = self.item()
            del attrs
            return {**head, **(tail or {})}
        if kind == CHARSXP:
            length = self.int()
            if length == -1:
                return None  # NA_character_
            raw = self.data[self.pos : self.pos + length]
            self.pos += length
            return raw.decode("utf-8", errors="replace")
        if kind in (LGLSXP, INTSXP):
            n = self.int()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == REALSXP:
            n = self.int()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (STRSXP, VECSXP):
            value = [self.item() for _ in range(self.int())]
        else:
            raise ValueError(f"unsupported R object type {kind} at byte {self.pos}")
        if has_attr:
            attrs = self.item()
            names = (attrs or {}).get("names")
            if names is not None and kind == VECSXP:
                return dict(zip(names, value))
        return value


def read_lazyload(data_dir: Path) -> dict[str, list]:
    """All objects of an R package's lazy-load data base, ``{name: decoded object}``."""
    index = RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).item()
    blob = (data_dir / "Rdata.rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        entry = blob[int(offset) : int(offset) + int(length)]
        objects[name] = RReader(zlib.decompress(entry[4:])).item()
    return objects


# --------------------------------------------------------------------------------------------
# Text clean-up
# --------------------------------------------------------------------------------------------


def join_lines(lines: list[str]) -> str:
    """The novel as it is stored: Gutenberg's hard-wrapped lines (~70 characters), joined by newlines."""
    return "\n".join(line or "" for line in lines).strip() + "\n"


def html_to_text(page: str) -> str:
    """Prose of an HTML page: paragraphs and headings, tags and entities removed."""
    page = re.sub(r"(?is)<(script|style|head).*?</\1>", " ", page)
    page = re.sub(r"(?i)<\s*(p|br|h[1-6]|li|div|tr)\b[^>]*>", "\n\n", page)
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    paragraphs = [" ".join(block.split()) for block in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder the two .deb packages were extracted into")
    parser.add_argument("out", type=Path, help="output folder (power_transformers/data)")
    args = parser.parse_args(argv)

    novels = read_lazyload(args.root / "usr/lib/R/site-library/janeaustenr/data")
    print("novels found:", ", ".join(f"{k} ({len(v)} lines)" for k, v in novels.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, source in (("emma", "emma"), ("persuasion", "persuasion")):
        text = join_lines(novels[source])
        (args.out / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{name}.txt: {len(text):,} characters")

    html_dir = args.root / "usr/share/doc/cfi-en/html"
    chapters = sorted(html_dir.glob("ch*web.htm"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    parts = [html_to_text(p.read_text(encoding="latin-1")) for p in chapters]
    text = "".join(f"== Chapter {re.findall(chr(92) + 'd+', p.name)[0]} ==\n\n{t}\n" for p, t in zip(chapters, parts))
    (args.out / "cfi_en.txt").write_text(text, encoding="utf-8")
    print(f"cfi_en.txt: {len(text):,} characters from {len(chapters)} chapters")


if __name__ == "__main__":
    main()
