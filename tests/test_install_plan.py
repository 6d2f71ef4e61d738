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
    assert all(not r.spec.startswith(("torch", "numpy", "protobuf")) for r in REQUIREMENTS)
