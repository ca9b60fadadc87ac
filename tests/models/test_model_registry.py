"""get_model: every registered name builds the right module, overrides apply, errors are clear."""

import jax.numpy as jnp
import pytest

from batchlab.models import (
    BERT_BASE,
    BERT_LARGE,
    BERT_TINY,
    MODEL_NAMES,
    BasicBlock,
    BertForPreTraining,
    BottleneckBlock,
    ResNet,
    ResNet1D,
    get_model,
)

REQUIRED_NAMES = [
    "resnet50",
    "resnet18",
    "resnet20",
    "resnet1d",
    "bert_large",
    "bert_base",
    "bert_tiny",
]


@pytest.mark.parametrize(
    "name,cls,fields",
    [
        ("resnet50", ResNet, dict(stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)),
        ("resnet34", ResNet, dict(stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)),
        ("resnet18", ResNet, dict(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)),
        ("resnet20", ResNet, dict(stage_sizes=(3, 3, 3), num_filters=16, stem="cifar")),
        ("resnet1d", ResNet1D, dict(num_filters=16, num_classes=10)),
        ("bert_large", BertForPreTraining, dict(config=BERT_LARGE)),
        ("bert_base", BertForPreTraining, dict(config=BERT_BASE)),
        ("bert_tiny", BertForPreTraining, dict(config=BERT_TINY)),
    ],
)
def test_registered_names_build_the_paper_models(name, cls, fields):
    model = get_model(name)
    assert type(model) is cls
    for field, value in fields.items():
        assert getattr(model, field) == value, (name, field)


def test_every_required_name_is_registered():
    assert set(REQUIRED_NAMES) <= set(MODEL_NAMES)


@pytest.mark.parametrize(
    "name,overrides,check",
    [
        ("resnet50", dict(gamma_0=0.0, num_classes=10), lambda m: (m.gamma_0, m.num_classes)),
        ("resnet20", dict(dtype=jnp.bfloat16), lambda m: (m.dtype,)),
        ("resnet1d", dict(virtual_batch_size=None), lambda m: (m.virtual_batch_size,)),
        ("bert_tiny", dict(vocab_size=1024), lambda m: (m.config.vocab_size,)),
    ],
)
def test_overrides_reach_the_module(name, overrides, check):
    assert check(get_model(name, **overrides)) == tuple(overrides.values())


def test_bert_overrides_leave_the_shared_config_alone():
    get_model("bert_tiny", vocab_size=1024)
    assert BERT_TINY.vocab_size == 8192


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(ValueError) as error:
        get_model("resnet51")
    for name in REQUIRED_NAMES:
        assert name in str(error.value)


@pytest.mark.parametrize("name", ["resnet20", "bert_tiny"])
def test_unknown_override_is_a_type_error(name):
    with pytest.raises(TypeError):
        get_model(name, not_a_field=1)
