"""The dataset as the loop sees it: items with buckets, cached latents, per-epoch batches."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .buckets import choose_bucket, load_resized, make_buckets, size_conditioning
from .captions import CaptionRules
from .folders import DatasetScan, ImageItem
from .latent_cache import cache_key, load_cached, store_cached

log = logging.getLogger(__name__)


@dataclass
class Batch:
    indices: List[int]
    bucket: Tuple[int, int]


class TrainData:
    def __init__(self, scan: DatasetScan, *, resolution: Tuple[int, int], enable_bucket: bool, min_bucket_reso: int,
                 max_bucket_reso: int, bucket_reso_steps: int, bucket_no_upscale: bool, batch_size: int,
                 caption_rules: CaptionRules, seed: int):
        self.scan = scan
        self.items: List[ImageItem] = scan.items
        self.batch_size = batch_size
        self.caption_rules = caption_rules
        self.seed = seed
        if enable_bucket:
            self.buckets = make_buckets(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps)
            self.item_bucket = [choose_bucket(it.size, self.buckets, bucket_no_upscale) for it in self.items]
        else:
            self.buckets = [resolution]
            self.item_bucket = [resolution for _ in self.items]
        self.latents: Optional[List[torch.Tensor]] = None
        self.cache_hits = 0

    # ------------------------------------------------------------ counts
    def bucket_counts(self) -> Dict[Tuple[int, int], int]:
        counts: Dict[Tuple[int, int], int] = {}
        for it, b in zip(self.items, self.item_bucket):
            counts[b] = counts.get(b, 0) + it.repeats
        return counts

    def steps_per_epoch(self) -> int:
        """Batches per epoch (a bucket's last batch may be smaller)."""
        return sum(-(-n // self.batch_size) for n in self.bucket_counts().values())

    # ------------------------------------------------------------ latents
    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], vae_fingerprint: str, to_disk: bool,
                      progress: Optional[Callable[[int, int], None]] = None, chunk: int = 8) -> None:
        """Encode every image once (batched per bucket); reuse valid disk entries when ``to_disk``."""
        latents: List[Optional[torch.Tensor]] = [None] * len(self.items)
        todo: Dict[Tuple[int, int], List[int]] = {}
        keys: Dict[int, str] = {}
        for i, (it, b) in enumerate(zip(self.items, self.item_bucket)):
            if to_disk:
                keys[i] = cache_key(it.path, b, vae_fingerprint)
                hit = load_cached(it.path, keys[i], (4, b[1] // 8, b[0] // 8))
                if hit is not None:
                    latents[i] = hit
                    self.cache_hits += 1
                    continue
            todo.setdefault(b, []).append(i)
        done = self.cache_hits
        for b, idx in todo.items():
            for s in range(0, len(idx), chunk):
                part = idx[s: s + chunk]
                imgs = torch.stack([load_resized(self.items[i].path, b) for i in part])
                z = encode(imgs).float().cpu()
                for j, i in enumerate(part):
                    latents[i] = z[j].clone()
                    if to_disk:
                        store_cached(self.items[i].path, keys[i], latents[i])
                done += len(part)
                if progress:
                    progress(done, len(self.items))
        self.latents = latents  # type: ignore[assignment]

    def move_latents(self, device: torch.device) -> None:
        if self.latents is not None:
            self.latents = [z.to(device) for z in self.latents]

    # ------------------------------------------------------------ batches
    def epoch_batches(self, epoch: int) -> List[Batch]:
        """This epoch's batches: every image ``repeats`` times, shuffled within buckets, batch order shuffled."""
        rng = random.Random(self.seed * 1000003 + epoch)
        per_bucket: Dict[Tuple[int, int], List[int]] = {}
        for i, (it, b) in enumerate(zip(self.items, self.item_bucket)):
            per_bucket.setdefault(b, []).extend([i] * it.repeats)
        batches: List[Batch] = []
        for b in sorted(per_bucket):
            idx = per_bucket[b]
            rng.shuffle(idx)
            batches += [Batch(idx[s: s + self.batch_size], b) for s in range(0, len(idx), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def batch_latents(self, batch: Batch, encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.latents is not None:
            return torch.stack([self.latents[i] for i in batch.indices])
        imgs = torch.stack([load_resized(self.items[i].path, batch.bucket) for i in batch.indices])
        return encode(imgs)

    def batch_size_conditioning(self, batch: Batch) -> torch.Tensor:
        """(B, 6) SDXL size conditioning: original h, w, crop top, left, target h, w."""
        return torch.tensor([size_conditioning(self.items[i].size, batch.bucket) for i in batch.indices],
                            dtype=torch.float32)

    def batch_captions(self, batch: Batch, rng: random.Random) -> List[str]:
        return [self.caption_rules.apply(self.items[i].caption, rng) for i in batch.indices]

    def bucket_info(self) -> dict:
        counts: Dict[Tuple[int, int], int] = {}
        for b in self.item_bucket:
            counts[b] = counts.get(b, 0) + 1
        return {"buckets": {i: {"resolution": list(b), "count": n} for i, (b, n) in enumerate(sorted(counts.items()))},
                "mean_img_ar_error": 0.0}
