"""Caption files and caption augmentation per step: reading a caption file whatever its encoding, tag
shuffling with kept leading tags, tag and caption dropout."""
from __future__ import annotations

import codecs
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Encodings a caption file may be read with when it is not UTF-8, with the name a user knows them by.
FALLBACK_ENCODINGS = {"cp1251": "Windows-1251 (Cyrillic)", "cp1252": "Windows-1252 (Western European)"}
_CYRILLIC_BYTES = re.compile(rb"[\xc0-\xff\xa8\xb8]{2,}")   # cp1251 letters: runs of high bytes make words


@dataclass
class CaptionText:
    text: str        # one line: the file's lines joined with spaces, surrounding whitespace removed
    encoding: str    # "utf-8", "utf-8-sig" (BOM removed), "utf-16", or a FALLBACK_ENCODINGS key


def read_caption_file(path: Path) -> CaptionText:
    """The caption in ``path``. UTF-8 (with or without a BOM) and BOM-marked UTF-16 are read as such; other
    bytes are read as cp1251 when they look like Cyrillic words, else as cp1252, and ``encoding`` says so,
    so the caller can warn. Raises ``OSError`` when the file cannot be read."""
    raw = Path(path).read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        encoding, body = "utf-8-sig", raw[len(codecs.BOM_UTF8):]
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding, body = "utf-16", raw
    else:
        encoding, body = "utf-8", raw
    try:
        text = body.decode("utf-16" if encoding == "utf-16" else "utf-8")
    except UnicodeDecodeError:
        encoding = guess_legacy_encoding(body)
        text = body.decode(encoding, errors="replace")
    return CaptionText(one_line(text), encoding)


def guess_legacy_encoding(raw: bytes) -> str:
    high = sum(b >= 0x80 for b in raw)
    in_words = sum(len(m) for m in _CYRILLIC_BYTES.findall(raw))
    return "cp1251" if high and in_words >= 0.6 * high else "cp1252"


def one_line(text: str) -> str:
    text = text.replace("\ufeff", "").replace("\r", "\n")
    return " ".join(line.strip() for line in text.split("\n") if line.strip())


@dataclass
class CaptionRules:
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0

    @property
    def varies(self) -> bool:
        """Whether a caption can differ from step to step."""
        return bool(self.shuffle_caption or self.caption_dropout_rate or self.caption_tag_dropout_rate)

    def apply(self, caption: str, rng: random.Random) -> str:
        if self.caption_dropout_rate and rng.random() < self.caption_dropout_rate:
            return ""
        if not (self.shuffle_caption or self.caption_tag_dropout_rate):
            return caption
        tags = [t.strip() for t in caption.split(",") if t.strip()]
        kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens:]
        if self.caption_tag_dropout_rate:
            rest = [t for t in rest if rng.random() >= self.caption_tag_dropout_rate]
        if self.shuffle_caption:
            rng.shuffle(rest)
        return ", ".join(kept + rest)


def truncate_tags(caption: str, count_tokens: Callable[[str], int], limit: int) -> str:
    """Keep whole leading tags while their tokens (with ", " between them) fit in ``limit``: how
    ``max_token_length`` caps a caption on hosts that chunk text themselves (the WebUI)."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, used = [], 0
    for i, tag in enumerate(tags):
        n = count_tokens(tag) + (1 if i else 0)  # "," is one token
        if used + n > limit:
            break
        kept.append(tag)
        used += n
    return ", ".join(kept)
