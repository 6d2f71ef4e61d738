"""Captions to CLIP token ids the way the WebUI feeds its text encoders: 75-token chunks, each wrapped
in BOS/EOS and padded to 77; ``max_token_length`` (75/150/225) gives the number of chunks, longer
captions are cut. Shared by the LDM (SD1/SD2) and SDXL hosts."""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch


def hf_clip_tokenizer_ids(tokenizer) -> Callable[[str], List[int]]:
    return lambda text: tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]


def openclip_ids(text: str) -> List[int]:
    from open_clip.tokenizer import _tokenizer
    return _tokenizer.encode(text)


def openclip_special():
    """(bos, eos, pad) of OpenCLIP's tokenizer: pad is 0, as the WebUI pads OpenCLIP prompts."""
    from open_clip.tokenizer import _tokenizer
    return _tokenizer.encoder["<start_of_text>"], _tokenizer.encoder["<end_of_text>"], 0


def chunked_ids(captions: Sequence[str], encode: Callable[[str], List[int]], bos: int, eos: int, pad: int,
                max_token_length: int = 75) -> torch.Tensor:
    """(B, chunks, 77) token ids, chunks = max_token_length / 75."""
    n = max(1, max_token_length // 75)
    out = torch.full((len(captions), n, 77), pad, dtype=torch.long)
    for i, c in enumerate(captions):
        ids = encode(c)[: 75 * n]
        for j in range(n):
            row = [bos] + ids[75 * j: 75 * (j + 1)] + [eos]
            out[i, j, : len(row)] = torch.tensor(row)
    return out
