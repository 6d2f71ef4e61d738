"""Caption augmentation per step: tag shuffling with kept leading tags, tag and caption dropout."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable


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
