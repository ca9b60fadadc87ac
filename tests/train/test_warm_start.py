"""Warm starts: a run initialised from another run's checkpoint (BERT phase 2 from phase 1).

The source is a 30-step run of the baseline configuration, checkpointed at 10, 20 and 30 (the
newest two kept). A warm-started run must begin with exactly the source's final parameters and batch statistics, a fresh
optimizer state and step 0; a source of another architecture is a ValueError naming the field.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import assert_trees_equal

from batchlab import data, models
from batchlab.search.protocol import Outcome
from batchlab.train import RunResult, train_and_evaluate
from batchlab.train.checkpoint import save_final_variables

# Another optimizer than the source's: the warm start takes parameters, never optimizer state.
ADAM = {"optimizer": "adam", "learning_rate": {"schedule": "cosine", "peak_value": 1e-3}}


@dataclasses.dataclass
class Source:
    result: RunResult
    checkpoint_dir: str


@pytest.fixture(scope="module")
def baseline(make_config, tmp_path_factory) -> Source:
    """The source run: the baseline configuration, checkpointed, final state returned."""
    checkpoint_dir = str(tmp_path_factory.mktemp("ckpt_source"))
    result = train_and_evaluate(make_config(checkpoint_dir=checkpoint_dir), return_state=True)
    assert result.outcome is Outcome.SUCCEEDED, result.error
    return Source(result, checkpoint_dir)


def _initial_state(config):
    """The state a run starts training from: cancel it before its first step."""
    result = train_and_evaluate(config, should_stop=lambda: True, return_state=True)
    assert result.outcome is Outcome.CANCELLED and result.steps_completed == 0
    return result


def test_starts_from_the_source_parameters_with_a_fresh_optimizer_state(make_config, baseline, tmp_path):
    source = baseline.result.final_state
    # The source's momentum is not zero, so a copied optimizer state would be seen below.
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(source.opt_state))
    config = make_config(init_checkpoint=baseline.checkpoint_dir, optimizer=ADAM, seed=7,
                         checkpoint_dir=str(tmp_path / "ckpt"))
    result = _initial_state(config)
    state = result.final_state
    assert_trees_equal(state.params, source.params)
    assert_trees_equal(state.batch_stats, source.batch_stats)
    assert int(state.step) == 0
    leaves = jax.tree.leaves(state.opt_state)
    assert leaves and all(not np.any(np.asarray(x)) for x in leaves)  # Adam: count 0, mu = nu = 0
    assert result.initialised_from == f"{baseline.checkpoint_dir} (step 30)"


def test_a_kept_final_state_is_a_source_too_and_training_goes_on_from_it(make_config, baseline, tmp_path):
    source = baseline.result.final_state
    kept = tmp_path / "kept"
    save_final_variables(kept, 30, {"params": source.params, "batch_stats": source.batch_stats}, {"why": "test"})
    state = _initial_state(make_config(init_checkpoint=str(kept))).final_state
    assert_trees_equal(state.params, source.params)
    assert_trees_equal(state.batch_stats, source.batch_stats)

    result = train_and_evaluate(make_config(init_checkpoint=str(kept), total_steps=10), return_state=True)
    assert result.outcome is Outcome.SUCCEEDED and result.steps_completed == 10
    assert int(result.final_state.step) == 10
    # Ten steps from the source's parameters (accuracy about 0.4 after 30 steps), not from a
    # fresh initialisation (chance, 0.1).
    assert result.curve[-1]["train/accuracy"] > 0.25


def test_a_resume_takes_precedence_over_the_warm_start(make_config, baseline, tmp_path):
    config = make_config(init_checkpoint=baseline.checkpoint_dir, total_steps=20,
                         checkpoint_dir=str(tmp_path / "ckpt"))
    whole = train_and_evaluate(make_config(init_checkpoint=baseline.checkpoint_dir, total_steps=20),
                               return_state=True)
    calls = [0]

    def stop_after_12() -> bool:
        calls[0] += 1
        return calls[0] > 12

    first = train_and_evaluate(config, should_stop=stop_after_12)
    assert first.outcome is Outcome.CANCELLED and first.initialised_from is not None
    second = train_and_evaluate(config, return_state=True)
    assert second.resumed_from_step == 12 and second.initialised_from is None
    assert_trees_equal(second.final_state.params, whole.final_state.params)
    assert second.curve == whole.curve


def test_a_source_of_another_architecture_is_a_value_error_naming_the_field(make_config, baseline):
    # mnist1d_resnet1d has 16 channels and 3 stages; the source has 8 channels and 2 stages.
    config = make_config(workload="mnist1d_resnet1d", init_checkpoint=baseline.checkpoint_dir)
    with pytest.raises(ValueError, match=r"^init_checkpoint: .* does not match the model") as err:
        train_and_evaluate(config)
    assert "params/" in str(err.value)


@pytest.mark.parametrize(
    "where, match",
    [("missing", "does not exist"), ("empty", "no checkpoint in")],
)
def test_a_source_that_is_no_checkpoint_is_a_value_error(make_config, tmp_path, where, match):
    folder = tmp_path / where
    if where == "empty":
        folder.mkdir()
    with pytest.raises(ValueError, match=rf"^init_checkpoint: .*{match}"):
        train_and_evaluate(make_config(init_checkpoint=str(folder)))


def test_init_checkpoint_must_be_a_folder_name(make_config):
    with pytest.raises(ValueError, match="init_checkpoint: must be a checkpoint folder"):
        train_and_evaluate(make_config(init_checkpoint=""))


# --------------------------------------------------------------- BERT: sequence 128 -> 512


@pytest.mark.parametrize("name", ["bert_tiny", "bert_large"])
def test_bert_parameters_do_not_depend_on_the_sequence_length(name):
    """Position embeddings cover 512 positions in both phases, as in the BERT code."""
    model = models.get_model(name, vocab_size=1000)

    def shapes(seq):
        ids = jnp.zeros((2, seq), jnp.int32)
        positions = jnp.zeros((2, 20), jnp.int32)
        variables = jax.eval_shape(lambda k: model.init(k, ids, ids, ids, positions, train=False), jax.random.key(0))
        return jax.tree.map(lambda x: x.shape, variables["params"])

    phase1, phase2 = shapes(128), shapes(512)
    assert phase1 == phase2
    assert phase1["bert"]["embeddings"]["position_embeddings"]["embedding"][0] == 512


@pytest.fixture(scope="module")
def mlm_data_dir(tmp_path_factory):
    """The default mlm_corpus (what mlm_tiny_bert reads), built once (about 20 s)."""
    path = tmp_path_factory.mktemp("tfds_mlm")
    data.prepare("mlm_corpus", path)
    return str(path)


@pytest.mark.slow
def test_tiny_bert_phase2_at_a_longer_sequence_starts_from_phase1(make_config, mlm_data_dir, tmp_path):
    def bert(seq, preds, **fields):
        return make_config(
            workload="mlm_tiny_bert", data_dir=mlm_data_dir, batch_size=8, eval_every_steps=3,
            hyperparameters={"max_seq_length": seq, "max_predictions_per_seq": preds}, optimizer=ADAM,
            **fields,
        )

    phase1 = train_and_evaluate(bert(32, 5, total_steps=3, checkpoint_dir=str(tmp_path / "p1")), return_state=True)
    assert phase1.outcome is Outcome.SUCCEEDED, phase1.error
    phase2 = bert(64, 10, total_steps=2, seed=1, init_checkpoint=str(tmp_path / "p1"))
    start = _initial_state(phase2).final_state
    assert_trees_equal(start.params, phase1.final_state.params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(start.opt_state))
    result = train_and_evaluate(phase2)
    assert result.outcome is Outcome.SUCCEEDED, result.error
    assert np.isfinite(result.curve[-1]["validation/mlm_accuracy"])
