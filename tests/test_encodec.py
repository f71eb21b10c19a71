"""EnCodec in JAX against transformers' EncodecModel: tiny random models saved in the hub
layout, converted, then codes compared exactly and waveforms to 1e-4."""

import json
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from musicrl_jax.audio import encodec  # noqa: E402
from musicrl_jax.audio.tokenizer import load_tokenizer  # noqa: E402
from musicrl_jax.errors import ConfigError  # noqa: E402

# hop 6 at 600 Hz -> 100 frames/s; 16 entries = 4 bits -> 0.4 kbps per stage:
# 0.8 kbps = 2 codebooks, 1.2 kbps = 3 (all stored).
TINY = dict(num_filters=4, hidden_size=8, upsampling_ratios=[2, 3], codebook_size=16,
            target_bandwidths=[0.8, 1.2], sampling_rate=600, normalize=False)
VARIANTS = {
    "reflect": dict(use_causal_conv=False, pad_mode="reflect", use_conv_shortcut=True),
    # Causal with an uneven transposed-conv trim, two dilated residual blocks, no shortcut.
    "causal": dict(use_causal_conv=True, pad_mode="constant", trim_right_ratio=0.5,
                   num_residual_layers=2, use_conv_shortcut=False),
}


def build_model(seed: int, **overrides):
    torch.manual_seed(seed)
    model = transformers.EncodecModel(transformers.EncodecConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("original0"):  # g != ||v||, so a missing weight-norm fold shows
                param.mul_(torch.rand_like(param) + 0.5)
        # transformers initialises codebooks to zero: draw them at the scale of the encoder's
        # output (shrinking per stage, like residuals) so codes vary from frame to frame.
        emb = model.encoder(torch.randn(4, 1, 240) * 0.5).transpose(1, 2).reshape(-1, 8)
        for i, layer in enumerate(model.quantizer.layers):
            pick = emb[torch.randperm(len(emb))[:16]] - emb.mean(0)
            layer.codebook.embed.copy_(pick * 0.5 ** i + emb.mean(0) * (i == 0))
    return model.eval()


@pytest.fixture(scope="module")
def convert(tmp_path_factory):
    """variant -> (transformers model, hub dir, tokenizer converted at 1.2 kbps), built once."""
    built = {}

    def get(variant):
        if variant not in built:
            model = build_model(0, **VARIANTS[variant])
            hub_dir = tmp_path_factory.mktemp(f"hub_{variant}")
            model.save_pretrained(hub_dir)
            built[variant] = (model, hub_dir, encodec.convert_encodec(
                str(hub_dir), str(hub_dir / "tok"), bandwidth=1.2))
        return built[variant]

    return get


@pytest.fixture(scope="module")
def converted(convert):
    return convert("reflect")


def reference(model, waveforms: np.ndarray, bandwidth: float):
    """transformers' codes [B, frames, K] and its decode of them [B, samples]."""
    with torch.no_grad():
        out = model.encode(torch.from_numpy(waveforms)[:, None], bandwidth=bandwidth)
        audio = model.decode(out.audio_codes, out.audio_scales).audio_values
    return out.audio_codes[0].permute(0, 2, 1).numpy(), audio[:, 0].numpy()


def batch(seed: int = 0, shape=(3, 37)) -> np.ndarray:
    # 37 samples is not a multiple of the hop (6): the encoder pads.
    return np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_codes_and_audio_match_transformers(convert, variant):
    model, _, tokenizer = convert(variant)
    wav = batch()
    # Every compile costs seconds here: the codebook-prefix case runs on one variant only.
    for bandwidth, k in ((1.2, 3), (0.8, 2))[:2 if variant == "reflect" else 1]:
        want_codes, want_audio = reference(model, wav, bandwidth)
        codes = tokenizer.encode(wav, num_codebooks=k)
        assert codes.shape == (3, 7, k) == want_codes.shape
        assert len(np.unique(codes)) > 4  # codes vary, so agreement means something
        np.testing.assert_array_equal(codes, want_codes)
        audio = tokenizer.decode(want_codes, num_codebooks=k)
        assert audio.shape == want_audio.shape == (3, 7 * 6)
        assert np.abs(want_audio).max() > 0.05
        np.testing.assert_allclose(audio, want_audio, rtol=0, atol=1e-4)


def test_short_clip_reflect_padding_on_tiny_inputs(converted):
    # 5 samples leave 1 frame deep in the encoder, shorter than the reflect pad.
    model, _, tokenizer = converted
    wav = batch(5, (5,))
    want_codes, want_audio = reference(model, wav[None], 1.2)
    codes = tokenizer.encode(wav)
    np.testing.assert_array_equal(codes, want_codes[0])
    np.testing.assert_allclose(tokenizer.decode(codes), want_audio[0], rtol=0, atol=1e-4)


def test_batched_functions_jit_and_agree_per_clip(converted):
    _, _, tokenizer = converted
    wav = batch(1)
    codes = tokenizer.encode_batch(jnp.asarray(wav))
    assert codes.dtype == jnp.int32 and codes.shape == (3, 7, 3)
    np.testing.assert_array_equal(np.asarray(codes), tokenizer.encode(wav))
    audio = jax.jit(tokenizer.decode_batch)(codes)  # as inside a jitted collection step
    per_clip = np.stack([tokenizer.decode(c) for c in np.asarray(codes)])
    np.testing.assert_allclose(np.asarray(audio), per_clip, rtol=0, atol=1e-6)
    # The pure form takes the weights as an argument: same program, same result.
    pure = encodec.encodec_decode(tokenizer.params, codes, tokenizer.spec)
    np.testing.assert_allclose(np.asarray(pure), per_clip, rtol=0, atol=1e-6)


def test_save_load_round_trip(converted, tmp_path):
    _, hub_dir, tokenizer = converted
    loaded = load_tokenizer(hub_dir / "tok")  # written by convert_encodec
    assert isinstance(loaded, encodec.EncodecTokenizer)
    assert loaded.spec == tokenizer.spec
    assert (loaded.sample_rate, loaded.samples_per_frame, loaded.num_codebooks,
            loaded.codebook_size) == (600, 6, 3, 16)
    loaded.save(tmp_path)
    again = load_tokenizer(tmp_path)
    wav = batch(2)
    codes = tokenizer.encode(wav)
    np.testing.assert_array_equal(again.encode(wav), codes)
    np.testing.assert_array_equal(again.decode(codes), tokenizer.decode(codes))


def test_load_tokenizer_finds_encodec_without_importing_it(converted):
    """A fresh process that only knows load_tokenizer (as data/RL code does) gets EnCodec."""
    import subprocess
    import sys
    _, hub_dir, _ = converted
    code = ("from musicrl_jax.audio.tokenizer import load_tokenizer; "
            f"print(type(load_tokenizer({str(hub_dir / 'tok')!r})).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "EncodecTokenizer"


def test_legacy_weight_norm_names(tmp_path):
    """Hub checkpoints from before torch's parametrizations name g/v `weight_g`/`weight_v`."""
    from safetensors.numpy import load_file, save_file
    model = build_model(1)
    model.save_pretrained(tmp_path / "new")
    tensors = load_file(str(tmp_path / "new" / "model.safetensors"))
    legacy = {name.replace(".parametrizations.weight.original0", ".weight_g")
              .replace(".parametrizations.weight.original1", ".weight_v"): value
              for name, value in tensors.items()}
    assert any(name.endswith("weight_g") for name in legacy)
    (tmp_path / "old").mkdir()
    save_file(legacy, str(tmp_path / "old" / "model.safetensors"))
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    new = encodec.convert_encodec(str(tmp_path / "new"), str(tmp_path / "a"))
    old = encodec.convert_encodec(str(tmp_path / "old"), str(tmp_path / "b"))
    assert new.num_codebooks == 2  # default bandwidth: the smallest, as in transformers
    for name, value in new.params.items():
        np.testing.assert_array_equal(np.asarray(old.params[name]), np.asarray(value))


def test_encodec_32khz_config():
    # facebook/encodec_32khz's config.json (the MusicGen codec).
    config = dict(model_type="encodec", audio_channels=1, chunk_length_s=None, codebook_dim=128,
                  codebook_size=2048, compress=2, dilation_growth_rate=2, hidden_size=128,
                  kernel_size=7, last_kernel_size=7, norm_type="weight_norm", normalize=False,
                  num_filters=64, num_lstm_layers=2, num_residual_layers=1, overlap=None,
                  pad_mode="reflect", residual_kernel_size=3, sampling_rate=32000,
                  target_bandwidths=[2.2], trim_right_ratio=1.0, upsampling_ratios=[8, 5, 4, 4],
                  use_causal_conv=False, use_conv_shortcut=False)
    spec, stored = encodec.spec_from_hub_config(config, "config.json")
    assert (spec.num_codebooks, stored, spec.hop, spec.codebook_size) == (4, 4, 640, 2048)
    shapes = encodec.param_shapes(spec)
    assert shapes["quantizer.embed"] == (4, 2048, 128)
    assert shapes["encoder.layers.13.w_ih0"] == (1024, 4096)  # LSTM over 16 * 64 channels


def test_fit_is_refused(converted):
    with pytest.raises(NotImplementedError, match="convert_encodec"):
        converted[2].fit(np.zeros((2, 600), np.float32))


# -- broken inputs -----------------------------------------------------------


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub_plain")
    build_model(2).save_pretrained(path)
    return path


def copy_hub(src, dst, edit=None):
    dst.mkdir()
    for name in os.listdir(src):
        if os.path.isfile(src / name):
            (dst / name).write_bytes((src / name).read_bytes())
    if edit:
        config = json.loads((dst / "config.json").read_text())
        edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_not_an_encodec_directory(hub_dir, tmp_path):
    src = copy_hub(hub_dir, tmp_path / "bert", lambda c: c.update(model_type="bert"))
    with pytest.raises(ConfigError, match=r"config\.json: model_type='bert'"):
        encodec.convert_encodec(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_shard(tmp_path):
    build_model(3).save_pretrained(tmp_path / "hub", max_shard_size="8KB")
    shards = sorted(n for n in os.listdir(tmp_path / "hub") if n.endswith(".safetensors"))
    assert len(shards) > 1
    os.remove(tmp_path / "hub" / shards[-1])
    with pytest.raises(ConfigError, match=f"missing shard.*{shards[-1]}"):
        encodec.convert_encodec(str(tmp_path / "hub"), str(tmp_path / "out"))


def test_wrong_shaped_tensor(hub_dir, tmp_path):
    src = copy_hub(hub_dir, tmp_path / "wide", lambda c: c.update(num_filters=6))
    with pytest.raises(ConfigError, match=r"wide: tensor 'encoder\.layers\.0\.conv\.parametriz"
                                          r"ations\.weight\.original0' has shape \(4, 1, 1\), "
                                          r"config\.json implies \(6, 1, 1\)"):
        encodec.convert_encodec(str(src), str(tmp_path / "out"))


def test_unused_tensor_is_reported(hub_dir, tmp_path):
    # One LSTM layer fewer in config.json leaves the second layer's tensors unused.
    src = copy_hub(hub_dir, tmp_path / "short", lambda c: c.update(num_lstm_layers=1))
    with pytest.raises(ConfigError, match=r"not understood.*lstm\.bias_hh_l1"):
        encodec.convert_encodec(str(src), str(tmp_path / "out"))


@pytest.mark.parametrize("field,value", [("normalize", True), ("audio_channels", 2),
                                         ("chunk_length_s", 1.0)])
def test_unsupported_config(hub_dir, tmp_path, field, value):
    src = copy_hub(hub_dir, tmp_path / "x", lambda c: c.update({field: value}))
    with pytest.raises(ConfigError, match=rf"config\.json: {field}=.*not supported"):
        encodec.convert_encodec(str(src), str(tmp_path / "out"))


def test_bandwidth_not_offered(hub_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"bandwidth 6\.0 kbps.*\[0\.8, 1\.2\]"):
        encodec.convert_encodec(str(hub_dir), str(tmp_path / "out"), bandwidth=6.0)


def test_cli(hub_dir, tmp_path, capsys):
    from musicrl_jax import convert
    assert convert.main(["encodec", "--source", str(hub_dir), "--out", str(tmp_path / "out"),
                         "--bandwidth", "1.2"]) == 0
    assert "3 codebooks of 16" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "out").num_codebooks == 3


def test_cli_reports_a_bad_source_in_one_paragraph(tmp_path):
    import subprocess
    import sys
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    out = subprocess.run([sys.executable, "-m", "musicrl_jax.convert", "encodec", "--source",
                          str(tmp_path), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "model_type='t5'" in out.stderr and "Traceback" not in out.stderr


def test_damaged_saved_tokenizer(converted, tmp_path):
    tokenizer = converted[2]
    tokenizer.save(tmp_path)
    os.remove(tmp_path / encodec.WEIGHTS_FILENAME)
    with pytest.raises(FileNotFoundError, match=encodec.WEIGHTS_FILENAME):
        load_tokenizer(tmp_path)
    tokenizer.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["spec"]["num_filters"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match .*config\.json.*"
                                         r"encoder\.layers\.0\.weight"):
        load_tokenizer(tmp_path)


def test_decode_checks_tokens(converted):
    tokenizer = converted[2]
    with pytest.raises(ValueError, match=r"expected values in \[0, 16\)"):
        tokenizer.decode(np.full((4, 3), 16, np.int32))
    with pytest.raises(ValueError, match="num_codebooks=4, expected 1..3"):
        tokenizer.encode(np.zeros(12, np.float32), num_codebooks=4)
