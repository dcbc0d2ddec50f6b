"""
transformers code for a nanoschnack model trained with nanochat's recipe (gpt.py's switches).

export.py copies this file into the folder of such a model, whose config.json names it
(model_type "nanoschnack", auto_map), so that it loads where transformers models load:

    AutoModelForCausalLM.from_pretrained("out/hf", trust_remote_code=True)
    lm_eval run --model hf --model_args pretrained=out/hf,trust_remote_code=True ...

It imports only torch and transformers (5.24, the version export.py verifies against), never
the repository: a folder on the hub must run without it. A plain model (every switch off) is
exported as transformers' own NanoChatForCausalLM and needs none of this.
It runs trained weights; it has no init of gpt.py's own (a model made from its config alone
gets transformers' init, the scalars at their neutral 1 and 0): train with train.py.

What it adds to transformers' NanoChat, each as gpt.py computes it (gpt.py's docstring and
GPT.trunk are the reference; export.py checks the logits against gpt.py before it writes):
- value_embeds: a second embedding table on alternating layers, added to v through the gate
  3 * sigmoid(ve_gate(x[..., :12])) per key/value head;
- layer_lambdas: before layer i, x = resid_lambdas[i] * x + x0_lambdas[i] * x0;
- smear: x_t + smear_lambda * sigmoid(smear_gate(x_t[..., :24])) * x_{t-1}, on the normalised
  embeddings. A step of generate() gets only the new token, so the token before it comes as
  previous_ids (prepare_inputs_for_generation takes it from the sequence so far);
- backout: the residual after layer n_layer // 2, times backout_lambda, is subtracted before
  the final norm;
- sliding windows: layer_types "sliding_attention" see the last sliding_window keys, as in
  transformers' Qwen2 and Mistral (gpt.py's window w is sliding_window - 1 keys back);
- qk_gain: q and k scaled after QK-norm.
"""
import torch
import torch.nn as nn
import transformers

try:  # transformers' internals this file builds on, as 5.24 has them (export.TRANSFORMERS_VERSION)
    from huggingface_hub.dataclasses import strict
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.modeling_outputs import BaseModelOutputWithPast
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.nanochat.configuration_nanochat import NanoChatConfig
    from transformers.models.nanochat.modeling_nanochat import (NanoChatAttention, NanoChatDecoderLayer, NanoChatForCausalLM,
                                                                NanoChatModel, NanoChatPreTrainedModel, NanoChatRMSNorm,
                                                                NanoChatRotaryEmbedding, apply_rotary_pos_emb,
                                                                eager_attention_forward)
    from transformers.utils.generic import merge_with_config_defaults
    from transformers.utils.output_capturing import capture_outputs
except ImportError as e:
    raise ImportError(f"this model's code (modeling_nanoschnack.py) is written for transformers 5.24 and cannot "
                      f"use transformers {transformers.__version__} ({e}); pip install 'transformers==5.24.*'") from e

SMEAR_CHANNELS = 24    # the smear gate reads the first 24 channels of the embedding (gpt.SMEAR_CHANNELS)
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of the layer input (gpt.VE_GATE_CHANNELS)


@strict
class NanoschnackConfig(NanoChatConfig):
    model_type = "nanoschnack"
    value_embeds: bool = False
    layer_lambdas: bool = False
    smear: bool = False
    backout: bool = False
    qk_gain: float = 1.0
    layer_types: list[str] | None = None  # per layer: "full_attention" or "sliding_attention"
    sliding_window: int | None = None     # keys a sliding layer's query sees, itself included

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        super().__post_init__(**kwargs)

    def has_value_embed(self, layer: int) -> bool:
        """gpt.has_value_embed: alternating layers, the last always among them."""
        return self.value_embeds and layer % 2 == (self.num_hidden_layers - 1) % 2


