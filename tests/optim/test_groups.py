"""Parameter groups on toy trees and on the real ResNet-50 and BERT trees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from batchlab import optim
from batchlab.optim.groups import BIAS_BN, WEIGHTS


def _labels(tree):
    return jax.tree.leaves(optim.param_groups(tree))


@pytest.fixture(scope="module")
def resnet50_params():
    from batchlab.models import ResNet50

    model = ResNet50(num_classes=1000)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )
    return variables["params"]


def test_resnet50_has_54_weights_and_107_bias_bn(resnet50_params):
    labels = _labels(resnet50_params)
    assert labels.count(WEIGHTS) == 54
    assert labels.count(BIAS_BN) == 107


def test_every_bn_and_bias_leaf_is_bias_bn_whatever_the_module_name(resnet50_params):
    flat = jax.tree_util.tree_flatten_with_path(optim.param_groups(resnet50_params))[0]
    for path, label in flat:
        name = path[-1].key
        expected = BIAS_BN if name in ("scale", "bias") else WEIGHTS
        assert label == expected, jax.tree_util.keystr(path)
    # Modules named freely (not BatchNorm_N) are still caught: the tree has projection BNs.
    assert any("proj" in jax.tree_util.keystr(p) and lab == BIAS_BN for p, lab in flat)


def test_names_that_public_masks_miss():
    tree = {
        "bn1": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        "proj_bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
        "attention": {"query": {"kernel": jnp.ones((8, 2, 4)), "bias": jnp.zeros((2, 4))}},
        "embed": {"embedding": jnp.ones((10, 8))},
        "layer_norm": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
    }
    groups = optim.param_groups(tree)
    assert groups["attention"]["query"]["bias"] == BIAS_BN  # rank 2, caught by its name
    assert groups["attention"]["query"]["kernel"] == WEIGHTS
    assert groups["embed"]["embedding"] == WEIGHTS
    assert {groups[k]["scale"] for k in ("bn1", "proj_bn", "layer_norm")} == {BIAS_BN}


def test_bert_tiny_groups_layer_norms_and_biases_apart():
    from batchlab.models import get_model

    model = get_model("bert_tiny")
    ids = jnp.zeros((1, 16), jnp.int32)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), ids, ids, jnp.ones_like(ids), jnp.zeros((1, 2), jnp.int32), train=False)
    )
    flat = jax.tree_util.tree_flatten_with_path(optim.param_groups(variables["params"]))[0]
    for path, label in flat:
        name = path[-1].key
        is_bias_or_norm = name in ("scale", "bias") or name.endswith("_bias")
        assert (label == BIAS_BN) == is_bias_or_norm, jax.tree_util.keystr(path)


def test_grouped_applies_each_transformation_to_its_group_only():
    tree = {"conv": {"kernel": jnp.ones((2, 2))}, "bn": {"scale": jnp.zeros(2), "bias": jnp.ones(2)}}
    # LARS + L2 on weights; heavy ball without decay on bias/BN (the paper's LARS pipeline).
    opt = optim.grouped(
        weights=optim.lars(1.0, weight_decay=0.5, momentum=0.0),
        bias_bn=optim.heavy_ball(1.0, momentum=0.0),
    )
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = opt.update(grads, opt.init(tree), tree)
    np.testing.assert_allclose(updates["bn"]["scale"], [-1.0, -1.0])  # plain SGD step, no trust ratio
    np.testing.assert_allclose(updates["bn"]["bias"], [-1.0, -1.0])  # no weight decay on bias
    ratio = 0.001 * 2.0 / (2.0 + 0.5 * 2.0)
    np.testing.assert_allclose(updates["conv"]["kernel"], -ratio * 1.5 * np.ones((2, 2)), rtol=1e-6)
    # The same update with one jitted call, twice, compiles once.
    step = jax.jit(lambda g, s, p: opt.update(g, s, p))
    step(grads, opt.init(tree), tree)
    step(grads, opt.init(tree), tree)
    assert step._cache_size() == 1
    assert isinstance(opt, optax.GradientTransformation)
