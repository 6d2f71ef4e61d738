"""The tab's Tools section (issue 4) as plain handlers on real files made with the tiny SD1 model, and
the optimizer-args defaults of issue 5 (no gradio, no WebUI)."""
import pytest
import torch

from lora_trainer import tiny
from lora_trainer.webui import tab_actions as act
from lora_trainer.webui import tab_tools as tt
from test_post_support import load, meta, random_lora, save_net


class Calls:
    def __init__(self):
        self.loras = self.checkpoints = 0

    def lora(self):
        self.loras += 1

    def ckpt(self):
        self.checkpoints += 1


@pytest.fixture(scope="module")
def world(sd1_host, tmp_path_factory):
    """A Lora folder with two LoRAs (one in a run subfolder) and a checkpoint folder with tiny-sd1."""
    root = tmp_path_factory.mktemp("tools")
    lora_root, ckpt_dir = root / "Lora", root / "Stable-diffusion"
    ckpt = tiny.save_checkpoint(sd1_host.model, ckpt_dir, "sd1")
    save_net(random_lora(sd1_host, seed=1), lora_root / "run" / "a.safetensors")
    save_net(random_lora(sd1_host, seed=2, dim=4, alpha=4, conv_dim=None), lora_root / "b.safetensors")
    return lora_root, ckpt_dir, ckpt


def places(world, calls=None):
    lora_root, ckpt_dir, ckpt = world
    calls = calls or Calls()
    # the WebUI's checkpoint titles carry a short hash
    cks = {f"{p.name} [0123456789]": p for p in sorted(ckpt_dir.glob("*.safetensors"))}
    return tt.Places(lora_root, ckpt_dir, cks, calls.lora, calls.ckpt)


def one_line_error(msg):
    assert msg.startswith("❌") and "\n" not in msg and "Traceback" not in msg, msg


# ------------------------------------------------------------------ pickers and names
def test_lora_choices_are_relative_paths_under_the_lora_folder(world, tmp_path):
    lora_root = world[0]
    (lora_root / ".hidden").mkdir(exist_ok=True)
    (lora_root / ".hidden" / "x.safetensors").write_bytes(b"")
    (lora_root / "notes.txt").write_text("x")
    choices = tt.lora_choices(lora_root)
    assert "b.safetensors" in choices and "run/a.safetensors" in choices
    assert not any(c.startswith(".hidden") or c.endswith(".txt") for c in choices)
    assert tt.lora_choices(tmp_path / "missing") == []


def test_output_names_stay_inside_the_folder(tmp_path):
    default = tmp_path / "d.safetensors"
    assert tt.output_target("", tmp_path, default) == default
    assert tt.output_target("  new ", tmp_path, default) == tmp_path / "new.safetensors"
    assert tt.output_target("sub/my.v2", tmp_path, default) == tmp_path / "sub" / "my.v2.safetensors"
    assert tt.output_target("x.SAFETENSORS", tmp_path, default) == tmp_path / "x.SAFETENSORS"
    for bad in ("../up", "/abs/path", "a/../../b", ".hidden", "what?", "x.ckpt", "a\\..\\b"):
        with pytest.raises(tt.UserError):
            tt.output_target(bad, tmp_path, default)
    (tmp_path / "n.safetensors").write_bytes(b"")
    assert tt.free_name(tmp_path, "n") == tmp_path / "n-1.safetensors"


def test_ratios():
    assert tt.parse_ratios("", 2) == [1.0, 1.0]
    assert tt.parse_ratios("0.8, -0.5", 2) == [0.8, -0.5]
    assert tt.parse_ratios("0.8 0.5", 2) == [0.8, 0.5]
    with pytest.raises(tt.UserError, match="2 LoRAs chosen but 1 ratios"):
        tt.parse_ratios("1", 2)
    with pytest.raises(tt.UserError):
        tt.parse_ratios("a, b", 2)


# ------------------------------------------------------------------ check
def test_check_ok_damaged_and_not_a_lora(world, sd1_host):
    p = places(world)
    msg, report = tt.run_check("run/a.safetensors", p)
    assert msg.startswith("✅ **OK**") and "verdict: OK" in report
    assert "lora_unet_" in report  # the per-module lines

    net = random_lora(sd1_host, seed=3, dim=4, alpha=4, conv_dim=None)
    sd = net.kohya_state_dict()
    dead = [k for k in sd if k.startswith("lora_unet_") and k.endswith("lora_up.weight")][:3]
    for k in dead:
        sd[k] = torch.zeros_like(sd[k])
    save_net(sd, p.lora_root / "dead.safetensors", kind="sd1")
    msg, report = tt.run_check("dead.safetensors", p)
    assert msg.startswith("❌ **DAMAGED**") and "3 zero" in msg and "zero-expected" in msg  # the legend
    assert "verdict: DAMAGED" in report

    msg, report = tt.run_check(str(world[2]), p)   # a checkpoint, by full path
    one_line_error(msg)
    assert "checkpoint" in msg and report == ""
    one_line_error(tt.run_check("", p)[0])
    one_line_error(tt.run_check("gone.safetensors", p)[0])


