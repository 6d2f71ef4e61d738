"""Trigger words: the kept leading tags (``keep_tokens``) that most captions of a concept start with.
They become the LoRA card's activation text and the X/Y/Z preset's prompt."""
from __future__ import annotations

from collections import Counter
from typing import Dict, List

from .folders import ImageItem


def trigger_words(items: List[ImageItem], keep_tokens: int, min_share: float = 0.5) -> List[str]:
    if keep_tokens < 1:
        return []
    by_concept: Dict[str, List[ImageItem]] = {}
    for it in items:
        by_concept.setdefault(it.concept, []).append(it)
    out: List[str] = []
    for concept, its in by_concept.items():
        counts = Counter()
        for it in its:
            if it.caption_source != "file":
                continue
            for tag in [t.strip() for t in it.caption.split(",") if t.strip()][:keep_tokens]:
                counts[tag] += 1
        for tag, n in counts.most_common():
            if n >= min_share * len(its) and tag not in out:
                out.append(tag)
    return out


def missing_trigger(items: List[ImageItem], triggers: List[str]) -> Dict[str, int]:
    """Per concept, how many captions lack every trigger word (the guide: the trigger comes first in every caption)."""
    out: Dict[str, int] = {}
    for it in items:
        tags = {t.strip() for t in it.caption.split(",")}
        if triggers and not tags & set(triggers):
            out[it.concept] = out.get(it.concept, 0) + 1
    return out
