import pytest

from lora_trainer.errors import UserError
from lora_trainer.xyz import build_preset, epoch_stems, grid_cells, parse_weights


def test_parse_weights_like_the_xyz_script():
    assert parse_weights("0.7-1.5 [5]") == [0.7, 0.9, 1.1, 1.3, 1.5]
    assert parse_weights("0-1 (+0.25)") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_weights("0.5, 0.8,1") == [0.5, 0.8, 1.0]
    with pytest.raises(UserError):
        parse_weights("lots")


def test_epoch_stems_in_training_order(tmp_path):
    for n in ("r-000010", "r-000002", "r", "other-000001", "notes"):
        (tmp_path / f"{n}.safetensors").write_bytes(b"x")
    assert epoch_stems(tmp_path, "r") == ["r-000002", "r-000010", "r"]
    assert epoch_stems(tmp_path) == ["other-000001", "r-000002", "r-000010", "r"]


def test_preset_infotext_and_script_args():
    p = build_preset(["r-000001", "r-000002", "r"], trigger_words="mychar", prompt="1girl, smile", clip_skip=2)
    assert p.prompt == "mychar, 1girl, smile, <lora:r-000001:0.7>"
    assert p.x_values == "r-000001, r-000002, r"
    assert p.y_values == ":0.7>, :0.9>, :1.1>, :1.3>, :1.5>"
    lines = p.infotext.split("\n")
    assert lines[0] == p.prompt and lines[1] == "Negative prompt: "
    assert "Script: X/Y/Z plot" in lines[2] and 'X Values: "r-000001, r-000002, r"' in lines[2]
    assert "X Type: Prompt S/R" in lines[2] and "Clip skip: 2" in lines[2]
    args = p.script_args()
    assert len(args) == 18 and args[0] == 7 and args[3] == 7 and args[1] == p.x_values
    # every cell's prompt: the first S/R value is in the prompt, so the script never aborts
    cells = grid_cells(p)
    assert cells[0][0] == p.prompt and cells[4][2] == "mychar, 1girl, smile, <lora:r:1.5>"
    assert len(cells) == 5 and all(len(r) == 3 for r in cells)


def test_seeds_variant():
    p = build_preset(["r-000001", "r"], seeds_variant=True)
    assert p.y_type == "Seed" and p.y_values == "-1--1 [8]" and p.prompt == "<lora:r-000001:1>"
    assert p.script_args()[3] == 1


def test_no_epochs_is_a_message():
    with pytest.raises(UserError, match="no epoch files"):
        build_preset([])
