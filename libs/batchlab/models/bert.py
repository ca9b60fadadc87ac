"""BERT encoder with masked-LM and next-sentence heads, as in the original (post-LN) BERT.

Parameter paths are fixed by explicit names: ``bert/embeddings/{word_embeddings, ...}``,
``bert/layers_{i}/{attention, attention_layer_norm, intermediate, output, output_layer_norm}``,
``bert/pooler``, ``mlm_transform``, ``mlm_layer_norm``, ``mlm_output_bias``, ``nsp_classifier``.

References:
  Nado et al. 2021, "A Large Batch Optimizer Reality Check", Section 3 (BERT-Large pretraining
  with Adam versus LAMB).
  Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers for Language
  Understanding" (architecture, initialisation, GELU, post-LN, tied MLM output embedding).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Sizes and regularisation of a BERT model.

    Attributes:
      vocab_size: word-piece vocabulary size.
      hidden_size: model width.
      num_layers: transformer layers.
      num_heads: attention heads; must divide hidden_size.
      intermediate_size: width of the feed-forward layer.
      max_position_embeddings: longest sequence the position table covers.
      type_vocab_size: number of segment ids (2 for sentence A/B).
      dropout_rate: dropout on embeddings and on every residual branch.
      attention_dropout_rate: dropout on the attention probabilities.
      initializer_range: stddev of the truncated-normal initialiser.
      layer_norm_epsilon: LayerNorm epsilon (1e-12 in the original BERT).
      dtype: compute dtype; parameters stay float32.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    initializer_range: float = 0.02
    layer_norm_epsilon: float = 1e-12
    dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}"
            )


BERT_LARGE = BertConfig(
    vocab_size=30522,
    hidden_size=1024,
    num_layers=24,
    num_heads=16,
    intermediate_size=4096,
    max_position_embeddings=512,
)
BERT_BASE = BertConfig(
    vocab_size=30522,
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
)
# CPU-sized: 2 layers of width 128 (the "BERT-Tiny" of Turc et al. 2019) on a small vocabulary.
BERT_TINY = BertConfig(
    vocab_size=8192,
    hidden_size=128,
    num_layers=2,
    num_heads=2,
    intermediate_size=512,
    max_position_embeddings=512,
)


def _init(config: BertConfig) -> nn.initializers.Initializer:
    # BERT's tf.truncated_normal_initializer(stddev=initializer_range): truncation at 2 stddev.
    return nn.initializers.truncated_normal(stddev=config.initializer_range)


def _dense(config: BertConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=_init(config), dtype=config.dtype, name=name)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=config.dtype, name=name)


def _gelu(x: jax.Array) -> jax.Array:
    # The original BERT uses the exact erf GELU, not the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


class BertEmbeddings(nn.Module):
    """Word + position + segment embeddings, then LayerNorm and dropout.

    Attributes:
      config: model sizes.
    """

    config: BertConfig

    def setup(self) -> None:
        cfg = self.config
        self.word_embeddings = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, embedding_init=_init(cfg), dtype=cfg.dtype
        )
        self.position_embeddings = nn.Embed(
            cfg.max_position_embeddings, cfg.hidden_size, embedding_init=_init(cfg), dtype=cfg.dtype
        )
        self.token_type_embeddings = nn.Embed(
            cfg.type_vocab_size, cfg.hidden_size, embedding_init=_init(cfg), dtype=cfg.dtype
        )
        self.layer_norm = _layer_norm(cfg, "layer_norm")
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, train: bool) -> jax.Array:
        """Embeds (batch, seq) token ids into (batch, seq, hidden)."""
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        x = self.word_embeddings(input_ids)
        x = x + self.position_embeddings(jnp.arange(seq_len))[None]
        x = x + self.token_type_embeddings(segment_ids)
        x = self.layer_norm(x)
        embedded: jax.Array = self.dropout(x, deterministic=not train)
        return embedded

    def attend(self, x: jax.Array) -> jax.Array:
        """Projects hidden states onto the vocabulary with the word embedding matrix (tied)."""
        return self.word_embeddings.attend(x)


class BertSelfAttention(nn.Module):
    """Multi-head self attention with a padding mask and output projection.

    Attributes:
      config: model sizes.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, attention_bias: jax.Array, train: bool) -> jax.Array:
        """Attends over (batch, seq, hidden); attention_bias broadcasts to (batch, heads, q, k)."""
        cfg = self.config
        batch, seq_len, hidden = x.shape
        head_dim = hidden // cfg.num_heads

        def heads(name: str) -> jax.Array:
            # 2-D kernels as in the original checkpoints; per-leaf norms (LARS/LAMB) are unchanged.
            y = _dense(cfg, hidden, name)(x)
            return y.reshape(batch, seq_len, cfg.num_heads, head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
        # Softmax in float32: bfloat16 logits plus a large negative mask overflow easily.
        probs = jax.nn.softmax(scores.astype(jnp.float32) + attention_bias, axis=-1)
        probs = nn.Dropout(cfg.attention_dropout_rate)(probs, deterministic=not train)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(cfg.dtype), v)
        context = context.reshape(batch, seq_len, hidden)
        return _dense(cfg, hidden, "output")(context)


