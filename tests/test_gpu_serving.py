"""bench/gpu_serving.py's CPU smoke run: every row of the two GPU sections comes out (nothing is measured here),
so the sections cannot rot between the rare runs on a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DECODE_CASES = ["load_session", "first token after load", "batch 1, greedy (second answer)",
                "batch 1, greedy, eager step", "greedy tokens: compiled = eager", "engine, 4 streams at once",
                "engine, one at a time", "engine: batched answers = one at a time"]
PIPELINE_STAGES = ["tokenizer", "pretraining", "SFT", "evaluation (bits per byte)", "chat (one answer)",
                   "serve (4 concurrent streams)"]


def smoke_rows(section: str, tmp_path) -> tuple[str, list[list[str]]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu_serving.py"), "--smoke", "--sections", section],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FAILED" not in run.stdout, run.stdout + run.stderr[-3000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in run.stdout.splitlines() if line.startswith("| ")]
    return run.stdout, rows


def test_decode_section_smoke_run(tmp_path):
    out, rows = smoke_rows("decode", tmp_path)
    assert [r[1] for r in rows if r[0] == "nano"] == DECODE_CASES, out
    decode = {r[1]: r for r in rows if r[0] == "nano"}
    assert decode["greedy tokens: compiled = eager"][2] == "equal (24 tokens)"  # both eager on the CPU: the check runs
    assert decode["engine: batched answers = one at a time"][2] == "4 of 4 equal"


@pytest.mark.slow  # seven processes, each importing torch: about a minute of CPU
def test_pipeline_section_smoke_run(tmp_path):
    out, rows = smoke_rows("pipeline", tmp_path)
    assert [r[0] for r in rows if r[0] in PIPELINE_STAGES] == PIPELINE_STAGES, out
    pipeline = {r[0]: r for r in rows}
    assert "validation bits per byte" in pipeline["pretraining"][2]
    assert "bits per byte on" in pipeline["evaluation (bits per byte)"][2]
    assert "answer: '" in pipeline["chat (one answer)"][2]
    assert "4 streams" in pipeline["serve (4 concurrent streams)"][2]
