"""
The nanoschnack GPT: a decoder-only Transformer in one file, after nanochat.

    token ids -> embedding -> norm -> n_layer x Block -> norm -> lm_head -> softcap -> logits
    Block:  x = x + attn(norm(x));  x = x + mlp(norm(x))          (pre-norm)

Design choices (all from nanochat):
- RMSNorm without a learnable weight, also right after the embedding.
- Rotary position embeddings (no learned positions), then QK-norm on q and k.
- Causal self-attention with optional grouped-query attention (n_kv_head < n_head).
- ReLU^2 MLP with 4x width. No biases anywhere. Untied embedding and lm_head.
- Logits soft-capped at 15 with tanh, so no logit can run away.
- Output projections (attention c_proj, MLP c_proj) and lm_head start at zero:
  every block starts as the identity and the first loss is exactly log(vocab).

Training calls the fused kernels in kernels/ (Triton on CUDA, PyTorch reference
on CPU). Generation uses a KV cache: the prompt is prefilled in one forward, then
one token per forward attends to everything cached so far (plain PyTorch SDPA; at
T=1 there is nothing for a fused kernel to win).
"""
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import flash_attn, rms_norm

SOFTCAP = 15.0
NORM_EPS = 1e-6
ROTARY_BASE = 10000.0


@dataclass
class GPTConfig:
    sequence_len: int = 1024  # training context; rotary tables cover 10x that for generation
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads; n_head must be a multiple (GQA when smaller)
    n_embd: int = 768

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dim, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, sequence_len: int, head_dim: int = 128, n_kv_head: int | None = None):
        """nanochat's single knob: width = depth * 64, as many heads of `head_dim` as fit."""
        n_embd = depth * 64
        if n_embd % head_dim:
            raise ValueError(f"width {n_embd} (depth {depth} x 64) is not a multiple of head_dim={head_dim}")
        n_head = n_embd // head_dim
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                   n_head=n_head, n_kv_head=n_kv_head or n_head, n_embd=n_embd)


# Small models that train on a CPU. Anything named "d<depth>" (d12, d20, d26, ...)
# is GPTConfig.from_depth(depth): d20 is nanochat's $100 speedrun model.
PRESETS = {
    "nano": dict(n_layer=2, n_head=2, n_kv_head=2, n_embd=64),  # tests, seconds on a laptop
    "tiny": dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=256),  # head_dim 64
}


def preset(name: str, vocab_size: int, sequence_len: int) -> GPTConfig:
    """A config by name: 'nano', 'tiny', or 'd<depth>' such as 'd12' or 'd20'."""
    if name in PRESETS:
        return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, **PRESETS[name])
    if re.fullmatch(r"d\d+", name):
        return GPTConfig.from_depth(int(name[1:]), vocab_size=vocab_size, sequence_len=sequence_len)
    raise ValueError(f"unknown preset {name!r}: use one of {sorted(PRESETS)} or d<depth> (e.g. d20)")


def norm(x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x, NORM_EPS)


