"""
Every Triton launch the kernels make on CUDA, compiled for real GPUs on the CPU.

kernels/aot.py runs the real launchers on fake CUDA tensors, records each launch
(kernel, grid, arguments, constexprs, num_warps, num_stages) and compiles it
through the whole Triton pipeline to a cubin for sm_90 (H100/H200) and sm_80
(A100), with the ptxas bundled in the triton wheel. Float scalars are compiled
typed fp32 (an eager launch) and fp64 (torch.compile's Inductor). It runs once,
in a subprocess without TRITON_INTERPRET (conftest.py switches the interpreter
on for this whole session, and interpreted @jit functions cannot be compiled),
on the cores the other xdist workers leave (in CI one, beside the other worker).

Checked per compiled kernel:
  * it compiles (the fp64 typing used to break the attention forward);
  * its shared memory fits the target's opt-in limit per block;
  * no fp64 arithmetic in the PTX (only reading an fp64 scalar argument and
    narrowing it to fp32 once is allowed);
  * on sm_90, 16-bit dots run as wgmma (Hopper's tensor-core instruction): in the PTX, and as HGMMA
    in the machine code ptxas made (cuobjdump -sass, read once per kernel, tile and head dim:
    kernels/aot.py, READ_SASS_BY);
  * every candidate of the Hopper autotuner was compiled (test_every_hopper_candidate_is_compiled);
  * the candidates that load through TMA tensor descriptors (TMA=True) copy their tiles with the bulk
    tensor copies of the Hopper's tensor memory accelerator (cp.async.bulk.tensor in the PTX, UTMALDG
    in the machine code) and ask for the global scratch their descriptors are written to; no other
    launch does any of it;
  * register spills, as ptxas -v reports them (bytes of spill stores + loads
    per thread), stay under SPILL_BOUND.

SPILL_BOUND. 16-bit (what every preset trains in on a GPU): 0 bytes. Spills go
to local memory (L1/L2-cached DRAM) inside the tile loops; the configurations in
kernels/attention.py were picked to have none on either target, and the ptxas
is pinned with the triton wheel, so counts are deterministic: any spill is a
regression of a kernel or config change, worth a look before it ships. fp32 is
the exact-math path (tests, debugging), never a training path; it gets a small
documented allowance, FP32_SPILL_BOUND: a few backward launches spill 4 to 16
bytes of stores and as many loads (dK/dV at D = 64 with GQA on sm_90, the most),
ieee fp32 dots running on the FMA units with whole fp32 tiles in registers.

Every launch is compiled with and without a sliding window (the WINDOWED
kernels), and for sm_90 with every tile the Hopper autotuner can pick
(kernels/tiles.py, HOPPER_SPACES and HOPPER_TMA_SPACES) on four of the eight attention shapes, as
fp32 is (kernels/aot.py, HALF_FRACTION, says which and why), so all of the above holds for each of them.
Time: 359 compiles (56 of them TMA candidates, 48 the fused RoPE + QK-norm's), 80 machine-code reads; this file
took 252 s alone on the 2-core development box (idle, both cores, 2026-12-07; 476 s of CPU; with the machine
code read in all 191 16-bit sm_90 compiles 343 s and 601 s, with all eight shapes' 510 compiles 841 s of CPU);
fp16 is not compiled (kernels/aot.py, DTYPES, says why).
"""
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SPILL_BOUND = 0  # bytes per thread, stores + loads, 16-bit kernels
FP32_SPILL_BOUND = 64  # bytes per thread, stores + loads, fp32 kernels (see above)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1")
    out = folder / "aot.json"
    # The cores the other xdist workers leave: on the 2-core CI machine with -n 2 one process, beside the other
    # worker (tests/conftest.py hands this file out first); both cores with -n 0.
    workers = max(1, (os.cpu_count() or 1) - int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) + 1)
    run = subprocess.run([sys.executable, "-m", "kernels.aot", "--json", str(out), "--workers", str(workers)],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if run.returncode:  # what killed the whole run (a failed launch is a row instead, see below)
        pytest.fail(f"python -m kernels.aot exited {run.returncode}:\n{run.stderr[-4000:]}", pytrace=False)
    return json.loads(out.read_text())


def name(r: dict) -> str:
    return f"{r['kernel']} [{r['case']}, {r['dtype']}, {r['target']}, floats {r['float_type']}]"


def ok(compiled):
    return [r for r in compiled if not r["error"]]


def test_every_launch_compiles(compiled):
    failed = [f"{name(r)}: {r['error']}" for r in compiled if r["error"]]
    assert not failed, "\n\n".join(failed)


def test_every_kernel_dtype_head_dim_and_target_is_covered(compiled):
    seen = {(r["kernel"], r["dtype"], r["config"].get("HEAD_DIM"), r["target"], r["config"].get("WINDOWED")) for r in compiled}
    for kernel in ("attn_fwd_kernel", "attn_bwd_delta_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"):
        windows = (None,) if kernel == "attn_bwd_delta_kernel" else (False, True)  # with and without a sliding window
        for dtype, D, target, windowed in itertools.product(("bfloat16", "float32"), (64, 128), ("sm_90", "sm_80"), windows):
            assert (kernel, dtype, D, target, windowed) in seen, (kernel, dtype, D, target, windowed)
    for kernel in ("decode_split_kernel", "decode_merge_kernel"):  # the decode step's attention (kernels/decode.py)
        for dtype, D, target in itertools.product(("bfloat16", "float32"), (64, 128), ("sm_90", "sm_80")):
            assert (kernel, dtype, D, target, None) in seen, (kernel, dtype, D, target)
    norm = {(r["kernel"], r["dtype"], r["target"]) for r in compiled if r["kernel"].startswith("rms_norm")}
    assert len(norm) == 2 * 2 * 2  # fwd and bwd, 2 dtypes, 2 targets
    # the Inductor typing is really exercised: RMSNorm's eps is a float scalar
    assert {r["float_type"] for r in compiled if r["kernel"] == "rms_norm_fwd_kernel"} == {"fp32", "fp64"}


def test_every_hopper_candidate_is_compiled(compiled):
    """Each candidate tile of each attention kernel, for sm_90, on every case of kernels/aot.py's HALF_FRACTION;
    and those cases meet the promise made where they are chosen: each head dim with and without a window,
    any two of {head dim, MHA or GQA, window or not} together in at least one case."""
    from kernels import aot, tiles
    names = {"attn_fwd_kernel": "fwd", "attn_bwd_dkdv_kernel": "dkdv", "attn_bwd_dq_kernel": "dq"}
    tile = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "TMA")
    seen = {(names[r["kernel"]], r["config"]["HEAD_DIM"], r["config"]["WINDOWED"], "Hkv2" in r["case"],
             *(r["config"][k] for k in tile))
            for r in ok(compiled) if r["kernel"] in names and r["dtype"] == "bfloat16" and r["target"] == "sm_90"}
    swept = {(D, window is not None, H_kv < H) for (B, H, H_kv, T, D), window in aot.HALF_FRACTION}
    for which, (D, windowed, gqa) in itertools.product(names.values(), swept):
        space = tiles.hopper_space(which, D, windowed, tma=True)
        assert any(c["TMA"] for c in space), (which, D, windowed)
        for c in space:
            assert (which, D, windowed, gqa, *(c[k] for k in tile)) in seen, (which, D, windowed, gqa, c)
    factors = [(64, 128), (False, True), (False, True)]  # head dim, windowed, GQA
    for i, j in itertools.combinations(range(3), 2):
        for a, b in itertools.product(factors[i], factors[j]):
            assert any(case[i] == a and case[j] == b for case in swept), (i, a, j, b, swept)


