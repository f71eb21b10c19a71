"""A frozen text encoder (MusicGen's T5, MusicLMConfig.freeze_text_encoder) stays bit-identical
through real optimizer steps, pretraining's and RL's, even with weight decay, while the decoder
and enc_to_dec projection train; and LoRA adapts MusicGen's ungated MLP but not the frozen
encoder. A tiny MusicGen-shaped config, built without transformers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lm_params, toy_task
from flax import traverse_util

from musicrl_jax import partitioning
from musicrl_jax.models import lora, music_lm
from musicrl_jax.training import rl, trainer

# What `convert musicgen` writes, shrunk: T5 encoder (width 24, relu MLP, relative bias),
# enc_to_dec projection to the decoder's 32, sinusoidal positions, LayerNorm, ungated GELU.
FROZEN = music_lm.MusicLMConfig(
    caption_vocab_size=64, codebook_size=32, num_codebooks=2, embed_dim=32, num_heads=2,
    head_dim=16, mlp_dim=48, num_encoder_layers=2, num_decoder_layers=2, max_caption_length=8,
    max_frames=8, positions="sinusoidal", norm="layer", norm_epsilon=1e-5, mlp="gelu",
    text_encoder="t5", text_embed_dim=24, text_num_heads=2, text_head_dim=8, text_mlp_dim=40,
    text_mlp="relu", relative_attention_buckets=8, relative_attention_max_distance=16,
    encoder_projection=True, freeze_text_encoder=True, null_caption="mask")
UNFROZEN = dataclasses.replace(FROZEN, freeze_text_encoder=False)
# MusicGen's T5 (test_musicgen lists the same): everything before enc_to_dec_proj.
TEXT_ENCODER = {"caption_embed", "encoder_0", "encoder_1", "encoder_norm",
                "relative_attention_bias"}
# Large enough that weight decay alone would visibly move a "frozen" weight.
OPTIMIZER = dict(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)


def _moved(before, after) -> dict[str, bool]:
    """{top-level param: whether any of its values changed (exact comparison)}."""
    before, after = jax.device_get(before), jax.device_get(after)
    return {name: any(not np.array_equal(a, b) for a, b in
                      zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])))
            for name in before}


def assert_only_the_frozen_encoder_stayed(config, moved):
    assert TEXT_ENCODER < set(moved)  # the names are the model's
    frozen = {name for name, m in moved.items() if not m}
    if config.freeze_text_encoder:
        # Not a drift of one ulp: not a single value of the encoder changed, all else did.
        assert frozen == TEXT_ENCODER, moved
    else:
        assert frozen == set(), moved
    assert moved["encoder_projection"] and moved["encoder_projection_bias"]
    assert moved["decoder_0"] and moved["heads"]


@pytest.mark.parametrize("config", [FROZEN, UNFROZEN], ids=["frozen", "unfrozen"])
def test_pretraining_steps_leave_a_frozen_text_encoder_bit_identical(config):
    task = toy_task(config, num_train=32, num_eval=8, caption_dropout=0.25)
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    tx, _ = trainer.make_optimizer(total_steps=3, **OPTIMIZER)
    state, shardings = trainer.create_train_state(task, tx, mesh, seed=0)
    start = partitioning.unbox(jax.device_get(state.params))
    batch = task.train_source.train_batch(0, 8)
    with partitioning.mesh_context(mesh):
        step = trainer.jit_train_step(trainer.make_train_step(task, tx, 0, 2), shardings, mesh,
                                      batch)
        for i in range(3):
            batch = task.train_source.train_batch(i, 8)
            state, _ = step(state, partitioning.shard_batch(batch, mesh))
    assert_only_the_frozen_encoder_stayed(config, _moved(start, partitioning.unbox(state.params)))


def _reward_fn(params, captions, codes):
    """Mean code of codebook 0: continuous, so every group's samples differ in reward."""
    del captions
    reward = params["scale"] * codes[..., 0].astype(jnp.float32).mean(-1)
    return reward, {"mean_code": reward}


@pytest.mark.parametrize("config", [FROZEN, UNFROZEN], ids=["frozen", "unfrozen"])
def test_an_rl_update_leaves_a_frozen_text_encoder_bit_identical(config):
    rl_config = rl.RLConfig(samples_per_caption=2, num_frames=4)
    tx, _ = trainer.make_optimizer(total_steps=1, **OPTIMIZER)
    params = lm_params(config, 0)
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    captions = jnp.asarray(toy_task(config, num_train=8, num_eval=8).train_source
                           .train_batch(0, 4)["caption_tokens"], jnp.int32)
    with partitioning.mesh_context(mesh):
        state, state_shardings, param_shardings = rl.create_rl_state(config, tx, params, mesh,
                                                                     rl_config)
        step = rl.jit_rl_step(rl.make_rl_step(config, tx, _reward_fn, rl_config),
                              state_shardings, param_shardings, mesh)
        state, metrics = step(state, params, {"scale": jnp.float32(1.0)}, captions,
                              jax.random.PRNGKey(0))
    assert float(metrics["grad_norm"]) > 0
    assert_only_the_frozen_encoder_stayed(config, _moved(params, state.params))


def _adapted(config, lora_config):
    """{top-level param: kernel names given adapters} of an RL state built for `config`."""
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    abstract, _ = rl.abstract_rl_state(config, trainer.make_optimizer(1)[0], mesh,
                                       rl.RLConfig(), lora=lora_config)
    adapted = {}
    for path in {p[:-1] for p in traverse_util.flatten_dict(abstract.params)}:  # drop a/b
        adapted.setdefault(path[0], set()).add(path[-1])
    return adapted


def test_lora_adapts_the_gelu_mlp_and_no_frozen_text_encoder_kernel():
    default = lora.LoRAConfig(rank=4)
    adapted = _adapted(FROZEN, default)
    assert set(adapted) == {"decoder_0", "decoder_1"}  # not the encoder, nor its projection
    assert adapted["decoder_0"] == {"query", "key", "value", "out", "wi", "wo"}
    # Restoring a LoRA checkpoint rebuilds its LoRAConfig from the meta train_rl records.
    resolved = lora.for_model(default, FROZEN)
    params = lm_params(FROZEN, 0)
    rebuilt = lora.init(lora.LoRAConfig(**dataclasses.asdict(resolved)), params,
                        jax.random.PRNGKey(0))
    assert jax.tree.structure(rebuilt) == jax.tree.structure(
        lora.init(resolved, params, jax.random.PRNGKey(0)))
    # Unfrozen, the T5 encoder's attention and relu MLP get adapters too.
    adapted = _adapted(UNFROZEN, default)
    assert adapted["encoder_0"] == {"query", "key", "value", "out", "wi", "wo"}
    assert "encoder_projection" not in adapted and "caption_embed" not in adapted
    # Naming only the ungated kernel works; the default's names still fit a gated model.
    assert _adapted(FROZEN, lora.LoRAConfig(rank=4, targets=("wi",)))["decoder_1"] == {"wi"}
    gated = lora.targeted(resolved, lm_params(dataclasses.replace(FROZEN, mlp="gated_gelu"), 0))
    assert {p[-1] for p in gated} == set(default.targets)
