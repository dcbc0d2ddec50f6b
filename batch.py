"""
batch.py: decode many sequences at once on one model, for serve.py's continuous batching.

gpt.py's KVCache holds B sequences that all sit at the same position, which is what
training-style generation needs. A server's sequences do not: they arrive at different
times with prompts of different lengths. So here:

- BatchCache: keys and values of `rows` sequences, (n_layer, rows, n_kv_head, max_len,
  head_dim), and each row's own length. A row is a slot: a request takes a free one,
  fills it, and leaves it when it ends (its tokens stay, for reuse by the same client).
- prefill(): one row alone, through gpt.GPT.forward with a gpt.KVCache that is a view
  of that row, so a prompt is computed exactly as chat.ChatSession computes it.
- decode(): one new token for each of several rows in one forward. Each row gets its
  own rotary position, writes its key and value at its own length, and attends to its
  own keys only (a per-row length mask for SDPA). The weights are gpt.GPT's; this
  re-states CausalSelfAttention.forward for per-row positions instead of complicating
  gpt.py's single-sequence path.

Exactness: on CPU in fp32, decode() of a row gives the logits of the single-sequence path
up to float rounding (below 1e-5 on the test models: a matmul of B rows, or SDPA over
masked keys, sums in another order), whatever the other rows are. So greedy answers are
the same tokens as alone unless the two best logits of some step lie within that
rounding of each other; tests/test_batch.py and tests/test_serve.py check token equality.
On CUDA with bf16 autocast the rounding is bf16's, and near-ties flip more easily.
"""
import torch
import torch.nn.functional as F

from gpt import SOFTCAP, KVCache, apply_rotary, norm


class BatchCache:
    def __init__(self, model, rows: int, max_len: int):
        c = model.config
        p = model.lm_head.weight
        dtype = torch.bfloat16 if p.device.type == "cuda" else p.dtype  # what autocast makes of k and v
        shape = (c.n_layer, rows, c.n_kv_head, max_len, c.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=dtype, device=p.device)
        self.lengths = [0] * rows  # tokens cached per row
        self.max_len = max_len

    def row_view(self, row: int) -> KVCache:
        """gpt.KVCache over one row: GPT.forward writes straight into this cache."""
        n_layer, _, n_kv_head, _, head_dim = self.k.shape
        view = KVCache(1, self.max_len, n_layer, n_kv_head, head_dim)
        view.k, view.v = self.k[:, row:row + 1], self.v[:, row:row + 1]
        view.pos = self.lengths[row]
        return view


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.inference_mode()
def prefill(model, cache: BatchCache, row: int, keep: int, ids: list[int]) -> torch.Tensor:
    """Keep the row's first `keep` tokens, compute `ids` after them; the logits (1, vocab) after the last."""
    view = cache.row_view(row)
    view.truncate(keep)
    x = torch.tensor([ids], dtype=torch.long, device=cache.k.device)
    with autocast(x.device):
        logits = model(x, kv_cache=view)[:, -1]
    cache.lengths[row] = view.pos
    return logits.float()


@torch.inference_mode()
def decode(model, cache: BatchCache, rows: list[int], tokens: list[int]) -> torch.Tensor:
    """Feed tokens[i] to row rows[i], all in one forward; the next logits, (len(rows), vocab)."""
    device = cache.k.device
    B = len(rows)
    pos = torch.tensor([cache.lengths[r] for r in rows], device=device)
    if int(pos.max()) >= cache.max_len:
        raise ValueError(f"a row of the batch cache is full ({cache.max_len} tokens)")
    index = torch.tensor(rows, device=device)
    T_keys = int(pos.max()) + 1  # attend over this many cached positions; shorter rows are masked
    mask = (torch.arange(T_keys, device=device)[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, T_keys)
    cos, sin = model.cos[0, pos][:, None], model.sin[0, pos][:, None]  # (B, 1, 1, D/2): each row its position
    with autocast(device):
        x = norm(model.transformer.wte(torch.tensor(tokens, device=device)[:, None]))  # (B, 1, C)
        for layer, block in enumerate(model.transformer.h):
            a = block.attn
            h = norm(x)
            q = a.c_q(h).view(B, 1, a.n_head, a.head_dim)
            k = a.c_k(h).view(B, 1, a.n_kv_head, a.head_dim)
            v = a.c_v(h).view(B, 1, a.n_kv_head, a.head_dim)
            q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
            ck, cv = cache.k[layer], cache.v[layer]
            ck[index, :, pos] = k[:, 0].to(ck.dtype)  # row i's new key at its own position
            cv[index, :, pos] = v[:, 0].to(cv.dtype)
            keys, values = ck[index, :, :T_keys], cv[index, :, :T_keys]  # (B, H_kv, T_keys, D)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                               enable_gqa=a.n_head != a.n_kv_head)
            x = x + a.c_proj(y.transpose(1, 2).reshape(B, 1, -1))
            x = x + block.mlp(norm(x))
        logits = model.lm_head(norm(x))[:, -1]
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
    for r in rows:
        cache.lengths[r] += 1
    return logits.float()