class NanoschnackAttention(NanoChatAttention):
    """NanoChat's attention plus the value embedding and its gate, the q/k gain and the layer's window."""

    def __init__(self, config: NanoschnackConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.qk_gain = config.qk_gain
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        if config.has_value_embed(layer_idx):
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, config.num_key_value_heads, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, value_embed=None, **kwargs):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        v = self.v_proj(hidden_states).view(hidden_shape)
        if value_embed is not None:  # ResFormer's value residual: the gate, in (0, 3) per kv head, reads the input
            gate = 3 * torch.sigmoid(self.ve_gate(hidden_states[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * value_embed.to(v.dtype).view(hidden_shape)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q, k = self.q_norm(q) * self.qk_gain, self.k_norm(k) * self.qk_gain  # RoPE, then QK-norm, then the gain
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        y, weights = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling,
                               sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(y.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class NanoschnackDecoderLayer(NanoChatDecoderLayer):
    def __init__(self, config: NanoschnackConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = NanoschnackAttention(config, layer_idx)


class NanoschnackPreTrainedModel(NanoChatPreTrainedModel):
    config: NanoschnackConfig
    _no_split_modules = ["NanoschnackDecoderLayer"]
    _can_record_outputs = {"hidden_states": NanoschnackDecoderLayer, "attentions": NanoschnackAttention}


class NanoschnackModel(NanoschnackPreTrainedModel, NanoChatModel):
    def __init__(self, config: NanoschnackConfig):
        NanoschnackPreTrainedModel.__init__(self, config)
        self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([NanoschnackDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = NanoChatRMSNorm(eps=config.rms_norm_eps)
        self.rotary_emb = NanoChatRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        if config.value_embeds:
            kv_dim = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                               for i in range(config.num_hidden_layers) if config.has_value_embed(i)})
        if config.layer_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))
        if config.smear:
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.post_init()

    def smear(self, x, previous_ids, attention_mask, past_seen: int):
        """x_t plus its gated share of x_{t-1} (gpt.GPT.smear). The token before the first new one is
        previous_ids (B, 1), or none at the start of a text; a padding token counts as none."""
        if past_seen and previous_ids is None:
            raise ValueError("this model's smear needs the token before input_ids when a cache holds earlier "
                             "tokens: pass previous_ids (B, 1), or call generate(), which does")
        before = torch.zeros_like(x[:, :1]) if previous_ids is None else self.norm(self.embed_tokens(previous_ids))
        before = torch.cat([before, x[:, :-1]], dim=1)
        if attention_mask is not None and attention_mask.dim() == 2:  # (B, past + T): 0 where padding
            keep = attention_mask[:, -x.shape[1] - 1:-1] if attention_mask.shape[1] > x.shape[1] else \
                torch.cat([attention_mask[:, :1], attention_mask[:, :-1]], dim=1)
            before = before * keep[..., None].to(before.dtype)
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        return x + gate * before

    @merge_with_config_defaults  # use_cache from the config, as NanoChatModel.forward
    @capture_outputs             # output_hidden_states, output_attentions, return_dict, as NanoChatModel.forward
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, previous_ids=None, **kwargs) -> BaseModelOutputWithPast:
        c = self.config
        if input_ids is None:
            raise ValueError("this model needs input_ids (its value embeddings and smear read the tokens), "
                             "not inputs_embeds")
        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        if use_cache and cache is None:
            cache = DynamicCache(config=c)
        past_seen = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device) + past_seen).unsqueeze(0)
        x = self.norm(self.embed_tokens(input_ids))
        masks = attention_mask
        if not isinstance(masks, dict):  # generate() may have built them already
            mask_args = dict(config=c, inputs_embeds=x, attention_mask=attention_mask, cache=cache,
                             position_ids=position_ids)
            masks = {"full_attention": create_causal_mask(**mask_args)}
            if "sliding_attention" in c.layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
        position_embeddings = self.rotary_emb(x, position_ids=position_ids)
        if c.smear:
            x = self.smear(x, previous_ids, attention_mask, past_seen)
        x0, x_mid = x, None
        for i, layer in enumerate(self.layers):
            if c.layer_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            value_embed = self.value_embeds[str(i)](input_ids) if c.has_value_embed(i) else None
            x = layer(x, attention_mask=masks[c.layer_types[i]], position_embeddings=position_embeddings,
                      position_ids=position_ids, cache=cache, value_embed=value_embed, **kwargs)
            if c.backout and i == c.num_hidden_layers // 2:
                x_mid = x
        if c.backout:  # the middle layer's low-level features taken back out before the head
            x = x - self.backout_lambda * x_mid
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache if use_cache else None)


class NanoschnackForCausalLM(NanoschnackPreTrainedModel, NanoChatForCausalLM):
    def __init__(self, config: NanoschnackConfig):
        NanoschnackPreTrainedModel.__init__(self, config)
        self.model = NanoschnackModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """generate()'s inputs, plus the token before the new ones for the smear (previous_ids)."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new = inputs.get("input_ids")
        if self.config.smear and new is not None and new.shape[1] < input_ids.shape[1]:
            inputs["previous_ids"] = input_ids[:, -new.shape[1] - 1:-new.shape[1]]
        return inputs


__all__ = ["NanoschnackConfig", "NanoschnackModel", "NanoschnackForCausalLM"]
