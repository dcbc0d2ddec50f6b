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
- decode(): one new token for each of several rows in one forward, through the same
  gpt.GPT.forward: BatchCache.select(rows) is a cache whose rows each have their own
  position (rotary angle), write their key and value at their own length, and attend
  to their own keys only (a per-row length mask for SDPA). gpt.py's KVCache documents
  the three things GPT.forward asks of a cache.

Exactness: on CPU in fp32, decode() of a row gives the logits of the single-sequence path
up to float rounding (below 1e-5 on the test models: a matmul of B rows, or SDPA over
masked keys, sums in another order), whatever the other rows are. So greedy answers are
the same tokens as alone unless the two best logits of some step lie within that
rounding of each other; tests/test_batch.py and tests/test_serve.py check token equality.
On CUDA with bf16 autocast the rounding is bf16's, and near-ties flip more easily.
"""
import torch

from gpt import KVCache, autocast


class BatchCache:
    """Keys and values of `rows` sequences, (n_layer, rows, n_kv_head, max_len, head_dim), each row its own length."""

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

    def select(self, rows: list[int]) -> "Rows":
        return Rows(self, rows)


class Rows:
    """Some rows of a BatchCache, each at its own position, as the cache of one GPT.forward."""

    def __init__(self, cache: BatchCache, rows: list[int]):
        self.cache, self.rows = cache, rows
        self.index = torch.tensor(rows, device=cache.k.device)
        self.lengths = torch.tensor([cache.lengths[r] for r in rows], device=cache.k.device)

    def positions(self, T: int, device=None) -> torch.Tensor:
        """(len(rows), T): row i's new tokens follow its own cached ones."""
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write each row's new k, v (B, H_kv, T, D) at its own positions; return the rows' keys and values
        up to the longest row, and a mask (B, 1, T, Tk) that hides other rows' lengths and the future."""
        positions = self.positions(k.shape[2])
        end = int(positions.max()) + 1
        if end > self.cache.max_len:
            raise ValueError(f"a row of the batch cache is full ({self.cache.max_len} tokens)")
        ck, cv = self.cache.k[layer], self.cache.v[layer]
        ck[self.index[:, None], :, positions] = k.transpose(1, 2).to(ck.dtype)  # (B, T, H_kv, D) into place
        cv[self.index[:, None], :, positions] = v.transpose(1, 2).to(cv.dtype)
        mask = torch.arange(end, device=k.device)[None, None, :] <= positions[:, :, None]  # key j <= query's position
        return ck[self.index, :, :end], cv[self.index, :, :end], mask[:, None]

    def advance(self, T: int) -> None:
        for r in self.rows:
            self.cache.lengths[r] += T
        self.lengths += T


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
    x = torch.tensor(tokens, dtype=torch.long, device=cache.k.device)[:, None]
    with autocast(x.device):
        logits = model(x, kv_cache=cache.select(rows))[:, -1]
    return logits.float()
