"""The speed benchmark runs end to end (the GPU script with CPU arguments) and prints its JSON lines.
Timings are reported, never asserted."""
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_gpu_script_runs_with_cpu_arguments(model):
    if model == "tiny-sdxl":
        pytest.importorskip("diffusers")
    import sys
    r = subprocess.run(["bash", str(ROOT / "tests" / "bench" / "gpu.sh"), "--model", model, "--device", "cpu",
                        "--steps", "2", "--warmup", "1", "--batch", "1", "--batch", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                            "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(l["impl"], l["batch"]) for l in lines] == [("ours", 1), ("reference", 1), ("ours", 2), ("reference", 2)]
    for l in lines:
        assert l["model"] == model and l["resolution"] == 64 and l["it_per_s"] > 0 and l["peak_mem_mb"] > 0
        assert l["images_per_s"] == pytest.approx(l["it_per_s"] * l["batch"], rel=1e-2)
    assert lines[0]["ratio"] > 0 and lines[1]["ratio"] == 1.0