def rotary_tables(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency) pair, shaped (1, seq_len, 1, head_dim/2) for (B, T, H, D)."""
    inv_freq = 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[i], x[i + D/2]) of x (B, T, H, D) by position-dependent angles."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
    return y.to(x.dtype)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for generation.

    Holds (n_layer, B, n_kv_head, max_len, head_dim) tensors, allocated on the first
    insert with that key's dtype and device. `pos` is the number of cached tokens,
    the same for all B rows; GPT.forward advances it after all layers have inserted.
    Prefill any number of tokens on top of what is cached (a whole prompt, or the
    next chat turn), decode one at a time, and `truncate(n)` / `reset()` to roll back.

    GPT.forward asks a cache three things: positions(T) of the new tokens,
    insert(layer, k, v) -> (keys, values, mask), and advance(T). engine.py's cache
    answers them with a position per row, for a server's requests that arrived at
    different times; the model code is the same for both.
    """

    def __init__(self, batch_size: int, max_len: int, n_layer: int, n_kv_head: int, head_dim: int):
        self.shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.max_len = max_len
        self.k = self.v = None
        self.pos = 0

    def positions(self, T: int, device=None) -> torch.Tensor:
        """Positions of T new tokens after the cached ones, (1, T): every row is at the same place."""
        return torch.arange(self.pos, self.pos + T, device=device)[None]

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H_kv, T, D) after the cached tokens; return all keys and values so far and
        the attention mask (T, Tk) of the new queries."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        T, end = k.shape[2], self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} cached + {T} new > max_len {self.max_len}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        # New query i sits at position end - T + i: it sees the whole cache and the new
        # tokens up to itself. (T == end is plain causal; T == 1 sees everything.)
        mask = torch.ones(T, end, dtype=torch.bool, device=k.device).tril(diagonal=end - T)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask

    def advance(self, T: int) -> None:
        self.pos += T

    def truncate(self, pos: int) -> None:
        """Forget every token from position `pos` on."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot truncate a cache of {self.pos} tokens to {pos}")
        self.pos = pos

    def reset(self) -> None:
        self.pos = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm: attention logits stay bounded by sqrt(head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D) views, no copy
        if kv_cache is None:
            y = flash_attn(q, k, v)
        else:
            k, v, mask = kv_cache.insert(self.layer_idx, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_kv_head)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.rotary_len = 10 * config.sequence_len  # room for generating past the training length
        cos, sin = rotary_tables(self.rotary_len, config.head_dim)
        self.register_buffer("cos", cos, persistent=False)  # recomputed, never saved in checkpoints
        self.register_buffer("sin", sin, persistent=False)
        if self.lm_head.weight.device.type != "meta":  # on meta: to_empty(device=...) then init_weights()
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """nanochat's init. With a seed it is deterministic (for a given device)."""
        device = self.lm_head.weight.device
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                # std 1/sqrt(fan_in), shrunk for layers that narrow (arXiv:2310.17813)
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                module.weight.normal_(0.0, std, generator=gen)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0, generator=gen)
        self.lm_head.weight.zero_()
        for block in self.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        self.cos, self.sin = rotary_tables(self.rotary_len, self.config.head_dim, device=device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                loss_reduction: str = "mean") -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab), or the cross-entropy loss if targets are given.

        Targets equal to -1 are ignored. With a KV cache, idx are the tokens after
        the cached ones, and the cache advances by T.
        """
        B, T = idx.shape
        if kv_cache is None:  # training: positions 0..T-1
            end, cos, sin = T, self.cos[:, :T], self.sin[:, :T]
        else:  # each row's new tokens at their own positions: (1 or B, T, 1, head_dim/2)
            positions = kv_cache.positions(T, idx.device)
            end, cos, sin = int(positions[:, -1].max()) + 1, self.cos[0, positions], self.sin[0, positions]
        if end > self.rotary_len:
            raise ValueError(f"position {end} is past the rotary tables ({self.rotary_len})")

        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)

        if targets is None:
            logits = self.lm_head(x)
            return SOFTCAP * torch.tanh(logits / SOFTCAP)
        logits = self.lm_head(x).float()  # the loss wants fp32 logits even under bf16 autocast
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def new_kv_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        c = self.config
        return KVCache(batch_size, max_len or self.rotary_len, c.n_layer, c.n_kv_head, c.head_dim)

    @torch.no_grad()
    def generate(self, tokens: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 kv_cache: KVCache | None = None, generator: torch.Generator | None = None):
        """Stream up to max_new_tokens sampled token ids (a Python generator of ints): the one decode loop.

        tokens are prefilled in one forward on top of kv_cache if one is given (e.g.
        the next chat turn, or what is left of it after a shared prefix), then each
        new token is one decode step. temperature 0 is greedy. Randomness comes from
        `generator` (a caller's stream, e.g. a chat session's) or else a new one
        seeded with `seed`. Each token is fed to the model before it is yielded, so
        when the caller stops early the cache holds exactly the prompt and every
        token it received, ready for the next turn.
        """
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        device = self.lm_head.weight.device
        if kv_cache is None:
            kv_cache = self.new_kv_cache(1, len(tokens) + max_new_tokens)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed) if seed is not None else generator.seed()
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        with autocast(device):
            logits = self.forward(ids, kv_cache=kv_cache)[:, -1]
        for _ in range(max_new_tokens):
            next_id = sample_next_token(logits, temperature, top_k, top_p, generator)
            with autocast(device):
                logits = self.forward(next_id, kv_cache=kv_cache)[:, -1]
            yield next_id.item()

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wte.weight.numel() if exclude_embedding else n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), nanochat's estimate for MFU.

        6 per parameter (2 forward, 4 backward) except the embedding lookup, plus
        the attention matmuls: 12 * n_layer * n_head * head_dim * sequence_len
        (counted at full T x T, as nanochat and PaLM do, ignoring the causal half).
        """
        c = self.config
        return 6 * self.num_params(exclude_embedding=True) + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len


def compute_dtype(device, choice: str = "auto") -> torch.dtype:
    """The dtype of training's matrix products: "float32", "bfloat16", or "auto": bf16 where the
    hardware multiplies bf16 natively (CUDA; CPUs with AVX512-BF16 or AMX, such as AMD Zen 4 and
    Intel Sapphire Rapids, where it makes a tiny-model training step ~1.8x faster), else fp32."""
    if choice not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"unknown dtype {choice!r}: use auto, float32 or bfloat16")
    if choice == "auto":
        native = torch.device(device).type == "cuda" or torch.cpu._is_avx512_bf16_supported() \
            or torch.cpu._is_amx_tile_supported()
        choice = "bfloat16" if native else "float32"
    return getattr(torch, choice)


def default_dtype(device) -> torch.dtype:
    """What runs without a choice (generation, evaluation): bf16 on CUDA, fp32 on the CPU, where
    generation is memory-bound and casting the weights each step costs more than it saves."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def autocast(device, dtype: torch.dtype | None = None):
    """The compute dtype, in one place: autocast to `dtype` (weights stay fp32), default_dtype by default."""
    dtype = dtype or default_dtype(device)
    return nullcontext() if dtype == torch.float32 else torch.autocast(torch.device(device).type, dtype=dtype)


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None,
                      uniform: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, vocab) -> token ids (B, 1). temperature 0 means greedy.

    Each row takes one random number in [0, 1) (`uniform`, (B, 1) float64, or drawn from
    `generator`) and picks the token where that number falls in the cumulative distribution.
    One number per token, so a row's tokens follow from its own numbers alone (the server
    draws a seeded request's from its own generator while sampling its batch in one call);
    torch.multinomial draws one per vocabulary entry: 0.18 ms a row at 8k tokens on the development
    CPU, against 0.01 ms here."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop.scatter(-1, order, drop)
        logits = logits.masked_fill(drop, float("-inf"))
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)  # float64: the tail's tiny probabilities still count
    if uniform is None:
        uniform = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64, device=logits.device)
    return torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=logits.shape[-1] - 1)
