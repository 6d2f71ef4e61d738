import pytest

from .harness import WebUI, webui_dir


def pytest_collection_modifyitems(config, items):
    if webui_dir() is None:
        skip = pytest.mark.skip(reason="set LORA_TRAINER_WEBUI_DIR to a WebUI v1.10.1 checkout to run")
        for item in items:
            if "tests/webui" in str(item.fspath).replace("\\", "/"):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def webui(tmp_path_factory):
    w = WebUI(tmp_path_factory.mktemp("webui-home"))
    w.prepare()
    w.start()
    try:
        yield w
    finally:
        w.stop()
