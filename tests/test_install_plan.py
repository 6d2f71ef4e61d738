from lora_trainer.install_plan import REQUIREMENTS, constraints_text, missing


def test_nothing_missing_means_nothing_to_do():
    assert missing(lambda d: True) == []


def test_missing_lists_only_absent_and_needed():
    todo = missing(lambda d: d != "tensorboard")
    assert [r.dist for r in todo] == ["tensorboard"]


def test_constraints_pin_every_installed_host_package():
    versions = {"torch": "2.1.2+cu121", "numpy": "1.26.2", "protobuf": "3.20.0", "gradio": "3.41.2"}
    text = constraints_text(versions.get)
    assert set(text.split()) == {"torch==2.1.2+cu121", "numpy==1.26.2", "protobuf==3.20.0", "gradio==3.41.2"}
    assert all(not r.spec(versions.get).startswith(("torch", "numpy", "protobuf")) for r in REQUIREMENTS)


def test_version_bounds_follow_the_host():
    old = {"torch": "2.1.2+cu121", "protobuf": "3.20.0"}.get
    new = {"torch": "2.14.1", "protobuf": "5.29.0"}.get
    spec = {r.dist: r for r in REQUIREMENTS}
    assert spec["lycoris-lora"].spec(old) == "lycoris-lora==4.0.0"
    assert spec["lycoris-lora"].spec(new) == "lycoris-lora>=4.1,<5"
    assert spec["bitsandbytes"].spec(old) == "bitsandbytes<=0.45.5"
    assert spec["tensorboard"].spec(old) == "tensorboard<2.21" and spec["tensorboard"].spec(new) == "tensorboard"