# ------------------------------------------------------------------ resize
def test_resize_defaults_next_to_the_input_and_never_overwrites(world):
    calls = Calls()
    p = places(world, calls)
    d = tt.RESIZE_DEFAULTS
    args = ("run/a.safetensors", d["new_rank"], d["new_conv_rank"], d["dynamic_method"], d["dynamic_param"],
            d["save_precision"])
    msg, report = tt.run_resize(*args, "", False, places=p)
    out = p.lora_root / "run" / "a-sv_fro0.9-max32.safetensors"
    assert msg.startswith(f"✅ Wrote `{out}`"), msg
    assert out.is_file() and calls.loras == 1
    assert report.startswith("resize a.safetensors") and "summary:" in report
    assert all(v.dtype == torch.bfloat16 for k, v in load(out).items() if not k.endswith("alpha"))
    # an empty name again: a new free name, the first file stays
    before = out.read_bytes()
    msg, _ = tt.run_resize(*args, "", False, places=p)
    assert "a-sv_fro0.9-max32-1.safetensors" in msg and out.read_bytes() == before

    # a fixed rank, a name of the user's in a subfolder; then the same name without / with overwrite
    fixed = ("run/a.safetensors", 2, 0, tt.NO_DYNAMIC, 0.9, tt.AS_INPUT)
    msg, _ = tt.run_resize(*fixed, "small/a_r2", False, places=p)
    small = p.lora_root / "small" / "a_r2.safetensors"
    assert msg.startswith("✅") and meta(small)["ss_network_dim"] == "2"
    assert all(v.dtype == torch.float32 for v in load(small).values())
    msg, _ = tt.run_resize(*fixed, "small/a_r2", False, places=p)
    one_line_error(msg)
    assert "already exists" in msg
    msg, _ = tt.run_resize(*fixed, "small/a_r2", True, places=p)
    assert msg.startswith("✅")

    for bad in (("run/a.safetensors", 0, 0, tt.NO_DYNAMIC, 0.9, "bf16", "", False),   # no rank, no method
                ("run/a.safetensors", 4, 0, "sv_fro", 1.5, "bf16", "", False),        # sv_fro above 1
                ("run/a.safetensors", 4, 0, tt.NO_DYNAMIC, 0.9, "bf16", "../x", False),
                ("run/a.safetensors", 4, 0, tt.NO_DYNAMIC, 0.9, "bf16", "run/a", True),  # the input itself
                ("run/a.safetensors", 2.5, 0, tt.NO_DYNAMIC, 0.9, "bf16", "", False)):
        one_line_error(tt.run_resize(*bad, places=p)[0])
    assert (p.lora_root / "run" / "a.safetensors").is_file()


def test_resize_warns_about_a_second_file_of_the_same_name(world):
    p = places(world)
    msg, _ = tt.run_resize("b.safetensors", 2, 0, tt.NO_DYNAMIC, 0.9, "bf16", "run/b", False, places=p)
    assert msg.startswith("✅") and "b.safetensors has the same file name" in msg


# ------------------------------------------------------------------ merge, extract
def test_merge_writes_a_new_checkpoint_and_refreshes_the_list(world, sd1_host):
    calls = Calls()
    p = places(world, calls)
    title = next(iter(p.checkpoints))
    msg, report = tt.run_merge(title, ["run/a.safetensors", "b.safetensors"], "0.8, 0.5", "", tt.AS_CHECKPOINT,
                               places=p)
    out = p.checkpoint_dir / "tiny-sd1_a_b.safetensors"
    assert msg.startswith(f"✅ Wrote `{out}`"), msg
    assert "checkpoint list" in msg and calls.checkpoints == 1 and calls.loras == 0
    assert report.startswith("merge into tiny-sd1.safetensors") and "a.safetensors x 0.8" in report
    assert out.with_suffix(".yaml").is_file()
    base, merged = load(world[2]), load(out)
    assert base.keys() == merged.keys() and any(not torch.equal(base[k], merged[k]) for k in base)

    # never replaces a file, whatever the name; a free default name the second time
    msg, _ = tt.run_merge(title, ["b.safetensors"], "", "tiny-sd1_a_b", tt.AS_CHECKPOINT, places=p)
    one_line_error(msg)
    assert "already exists" in msg
    msg, _ = tt.run_merge(title, ["run/a.safetensors", "b.safetensors"], "", "", "fp16", places=p)
    assert "tiny-sd1_a_b-1.safetensors" in msg
    assert {v.dtype for v in load(p.checkpoint_dir / "tiny-sd1_a_b-1.safetensors").values()
            if v.is_floating_point()} == {torch.float16}
    one_line_error(tt.run_merge(title, ["b.safetensors"], "1, 2", "", tt.AS_CHECKPOINT, places=p)[0])
    one_line_error(tt.run_merge(title, [], "", "", tt.AS_CHECKPOINT, places=p)[0])
    one_line_error(tt.run_merge("", ["b.safetensors"], "", "", tt.AS_CHECKPOINT, places=p)[0])
    one_line_error(tt.run_merge("nothing.safetensors [abc]", ["b.safetensors"], "", "", tt.AS_CHECKPOINT,
                                places=p)[0])


