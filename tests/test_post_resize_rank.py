"""resize picks sd-scripts' ranks: the same flags give the same ranks, alphas and ΔW.

Facts from sd-scripts' ``networks/resize_lora.py`` (kohya-ss/sd-scripts at 48d368f, read, not copied):

- each module's ``lora_up @ lora_down`` (alpha not applied) is factored by a full SVD: ``S`` has
  ``min(out, in·kh·kw)`` values, largest first;
- ``index_sv_ratio``: the number of ``S > S[0] / param``;
  ``index_sv_cumulative``: ``searchsorted(cumsum(S) / sum(S), param) + 1``;
  ``index_sv_fro``: ``searchsorted(cumsum(S²) / sum(S²), param²) + 1``;
  each then held to ``max(1, min(index, len(S) - 1))``;
- ``rank_resize``: ``new_rank = index + 1`` for all three methods, ``new_rank = rank`` (the flag) without
  one; then ``S[0] <= 1e-6`` (MIN_SV) gives rank 1, else a rank above the flag's is cut to it;
  ``new_alpha = alpha / old_rank · new_rank`` (scale 1 without an alpha tensor);
- ``lora_down`` with 4 dimensions (every conv, 1x1 included) takes ``new_conv_rank``, which defaults to
  ``new_rank``; ``--new_rank`` defaults to 4.

The expected ranks below are worked out by hand from those rules.
"""
from __future__ import annotations

import pytest
import torch

from lora_trainer.post import resize_lora
from lora_trainer.post.resize_rank import full_rank, resize_rank
from test_post_support import load, save_net

S = torch.tensor([4.0, 2.0, 1.0, 0.5])  # cumsum / sum: .533 .8 .933 1; squares' cumsum / sum: .753 .941 .988 1


@pytest.mark.parametrize("method, param, cap, full, want", [
    ("sv_ratio", 2, 8, 320, (2, 2)),          # S > 2: one value -> 1 + 1
    ("sv_ratio", 5, 8, 320, (4, 4)),          # S > 0.8: three -> 3 + 1
    ("sv_ratio", 10, 8, 320, (5, 5)),         # S > 0.4: all four -> 4 + 1 (one zero component)
    ("sv_cumulative", 0.5, 8, 320, (2, 2)),   # .533 >= .5 at position 0 -> index 1 -> rank 2
    ("sv_cumulative", 0.7, 8, 320, (3, 3)),   # .8 >= .7 at position 1 -> index 2 -> rank 3
    ("sv_fro", 0.9, 8, 320, (3, 3)),          # .941 >= .81 at position 1 -> index 2 -> rank 3
    ("sv_fro", 0.99, 8, 320, (4, 4)),         # .988 >= .9801 at position 2 -> rank 4
    ("sv_fro", 0.999, 8, 320, (5, 5)),        # 1 >= .998 at position 3 -> rank 5
    ("sv_fro", 1.0, 8, 320, (5, 5)),
    ("sv_fro", 0.99, 3, 320, (3, 4)),         # new_rank caps: wanted 4, kept 3
    ("sv_fro", 0.999, 8, 4, (4, 4)),          # a 4-wide layer: index held at len(S) - 1 = 3 -> rank 4
    ("sv_ratio", 10, 8, 4, (4, 4)),
    (None, None, 8, 320, (8, 8)),             # no method: new_rank, even above the old rank
    (None, None, 2, 320, (2, 2)),
    (None, None, 500, 320, (320, 320)),       # above the layer's full rank (sd-scripts stops with an error)
])
def test_rank_rule_on_known_singular_values(method, param, cap, full, want):
    assert resize_rank(S, full=full, cap=cap, method=method, param=param) == want


def test_rank_rule_edges():
    ones = torch.ones(4)  # cumsum / sum: .25 .5 .75 1 -- reaching the target exactly counts
    assert resize_rank(ones, full=64, cap=8, method="sv_cumulative", param=0.5) == (3, 3)
    assert resize_rank(ones, full=64, cap=8, method="sv_ratio", param=1) == (2, 2)  # none above S[0]: index held at 1
    # all-zero (S[0] <= 1e-6 before alpha) keeps rank 1, with a method or without
    assert resize_rank(torch.zeros(4), full=64, cap=8, method="sv_fro", param=0.9) == (1, 1)
    assert resize_rank(torch.zeros(4), full=64, cap=8) == (1, 1)
    small = torch.tensor([4e-7, 1e-7])
    assert resize_rank(small, full=64, cap=8, method="sv_fro", param=0.9, scale=0.5) == (1, 1)   # 8e-7 raw
    assert resize_rank(small, full=64, cap=8, method="sv_fro", param=0.9, scale=0.25) == (2, 2)  # 1.6e-6 raw
    assert full_rank((16, 24)) == 16 and full_rank((8, 8, 3, 3)) == 8 and full_rank((320, 4, 1, 1)) == 4


