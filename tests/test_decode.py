"""kernels/decode.py: one query per row over a static KV cache, against attention written out in fp64."""
import math

import pytest
import torch

from kernels import decode, triton_on_cpu
from kernels.decode import decode_attn, decode_attn_op


def written_out(q, k, v, positions, window):
    """Row b's query sees the slots j with positions[b] - window <= j <= positions[b]; GQA by repeating k and v."""
    B, H, _, D = q.shape
    group = H // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1).double() for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) / math.sqrt(D)  # (B, H, 1, S)
    j, p = torch.arange(k.shape[2]), positions[:, None, None, None]
    seen = (j <= p) & (j >= p - window if window is not None else True)
    return (s.masked_fill(~seen, float("-inf")).softmax(-1) @ v).to(q.dtype)


def cache_and_query(B, H, H_kv, S, D, positions, seed=0):
    """A layer of a cache, sliced out of a bigger buffer as kvcache.KVCache does, and queries in the model's
    transposed layout. Slots past each row's position hold large stale values: they must not count."""
    g = torch.Generator().manual_seed(seed)
    buffer = torch.randn(2, 2, B + 1, H_kv, S, D, generator=g)
    k, v = buffer[0, 1, :B], buffer[1, 1, :B]
    for b, p in enumerate(positions.tolist()):
        k[b, :, p + 1:] = 1e4
        v[b, :, p + 1:] = -1e4
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("window", [None, 1, 5, 100])
def test_decode_attn_matches_attention_written_out(H, H_kv, window):
    positions = torch.tensor([0, 3, 17, 39, 17])  # the first slot, the last slot, two rows alike
    q, k, v = cache_and_query(5, H, H_kv, 40, 16, positions)
    want = written_out(q, k, v, positions, window)
    for fn in (decode._sliced, decode._full_span, decode_attn, decode_attn_op):
        got = fn(q, k, v, positions, window)
        assert got.shape == q.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{fn.__name__}: {m}")


@pytest.mark.parametrize("D", [16, 64])
@pytest.mark.parametrize("H, H_kv", [(4, 4), (4, 1)], ids=["mha", "mqa"])
@pytest.mark.parametrize("window", [None, 0, 5])
def test_triton_kernel_matches_attention_written_out(D, H, H_kv, window):
    """The CUDA kernel, run by Triton's interpreter: 16-key tiles, so a 70-slot cache is 5 pieces, and rows
    end in the first, a middle and the last one."""
    positions = torch.tensor([0, 3, 17, 69, 33])
    q, k, v = cache_and_query(5, H, H_kv, 70, D, positions)
    with triton_on_cpu():
        got = decode_attn(q, k, v, positions, window)
    assert got.shape == q.shape and got.stride() == q.stride()
    torch.testing.assert_close(got, written_out(q, k, v, positions, window), atol=1e-5, rtol=1e-5)


def test_triton_kernel_in_the_model(monkeypatch):
    """A small model's decode steps with the kernel (every op in the interpreter) give the eager path's logits."""
    import gpt
    from test_gpt import random_model, random_tokens
    model = random_model(n_head=2, n_kv_head=1, n_embd=64)  # head dim 32, grouped-query
    idx = random_tokens(model, 2, 12)
    launches = []
    kernel = decode._triton_decode
    monkeypatch.setattr(decode, "_triton_decode", lambda *a: launches.append(1) or kernel(*a))

    def steps(triton):
        cache, out = model.new_kv_cache(2, 16), []
        with torch.no_grad():
            model(idx[:, :6], kv_cache=cache)
            for t in range(6, 12):
                if triton:
                    with triton_on_cpu():
                        out.append(model.decode(idx[:, t:t + 1], cache))
                else:
                    out.append(model.decode(idx[:, t:t + 1], cache))
        return torch.stack(out)

    torch.testing.assert_close(steps(True), steps(False), atol=1e-5, rtol=1e-5)
    assert len(launches) == 6 * model.config.n_layer  # the kernel really ran, every layer of every step


@pytest.mark.parametrize("window", [None, 4])
def test_rows_at_one_position_need_no_mask(window):
    """The sliced path skips the mask when all rows sit at one position: the same result as with it."""
    positions = torch.tensor([12, 12, 12])
    q, k, v = cache_and_query(3, 4, 2, 30, 16, positions, seed=1)
    torch.testing.assert_close(decode._sliced(q, k, v, positions, window), written_out(q, k, v, positions, window),
                               atol=1e-5, rtol=1e-5)


def test_decode_attn_is_one_opaque_op_under_compile():
    """Inside a compiled graph the op is one call with the cache's whole shape: nothing about the positions
    reaches the graph, so new positions never retrace it."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v, p: decode_attn(q, k, v, p), backend=backend, fullgraph=True, dynamic=False)
    for positions in ([3, 9], [4, 10], [29, 0]):
        positions = torch.tensor(positions)
        q, k, v = cache_and_query(2, 4, 2, 30, 16, positions)
        torch.testing.assert_close(fn(q, k, v, positions), written_out(q, k, v, positions, None), atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1 and "nanoschnack.decode_attn" in graphs[0].code
    torch._dynamo.reset()


def test_triton_kernel_takes_any_layout():
    """The kernels read the head dim at stride 1; a q, k or v laid out otherwise is copied, not misread."""
    positions = torch.tensor([5, 20])
    q, k, v = cache_and_query(2, 2, 2, 33, 16, positions)
    want = written_out(q, k, v, positions, None)
    q_head_dim_outer = q.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)  # same values, stride(-1) = B*H
    k_head_dim_outer = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    with triton_on_cpu():
        got = decode_attn(q_head_dim_outer, k_head_dim_outer, v, positions, None)
    assert got.stride() == q_head_dim_outer.stride()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_refused():
    positions = torch.tensor([1, 2])
    q, k, v = cache_and_query(2, 4, 2, 8, 16, positions)
    with pytest.raises(RuntimeError, match="one query per row"):
        decode_attn_op(torch.cat([q, q], dim=2), k, v, positions, None)
    with pytest.raises(RuntimeError, match="not a multiple"):
        decode_attn_op(q[:, :3], k, v, positions, None)
    with pytest.raises(RuntimeError, match="positions must be"):
        decode_attn_op(q, k, v, positions[:1], None)
