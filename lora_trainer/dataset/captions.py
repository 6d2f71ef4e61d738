"""Caption augmentation per step: tag shuffling with kept leading tags, tag and caption dropout."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class CaptionRules:
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0

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
