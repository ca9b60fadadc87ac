"""ResNet v1.5 family: parameter counts, stable names, gamma_0 placement, train/eval steps, bf16."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from batchlab.models import ResNet1D, ResNet18, ResNet20, ResNet34, ResNet50


def _abstract_variables(model, input_shape):
    """Variable shapes without allocating or computing anything."""
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(input_shape), train=False)
    )


def _fast_key(seed):
    # XLA on CPU compiles one threefry hash per parameter slowly (about 3x the 'rbg' time); the
    # generator does not matter to these tests, only the compile time does.
    return jax.random.key(seed, impl="rbg")


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def _num_params(params):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


# Published counts (torchvision's resnet18/34/50 have the same v1.5 layout: bias-free convs,
# 1x1 projection + BN shortcuts, 1000-way head). ResNet-20 with projection shortcuts:
# 269,722 for He et al.'s zero-padding variant plus two projections (16*32 + 2*32) + (32*64 + 2*64).
PARAM_COUNTS = [
    ("resnet50", ResNet50, (1, 224, 224, 3), 25_557_032),
    ("resnet34", ResNet34, (1, 224, 224, 3), 21_797_672),
    ("resnet18", ResNet18, (1, 224, 224, 3), 11_689_512),
    ("resnet20", ResNet20, (1, 32, 32, 3), 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)),
]


@pytest.mark.parametrize("name,model_fn,input_shape,expected", PARAM_COUNTS)
def test_parameter_count(name, model_fn, input_shape, expected):
    variables = _abstract_variables(model_fn(), input_shape)
    assert _num_params(variables["params"]) == expected, name


def test_resnet50_leaf_ranks_are_what_param_groups_rely_on():
    params = _flat(_abstract_variables(ResNet50(), (1, 224, 224, 3))["params"])
    matrices = {path: leaf for path, leaf in params.items() if len(leaf.shape) > 1}
    vectors = {path: leaf for path, leaf in params.items() if len(leaf.shape) == 1}
    assert len(params) == 161
    assert len(matrices) == 54  # 53 convolutions + the head
    assert len(vectors) == 107  # 53 batch norms x (scale, bias) + the head bias
    assert all(path.endswith("/kernel") for path in matrices)
    bn_vectors = [p for p in vectors if re.search(r"(^|/)(bn\d|bn_init|proj_bn)/(scale|bias)$", p)]
    assert len(bn_vectors) == 106
    assert set(vectors) - set(bn_vectors) == {"head/bias"}
    # Convolutions carry no bias: the only Dense-style bias is the head's.
    assert not any(re.search(r"conv[^/]*/bias$", p) for p in params)


def test_resnet50_names_are_explicit_and_deterministic():
    params = _abstract_variables(ResNet50(), (1, 64, 64, 3))["params"]
    stages = {"stage1": 3, "stage2": 4, "stage3": 6, "stage4": 3}
    blocks = [f"{s}_block{j}" for s, n in stages.items() for j in range(1, n + 1)]
    assert set(params) == {"conv_init", "bn_init", "head", *blocks}
    inner = {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3"}
    for block in blocks:
        projection = {"proj_conv", "proj_bn"} if block.endswith("_block1") else set()
        assert set(params[block]) == inner | projection, block


def test_resnet50_is_v1_5_with_the_stride_on_the_3x3_conv():
    model = ResNet50()
    variables = _abstract_variables(model, (1, 64, 64, 3))
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v,
            jnp.zeros((1, 64, 64, 3)),
            train=False,
            capture_intermediates=True,
            mutable=["intermediates"],
        ),
        variables,
    )
    block = state["intermediates"]["stage2_block1"]
    # Input to stage 2 is 16x16 (64 / 2 conv / 2 pool).
    assert block["conv1"]["__call__"][0].shape[1:3] == (16, 16)
    assert block["conv2"]["__call__"][0].shape[1:3] == (8, 8)
    assert block["proj_conv"]["__call__"][0].shape[1:3] == (8, 8)


GAMMA_CASES = [
    # (name, model_fn, input_shape, last BN of a block, number of blocks)
    ("resnet50", ResNet50, (1, 32, 32, 3), "bn3", 16),
    ("resnet18", ResNet18, (1, 32, 32, 3), "bn2", 8),
    ("resnet20", ResNet20, (1, 8, 8, 3), "bn2", 9),
    ("resnet1d", ResNet1D, (1, 40), "bn2", 3),
]


@pytest.mark.parametrize("gamma_0", [0.0, 0.4138])
@pytest.mark.parametrize("name,model_fn,input_shape,last_bn,num_blocks", GAMMA_CASES)
def test_gamma_0_initialises_exactly_the_last_bn_of_each_block(
    name, model_fn, input_shape, last_bn, num_blocks, gamma_0
):
    model = model_fn(gamma_0=gamma_0)

    @jax.jit
    def vectors(key):
        # Returning only the rank-1 leaves lets XLA drop the kernels' initialisation: fast.
        params = model.init(key, jnp.zeros(input_shape), train=False)["params"]
        return {p: v for p, v in _flat(params).items() if v.ndim == 1}

    leaves = vectors(jax.random.key(0))
    last_scale = re.compile(rf"^stage\d+_block\d+/{last_bn}/scale$")
    gamma_paths = [p for p in leaves if last_scale.match(p)]
    assert len(gamma_paths) == num_blocks, name
    for path, value in leaves.items():
        if last_scale.match(path):
            np.testing.assert_array_equal(value, np.float32(gamma_0), err_msg=path)
        elif path.endswith("/scale"):
            np.testing.assert_array_equal(value, 1.0, err_msg=path)
        else:
            np.testing.assert_array_equal(value, 0.0, err_msg=path)


# Small models trained for one step on tiny inputs; virtual batches of 4 in a batch of 8.
TRAIN_CASES = {
    "resnet20": (functools.partial(ResNet20, virtual_batch_size=4), (8, 8, 8, 3)),
    "resnet1d": (functools.partial(ResNet1D, virtual_batch_size=4), (8, 40)),
}


@pytest.fixture(scope="module", params=sorted(TRAIN_CASES))
def trained(request):
    model_fn, input_shape = TRAIN_CASES[request.param]
    model = model_fn()
    x = jax.random.normal(jax.random.key(1), input_shape) * 3.0 + 1.0
    labels = jnp.arange(input_shape[0]) % model.num_classes
    variables = jax.jit(lambda k: model.init(k, x, train=False))(_fast_key(0))

    @jax.jit
    def train_step(params, batch_stats):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, updates["batch_stats"])

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        eval_logits = model.apply({"params": params, "batch_stats": aux[1]}, x, train=False)
        return loss, grads, aux, eval_logits

    loss, grads, (logits, new_stats), eval_logits = train_step(
        variables["params"], variables["batch_stats"]
    )
    return dict(
        model=model,
        variables=variables,
        loss=loss,
        grads=grads,
        logits=logits,
        new_stats=new_stats,
        eval_logits=eval_logits,
        batch=input_shape[0],
    )


def test_train_step_is_finite_and_shaped(trained):
    assert np.isfinite(trained["loss"])
    assert trained["logits"].shape == (trained["batch"], trained["model"].num_classes)
    assert trained["logits"].dtype == jnp.float32
    assert jax.tree.structure(trained["grads"]) == jax.tree.structure(
        trained["variables"]["params"]
    )
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(trained["grads"]))
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(trained["grads"]))


def test_train_step_updates_every_running_statistic(trained):
    old = _flat(trained["variables"]["batch_stats"])
    new = _flat(trained["new_stats"])
    assert set(old) == set(new)
    for path in old:
        assert np.isfinite(new[path]).all(), path
        assert not np.allclose(old[path], new[path]), path


def test_eval_mode_after_a_step_is_finite(trained):
    assert np.isfinite(trained["eval_logits"]).all()


def test_indivisible_batch_in_train_mode_names_virtual_batch_size():
    model = ResNet20(virtual_batch_size=4)
    x = jnp.zeros((6, 8, 8, 3))
    variables = _abstract_variables(model, x.shape)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        jax.eval_shape(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)


def test_bfloat16_forward_computes_in_bfloat16_and_stays_close_to_float32():
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
    # One block per stage: the same code paths as ResNet-20 at a third of the compile time.
    f32 = ResNet20(virtual_batch_size=4, stage_sizes=(1, 1, 1))
    bf16 = ResNet20(virtual_batch_size=4, stage_sizes=(1, 1, 1), dtype=jnp.bfloat16)
    variables = jax.jit(lambda k: f32.init(k, x, train=False))(_fast_key(0))

    def forward(model, v):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    jaxpr = jax.make_jaxpr(functools.partial(forward, bf16))(variables).jaxpr
    conv_dtypes = {
        str(var.aval.dtype)
        for eqn in jaxpr.eqns
        if eqn.primitive.name == "conv_general_dilated"
        for var in eqn.invars
    }
    assert conv_dtypes == {"bfloat16"}

    logits_bf16, stats = jax.jit(functools.partial(forward, bf16))(variables)
    logits_f32, _ = jax.jit(functools.partial(forward, f32))(variables)
    assert logits_bf16.dtype == jnp.float32
    assert stats["batch_stats"]["bn_init"]["mean"].dtype == jnp.float32
    assert np.isfinite(logits_bf16).all()
    scale = np.abs(logits_f32).max()
    np.testing.assert_allclose(logits_bf16, logits_f32, atol=0.05 * scale)


@pytest.mark.parametrize(
    "input_shape,stem_channels",
    [((4, 40), 1), ((4, 40, 1), 1), ((4, 40, 2), 2)],
)
def test_resnet1d_accepts_sequences_with_or_without_a_channel_axis(input_shape, stem_channels):
    model = ResNet1D(virtual_batch_size=2, stage_sizes=(2, 1))
    params = _abstract_variables(model, input_shape)["params"]
    assert params["conv_init"]["kernel"].shape == (5, stem_channels, 16)
    assert set(params) == {
        "conv_init",
        "bn_init",
        "stage1_block1",
        "stage1_block2",
        "stage2_block1",
        "head",
    }
    logits, _ = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros(input_shape), train=True, mutable=["batch_stats"]),
        _abstract_variables(model, input_shape),
    )
    assert logits.shape == (4, 10)


def test_resnet1d_rejects_images():
    with pytest.raises(ValueError, match="ResNet1D expects"):
        _abstract_variables(ResNet1D(), (1, 8, 8, 3))


def test_unknown_stem_is_rejected():
    with pytest.raises(ValueError, match="stem"):
        _abstract_variables(ResNet20(stem="tiny"), (1, 8, 8, 3))
