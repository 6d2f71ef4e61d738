"""House rule 1: the core never imports the WebUI (``modules``, ``launch``) or gradio; only
``lora_trainer/webui/`` and ``scripts/`` may, and then inside functions."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"modules", "launch", "gradio", "webui"}


def _imports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name.split(".")[0], node
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node


def test_core_never_imports_the_webui():
    bad = []
    for path in (ROOT / "lora_trainer").rglob("*.py"):
        if "webui" in path.relative_to(ROOT / "lora_trainer").parts:
            continue
        for mod, node in _imports(path):
            if mod in FORBIDDEN:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {mod}")
    assert not bad, bad


def test_webui_glue_imports_webui_only_inside_functions():
    """scripts/ is loaded by the WebUI alone and may import it at the top; lora_trainer/webui/ may not."""
    bad = []
    files = list((ROOT / "lora_trainer" / "webui").rglob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            if set(names) & {"modules", "launch", "gradio"}:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad
