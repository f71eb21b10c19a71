"""MusicGen through musicrl_jax.convert equals transformers' MusicgenForConditionalGeneration:
teacher-forced logits with the delay pattern, classifier-free-guided logits, and greedy
generation with our KV-cache sampler, on a tiny random model built offline. Also the
converter's error reports and that default MusicLMConfig models are unchanged."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from musicrl_jax import convert, decoding, partitioning  # noqa: E402
from musicrl_jax.models import layers, music_lm  # noqa: E402
from musicrl_jax.training import rl_finetune  # noqa: E402

VOCAB, K, PAD = 64, 4, 64
BATCH, FRAMES = 2, 6
TOLERANCE = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_musicgen(seed: int = 0):
    """A random MusicGen with T5 width 24 (so enc_to_dec_proj exists) and decoder width 32.
    Weights are scaled up from the ~0.02 init so logits are O(1) and differences show."""
    torch.manual_seed(seed)
    t5 = transformers.T5Config(vocab_size=99, d_model=24, d_kv=8, d_ff=40, num_layers=2,
                               num_heads=3, relative_attention_num_buckets=8,
                               relative_attention_max_distance=16)
    encodec = transformers.EncodecConfig(codebook_size=VOCAB, hidden_size=8, num_filters=4,
                                         upsampling_ratios=[2, 2], codebook_dim=8,
                                         num_lstm_layers=1, target_bandwidths=[2.0],
                                         sampling_rate=800)
    decoder = transformers.MusicgenDecoderConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ffn_dim=48, num_codebooks=K, max_position_embeddings=64, pad_token_id=PAD,
        bos_token_id=PAD, decoder_start_token_id=PAD)
    config = transformers.MusicgenConfig(text_encoder=t5.to_dict(),
                                         audio_encoder=encodec.to_dict(),
                                         decoder=decoder.to_dict())
    model = transformers.MusicgenForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("audio_encoder."):
                continue
            noise = 0.3 * torch.randn_like(param)
            param.copy_(1.0 + noise if "norm" in name and name.endswith("weight") else noise)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(transformers model, hub dir, our config, our params restored like a pretrained LM)."""
    root = tmp_path_factory.mktemp("musicgen")
    model = _tiny_musicgen()
    hub_dir, out = str(root / "hub"), str(root / "lm")
    model.save_pretrained(hub_dir, safe_serialization=True)
    assert convert.main(["musicgen", "--source", hub_dir, "--out", out]) == 0
    with open(os.path.join(hub_dir, "config.json")) as f:
        config = convert.musicgen_config(json.load(f), hub_dir)
    _, step, meta = rl_finetune.policy_checkpoint(out)  # what pipeline/export read back
    assert (step, meta["kind"]) == (0, "music_lm")
    assert music_lm.MusicLMConfig(**meta["model_config"]) == config
    # Restored exactly as RL restores a pretraining run's LM, sharded over a 2x2x2 mesh.
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    params = rl_finetune.restore_policy_params(config, out, mesh)
    params = jax.device_get(partitioning.unbox(params))
    return model, hub_dir, config, params


def _captions():
    """Two captions of T5 ids (eos 1, pad 0) of different lengths."""
    captions = np.zeros((BATCH, 7), np.int64)
    captions[0, :5] = [5, 9, 17, 3, 1]
    captions[1, :3] = [42, 8, 1]
    return captions


def _codes(seed: int = 1):
    return np.random.default_rng(seed).integers(0, VOCAB, (BATCH, FRAMES, K))


def _their_decoder_ids(model, codes):
    """transformers' own delay pattern for BOS + codes: [batch * K, frames + K - 1] inputs."""
    start = torch.full((BATCH * K, 1), PAD)
    ids = torch.cat([start, torch.tensor(codes).permute(0, 2, 1).reshape(BATCH * K, -1)], 1)
    _, pattern = model.decoder.build_delay_pattern_mask(ids, PAD, max_length=FRAMES + K)
    return pattern[:, :-1]  # the last step's input predicts nothing


def _their_logits(logits):
    """[batch * K, length, vocab] -> our [batch, length, K, vocab]."""
    return logits.reshape(-1, K, logits.shape[1], VOCAB).permute(0, 2, 1, 3).numpy()


