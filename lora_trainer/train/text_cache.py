"""Cached text-encoder outputs (``cache_text_encoder_outputs``): with frozen text encoders, each caption
(each shuffled or dropped-tag variant, when captions vary) is encoded once; later steps read the result.

Entries are the host's conditioning for one caption (a tensor, or SDXL's ``crossattn`` + ``pooled``),
computed under the run's autocast exactly as a training step would compute them, and kept detached.
Captions of different lengths are encoded by the host in 77-token chunks; a batch pads shorter ones
with the encoding of an empty chunk, which is what the host's own batched encoding does.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, List, Optional

import torch


def _one(cond: Any, i: int) -> Any:
    if isinstance(cond, dict):
        return {k: v[i].detach() for k, v in cond.items()}
    return cond[i].detach()


def _seq(entry: Any) -> torch.Tensor:
    return entry["crossattn"] if isinstance(entry, dict) else entry


class TextEncoderCache:
    def __init__(self, host, *, max_token_length: int, clip_skip: int, autocast, store_device=None,
                 chunk: int = 16, max_entries: Optional[int] = None):
        """``max_entries``: keep at most that many (least recently used dropped) - for shuffled captions,
        whose variants rarely repeat; ``store_device``: where entries live (e.g. the CPU for those)."""
        self.host = host
        self.max_token_length, self.clip_skip = max_token_length, clip_skip
        self.autocast = autocast
        self.store_device = store_device
        self.chunk = chunk
        self.entries: "OrderedDict[str, Any]" = OrderedDict()
        self.max_entries = max_entries
        self._empty: Optional[torch.Tensor] = None
        self.computed = 0

    def __len__(self) -> int:
        return len(self.entries)

    @torch.no_grad()
    def _compute(self, captions: List[str]) -> None:
        for s in range(0, len(captions), self.chunk):
            part = captions[s: s + self.chunk]
            with self.autocast():
                cond = self.host.encode_tokens(self.host.tokenize(part, self.max_token_length), self.clip_skip)
            for i, c in enumerate(part):
                e = _one(cond, i)
                if self.store_device is not None:
                    e = {k: v.to(self.store_device) for k, v in e.items()} if isinstance(e, dict) else e.to(self.store_device)
                self.entries[c] = e
            self.computed += len(part)

    def _evict(self) -> None:
        while self.max_entries and len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def precompute(self, captions: Iterable[str]) -> None:
        todo = sorted(set(c for c in captions if c not in self.entries))
        if self.max_entries:
            todo = todo[: self.max_entries]
        if todo:
            self._compute(todo)
        self._evict()

    def encode(self, captions: List[str], device=None) -> Any:
        """The batch's conditioning, as ``host.encode_tokens`` would give it (no gradients)."""
        batch = list(dict.fromkeys(captions))
        for c in batch:
            if c in self.entries:
                self.entries.move_to_end(c)
        todo = [c for c in batch if c not in self.entries]
        if todo:
            self._compute(todo)
        entries = [self.entries[c] for c in captions]
        self._evict()
        lengths = {_seq(e).shape[0] for e in entries}
        if len(lengths) > 1:
            entries = self._pad(entries, max(lengths))
        if isinstance(entries[0], dict):
            out = {k: torch.stack([e[k] for e in entries]) for k in entries[0]}
            return {k: v.to(device) for k, v in out.items()} if device is not None else out
        out = torch.stack(entries)
        return out.to(device) if device is not None else out

    def _pad(self, entries: List[Any], length: int) -> List[Any]:
        if self._empty is None:
            self._compute([""])
            self._empty = _seq(self.entries.pop(""))[:77]
        out = []
        for e in entries:
            seq = _seq(e)
            reps = (length - seq.shape[0]) // 77
            if reps:
                seq = torch.cat([seq] + [self._empty] * reps, dim=0)
            out.append(dict(e, crossattn=seq) if isinstance(e, dict) else seq)
        return out
