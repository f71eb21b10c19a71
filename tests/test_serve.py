"""The demo's serving stage on an RL checkpoint: export (model rebuilt from the config the RL
checkpoint stored) and generate in fresh processes, compared with `decoding.sample`."""

import jax
import jax.numpy as jnp
import pytest

from musicrl_jax import decoding, partitioning, pipeline
from musicrl_jax.data import vocab
from musicrl_jax.training import rl, trainer

from test_export import CAPTIONS, TRAINING_CAPTIONS
from test_rl import REWARD_SCALE, RL_CONFIG, toy_reward_fn


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory, tiny_config, tiny_params, tiny_tokenizer):
    """Two RL steps of the tiny LM, checkpointed by train_rl as the demo's RL stages are."""
    from conftest import toy_task
    root = tmp_path_factory.mktemp("serve")
    assets = root / "assets"
    tiny_tokenizer.save(assets / "tokenizer")
    vocab.train_caption_vocabulary(TRAINING_CAPTIONS * 20, str(assets / "vocab"), vocab_size=40,
                                   tempo_pieces=False)  # TINY embeds 64 caption ids
    task = toy_task()
    result = rl.train_rl(  # no held-out evals: they do not enter the checkpoint
        lm_config=tiny_config, policy_params=tiny_params, reward_fn=toy_reward_fn,
        reward_params={"scale": jnp.asarray(REWARD_SCALE)}, caption_source=task.train_source,
        rl_config=RL_CONFIG,
        # The trainer's optimizer, as the demo's RL stages use: restoring a checkpoint rebuilds
        # its state layout (an optimizer of another structure would not restore).
        tx=trainer.make_optimizer(total_steps=2, learning_rate=5e-2, warmup_steps=0)[0],
        captions_per_step=4, num_steps=2, checkpoint_every=2,
        show_progress=False, workdir=str(root / "policy"),
        mesh=partitioning.make_mesh(devices=jax.devices()[:1]))
    return root, str(assets), result["policy_params"]


def test_the_served_rl_policy_is_the_trained_one_with_top_k(rl_run, tiny_config, tiny_params):
    root, assets, params = rl_run
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), params, tiny_params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # RL moved the params: the test can tell them apart
    sampling = decoding.SamplingConfig(temperature=0.8, top_k=4)
    served = pipeline.serve_stage(str(root), assets, tiny_config, "policy", params, CAPTIONS,
                                  seed=3, sampling=sampling)
    assert served["num_captions"] == len(CAPTIONS) and served["bytes"] > 0
    # The pretrained params are not what the artifact serves: the check must stop the run.
    with pytest.raises(RuntimeError, match=f"for [1-9]\\d* of {len(CAPTIONS)} captions"):
        pipeline.check_served_codes(served["generated"], tiny_config, tiny_params, 3, sampling,
                                    "the pretrained params")