def test_sinusoid_and_buckets_match_transformers():
    from transformers.models.musicgen.modeling_musicgen import (
        MusicgenSinusoidalPositionalEmbedding)
    from transformers.models.t5.modeling_t5 import T5Attention

    for features in (32, 33):
        want = MusicgenSinusoidalPositionalEmbedding.get_embedding(80, features).numpy()
        got = np.asarray(layers.sinusoidal_positions(jnp.arange(80), features))
        np.testing.assert_allclose(got, want, atol=1e-5)
    relative = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    for buckets, distance in ((32, 128), (8, 16)):  # T5-base's and the tiny model's
        want = T5Attention._relative_position_bucket(relative, True, buckets, distance).numpy()
        np.testing.assert_array_equal(
            layers.relative_position_buckets(300, 300, buckets, distance), want)


def test_teacher_forced_logits_equal_transformers(converted):
    model, _, config, params = converted
    captions, codes = _captions(), _codes()
    ours_in = music_lm.decoder_inputs(music_lm.apply_delay(jnp.asarray(codes), PAD), PAD)
    theirs_in = _their_decoder_ids(model, codes)
    # Same delay pattern: transformers' build_delay_pattern_mask vs decoder_inputs(apply_delay).
    np.testing.assert_array_equal(
        theirs_in.reshape(BATCH, K, -1).permute(0, 2, 1).numpy(), np.asarray(ours_in))
    with torch.no_grad():
        theirs = _their_logits(model(input_ids=torch.tensor(captions),
                                     attention_mask=torch.tensor(captions > 0).long(),
                                     decoder_input_ids=theirs_in).logits)
    ours = np.asarray(music_lm.MusicLM(config).apply({"params": params}, jnp.asarray(captions),
                                                     ours_in))
    diff = np.abs(ours - theirs).max()
    print(f"teacher-forced max |logit diff| = {diff:.2e} (logits up to {np.abs(theirs).max():.1f})")
    assert np.abs(theirs).max() > 1.0  # a real check, not two near-zero outputs
    assert diff < TOLERANCE
    # The KV-cache path (sinusoid index in the cache) gives the same logits.
    cached = np.asarray(decoding.cached_logits(config, params, jnp.asarray(captions),
                                               jnp.asarray(codes)))
    assert np.abs(cached - theirs).max() < TOLERANCE


