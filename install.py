"""Run by the WebUI at start (and after "Install from URL"): installs only the packages this extension
needs that are missing, with every package the WebUI pins (torch, numpy, protobuf, transformers,
gradio, ...) held at its installed version, so nothing the WebUI relies on ever moves. When nothing is
missing it does nothing, and touches no network."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lora_trainer.install_plan import constraints_text, installed_version, missing  # noqa: E402


def main() -> None:
    try:
        import launch
    except ImportError:  # not run by the WebUI
        launch = None
    if launch is not None and getattr(getattr(launch, "args", None), "skip_install", False):
        return
    todo = missing()
    if not todo:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="lora-trainer-constraints-", delete=False) as f:
        f.write(constraints_text())
        constraints = f.name
    try:
        for req in todo:
            spec = req.spec(installed_version)
            print(f"[sd-webui-lora-trainer] installing {spec} ({req.why})", flush=True)
            args = f'install -c "{constraints}" "{spec}"'
            try:
                if launch is not None:
                    launch.run_pip(args, f"sd-webui-lora-trainer requirement: {spec}")
                else:
                    import subprocess
                    subprocess.run([sys.executable, "-m", "pip", *args.replace('"', "").split()], check=True)
            except Exception as e:  # one optional package must not stop the WebUI
                print(f"[sd-webui-lora-trainer] could not install {spec}: {e}", flush=True)
    finally:
        os.unlink(constraints)


main()
