"""
The static KV cache of generation: keys and values of every layer for B rows, each row at
its own position, preallocated once, kept on the device (gpt.py's model docstring says how
the decode step uses it; README, "Generation").

One cache serves every decode path: GPT.generate (chat.py, training and SFT samples) with
one row, session.ChatSession across the turns of a conversation, and serve.py's batched
engine with a row per request. attend() is what a layer's attention calls; the host-side
methods (check_room, advance, truncate, swap, ...) keep each row's length twice, as a list
for the host and a tensor for the device, so the compiled decode step reads no host state.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels import decode_attn, flash_attn
from kernels.decode import slice_plan


class KVCache(nn.Module):
    """Keys and values of every layer for B sequences (rows), each at its own position: the one
    cache of GPT.generate, session.ChatSession and engine.BatchEngine.

    Static: k and v are (n_layer, B, n_kv_head, max_len + 1, head_dim), allocated once (on
    the first forward, in the dtype of its keys, or by allocate()) and written in place.
    Each row's length is kept twice: `lengths`, a list of ints for the host's decisions, and
    `seq_lens`, a (B,) int64 buffer on the device that the decode step reads. So the decode
    step (decode_step) touches device tensors only: its shapes, and its compiled graph, are
    the same for every token (compile_decode). Every method here keeps the two equal.

    A row's tokens sit in slots 0..length-1. Slot max_len is scratch: a compiled step feeds
    a fixed number of rows, and a row fed only to fill that number (GPT.decode's `keep`)
    writes its key at its own length, which is max_len when the row is full.

    GPT.forward asks a cache check_room(B, T), positions(B, T) of the new tokens,
    attend(layer, q, k, v, window) and advance(B, T), and a model with the smear
    previous_tokens(idx): the token before the new ones (the cache keeps every row's token
    ids for it); rows(start) is rows start, start+1, ... as such a cache (a prefill into
    some rows of a server's batch).
    """

    def __init__(self, batch_size: int, max_len: int, n_layer: int, n_kv_head: int, head_dim: int, device=None):
        super().__init__()
        self.batch_size, self.max_len = batch_size, max_len
        self.shape = (n_layer, batch_size, n_kv_head, max_len + 1, head_dim)
        self.lengths = [0] * batch_size  # tokens cached per row, on the host
        self.register_buffer("seq_lens", torch.zeros(batch_size, dtype=torch.long, device=device), persistent=False)
        # made on the CPU and moved: arange on the meta device (a session of shapes only, serve.py's HTTP side)
        # runs torch's Python reference, which imports sympy (0.6 s)
        self.register_buffer("row_ids", torch.arange(batch_size).to(device), persistent=False)
        self.register_buffer("k", None, persistent=False)
        self.register_buffer("v", None, persistent=False)
        self.register_buffer("ids", None, persistent=False)  # (B, max_len + 1) token ids, -1 unwritten: the smear's
        self.compiled = False  # GPT.decode runs the compiled step (compile_decode sets it)
        self.batch_sizes = None  # the row counts the compiled step was warmed up for
        self.compile_seconds = None  # how long compiling and warming them up took
        self.prefill_warm_up_seconds = None  # how long session.warm_up_prefill took on this cache
        self._plan = None  # the eager decode step's attention plan (_slice_plan)

    @property
    def device(self) -> torch.device:
        return self.seq_lens.device

    def allocate(self, dtype: torch.dtype) -> "KVCache":
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=dtype, device=self.seq_lens.device)
            self.v = torch.zeros_like(self.k)
        self._allocate_ids()
        return self

    def _allocate_ids(self) -> None:
        if self.ids is None:
            self.ids = torch.full(self.shape[1:2] + self.shape[3:4], -1, dtype=torch.long, device=self.seq_lens.device)

    # -- the device side: what a forward (and the compiled decode step) runs ----

    def _rows(self, t: torch.Tensor, start: int, B: int) -> torch.Tensor:
        """Rows start..start+B-1 of t (its first dim): t itself when they are all (an op less per layer and token)."""
        return t if start == 0 and B == self.batch_size else t[start:start + B]

    def positions(self, B: int, T: int, start: int = 0) -> torch.Tensor:
        """(B, T): rows start..start+B-1's new tokens follow their own cached ones."""
        p = self._rows(self.seq_lens, start, B)[:, None]
        return p if T == 1 else p + torch.arange(T, device=p.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None,
               start: int = 0) -> torch.Tensor:
        """Write the new k, v (B, H_kv, T, D) at each row's positions, then attend q (B, H, T, D) to each row's
        own keys: key j is visible to a query at position p iff p - window <= j <= p (window None: j <= p)."""
        B, _, T, _ = q.shape
        self.allocate(k.dtype)
        kc, vc = self._rows(self.k[layer], start, B), self._rows(self.v[layer], start, B)
        if k.dtype != kc.dtype:
            k, v = k.to(kc.dtype), v.to(vc.dtype)
        if torch.compiler.is_compiling():  # the compiled decode step: the positions on the device, nothing else
            lengths = None
            positions = self.positions(B, T, start)
            kc[self.row_ids[:B, None], :, positions] = k.transpose(1, 2)  # (B, T, H_kv, D) into each row's slots
            vc[self.row_ids[:B, None], :, positions] = v.transpose(1, 2)
        else:  # eager: the host knows the lengths, and a copy into a slice is cheaper than a scatter
            lengths = self.lengths[start:start + B]
            if min(lengths) == max(lengths):
                kc[:, :, lengths[0]:lengths[0] + T] = k
                vc[:, :, lengths[0]:lengths[0] + T] = v
            else:
                positions = self.positions(B, T, start)
                kc[self.row_ids[:B, None], :, positions] = k.transpose(1, 2)
                vc[self.row_ids[:B, None], :, positions] = v.transpose(1, 2)
        if T == 1:  # a decode step: the whole cache in, each row's keys read (kernels/decode.py)
            positions = self._rows(self.seq_lens, start, B)
            plan = None if lengths is None else self._slice_plan(positions, lengths, window)
            return decode_attn(q, kc, vc, positions, window, plan)
        if window is None and not any(lengths):  # a prefill into empty rows: plain causal attention
            return flash_attn(q, k, v)  # (a padded row's tail sits after its own tokens: none of them sees it)
        end = max(lengths) + T
        positions = self.positions(B, T, start)
        j = torch.arange(end, device=q.device)
        seen = j <= positions[..., None]  # (B, T, end)
        if window is not None:
            seen &= j >= positions[..., None] - window
        # not cuDNN: it plans anew for every length (issue 26), and prefill lengths always differ
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=seen[:, None],
                                                  enable_gqa=q.shape[1] != k.shape[1])

    def previous_tokens(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Record the new tokens idx (B, T) at their rows' positions; the token before them (B, 1), -1 for a row
        at position 0. Device work only, so the compiled decode step runs it too."""
        B, T = idx.shape
        self._allocate_ids()  # only the ids: the keys take the dtype of the first keys written (update)
        ids = self.ids[start:start + B]
        positions = self.positions(B, T, start)
        ids[self.row_ids[:B, None], positions] = idx
        before = positions[:, :1] - 1
        return torch.where(before >= 0, ids.gather(1, before.clamp(min=0)), -1)

    def _slice_plan(self, positions: torch.Tensor, lengths: list[int], window: int | None) -> tuple:
        """kernels/decode.py's slice_plan from the host's lengths, made once a step and window for all layers
        (the lengths are its key: whatever changed them, a new plan)."""
        key = (tuple(lengths), window)
        if self._plan is None or self._plan[0] != key:
            self._plan = key, slice_plan(positions, window, (min(lengths), max(lengths)))
        return self._plan[1]

    # -- the host side ------------------------------------------------------------

    def check_room(self, B: int, T: int, rotary_len: int, start: int = 0) -> None:
        end = max(self.lengths[start:start + B]) + T
        if end > rotary_len:
            raise ValueError(f"position {end} is past the rotary tables ({rotary_len})")
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end - T} cached + {T} new > max_len {self.max_len}")

    def advance(self, B: int, T: int, start: int = 0) -> None:
        for row in range(start, start + B):
            self.lengths[row] += T
        self._rows(self.seq_lens, start, B).add_(T)

    def set_length(self, row: int, n: int) -> None:
        """Row `row` keeps its first n tokens."""
        if not 0 <= n <= self.max_len:
            raise ValueError(f"a row holds 0 to {self.max_len} tokens, not {n}")
        self.lengths[row] = n
        self.seq_lens[row] = n

    @property
    def pos(self) -> int:
        """The number of cached tokens, when every row holds the same number (generation's rows do)."""
        if len(set(self.lengths)) != 1:
            raise ValueError(f"the rows hold different numbers of tokens: {self.lengths}")
        return self.lengths[0]

    def truncate(self, pos: int) -> None:
        """Forget every token from position `pos` on, in every row."""
        if not 0 <= pos <= min(self.lengths):
            raise ValueError(f"cannot truncate a cache of {min(self.lengths)} tokens to {pos}")
        self.lengths = [pos] * self.batch_size
        self.seq_lens.fill_(pos)

    def reset(self) -> None:
        self.truncate(0)

    def swap(self, i: int, j: int) -> None:
        """Exchange rows i and j (their cached tokens only: a copy of at most the longer one)."""
        n = max(self.lengths[i], self.lengths[j])
        if i != j and n and self.k is not None:
            for t in (self.k, self.v):
                row_i = t[:, i, :, :n].clone()
                t[:, i, :, :n] = t[:, j, :, :n]
                t[:, j, :, :n] = row_i
            self.ids[[i, j], :n] = self.ids[[j, i], :n]
        self.lengths[i], self.lengths[j] = self.lengths[j], self.lengths[i]
        self.seq_lens[[i, j]] = self.seq_lens[[j, i]]

    def rows(self, start: int) -> "CacheRows":
        return CacheRows(self, start)


class CacheRows:
    """Rows start, start+1, ... of a KVCache as the cache of one GPT.forward (the rows of a prefill)."""

    def __init__(self, cache: KVCache, start: int):
        self.cache, self.start = cache, start

    def check_room(self, B, T, rotary_len):
        self.cache.check_room(B, T, rotary_len, self.start)

    def positions(self, B, T):
        return self.cache.positions(B, T, self.start)

    def attend(self, layer, q, k, v, window=None):
        return self.cache.attend(layer, q, k, v, window, self.start)

    def previous_tokens(self, idx):
        return self.cache.previous_tokens(idx, self.start)

    def advance(self, B, T):
        self.cache.advance(B, T, self.start)