def test_guided_logits_equal_transformers(converted):
    """transformers' CFG: the unconditional half gets a zeroed encoder output and an all-zero
    attention mask; ours gets an EOS-only caption, which null_caption='mask' makes the same."""
    from transformers.generation.logits_process import ClassifierFreeGuidanceLogitsProcessor

    model, _, config, params = converted
    captions, codes, weight = _captions(), _codes(2), 3.0
    mask = torch.tensor(captions > 0).long()
    with torch.no_grad():
        encoded = model.text_encoder(input_ids=torch.tensor(captions),
                                     attention_mask=mask).last_hidden_state
        out = model(encoder_outputs=(torch.cat([encoded, torch.zeros_like(encoded)]),),
                    attention_mask=torch.cat([mask, torch.zeros_like(mask)]),
                    decoder_input_ids=_their_decoder_ids(model, codes).repeat((2, 1)))
        scores = out.logits.reshape(2, -1, VOCAB).reshape(-1, VOCAB)  # cond rows first
        cond_rows = torch.zeros((scores.shape[0] // 2, 1), dtype=torch.long)  # only its shape
        guided = ClassifierFreeGuidanceLogitsProcessor(weight)(cond_rows, scores)
    theirs = _their_logits(guided.reshape(BATCH * K, -1, VOCAB))

    both = decoding._with_unconditional(jnp.asarray(captions, jnp.int32), True)
    inputs = music_lm.decoder_inputs(music_lm.apply_delay(jnp.asarray(codes), PAD), PAD)
    logits = music_lm.MusicLM(config).apply({"params": params}, both,
                                            jnp.concatenate([inputs, inputs]))
    ours = np.asarray(decoding._guide(logits, weight, True))
    diff = np.abs(ours - theirs).max()
    print(f"guided (w={weight}) max |logit diff| = {diff:.2e}")
    assert diff < TOLERANCE


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_greedy_sampler_reproduces_generate(converted, weight):
    model, _, config, params = converted
    captions = _captions()
    # generate() decodes the codes with EnCodec; keep the codes instead.
    model.audio_encoder.decode = lambda codes, audio_scales=None, **_: types.SimpleNamespace(
        audio_values=codes)
    with torch.no_grad():
        theirs = model.generate(input_ids=torch.tensor(captions),
                                attention_mask=torch.tensor(captions > 0).long(),
                                do_sample=False, guidance_scale=weight,
                                max_new_tokens=FRAMES + K - 1)  # BOS + F + K - 1 = F + K steps
    theirs = theirs[0].permute(0, 2, 1).numpy()  # [1, batch, K, frames] -> [batch, frames, K]
    assert theirs.shape == (BATCH, FRAMES, K)
    # top_k=1 at temperature 1 is greedy.
    ours = decoding.sample(config, params, jnp.asarray(captions, jnp.int32),
                           decoding.example_rngs(jax.random.PRNGKey(0), BATCH),
                           num_frames=FRAMES,
                           sampling=decoding.SamplingConfig(top_k=1, guidance_weight=weight))
    np.testing.assert_array_equal(np.asarray(ours["codes"]), theirs)


def test_frozen_text_encoder_gets_no_gradient(converted):
    _, _, config, params = converted
    grads = jax.grad(lambda p: music_lm.lm_loss(config, p, jnp.asarray(_captions(), jnp.int32),
                                                jnp.asarray(_codes()))[0])(params)
    norms = {name: max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(g))
             for name, g in grads.items()}
    frozen = ("caption_embed", "encoder_0", "encoder_1", "encoder_norm",
              "relative_attention_bias")
    assert all(norms[n] == 0 for n in frozen)
    # MusicGen trains enc_to_dec_proj with the decoder.
    assert norms["encoder_projection"] > 0 and norms["decoder_0"] > 0


# --- errors ---------------------------------------------------------------------------------

def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "musicrl_jax.convert", "musicgen", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def _main_error(capsys, source, out):
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["musicgen", "--source", str(source), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    return err


def test_not_musicgen_reported_by_cli(tmp_path):
    source = tmp_path / "t5"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "t5"}))
    result = _run_cli("--source", str(source), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert str(source / "config.json") in result.stderr and "'musicgen'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_shard_and_wrong_shape_and_leftover(converted, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    model = converted[0]
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), safe_serialization=True, max_shard_size="40KB")
    with open(sharded / "model.safetensors.index.json") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 1
    os.remove(sharded / shards[-1])
    err = _main_error(capsys, sharded, tmp_path / "out1")
    assert shards[-1] in err and "missing shard" in err

    wrong = tmp_path / "wrong"
    model.save_pretrained(str(wrong), safe_serialization=True)
    with open(wrong / "config.json") as f:
        config = json.load(f)
    config["decoder"]["ffn_dim"] = 50
    with open(wrong / "config.json", "w") as f:
        json.dump(config, f)
    err = _main_error(capsys, wrong, tmp_path / "out2")
    assert "'decoder.model.decoder.layers.0.fc1.weight'" in err and "(48, 32)" in err

    extra = tmp_path / "extra"
    model.save_pretrained(str(extra), safe_serialization=True)
    tensors = load_file(str(extra / "model.safetensors"))
    tensors["decoder.model.decoder.layers.0.extra.weight"] = np.ones((2,), np.float32)
    save_file(tensors, str(extra / "model.safetensors"), metadata={"format": "pt"})
    err = _main_error(capsys, extra, tmp_path / "out3")
    assert "not understood" in err and "layers.0.extra.weight" in err


# --- defaults unchanged -----------------------------------------------------------------------

def test_default_config_param_layout_unchanged():
    """The MusicGen options leave a default LM's parameters as they were (names and shapes;
    tests/test_music_lm.py and test_decoding.py cover its outputs)."""
    from flax import traverse_util

    abstract = partitioning.unbox(jax.eval_shape(
        lambda r: music_lm.init_params(music_lm.MusicLMConfig(), r), jax.random.PRNGKey(0)))
    shapes = {k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
    attention = {f"{n}": s for n, s in (("query", (64, 4, 16)), ("key", (64, 4, 16)),
                                         ("value", (64, 4, 16)), ("out", (4, 16, 64)))}
    mlp = {"wi_gate": (64, 128), "wi_up": (64, 128), "wo": (128, 64)}
    want = {"audio_embedding": (2, 257, 64), "heads": (64, 2, 256),
            "caption_embed/embedding": (256, 64), "encoder_norm/scale": (64,),
            "decoder_norm/scale": (64,)}
    want.update({f"encoder_0/self_attention/{n}": s for n, s in attention.items()})
    want.update({f"encoder_0/mlp/{n}": s for n, s in mlp.items()})
    want.update({f"encoder_0/{n}/scale": (64,) for n in ("pre_attention_norm", "pre_mlp_norm")})
    for i in range(2):
        for block in ("self_attention", "cross_attention"):
            want.update({f"decoder_{i}/{block}/{n}": s for n, s in attention.items()})
        want.update({f"decoder_{i}/mlp/{n}": s for n, s in mlp.items()})
        want.update({f"decoder_{i}/{n}/scale": (64,) for n in (
            "pre_self_attention_norm", "pre_cross_attention_norm", "pre_mlp_norm")})
    assert shapes == want