# ------------------------------------------------------------------ a file through resize_lora
LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # 16 x 24, alpha 2 / rank 4
PROJ = "lora_unet_down_blocks_0_attentions_0_proj_in"                            # 1x1 conv 16 x 16, alpha 4
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"                                 # 3x3 conv 8 x 8, alpha 1
ZERO = "lora_te_text_model_encoder_layers_0_mlp_fc1"                             # untrained, alpha 4
SPECTRA = {LINEAR: [4.0, 2.0, 1.0, 0.5], PROJ: [3.0, 1.0, 0.2, 0.1], CONV: [1.0, 0.9, 0.8, 0.7], ZERO: [0, 0, 0, 0]}
SHAPES = {LINEAR: (16, 24), PROJ: (16, 16, 1, 1), CONV: (8, 8, 3, 3), ZERO: (24, 16)}
ALPHAS = {LINEAR: 2.0, PROJ: 4.0, CONV: 1.0, ZERO: 4.0}


@pytest.fixture(scope="module")
def spectra_file(tmp_path_factory):
    """Modules whose lora_up @ lora_down has exactly the singular values in SPECTRA (rank 4 each)."""
    g = torch.Generator().manual_seed(7)
    sd = {}
    for name, s in SPECTRA.items():
        shape = SHAPES[name]
        n_in = int(torch.tensor(shape[1:]).prod())
        u, _ = torch.linalg.qr(torch.randn(shape[0], 4, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n_in, 4, generator=g, dtype=torch.float64))
        up, down = (u * torch.tensor(s, dtype=torch.float64)).float(), v.T.float().contiguous()
        if len(shape) == 4:
            up, down = up.reshape(shape[0], 4, 1, 1), down.reshape(4, *shape[1:])
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up.contiguous(), down
        sd[f"{name}.alpha"] = torch.tensor(ALPHAS[name])
    return save_net(sd, tmp_path_factory.mktemp("spectra") / "in.safetensors")


def _delta(sd, name):
    up, down = sd[f"{name}.lora_up.weight"].double(), sd[f"{name}.lora_down.weight"].double()
    r = down.shape[0]
    return up.reshape(up.shape[0], -1) @ down.reshape(r, -1) * float(sd[f"{name}.alpha"]) / r


@pytest.mark.parametrize("flags, ranks", [
    # sd-scripts' ranks for these flags, by the rules above (LINEAR, PROJ, CONV, ZERO)
    (dict(new_rank=8, dynamic_method="sv_fro", dynamic_param=0.9), (3, 2, 4, 1)),
    # PROJ: squares' cumsum / sum .896 -> rank 2; CONV: .340 .616 .833 -> position 2 -> rank 4
    (dict(new_rank=8, new_conv_rank=1, dynamic_method="sv_ratio", dynamic_param=2), (2, 1, 1, 1)),
    # new_conv_rank caps the 1x1 conv as well as the 3x3 one
    (dict(new_rank=2), (2, 2, 2, 1)),
    (dict(new_rank=16, dynamic_method="sv_cumulative", dynamic_param=0.99), (5, 5, 5, 1)),
    # every module needs all 4 values for 99 % of the sum -> 4 + 1, the fifth a zero component
])
def test_resize_gives_sd_scripts_ranks_alphas_and_delta(spectra_file, tmp_path, flags, ranks):
    out = tmp_path / "out.safetensors"
    resize_lora(spectra_file, out, save_precision="float", **flags)
    before, after = load(spectra_file), load(out)
    for name, rank in zip(SPECTRA, ranks):
        assert after[f"{name}.lora_down.weight"].shape[0] == rank, name
        assert after[f"{name}.lora_up.weight"].shape[1] == rank, name
        assert after[f"{name}.lora_down.weight"].shape[1:] == before[f"{name}.lora_down.weight"].shape[1:]
        # sd-scripts: new alpha = alpha / old rank * new rank
        assert float(after[f"{name}.alpha"]) == pytest.approx(ALPHAS[name] / 4 * rank), name
        # ΔW: the best rank-`rank` approximation of the input's (all of it from rank 4 on)
        d = _delta(before, name)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        k = min(rank, 4)
        best = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        assert float((_delta(after, name) - best).abs().max()) <= 1e-3, name
