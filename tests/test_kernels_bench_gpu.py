"""bench/gpu.py's CPU smoke run, so the GPU check cannot rot between the rare runs on a GPU.

One run of every section, with both test hooks on: --test-fail-case fails one case
of the correctness table (it must be one row, with the error's first line, and the
section must go on), and --test-hang adds a section that prints a row and then
blocks forever (the runner must kill it at its 3 s limit, keep its row, and go on
with the next section). The test waits for the bench process to end; no sleeps.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

from bench import gpu_profile
from kernels import tiles

REPO_ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLES = ["Device", "Test hook: a section that hangs", "Correctness on the device",
                  "Every tile the Hopper autotuner can pick", "Attention speed",
                  "RMSNorm speed", "RoPE + QK-norm speed", "Launch overhead", "Training throughput", "A short real run", "Chat and serving decode",
                  "The pipeline on local data"]
FAIL_CASE = "rms_norm_op 7x64 eager"
# bench/gpu_serving.py's rows, through bench/gpu.py's decode and pipeline sections
DECODE_CASES = ["load_session", "first token after load", "batch 1, greedy (second answer)",
                "batch 1, greedy, eager step", "greedy tokens: compiled = eager", "engine, 4 streams at once",
                "engine, one at a time", "engine: batched answers = one at a time"]
PIPELINE_STAGES = ["tokenizer", "pretraining", "SFT", "evaluation (bits per byte)", "chat (one answer)",
                   "serve (4 concurrent streams)"]


def test_gpu_bench_smoke_run_reports_every_section_through_a_failure_and_a_hang(tmp_path):
    results = REPO_ROOT / "bench" / "RESULTS.md"
    before = results.read_text()
    report = tmp_path / "report.md"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="1")  # Triton's interpreter for the kernels
    run = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(report),
                          "--test-hang", "--test-fail-case", FAIL_CASE],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = run.stdout
    assert run.returncode == 1, out + run.stderr  # 1: the deliberate failure and the hang are reported as such

    titles = re.findall(r"^### (.*)$", out, re.M)
    assert [t for t in SECTION_TITLES if any(x.startswith(t) for x in titles)] == SECTION_TITLES, titles
    assert len(titles) == len(SECTION_TITLES)

    # the failing case: one row, its error's first line only; the section went on past it
    failed = [line for line in out.splitlines() if "**FAILED**" in line]
    assert failed == ["| rms_norm_op | 7x64 | eager | **FAILED**: `RuntimeError: deliberate failure (--test-fail-case)` |"], failed
    assert "| rms_norm_op | 3x5x100 | eager |" in out.split(failed[0])[1]
    assert "this second line" not in out and "this second line" in run.stderr  # the traceback: on stderr

    # the hung section: its row survived, a timeout row says why it ended, and the next section ran
    hang = out.split("### Test hook: a section that hangs")[1].split("### ")[0]
    assert "| this row was printed before the section hung |" in hang
    assert "**TIMED OUT**: killed at its time limit, 3 s after its first line" in hang
    assert out.count("**TIMED OUT**") == 1

    # chat and serving, and the pipeline: every row came out (nothing is measured on the CPU)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    decode = {r[1]: r for r in rows if r[0] == "nano" and len(r) == 5}
    assert list(decode) == DECODE_CASES, out
    assert decode["greedy tokens: compiled = eager"][2] == "equal (24 tokens)"  # both eager on the CPU: the check runs
    assert decode["engine: batched answers = one at a time"][2] == "4 of 4 equal"
    pipeline = {r[0]: r for r in rows if r[0] in PIPELINE_STAGES}
    assert list(pipeline) == PIPELINE_STAGES, out
    assert "validation bits per byte" in pipeline["pretraining"][2]
    assert re.search(r"^bpb  \d+\.\d{4} bits per byte", pipeline["evaluation (bits per byte)"][2])  # not the header
    assert "answer: '" in pipeline["chat (one answer)"][2]
    assert "4 streams" in pipeline["serve (4 concurrent streams)"][2]

    assert "**NO**" not in out  # a wrong kernel or a loss that did not fall
    assert "Our ops run: Triton in the correctness section" in out  # the interpreter really ran our kernels
    assert re.search(r"\| rms_norm_op \| 3x5x100 \| eager \| [\d.e/ +-]+ \| yes \|", out)
    assert len(re.findall(r"^\| rope_norm_op \| B\d T\d+ H2 D64 \| eager \| [\d.e/ +-]+ \| yes \|$", out, re.M)) == 3, out
    candidates = out.split("### Every tile the Hopper autotuner can pick")[1].split("### ")[0]
    assert len(re.findall(r"^\| B1 H4 Hkv2 T100 D64 W30 \| \d+ \| .* \| yes \|$", candidates, re.M)) == max(
        len(tiles.hopper_space(w, 64, True, tma=True)) for w in ("fwd", "dkdv", "dq")), candidates
    # the train section's profile: a row of kernel groups for each variant, matmuls among them, then the top kernels
    profile = out.split("Where a step's GPU time goes, nano")[1].split("Top kernels, nano, ours:")
    header = next(line for line in profile[0].splitlines() if line.startswith("| kernels |"))
    assert header.startswith("| kernels | matmul |") and "| AdamW step | NorMuon step |" in header, header
    shares = {r[0]: r for r in rows if len(r) > 4 and r[0] in ("pytorch", "ours") and "(" in r[1]}
    assert set(shares) == {"pytorch", "ours"} and all(float(r[1].split()[0]) > 0 for r in shares.values()), profile[0]
    assert "| `aten::mm` | matmul |" in profile[1] or "| `aten::bmm` | matmul |" in profile[1], profile[1]
    assert out.rstrip().endswith(f"(appended to {report})")
    assert report.read_text().strip() == out.split("\n(appended")[0].strip()  # the file got every line
    assert results.read_text() == before, "the smoke run must not touch bench/RESULTS.md"


# Kernel names as a GPU profile shows them (cuBLAS, cuDNN, Inductor, ours, eager ATen), and their groups.
KERNEL_GROUPS = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel": "matmul",
    "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTT": "matmul",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "attention",
    "_attn_fwd_kernel": "attention",
    "triton_red_fused__log_softmax_div_tanh_2": "loss (softcap, cross-entropy)",
    "_rms_norm_bwd_kernel": "RMSNorm, ours",
    "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_1": "Inductor reductions (norms, ...)",
    "triton_poi_fused__foreach_copy_1": "optimizer (foreach)",
    "triton_poi_fused_add_mul_slice_sub_0": "Inductor pointwise",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "eager elementwise, copies",
    "ncclDevKernel_AllReduce_Sum_bf16_RING_LL": "other",
}


def test_smoke_run_writes_no_report_unless_asked(monkeypatch, tmp_path):
    """Not into bench/RESULTS.md, and not into $OUT either, which the GPU machine always sets: a CPU check must
    not append to the real report."""
    from bench import gpu
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu.default_out(smoke=True) is None and gpu.default_out(smoke=False) == str(tmp_path / "gpu_report.md")


def test_bench_chat_times_the_models_own_forward():
    """bench/chat.py's 'lm_head on the last position only' is GPT.forward's last position, recipe and all."""
    import torch
    from bench.chat import last_logits_lm_head_once, make_model
    model = make_model("nano", 256, 64, torch.device("cpu"))
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(last_logits_lm_head_once(model, idx), model(idx)[:, -1:])


def test_profile_groups_kernels_by_what_they_do():
    assert {name: gpu_profile.group_of(name) for name in KERNEL_GROUPS} == KERNEL_GROUPS


def test_profile_report_says_when_the_profiler_saw_no_kernel():
    """A profile with no kernel in it (no CUPTI, say) is a line saying so, not a table of zeros or nothing."""
    kernels = {"nvjet_hsh_256x128": (0.006, 4), "triton_poi_fused_add_0": (0.002, 2)}
    ours = {"profile": dict(kernels=kernels, optimizers={"NorMuon": 0.004}), "profile_steps": 2, "step_seconds": 0.005}
    nothing = {"profile": dict(kernels={}, optimizers={}), "profile_steps": 2}
    lines = gpu_profile.report_lines("d12", {"pytorch": nothing, "ours": ours})
    assert "The profiler recorded no kernels for d12 (pytorch): is CUPTI available?" in lines
    assert "| ours | 3.0 (75%) | 1.0 (25%) | 2.0 (50%) | 4.0 | 5.0 |" in lines, lines