class BertLayer(nn.Module):
    """One post-LN transformer layer: x = LN(x + attn(x)); x = LN(x + FFN(x)).

    Attributes:
      config: model sizes.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, attention_bias: jax.Array, train: bool) -> jax.Array:
        """Maps (batch, seq, hidden) to the same shape."""
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate)
        y = BertSelfAttention(cfg, name="attention")(x, attention_bias, train)
        x = _layer_norm(cfg, "attention_layer_norm")(x + drop(y, deterministic=not train))
        y = _gelu(_dense(cfg, cfg.intermediate_size, "intermediate")(x))
        y = _dense(cfg, cfg.hidden_size, "output")(y)
        out: jax.Array = _layer_norm(cfg, "output_layer_norm")(x + drop(y, deterministic=not train))
        return out


class BertModel(nn.Module):
    """The BERT encoder: embeddings, transformer layers and the tanh pooler on [CLS].

    Attributes:
      config: model sizes.
    """

    config: BertConfig

    def setup(self) -> None:
        cfg = self.config
        self.embeddings = BertEmbeddings(cfg)
        self.layers = [BertLayer(cfg) for _ in range(cfg.num_layers)]
        self.pooler = nn.Dense(cfg.hidden_size, kernel_init=_init(cfg), dtype=cfg.dtype)

    def __call__(
        self, input_ids: jax.Array, segment_ids: jax.Array, input_mask: jax.Array, train: bool
    ) -> tuple[jax.Array, jax.Array]:
        """Encodes a batch of token sequences.

        Args:
          input_ids: (batch, seq) int token ids.
          segment_ids: (batch, seq) int segment (sentence A/B) ids.
          input_mask: (batch, seq), 1 for real tokens and 0 for padding; padded keys get no
            attention.
          train: enable dropout (needs a 'dropout' rng).

        Returns:
          sequence_output (batch, seq, hidden) and pooled_output (batch, hidden).
        """
        x = self.embeddings(input_ids, segment_ids, train)
        # Additive bias rather than a boolean mask so that one softmax serves every layer.
        keep = input_mask.astype(bool)[:, None, None, :]
        attention_bias = jnp.where(keep, 0.0, -1e9).astype(jnp.float32)
        for layer in self.layers:
            x = layer(x, attention_bias, train)
        pooled = jnp.tanh(self.pooler(x[:, 0]))
        return x, pooled

    def attend(self, x: jax.Array) -> jax.Array:
        """Projects hidden states onto the vocabulary with the tied word embeddings."""
        return self.embeddings.attend(x)


class BertForPreTraining(nn.Module):
    """BERT with the masked-LM and next-sentence-prediction pretraining heads.

    The MLM head runs only on the hidden states gathered at ``masked_positions``: projecting every
    position onto a 30k vocabulary would dominate the step for nothing.

    Attributes:
      config: model sizes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = BertForPreTraining(BertConfig(vocab_size=64, hidden_size=16, num_layers=1,
      ...                                       num_heads=2, intermediate_size=32))
      >>> ids = jnp.zeros((2, 8), jnp.int32)
      >>> pos = jnp.zeros((2, 3), jnp.int32)
      >>> variables = model.init(jax.random.key(0), ids, ids, jnp.ones_like(ids), pos, False)
      >>> mlm, nsp = model.apply(variables, ids, ids, jnp.ones_like(ids), pos, False)
      >>> mlm.shape, nsp.shape
      ((2, 3, 64), (2, 2))

    References:
      Devlin et al. 2018; Nado et al. 2021, Section 3.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array,
        input_mask: jax.Array,
        masked_positions: jax.Array,
        train: bool,
    ) -> tuple[jax.Array, jax.Array]:
        """Computes the pretraining logits.

        Args:
          input_ids: (batch, seq) int token ids.
          segment_ids: (batch, seq) int segment ids.
          input_mask: (batch, seq), 1 for real tokens, 0 for padding.
          masked_positions: (batch, num_masked) int indices into seq of the masked tokens.
          train: enable dropout (needs a 'dropout' rng).

        Returns:
          mlm_logits (batch, num_masked, vocab_size) and nsp_logits (batch, 2), both float32.
        """
        cfg = self.config
        bert = BertModel(cfg, name="bert")
        sequence_output, pooled = bert(input_ids, segment_ids, input_mask, train)

        gathered = jnp.take_along_axis(sequence_output, masked_positions[..., None], axis=1)
        h = _gelu(_dense(cfg, cfg.hidden_size, "mlm_transform")(gathered))
        h = _layer_norm(cfg, "mlm_layer_norm")(h)
        output_bias = self.param(
            "mlm_output_bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32
        )
        mlm_logits = bert.attend(h).astype(jnp.float32) + output_bias

        nsp_logits = _dense(cfg, 2, "nsp_classifier")(pooled).astype(jnp.float32)
        return mlm_logits, nsp_logits
