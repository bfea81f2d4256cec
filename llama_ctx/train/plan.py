"""`llama-ctx plan`: per-GPU memory of a fine-tuning config, per sharding strategy, before renting the GPUs.

Every term is a count of bytes the step keeps alive, written out so it can be checked (tests/test_train_plan.py
compares the total with the measured peak of a tiny CPU run). Notation: T = seq_len, b = micro-batch, L layers,
H hidden, I MLP width, kvd = key/value width, nh heads, hd head width, V vocabulary, a = bytes of the compute dtype.

Activations saved for backward, per token and layer (counted on transformers 5 LLaMA layers with PEFT LoRA, using
`torch.autograd.graph.saved_tensors_hooks`): each RMSNorm keeps its float32 input, 1/rms and the normalised output
(4H + 4 + aH); LoRA keeps its float32 input (4H, shared by q/k/v in float32 models, once per target otherwise, and
for o), with dropout also each target's dropout output and mask, and its rank-r output; RoPE keeps cos and sin
(2a·hd); the attention kernel keeps q, k, v, output and log-sum-exp (a(2H + 2kvd) + 4nh); eager attention keeps q,
repeated k and v, its output and the probabilities instead (4aH + (4 [+a]) nh·K for K keys per query: T, or the S2
group G); the SwiGLU MLP keeps three I-wide tensors (3aI).
On packed rows without S2, sdpa converts the boolean (T x T) mask into a float bias in every layer and keeps it for
backward (aT per token and layer): at long lengths packed full attention needs flash-attention 2 (varlen, no mask).
Frozen projections keep nothing (no weight gradient). With activation checkpointing only each layer's input (aH) is
kept, and one layer is recomputed at a time in backward. Once per step, not per layer: transformers' (T x T) mask of
packed rows (bool for sdpa) and S2-attn's float (G x G) mask per window, plain and shifted (2aG per token); the
loss chunk's logits. `step_terms` says how these add up to the peak.

Not counted: the CUDA context and allocator fragmentation (`reserve`, 2 GiB + 5%), temporary buffers of kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import checkpointing_name

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOSS_CHUNK = 4096  # positions per chunk of the output layer (llama_ctx.train.trainer.LongContextTrainer)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# architectures of the recipes' hub models, for planning without a download (public config.json values)
KNOWN_ARCHITECTURES = {
    "meta-llama/Llama-2-7b-hf": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                     max_position_embeddings=4096, tie_word_embeddings=False),
    "meta-llama/Llama-2-13b-hf": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                                      max_position_embeddings=4096, tie_word_embeddings=False),
}
STRATEGIES = ("ddp", "fsdp2", "zero3")


@dataclass
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, c) -> "Arch":
        get = c.get if isinstance(c, dict) else lambda k, d=None: getattr(c, k, d)
        return cls(get("hidden_size"), get("intermediate_size"), get("num_hidden_layers"), get("num_attention_heads"),
                   get("num_key_value_heads") or get("num_attention_heads"), get("vocab_size"),
                   bool(get("tie_word_embeddings", False)))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kvd(self) -> int:
        return self.kv_heads * self.head_dim

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection."""
        H, M, kvd = self.hidden, self.intermediate, self.kvd
        return {"q_proj": (H, H), "k_proj": (H, kvd), "v_proj": (H, kvd), "o_proj": (H, H), "gate_proj": (H, M),
                "up_proj": (H, M), "down_proj": (M, H)}

    def params(self) -> int:
        layer = sum(i * o for i, o in self.shapes().values()) + 2 * self.hidden
        return self.layers * layer + self.hidden + self.vocab * self.hidden * (1 if self.tied else 2)


@dataclass
class Setup:
    """What the estimate depends on (all read from a training config by `plan_config`)."""

    arch: Arch
    seq_len: int
    micro_batch: int = 1
    weight_dtype: str = "bfloat16"
    mixed_bf16: bool = False  # bf16 autocast over float32 weights
    checkpointing: bool = True
    s2_group: int | None = None  # S2-attn group size, None: full attention
    attention: str = "kernel"  # "kernel" (sdpa flash / memory-efficient, flash-attention 2) or "eager"
    packed_mask: bool = True  # sdpa/eager build a (T x T) mask for packed rows
    packed: bool = True  # rows hold several documents (the worst case, and what packing usually gives)
    lora_r: int = 8
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: bool = False
    trainable: tuple = ("embed_tokens", "norm")
    loss_chunk: int = LOSS_CHUNK


