import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from musicrl_jax import partitioning
from musicrl_jax.errors import ConfigError
from musicrl_jax.models import music_lm


def test_mesh_sizes_with_rest_axis():
    mesh = partitioning.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(partitioning.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("sizes", [dict(data=3), dict(data=2, fsdp=2, tensor=4),
                                   dict(data=-1, fsdp=-1)])
def test_bad_mesh_is_a_clear_error(sizes):
    with pytest.raises(ConfigError, match="make_mesh"):
        partitioning.make_mesh(**sizes)


def test_batch_must_divide_batch_axes():
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    partitioning.check_batch_size(8, mesh)
    with pytest.raises(ConfigError, match="batch_size=6 is not divisible.*multiple of 4"):
        partitioning.check_batch_size(6, mesh)


def test_lm_params_are_really_sharded(tiny_config):
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    params, shardings = partitioning.sharded_init(
        lambda rng: music_lm.init_params(tiny_config, rng), mesh, jax.random.PRNGKey(0))
    mlp = params["decoder_0"]["mlp"]["wi_gate"]  # [embed, mlp]
    assert mlp.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert mlp.addressable_shards[0].data.shape == (mlp.shape[0] // 2, mlp.shape[1] // 2)
    query = params["decoder_0"]["self_attention"]["query"]  # [embed, heads, kv]
    assert query.sharding.spec == PartitionSpec("fsdp", "tensor", None)
    heads = params["heads"]  # [embed, codebooks, vocab]
    assert heads.sharding.spec == PartitionSpec("fsdp", None, "tensor")
    # Norm scales over embed are split over fsdp too: nothing is silently replicated.
    scale = params["decoder_norm"]["scale"]
    assert scale.sharding.spec == PartitionSpec("fsdp")


def test_indivisible_dimension_is_replicated_not_an_error():
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    sharding = partitioning.logical_to_sharding(("vocab", "embed"), (33, 64), mesh)
    assert sharding.spec == PartitionSpec(None, "fsdp")


def test_shard_batch_splits_leading_axis():
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    batch = partitioning.shard_batch({"x": np.arange(16).reshape(8, 2)}, mesh)
    assert batch["x"].sharding.spec == PartitionSpec(("data", "fsdp"), None)
    assert batch["x"].addressable_shards[0].data.shape == (2, 2)
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(16).reshape(8, 2))


def test_activations_stay_sharded_over_fsdp(tiny_config):
    """The model's logical activation constraints really apply: with the weights split over
    fsdp=8, each device computes its 1/8 of the batch, not the whole batch (they were once a
    silent no-op, and every device ran the global batch)."""
    mesh = partitioning.make_mesh(data=1, fsdp=8, tensor=1)
    batch, frames = 16, tiny_config.max_frames
    params, shardings = partitioning.sharded_init(
        lambda rng: music_lm.init_params(tiny_config, rng), mesh, jax.random.PRNGKey(0))
    captions = jax.ShapeDtypeStruct((batch, tiny_config.max_caption_length), np.int32)
    codes = jax.ShapeDtypeStruct((batch, frames, tiny_config.num_codebooks), np.int32)

    def loss(p, c, a):
        return music_lm.lm_loss(tiny_config, p, c, a)[0]

    with partitioning.mesh_context(mesh):
        hlo = jax.jit(jax.grad(loss), in_shardings=(
            shardings, partitioning.batch_sharding(mesh, 2), partitioning.batch_sharding(mesh, 3))
        ).lower(params, captions, codes).compile().as_text()
    length = frames + tiny_config.num_codebooks - 1
    mlp_hidden = f"[{{}},{length},{tiny_config.mlp_dim}]"
    assert mlp_hidden.format(batch // 8) in hlo
    assert mlp_hidden.format(batch) not in hlo


def test_tensor_parallel_keeps_the_heads_vocab_split(tiny_config):
    """The LM heads' kernel [embed, codebooks, vocab] is split over `tensor` on vocab, and the
    training gradient keeps it so: a reshape of the kernel to [embed, codebooks * vocab] once
    made every device gather the whole vocabulary, every step."""
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    params, shardings = partitioning.sharded_init(
        lambda rng: music_lm.init_params(tiny_config, rng), mesh, jax.random.PRNGKey(0))
    captions = jax.ShapeDtypeStruct((8, tiny_config.max_caption_length), np.int32)
    codes = jax.ShapeDtypeStruct((8, tiny_config.max_frames, tiny_config.num_codebooks),
                                 np.int32)
    with partitioning.mesh_context(mesh):
        hlo = jax.jit(jax.grad(lambda p, c, a: music_lm.lm_loss(tiny_config, p, c, a)[0]),
                      in_shardings=(shardings, partitioning.batch_sharding(mesh, 2),
                                    partitioning.batch_sharding(mesh, 3)),
                      out_shardings=shardings).lower(params, captions, codes).compile().as_text()
    gathered = [tuple(int(d) for d in dims.split(","))
                for dims in re.findall(r"= f32\[([\d,]+)\]\S* all-gather\(", hlo)]
    codebooks, vocab = tiny_config.num_codebooks, tiny_config.codebook_size
    kernels = [s for s in gathered if s[0] in (tiny_config.embed_dim, tiny_config.embed_dim // 2)
               and len(s) <= 3]  # not the [batch, length, codebooks, vocab] logits
    assert (tiny_config.embed_dim, codebooks, vocab // 2) in kernels  # fsdp's gather, split kept
    assert not [s for s in kernels if s[1:] == (codebooks, vocab) or s[1:] == (codebooks * vocab,)]


@pytest.mark.parametrize("xla_flags, cpu_devices, expected", [
    ("", None, None),  # None: min(cores, 8) rounded down to a power of two
    ("--xla_force_host_platform_device_count=3", None, 3),  # the user's count is kept
    ("", "3", 3),
])
def test_use_cpu_cores_splits_the_host_unless_the_user_chose(xla_flags, cpu_devices, expected):
    """The CLI's one-device-per-core default: a fresh process sees that many CPU devices, and a
    mesh over them has a data axis of that size; a count set by the user is left alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update({"XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"})
    if cpu_devices:
        env["JAX_NUM_CPU_DEVICES"] = cpu_devices
    code = ("import jax; from musicrl_jax import partitioning\n"
            "partitioning.use_cpu_cores()\n"
            "print(jax.device_count(), dict(partitioning.make_mesh().shape)['data'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    if expected is None:
        expected = 1 << (min(len(os.sched_getaffinity(0)), 8).bit_length() - 1)
    assert out == [str(expected), str(expected)]
