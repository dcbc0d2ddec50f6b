"""bench/gpu.py's CPU smoke run, so the GPU check cannot rot between the rare runs on a GPU."""
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLES = ["Correctness on the device", "Attention speed", "RMSNorm speed", "Training throughput",
                  "A short real run", "KV-cache decode"]


def test_gpu_bench_smoke_run(tmp_path):
    results = REPO_ROOT / "bench" / "RESULTS.md"
    before = results.read_text()
    report = tmp_path / "RESULTS.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}  # Triton's interpreter for the kernels
    run = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu.py"), "--smoke", "--append",
                          "--results", str(report)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for title in SECTION_TITLES:
        assert f"### {title}" in run.stdout, title
    assert "FAILED" not in run.stdout, run.stdout + run.stderr
    assert "**NO**" not in run.stdout, run.stdout  # a wrong kernel or a loss that did not fall
    assert "Our ops run: Triton in the correctness section" in run.stdout  # the interpreter really ran our kernels
    assert report.read_text().strip().endswith(run.stdout.split("\n(appended")[0].strip().splitlines()[-1])
    assert results.read_text() == before, "the smoke run must not touch bench/RESULTS.md"