@dataclass
class Plan:
    setup: Setup
    gpus: int
    gpu_memory_gib: float
    rows: dict[str, dict[str, float]] = field(default_factory=dict)  # strategy -> term -> bytes

    def total(self, strategy: str) -> float:
        return sum(self.rows[strategy].values())

    def fits(self, strategy: str) -> bool:
        return self.total(strategy) <= self.gpu_memory_gib * GiB


def trainable_params(s: Setup) -> tuple[int, int]:
    """(LoRA parameters, fully trained parameters) of the recipe."""
    a = s.arch
    lora = a.layers * sum(s.lora_r * (i + o) for name, (i, o) in a.shapes().items() if name in s.lora_targets)
    full = 0
    for name in s.trainable:
        if name in ("embed_tokens", "embed"):
            full += a.vocab * a.hidden
        elif name == "norm":  # matches every RMSNorm by suffix
            full += (2 * a.layers + 1) * a.hidden
        elif name == "lm_head" and not a.tied:
            full += a.vocab * a.hidden
    return lora, full


def activation_bytes_per_token_layer(s: Setup) -> float:
    """Bytes saved for backward per token and decoder layer without checkpointing (see the module docstring)."""
    a = s.arch
    x = 4 if s.weight_dtype == "float32" and not s.mixed_bf16 else 2
    H, M, kvd, nh, hd = a.hidden, a.intermediate, a.kvd, a.heads, a.head_dim
    norms = 2 * (4 * H + 4 + x * H)
    qkv = [t for t in s.lora_targets if t in ("q_proj", "k_proj", "v_proj")]
    lora = 4 * s.lora_r * len(s.lora_targets)
    copy = 4 * H * ((len(qkv) if x < 4 else 0) + ("o_proj" in s.lora_targets))
    if s.lora_dropout:  # each target's dropout output and its mask (float on CPU, measured; bool on CUDA)
        copy += 8 * H * len(qkv) + 4 * H * ("o_proj" in s.lora_targets) - (4 * H * len(qkv) if x < 4 else 0)
    mlp_lora = sum(4 * a.shapes()[t][0] for t in s.lora_targets if t in ("gate_proj", "up_proj", "down_proj"))
    rope = 2 * x * hd
    keys = s.s2_group or s.seq_len
    if s.attention == "eager":
        attn = 4 * x * H + (4 + (x if x < 4 else 0)) * nh * keys
    else:
        attn = x * (2 * H + 2 * kvd) + 4 * nh
        if s.s2_group is None and s.packed and s.packed_mask:
            # sdpa turns the boolean (T x T) mask into a float bias on every call, and its backward keeps it
            attn += x * s.seq_len
    return norms + lora + copy + mlp_lora + rope + attn + 3 * x * M


def step_terms(s: Setup) -> dict[str, float]:
    """Bytes of one micro-batch's forward + backward, by term; the step's peak is `step_peak(terms)`.

    Saved activations live from their layer's forward to its backward. The loss chunk exists at the end of the
    forward, the recomputed layer (checkpointing) and the gradients of the residual stream in backward: the peak
    holds the larger of the two. Eager attention also holds two more score-sized buffers of the current layer
    (scores, scores + mask) while its probabilities are computed. The masks (the model's packed-row mask, S2-attn's
    per-window masks, shared by all layers) live through the whole step.
    """
    a = s.arch
    x = 4 if s.weight_dtype == "float32" and not s.mixed_bf16 else 2
    tokens = s.micro_batch * s.seq_len
    per_layer = activation_bytes_per_token_layer(s) * tokens
    saved = a.layers * x * a.hidden * tokens if s.checkpointing else a.layers * per_layer
    keys = s.s2_group or s.seq_len
    eager_scores = 2 * 4 * a.heads * keys * tokens if s.attention == "eager" else 0
    backward = (per_layer if s.checkpointing else 0) + 2 * x * a.hidden * tokens + eager_scores
    loss = min(s.loss_chunk, tokens) * a.vocab * (x + 4 + 4) + eager_scores  # logits, float32 copy, gradient
    mask = s.micro_batch * s.seq_len**2 * (1 if s.attention == "kernel" else x) if s.packed_mask and s.packed else 0
    # float (G x G) per window, plain and shifted; without document boundaries sdpa's causal kernel needs none
    s2_masks = 2 * x * s.s2_group * tokens if s.s2_group and (s.packed or s.attention == "eager") else 0
    return {"activations saved" + (" (layer inputs)" if s.checkpointing else ""): saved,
            "transient: max(loss chunk, layer bwd)": max(loss, backward),
            "attention mask (packed rows, T x T)": mask, "S2-attn window masks": s2_masks}


