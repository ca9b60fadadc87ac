"""BERT pretraining model: parameter counts, head shapes, masked-only MLM logits, padding mask."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from batchlab.models import BERT_BASE, BERT_LARGE, BERT_TINY, BertConfig, BertForPreTraining

BATCH, SEQ, NUM_MASKED, VOCAB = 2, 16, 3, 97


def _dummy_inputs(batch=1, seq=8, num_masked=2):
    ids = jnp.zeros((batch, seq), jnp.int32)
    return ids, ids, jnp.ones_like(ids), jnp.zeros((batch, num_masked), jnp.int32)


def _abstract_params(config):
    model = BertForPreTraining(config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *_dummy_inputs(), False))["params"]


def _num_params(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _encoder_params(c: BertConfig) -> int:
    """Embeddings + layers + pooler, from the architecture of Devlin et al. 2018."""
    h, f = c.hidden_size, c.intermediate_size
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h
    attention = 4 * (h * h + h)  # query, key, value, output projections
    feed_forward = (h * f + f) + (f * h + h)
    layer = attention + feed_forward + 2 * (2 * h)  # two LayerNorms
    pooler = h * h + h
    return embeddings + c.num_layers * layer + pooler


def _pretraining_params(c: BertConfig) -> int:
    h = c.hidden_size
    mlm_head = (h * h + h) + 2 * h + c.vocab_size  # transform, LayerNorm, output bias (tied kernel)
    nsp_head = 2 * h + 2
    return _encoder_params(c) + mlm_head + nsp_head


@pytest.mark.parametrize(
    "name,config,published_encoder",
    [
        # bert-large-uncased / bert-base-uncased encoders with pooler, as commonly reported
        # (the paper's "BERT-Large", about 335M without and 336M with the pretraining heads).
        ("bert_large", BERT_LARGE, 335_141_888),
        ("bert_base", BERT_BASE, 109_482_240),
        ("bert_tiny", BERT_TINY, None),
    ],
)
def test_parameter_count(name, config, published_encoder):
    params = _abstract_params(config)
    assert _num_params(params) == _pretraining_params(config), name
    assert _num_params(params["bert"]) == _encoder_params(config), name
    if published_encoder is not None:
        assert _encoder_params(config) == published_encoder


def test_mlm_output_is_tied_to_the_word_embeddings():
    config = dataclasses.replace(BERT_TINY, vocab_size=VOCAB)
    params = traverse_util.flatten_dict(_abstract_params(config), sep="/")
    with_vocab_axis = sorted(p for p, leaf in params.items() if VOCAB in leaf.shape)
    assert with_vocab_axis == ["bert/embeddings/word_embeddings/embedding", "mlm_output_bias"]


@pytest.fixture(scope="module")
def tiny():
    config = dataclasses.replace(BERT_TINY, vocab_size=VOCAB)
    model = BertForPreTraining(config)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
    segments = jnp.asarray(np.repeat([[0] * 9 + [1] * 7], BATCH, axis=0), jnp.int32)
    mask = jnp.ones((BATCH, SEQ), jnp.int32)
    positions = jnp.asarray([[1, 4, 7], [2, 3, 9]], jnp.int32)
    variables = jax.jit(lambda k: model.init(k, ids, segments, mask, positions, False))(
        jax.random.key(0, impl="rbg")
    )  # rbg: compiles faster than threefry on CPU
    forward = jax.jit(lambda v, i, s, m, p: model.apply(v, i, s, m, p, False))
    return dict(
        model=model,
        variables=variables,
        forward=forward,
        ids=ids,
        segments=segments,
        mask=mask,
        positions=positions,
    )


def test_forward_shapes(tiny):
    mlm, nsp = tiny["forward"](
        tiny["variables"], tiny["ids"], tiny["segments"], tiny["mask"], tiny["positions"]
    )
    assert mlm.shape == (BATCH, NUM_MASKED, VOCAB)
    assert nsp.shape == (BATCH, 2)
    assert mlm.dtype == nsp.dtype == jnp.float32
    assert np.isfinite(mlm).all() and np.isfinite(nsp).all()


def test_mlm_logits_are_the_full_logits_at_the_masked_positions(tiny):
    args = (tiny["variables"], tiny["ids"], tiny["segments"], tiny["mask"])
    mlm, nsp = tiny["forward"](*args, tiny["positions"])
    every_position = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))
    full, nsp_full = tiny["forward"](*args, every_position)
    want = np.take_along_axis(np.asarray(full), np.asarray(tiny["positions"])[..., None], axis=1)
    np.testing.assert_allclose(mlm, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nsp, nsp_full, rtol=1e-5, atol=1e-5)


def _all_avals(jaxpr):
    """Every intermediate value of a jaxpr, sub-jaxprs (pjit, custom_jvp, ...) included."""
    for eqn in jaxpr.eqns:
        yield from (var.aval for var in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_avals(inner)


def test_vocabulary_projection_only_runs_on_masked_positions(tiny):
    jaxpr = jax.make_jaxpr(
        lambda v: tiny["model"].apply(
            v, tiny["ids"], tiny["segments"], tiny["mask"], tiny["positions"], False
        )
    )(tiny["variables"]).jaxpr
    shapes = {tuple(aval.shape) for aval in _all_avals(jaxpr) if hasattr(aval, "shape")}
    assert (BATCH, NUM_MASKED, VOCAB) in shapes
    assert not any(len(s) == 3 and s[1] == SEQ and s[2] == VOCAB for s in shapes)


def test_padding_mask_hides_padded_tokens(tiny):
    real = 10
    padded_mask = jnp.asarray(np.arange(SEQ) < real, jnp.int32)[None].repeat(BATCH, axis=0)
    other_ids = tiny["ids"].at[:, real:].set((tiny["ids"][:, real:] + 1) % VOCAB)
    args = (tiny["segments"],)
    v, f, pos = tiny["variables"], tiny["forward"], tiny["positions"]

    # With padding masked out, what sits in the padding cannot change any real position.
    a = f(v, tiny["ids"], *args, padded_mask, pos)
    b = f(v, other_ids, *args, padded_mask, pos)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    # Without the mask the same change leaks into every position: the mask is what prevents it.
    c = f(v, tiny["ids"], *args, tiny["mask"], pos)
    d = f(v, other_ids, *args, tiny["mask"], pos)
    assert np.abs(np.asarray(c[0]) - np.asarray(d[0])).max() > 1e-4
    assert np.abs(np.asarray(c[1]) - np.asarray(d[1])).max() > 1e-6


def test_dropout_is_active_only_in_training(tiny):
    model, v = tiny["model"], tiny["variables"]
    inputs = (tiny["ids"], tiny["segments"], tiny["mask"], tiny["positions"])
    train = jax.jit(lambda key: model.apply(v, *inputs, True, rngs={"dropout": key})[0])
    first, again, other = (train(jax.random.key(s, impl="rbg")) for s in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert np.abs(np.asarray(first) - np.asarray(other)).max() > 1e-4
    eval_logits = tiny["forward"](v, *inputs)[0]
    assert np.abs(np.asarray(first) - np.asarray(eval_logits)).max() > 1e-4


def test_bfloat16_forward(tiny):
    model = BertForPreTraining(dataclasses.replace(tiny["model"].config, dtype=jnp.bfloat16))
    inputs = (tiny["ids"], tiny["segments"], tiny["mask"], tiny["positions"])
    mlm, nsp = jax.jit(lambda v: model.apply(v, *inputs, False))(tiny["variables"])
    mlm_f32, _ = tiny["forward"](tiny["variables"], *inputs)
    assert mlm.dtype == nsp.dtype == jnp.float32
    assert mlm.shape == (BATCH, NUM_MASKED, VOCAB)
    assert np.isfinite(mlm).all() and np.isfinite(nsp).all()
    np.testing.assert_allclose(mlm, mlm_f32, atol=0.05 * np.abs(mlm_f32).max())


def test_sequence_longer_than_position_table_is_rejected():
    config = dataclasses.replace(BERT_TINY, vocab_size=VOCAB, max_position_embeddings=4)
    model = BertForPreTraining(config)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), *_dummy_inputs(seq=8), False))


def test_heads_must_divide_hidden_size():
    with pytest.raises(ValueError, match="num_heads"):
        BertConfig(hidden_size=100, num_heads=3)
