"""from_config and the JAX-free schema: building from data, and errors that name the field."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batchlab import optim
from batchlab.optim import PAPER_CONFIGS, ConfigError, paper_config, table1_differences

_PARAMS = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}


def _one_update(opt, params=_PARAMS):
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.1, p.dtype), params)
    updates, _ = opt.update(grads, opt.init(params), params)
    return updates


def test_from_config_equals_direct_construction():
    cfg = {
        "weights": {"optimizer": "lars", "learning_rate": 2.0, "weight_decay": 1e-4, "momentum": 0.929},
        "bias_bn": {"optimizer": "heavy_ball", "learning_rate": 2.0, "momentum": 0.929},
    }
    direct = optim.grouped(
        weights=optim.lars(2.0, weight_decay=1e-4, momentum=0.929),
        bias_bn=optim.heavy_ball(2.0, momentum=0.929),
    )
    jax.tree.map(np.testing.assert_allclose, _one_update(optim.from_config(cfg)), _one_update(direct))


def test_total_steps_fills_schedules_and_protobuf_floats_are_accepted():
    cfg = {"optimizer": "nesterov", "learning_rate": {"schedule": "cosine", "peak_value": 1.0}, "momentum": 0.9}
    lr = optim.learning_rate_fn(cfg, total_steps=100)
    np.testing.assert_allclose(float(lr(50)), 0.5, rtol=1e-6)
    # A protobuf Struct turns every number into a float: 706.0 must be accepted as steps.
    cfg2 = {"optimizer": "sgd", "learning_rate": {"schedule": "bert_legacy", "peak_value": 1.0, "warmup_steps": 20.0, "total_steps": 100.0}}
    np.testing.assert_allclose(float(optim.learning_rate_fn(cfg2)(20)), 0.8, rtol=1e-6)


@pytest.mark.parametrize(
    "cfg, path, words",
    [
        ({"optimizer": "larz", "learning_rate": 1.0}, "optimizer.optimizer", "allowed"),
        ({"optimizer": "lars"}, "optimizer.learning_rate", "missing"),
        ({"optimizer": "lars", "learning_rate": 1.0, "momentom": 0.9}, "optimizer.momentom", "allowed"),
        ({"optimizer": "lars", "learning_rate": 1.0, "momentum": 1.5}, "optimizer.momentum", "[0, 1)"),
        ({"optimizer": "lars", "learning_rate": 1.0, "variant": "tf"}, "optimizer.variant", "mlperf"),
        ({"optimizer": "adam", "learning_rate": -1.0}, "optimizer.learning_rate", ">= 0"),
        ({"optimizer": "adam", "learning_rate": 1.0, "bias_correction": "no"}, "optimizer.bias_correction", "true or false"),
        ({"optimizer": "adam", "learning_rate": {"schedule": "cosin"}}, "optimizer.learning_rate.schedule", "allowed"),
        ({"optimizer": "adam", "learning_rate": {"schedule": "cosine"}}, "optimizer.learning_rate.peak_value", "missing"),
        ({"optimizer": "adam", "learning_rate": {"schedule": "piecewise_polynomial", "peak_value": 1, "warmup_steps": 7.5}}, "optimizer.learning_rate.warmup_steps", "integer"),
        ({"optimizer": "adam", "learning_rate": {"schedule": "piecewise_polynomial", "peak_value": 1, "warmup_steps": 50, "total_steps": 10}}, "optimizer.learning_rate.warmup_steps", "<= total_steps"),
        ({"weights": {"optimizer": "lars", "learning_rate": 1.0}}, "optimizer.bias_bn", "missing"),
        ({"weights": {"optimizer": "lars", "learning_rate": 1.0}, "bias_bn": {"optimizer": "sgd", "learning_rate": 1}, "extra": {}}, "optimizer.extra", "unknown"),
        ({"weights": {"optimizer": "lars", "learning_rate": 1.0}, "bias_bn": {"optimizer": "sgd", "learning_rate": float("nan")}}, "optimizer.bias_bn.learning_rate", "finite"),
        ("lars", "optimizer", "mapping"),
    ],
)
def test_errors_name_the_field_path(cfg, path, words):
    with pytest.raises(ConfigError) as err:
        optim.from_config(cfg, total_steps=100)
    assert err.value.field_path == path
    assert words in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_total_steps_is_an_error_at_build_time_only():
    cfg = {"optimizer": "adam", "learning_rate": {"schedule": "cosine", "peak_value": 1.0}}
    assert optim.validate_optimizer_config(cfg)["learning_rate"]["total_steps"] is None
    with pytest.raises(ConfigError, match="optimizer.learning_rate.total_steps"):
        optim.from_config(cfg)


def test_schema_and_paper_import_without_jax():
    code = (
        "import sys; from batchlab.optim import schema, paper; "
        "schema.validate_optimizer_config(paper.paper_config('lars_pipeline_32k').optimizer); "
        "assert 'jax' not in sys.modules, 'jax was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_every_paper_config_builds_and_steps(name):
    cfg = paper_config(name)
    opt = optim.from_config(cfg.optimizer, total_steps=cfg.total_steps)
    updates = _one_update(opt)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_table1_differences_are_the_papers_table1():
    # Table 1 of the paper: Nesterov configuration B vs. the LARS pipeline.
    expected = {
        "p_warmup": (2, 1),
        "eta_peak": (7.05, 29.0),
        "eta_final": (6e-6, 1e-4),
        "1 - mu": (0.02397, 0.071),
        "lambda": (5.8e-5, 1e-4),
        "tau": (0.15, 0.10),
        "gamma_0": (0.4138, 0.0),
    }
    got = {name: (a, b) for name, a, b in table1_differences()}
    assert got.keys() == expected.keys()
    for name, (a, b) in expected.items():
        np.testing.assert_allclose(got[name], (a, b), rtol=1e-9, err_msg=name)


def test_figure1_schedules_from_paper_configs():
    lars = optim.learning_rate_fn(paper_config("lars_pipeline_32k").optimizer)
    nest = optim.learning_rate_fn(paper_config("nesterov_b_32k").optimizer)
    np.testing.assert_allclose([float(lars(t)) for t in (353, 706, 1609, 2512)], [14.5, 29.0, 7.250075, 1e-4], rtol=1e-6)
    np.testing.assert_allclose(float(nest(353)), 7.05 * 0.25, rtol=1e-6)
    np.testing.assert_allclose(float(nest(2512)), 6e-6, rtol=1e-6)


def test_paper_config_unknown_name_lists_names():
    with pytest.raises(ValueError, match="nesterov_b_32k"):
        paper_config("nesterov_c")


# -- optimizer_arguments: one compiled program per optimizer structure ---------------------------

_PW = {"schedule": "piecewise_polynomial", "peak_value": 0.4, "end_value": 1e-4, "warmup_steps": 3,
       "warmup_power": 1.5, "decay_power": 2.0}
_STRUCTURES = {
    "nesterov_piecewise": {"optimizer": "nesterov", "momentum": 0.9, "weight_decay": 5e-4, "learning_rate": _PW},
    "lars_pipeline": {
        "weights": {"optimizer": "lars", "momentum": 0.929, "weight_decay": 1e-4, "learning_rate": {**_PW, "peak_value": 20.0}},
        "bias_bn": {"optimizer": "heavy_ball", "momentum": 0.929, "learning_rate": {"schedule": "cosine", "peak_value": 0.3, "warmup_steps": 2, "end_value": 1e-3}},
    },
    "lars_optax_cosine": {"optimizer": "lars", "variant": "optax", "weight_decay": 1e-4, "eps": 1e-9,
                          "learning_rate": {"schedule": "cosine", "peak_value": 2.0, "end_value": 0.01}},
    "lamb_linear": {"optimizer": "lamb", "b1": 0.85, "b2": 0.99, "weight_decay": 0.01,
                    "learning_rate": {"schedule": "linear_decay", "init_value": 0.01, "decay_factor": 0.1}},
    "adam_to_constant": {"optimizer": "adam", "eps": 1e-6, "learning_rate": {
        "schedule": "warmup_decay_to_constant", "peak_value": 1e-3, "warmup_steps": 2, "decay_steps": 6, "decay_factor": 0.1}},
    "bert_adam": {"optimizer": "adam", "bias_correction": False, "weight_decay": 0.01,
                  "learning_rate": {"schedule": "bert_legacy", "peak_value": 1e-3, "warmup_steps": 2}},
    "sgd_constant": {"optimizer": "sgd", "learning_rate": 0.05},
}


def _steps(opt, n=4, params=_PARAMS):
    """``n`` updates of ``opt`` from fixed gradients, returning the final parameters."""
    state = opt.init(params)
    for i in range(n):
        grads = jax.tree.map(lambda p, i=i: jnp.full(p.shape, 0.1 * (i + 1), p.dtype) + 0.01 * p, params)
        updates, state = opt.update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params


@pytest.mark.parametrize("name", sorted(_STRUCTURES))
def test_optimizer_arguments_traced_equal_constants(name):
    cfg = _STRUCTURES[name]
    build, values = optim.optimizer_arguments(cfg, total_steps=8)
    assert values and all(isinstance(v, float) and v != 0.0 for v in values.values())
    expected = _steps(optim.from_config(cfg, total_steps=8))
    # Built inside jit from traced values: the same updates, up to float32 rounding (constants
    # are folded in float64 by Python, traced values combine in float32).
    got = jax.jit(lambda v: _steps(build(v)))(values)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), got, expected)
    # And built from the concrete values, exactly from_config's optimizer.
    jax.tree.map(np.testing.assert_array_equal, _steps(build(values)), expected)


def test_trials_that_differ_in_real_values_compile_once():
    traces = []

    def run(values, build):
        traces.append(1)
        return _steps(build(values), n=2)

    step = jax.jit(run, static_argnums=1)
    base = _STRUCTURES["lars_pipeline"]
    build, values = optim.optimizer_arguments(base, total_steps=8)
    step(values, build)
    other = {**values, "weights.learning_rate.peak_value": 35.0, "weights.momentum": 0.8}
    step(other, build)
    assert len(traces) == 1
    # The other trial's values took effect: different parameters than the first's.
    a, b = step(values, build), step(other, build)
    assert not np.allclose(a["conv"]["kernel"], b["conv"]["kernel"])
    np.testing.assert_array_equal(a["bn"]["scale"], b["bn"]["scale"])  # bias_bn's values are the same
    # A zero weight decay is structure (the term is left out), not a value.
    _, zero_wd = optim.optimizer_arguments(
        {**base, "weights": {**base["weights"], "weight_decay": 0.0}}, total_steps=8
    )
    assert "weights.weight_decay" not in zero_wd and "weights.weight_decay" in values


def test_optimizer_arguments_checks_values_before_tracing():
    with pytest.raises(ConfigError, match=r"optimizer\.momentum"):
        optim.optimizer_arguments({"optimizer": "nesterov", "learning_rate": 0.1, "momentum": 1.5})
    build, values = optim.optimizer_arguments({"optimizer": "nesterov", "learning_rate": 0.1})
    with pytest.raises(ValueError, match="arguments: expected the fields"):
        build({"momentum": 0.9})
    # Concrete arrays are still checked (only traced values pass over the builders' checks).
    with pytest.raises(ValueError, match=r"b1: must be in \[0, 1\)"):
        optim.adam(0.1, b1=jnp.asarray(1.5))
    # Traced, 1 - b2 is computed in float32: a b2 that float32 rounds to 1 is refused by name.
    with pytest.raises(ConfigError, match=r"optimizer\.b2.*float32 rounds it to 1"):
        optim.optimizer_arguments({"optimizer": "adam", "learning_rate": 0.1, "b2": 0.99999999})


def test_optimizer_structure_ignores_argument_values_and_sees_everything_else():
    base = {"optimizer": "nesterov", "momentum": 0.9, "weight_decay": 1e-4,
            "learning_rate": {"schedule": "cosine", "peak_value": 0.1, "warmup_steps": 5}}
    same = optim.optimizer_structure(base, total_steps=100)

    def changed(**fields):
        return optim.optimizer_structure({**base, **fields}, total_steps=100)

    # Values passed as arguments of the jitted step: the same structure.
    assert changed(momentum=0.5) == same
    assert changed(learning_rate={**base["learning_rate"], "peak_value": 2.0}) == same
    # Constants of the program: another structure.
    assert changed(weight_decay=0.0) != same  # a zero removes its term
    assert changed(optimizer="heavy_ball") != same
    assert changed(learning_rate={**base["learning_rate"], "warmup_steps": 6}) != same
    assert changed(learning_rate={"schedule": "constant", "value": 0.1}) != same
    assert optim.optimizer_structure(base, total_steps=101) != same