def test_extract_from_the_merged_checkpoint(world):
    lora_root, ckpt_dir, ckpt = world
    p = places(world)
    tuned = ckpt_dir / "tuned.safetensors"
    if not tuned.exists():
        tt.run_merge(str(ckpt), ["b.safetensors"], "", "tuned", tt.AS_CHECKPOINT, places=p)
    calls = Calls()
    p = places(world, calls)
    titles = {v.name: k for k, v in p.checkpoints.items()}
    msg, report = tt.run_extract(titles["tiny-sd1.safetensors"], titles["tuned.safetensors"], 4, 0, 1.0, 0.01,
                                 "float", "", False, places=p)
    out = lora_root / "tuned-extracted-d4.safetensors"
    assert msg.startswith(f"✅ Wrote `{out}`"), msg
    assert calls.loras == 1 and report.startswith("extract tuned.safetensors - tiny-sd1.safetensors")
    assert meta(out)["ss_network_dim"] == "4"
    msg, report = tt.run_check(out.name, p)
    assert msg.startswith("✅")
    one_line_error(tt.run_extract(titles["tiny-sd1.safetensors"], titles["tiny-sd1.safetensors"], 4, 0, 1.0, 0.01,
                                  "float", "same", False, places=p)[0])
    one_line_error(tt.run_extract(titles["tiny-sd1.safetensors"], titles["tuned.safetensors"], 0, 0, 1.0, 0.01,
                                  "float", "", False, places=p)[0])


# ------------------------------------------------------------------ combine
def test_combine(world):
    calls = Calls()
    p = places(world, calls)
    msg, report = tt.run_combine(["run/a.safetensors", "b.safetensors"], "1, 0.5", 0, 0, tt.AS_INPUT, "", False,
                                 places=p)
    out = p.lora_root / "a_b-combined.safetensors"
    assert msg.startswith(f"✅ Wrote `{out}`"), msg
    assert calls.loras == 1 and "ranks concatenated" in report
    msg, report = tt.run_combine(["run/a.safetensors", "b.safetensors"], "", 4, 0, "bf16", "ab4", False, places=p)
    assert msg.startswith("✅") and "re-factored to rank 4" in report
    assert meta(p.lora_root / "ab4.safetensors")["ss_network_dim"] == "4"
    one_line_error(tt.run_combine(["b.safetensors"], "", 0, 0, tt.AS_INPUT, "", False, places=p)[0])
    one_line_error(tt.run_combine(["b.safetensors", "b.safetensors"], "", 0, 0, tt.AS_INPUT, "b", True,
                                  places=p)[0])  # writing over an input


def test_handlers_never_raise_outside_the_webui():
    """Without a Places and without the WebUI the handlers still answer with one line."""
    for msg, _ in (tt.run_check("x"), tt.run_resize("x", 4, 0, tt.NO_DYNAMIC, 0.9, "bf16", "", False),
                   tt.run_merge("c", ["x"], "", "", tt.AS_CHECKPOINT),
                   tt.run_combine(["x", "y"], "", 0, 0, "bf16", "", False),
                   tt.run_extract("a", "b", 4, 0, 0.99, 0.01, "float", "", False)):
        one_line_error(msg)


# ------------------------------------------------------------------ issue 5: optimizer args
def test_optimizer_change_fills_the_guides_args_when_untouched():
    from lora_trainer.optim import recommended_args
    prodigy = " ".join(recommended_args("Prodigy"))
    new, hint = act.optimizer_change("Prodigy", "")
    assert new == prodigy and "decouple=True" in new and "adaptive" in hint and "1.0" in hint
    adamw = " ".join(recommended_args("AdamW"))
    new, hint = act.optimizer_change("AdamW", prodigy)   # the previous optimizer's args, untouched
    assert new == adamw and "adaptive" not in hint
    new, hint = act.optimizer_change("AdamW8bit", adamw)  # the same recommendation: nothing to change
    assert new is None and "adaptive" not in hint
    new, hint = act.optimizer_change("SGDNesterov", adamw)
    assert new == "" and "cleared" in hint


def test_optimizer_change_keeps_the_users_args_and_shows_the_recommendation():
    new, hint = act.optimizer_change("DAdaptAdam", "weight_decay=0.1")
    assert new is None
    assert "recommends" in hint and "decouple=True" in hint and "kept" in hint and "adaptive" in hint
    new, hint = act.optimizer_change("Lion", "weight_decay=0.1")
    assert new is None and "10-15x lower" in hint  # the optimizer's own note
    assert act.optimizer_change("NoSuchOptimizer", "") == (None, "")
    new, hint = act.optimizer_change("DAdaptSGD", "")  # adaptive, no recommended args
    assert new is None and "adaptive" in hint