def plan(s: Setup, gpus: int = 8, gpu_memory_gib: float = 80.0) -> Plan:
    """Per-GPU bytes of each term for every strategy in `STRATEGIES`."""
    a = s.arch
    w = DTYPE_BYTES[s.weight_dtype]
    lora, full = trainable_params(s)
    lora_bytes = 4  # PEFT keeps adapter weights in float32 whatever the base dtype (autocast_adapter_dtype)
    out = Plan(s, gpus, gpu_memory_gib)
    for strategy in STRATEGIES:
        shard = gpus if strategy != "ddp" else 1
        trainable = lora * lora_bytes + full * w
        rows = {
            "weights (frozen base)": a.params() * w / shard,
            "trainable (LoRA + full modules)": trainable / shard,
            "gradients": trainable / shard,
            "optimizer (AdamW, 2 states)": 2 * trainable / shard,
        }
        if strategy == "zero3":  # float32 master weights and states for what trains in 16-bit
            rows["ZeRO-3 fp32 master + states"] = full * (12 - 2 * w) / shard if w < 4 else 0.0
        if shard > 1:  # one layer gathered (plus one prefetched), and the root's embeddings / output layer
            layer = (a.params() - a.vocab * a.hidden * (1 if a.tied else 2)) / a.layers
            rows["gathered parameters"] = (2 * layer + a.vocab * a.hidden * (1 if a.tied else 2)) * w
        rows.update(step_terms(s))
        rows["reserve (CUDA context, fragmentation)"] = 2 * GiB + 0.05 * sum(rows.values())
        out.rows[strategy] = rows
    return out


def setup_from_config(config, model_config) -> Setup:
    tr = config.training
    return Setup(
        arch=Arch.from_config(model_config), seq_len=config.context.seq_len,
        micro_batch=int(tr.get("per_device_train_batch_size", 8)), weight_dtype=config.model.dtype,
        mixed_bf16=bool(tr.get("bf16")) and config.model.dtype == "float32",
        checkpointing=bool(tr.get(checkpointing_name())),
        s2_group=int(config.context.seq_len * config.s2_attn.group_size_ratio) if config.s2_attn.enabled else None,
        attention="eager" if config.model.attn_implementation == "eager" else "kernel",
        packed_mask=config.model.attn_implementation in ("sdpa", "eager"),
        lora_r=config.lora.r, lora_targets=tuple(config.lora.target_modules), lora_dropout=config.lora.dropout > 0,
        trainable=tuple(config.lora.trainable))


def plan_config(path, overrides=(), gpus: int = 8, gpu_memory_gib: float = 80.0) -> Plan:
    """The plan of a training YAML; the model's config.json is read (or a known architecture), never its weights."""
    from ..errors import ConfigError
    from .builtin import resolve_model_path
    from .checks import model_config
    from .config import load_config

    config = load_config(path, list(overrides))
    if config.model.path in KNOWN_ARCHITECTURES:
        try:
            cfg = model_config(config.model.path, config.model.gguf_file)
        except ConfigError:  # not downloaded: the published architecture is enough
            cfg = KNOWN_ARCHITECTURES[config.model.path]
    else:
        cfg = model_config(*resolve_model_path(config.model.path, config.model.gguf_file))
    return plan(setup_from_config(config, cfg), gpus, gpu_memory_gib)


def format_plan(p: Plan) -> str:
    s = p.setup
    head = (f"per-GPU memory, {p.gpus} GPUs x {p.gpu_memory_gib:g} GiB: seq_len {s.seq_len}, micro-batch "
            f"{s.micro_batch}, {s.weight_dtype}{' + bf16 autocast' if s.mixed_bf16 else ''}, checkpointing "
            f"{'on' if s.checkpointing else 'off'}, {'S2-attn G=' + str(s.s2_group) if s.s2_group else 'full attn'}"
            f" ({s.attention}), LoRA r={s.lora_r} + {', '.join(s.trainable) or 'nothing'} trained")
    terms = list(dict.fromkeys(t for st in ("zero3", "fsdp2", "ddp") for t in p.rows[st]))
    terms.sort(key=lambda t: t.startswith("reserve"))
    lines = [head, f"{'GiB':<40}" + "".join(f"{st:>10}" for st in STRATEGIES)]
    for t in terms:
        lines.append(f"{t:<40}" + "".join(f"{p.rows[st].get(t, 0) / GiB:>10.2f}" for st in STRATEGIES))
    lines.append(f"{'total':<40}" + "".join(f"{p.total(st) / GiB:>10.2f}" for st in STRATEGIES))
    lines.append(f"{'fits':<40}" + "".join(f"{'yes' if p.fits(st) else 'NO':>10}" for st in STRATEGIES))
    return "\n".join(lines)


__all__ = ["Arch", "Setup", "Plan", "plan", "plan_config", "format_plan", "activation_bytes_per_token_layer"]