def test_tma_candidates_copy_tiles_with_the_tensor_memory_accelerator(compiled):
    """TMA=True launches (sm_90 only) hold bulk tensor copies and ask for descriptor scratch; nothing else does."""
    tma = [r for r in ok(compiled) if r["config"].get("TMA")]
    assert tma and {r["target"] for r in tma} == {"sm_90"}
    assert all(r["tma_loads"] and r["global_scratch"] > 0 for r in tma), [name(r) for r in tma if not r["tma_loads"]]
    read = [r for r in tma if r["sass"]]
    assert read and all(r["sass"]["UTMALDG"] for r in read), [name(r) for r in read if not r["sass"]["UTMALDG"]]
    rest = [name(r) for r in ok(compiled) if not r["config"].get("TMA")
            and (r["tma_loads"] or r["global_scratch"] or (r["sass"] or {}).get("UTMALDG"))]
    assert not rest, rest


def test_attention_tiles_nest(compiled):
    """The kernels split the diagonal region into whole small tiles: the big tile must be a multiple."""
    for r in compiled:
        c = r["config"]
        if r["kernel"] in ("attn_fwd_kernel", "attn_bwd_dq_kernel"):
            assert c["BLOCK_M"] % c["BLOCK_N"] == 0, name(r)
        if r["kernel"] == "attn_bwd_dkdv_kernel":
            assert c["BLOCK_N"] % c["BLOCK_M"] == 0, name(r)


def test_shared_memory_fits(compiled):
    over = [f"{name(r)}: {r['shared']} > {r['smem_limit']} bytes" for r in ok(compiled) if r["shared"] > r["smem_limit"]]
    assert not over, "\n".join(over)


def test_no_fp64_arithmetic(compiled):
    bad = [f"{name(r)}: {r['n_f64']} fp64 instructions, e.g. {r['f64_instructions']}" for r in ok(compiled) if r["n_f64"]]
    assert not bad, "\n".join(bad)


def test_16bit_dots_use_wgmma_on_hopper(compiled):
    dots = [r for r in ok(compiled) if r["has_dot"] and r["dtype"] != "float32" and r["target"] == "sm_90"]
    assert dots
    assert all(r["wgmma"] for r in dots), [name(r) for r in dots if not r["wgmma"]]
    read = [r for r in dots if r["sass"]]
    assert read and all(r["sass"]["HGMMA"] for r in read), [name(r) for r in read if not r["sass"]["HGMMA"]]


def test_machine_code_is_read_once_for_every_tile_on_hopper(compiled):
    """Every kernel, tile and head dim compiled 16-bit for sm_90 has its machine code read in exactly one launch."""
    from kernels.aot import READ_SASS_BY
    hopper = [r for r in ok(compiled) if r["target"] == "sm_90" and r["dtype"] != "float32"]
    key = lambda r: (r["kernel"], *(r["config"].get(k) for k in READ_SASS_BY))
    read = [key(r) for r in hopper if r["sass"] is not None]
    assert len(read) == len(set(read)), "a tile read twice"
    assert set(read) == {key(r) for r in hopper}, {key(r) for r in hopper} - set(read)
    assert all(r["sass"] is None for r in ok(compiled) if r["target"] != "sm_90" or r["dtype"] == "float32")


def test_register_spills_under_bound(compiled):
    over = []
    for r in ok(compiled):
        bound = FP32_SPILL_BOUND if r["dtype"] == "float32" else SPILL_BOUND
        spilled = r["spill_stores"] + r["spill_loads"]
        if spilled > bound:
            over.append(f"{name(r)} {r['config']}: {r['spill_stores']} B spill stores + {r['spill_loads']} B "
                        f"spill loads > {bound}, {r['regs']} registers")
    assert not over, "\n".join(over)
