"""MusicRL on a converted MusicGen with EnCodec tokens, end to end and offline: a tiny random
MusicGen (with a T5-style spiece.model) and a tiny EnCodec of the same codebooks are converted,
the `musicgen_tiny` data is built through the pretrained-codec path (the codec and vocabulary
copied, the corpus rendered and resampled to the codec's rate, never fitted), and
experiments/musicgen_small_u.gin runs 2 RL steps from the converted checkpoint against a
preference reward on those tokens. Every experiments/musicgen_*.gin parses over the converted
run's config.gin with its macros bound."""

import dataclasses
import glob
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import gin  # noqa: E402
import jax  # noqa: E402
import soundfile as sf  # noqa: E402
from flax import traverse_util  # noqa: E402
from scipy.signal import resample_poly  # noqa: E402
from test_musicgen import K, VOCAB  # noqa: E402
from test_musicgen_serving import (  # noqa: E402
    BANDWIDTH, SAMPLE_RATE, _tiny_encodec, write_hub_folders)

from musicrl_jax import convert, export, partitioning  # noqa: E402
from musicrl_jax.audio.tokenizer import load_tokenizer  # noqa: E402
from musicrl_jax.data import build, musicrl_music, tasks  # noqa: E402
from musicrl_jax.data.sources import ArraySource  # noqa: E402
from musicrl_jax.errors import ConfigError  # noqa: E402
from musicrl_jax.main import parse_gin, run_job  # noqa: E402
from musicrl_jax.models import music_lm  # noqa: E402
from musicrl_jax.training import rl, rl_finetune, trainer  # noqa: E402
from musicrl_jax.training.reward_tasks import PreferenceRewardTask  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION_LENGTH, FRAMES, T5_VOCAB = 16, 8, 99  # _tiny_musicgen's T5 has 99 embedding rows
EXPERIMENTS = sorted(os.path.basename(p) for p in glob.glob(
    os.path.join(ROOT, "gin_configs", "experiments", "musicgen_*_*.gin")))


def _encodec_that_tells_clips_apart():
    """_tiny_encodec with each codebook drawn from the (residual) encoder outputs of a test
    signal: its random codebooks dwarf the tiny encoder's outputs, so every clip would encode
    to one constant code and the rewards would have nothing to tell apart."""
    model = _tiny_encodec()
    t = np.arange(10 * SAMPLE_RATE) / SAMPLE_RATE
    signal = 0.5 * np.sin(2 * np.pi * 60 * t) * np.sin(1.4 * np.pi * t) + 0.3 * np.sin(
        2 * np.pi * 130 * t + np.sin(t))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        residual = model.encoder(torch.tensor(signal, dtype=torch.float32)[None, None])[0].T
        for layer in model.quantizer.layers:
            embed = layer.codebook.embed
            picks = torch.randint(0, len(residual), (len(embed),), generator=generator)
            noise = torch.randn(embed.shape, generator=generator)
            embed.copy_(residual[picks] + 0.01 * residual.std() * noise)
            residual = residual - embed[torch.cdist(residual, embed).argmin(1)]
    return model


@pytest.fixture(scope="module")
def musicgen(tmp_path_factory):
    """Converted tiny MusicGen and EnCodec, and the musicgen_tiny data built from them."""
    root = tmp_path_factory.mktemp("musicgen_rl")
    hub, encodec_hub = write_hub_folders(root, _encodec_that_tells_clips_apart())
    run, codec, data_dir = root / "musicgen", root / "encodec", root / "data"
    assert convert.main(["musicgen", "--source", str(hub), "--out", str(run),
                         "--max_caption_length", str(CAPTION_LENGTH)]) == 0
    assert convert.main(["encodec", "--source", str(encodec_hub), "--out", str(codec),
                         "--bandwidth", str(BANDWIDTH)]) == 0
    vocab = run / "vocab" / "captions.model"
    # Through the CLI a user runs: its flags reach prepare_music_data.
    build.main(["--data_dir", str(data_dir), "--config", "musicgen_tiny",
                "--tokenizer_dir", str(codec), "--caption_vocab", str(vocab)])
    assets = musicrl_music.assets_dir(str(data_dir), "musicgen_tiny")
    return {"root": root, "run": str(run), "codec": str(codec), "vocab": str(vocab),
            "data_dir": str(data_dir), "assets": assets}


def test_the_data_holds_encodec_tokens_of_the_resampled_render_and_t5_caption_ids(musicgen):
    builder = musicrl_music.MusicrlMusic(config="musicgen_tiny", data_dir=musicgen["data_dir"])
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    assert all(splits[s] > 0 for s in ("train", "validation", "test")), splits
    record = next(builder.as_dataset(split="validation").as_numpy_iterator())
    # FluidSynth renders 8 kHz at the least; the 800 Hz codec reads a polyphase resample.
    audio, rate = sf.read(record["wav_path"].decode(), dtype="float32")
    assert rate == 8000 and audio.shape == (8000,)
    codec = load_tokenizer(musicgen["codec"])
    expected = codec.encode(resample_poly(audio, 1, 10).astype(np.float32))
    assert expected.shape == (SAMPLE_RATE // codec.samples_per_frame, K)
    np.testing.assert_array_equal(record["audio_tokens"], expected)
    assert min(len(np.unique(record["audio_tokens"][:FRAMES, k])) for k in range(K)) > 1
    # The assets are the pretrained files, copied; nothing was fitted or trained.
    for name in os.listdir(musicgen["codec"]):
        with open(os.path.join(musicgen["codec"], name), "rb") as a, \
                open(os.path.join(musicgen["assets"], "tokenizer", name), "rb") as b:
            assert a.read() == b.read(), name
    with open(musicgen["vocab"], "rb") as a, \
            open(os.path.join(musicgen["assets"], "vocab", "captions.model"), "rb") as b:
        assert a.read() == b.read()
    # Captions are read as T5 ids: SentencePiece pieces + EOS 1 (seqio keeps the EOS on a trim).
    import sentencepiece as spm
    tasks.register_tasks(musicgen["data_dir"], "musicgen_tiny")
    prompts = tasks.prompts("validation", CAPTION_LENGTH)
    pieces = spm.SentencePieceProcessor(model_file=musicgen["vocab"])
    ids = [*pieces.EncodeAsIds(str(prompts["caption"][0]))[:CAPTION_LENGTH - 1], 1]
    np.testing.assert_array_equal(prompts["caption_tokens"][0, :len(ids)], ids)
    assert prompts["caption_tokens"].max() < T5_VOCAB


def test_a_cache_built_with_another_codec_or_vocabulary_is_refused(musicgen, tmp_path, capsys):
    other = load_tokenizer(musicgen["codec"])
    name = sorted(other.params)[0]
    other.params = {**other.params, name: other.params[name] + 1.0}
    other.save(str(tmp_path / "other_codec"))
    with pytest.raises(ConfigError, match="prepare_music_data.tokenizer_dir=.*other_codec is "
                                          "not the one the cached musicrl_music/musicgen_tiny"):
        musicrl_music.prepare_music_data(musicgen["data_dir"], "musicgen_tiny",
                                         str(tmp_path / "other_codec"), musicgen["vocab"])
    (tmp_path / "other.model").write_bytes(b"another vocabulary")
    with pytest.raises(ConfigError, match="prepare_music_data.caption_vocab=.*other.model is "
                                          "not the one"):
        musicrl_music.prepare_music_data(musicgen["data_dir"], "musicgen_tiny",
                                         musicgen["codec"], str(tmp_path / "other.model"))
    # The same files elsewhere are the same codec: the cache is served.
    shutil.copytree(musicgen["codec"], tmp_path / "codec_copy")
    assert musicrl_music.prepare_music_data(
        musicgen["data_dir"], "musicgen_tiny", str(tmp_path / "codec_copy"),
        musicgen["vocab"]) == musicgen["assets"]
    with pytest.raises(SystemExit) as exit_info:
        build.main(["--data_dir", musicgen["data_dir"], "--config", "musicgen_tiny"])
    assert exit_info.value.code == 2
    assert "--tokenizer_dir" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="prepare_music_data.tokenizer_dir is not set"):
        musicrl_music.prepare_music_data(musicgen["data_dir"], "musicgen_tiny", None,
                                         musicgen["vocab"])
    with pytest.raises(ConfigError, match="fits its own tokenizer"):
        musicrl_music.prepare_music_data(str(tmp_path), "tiny", musicgen["codec"])


def _macros(musicgen, run_dir):
    reward = os.path.join(run_dir, "reward")
    return [f"MUSICGEN_DIR = '{musicgen['run']}'", f"ENCODEC_DIR = '{musicgen['codec']}'",
            f"CAPTION_VOCAB = '{musicgen['vocab']}'", f"RUN_DIR = '{run_dir}'",
            f"REWARD_STATS = '{run_dir}/reward_stats.json'",
            *[f"{m}_REWARD_DIR = '{reward}'" for m in ("TEXT", "QUALITY", "PREFERENCE")],
            f"MUSICRL_R_DIR = '{run_dir}/musicrl_r'",
            # The tiny data and models in place of MusicGen's.
            f"DATA_DIR = '{musicgen['data_dir']}'", "DATA_CONFIG = 'musicgen_tiny'",
            f"CAPTION_VOCAB_SIZE = {T5_VOCAB}", f"CAPTION_LENGTH = {CAPTION_LENGTH}",
            f"CODEBOOK_SIZE = {VOCAB}", f"NUM_CODEBOOKS = {K}", f"MAX_FRAMES = {FRAMES}"]


def _unbound_macros() -> set[str]:
    """Macros a binding reads (%NAME) that nothing binds."""
    config = gin.config._CONFIG  # {(scope, selector): {param: value}}
    bound = {scope for (scope, selector) in config if selector == "gin.macro"}
    used = set()

    def walk(value):
        if isinstance(value, gin.config.ConfigurableReference):
            if value.configurable.name == "macro":
                used.add(value.scoped_selector.split("/")[0])
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
    for params in config.values():
        walk(list(params.values()))
    return used - bound


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_each_musicgen_experiment_parses_over_the_converted_config(musicgen, experiment,
                                                                   tmp_path):
    # parse_gin raises on any configurable or parameter musicrl_jax does not have.
    parse_gin([os.path.join(musicgen["run"], "config.gin"), f"experiments/{experiment}"],
              _macros(musicgen, str(tmp_path)))
    assert not _unbound_macros()
    converted = music_lm.MusicLMConfig(**rl_finetune.policy_checkpoint(
        musicgen["run"])[2]["model_config"])
    remat = "full"  # both sizes: the setting their memory budget was measured at
    # The LM is the converted one; only the runtime dtype and remat are the experiment's.
    policy = music_lm.MusicLMConfig()
    assert policy == dataclasses.replace(converted, dtype="bfloat16", remat=remat)
    assert (policy.text_encoder, policy.freeze_text_encoder, policy.remat) == ("t5", True, remat)
    # The reward trunks read the same tokens with a native text encoder of their own.
    with gin.config_scope("reward_trunk"):
        trunk = music_lm.MusicLMConfig()
    assert (trunk.num_codebooks, trunk.codebook_size, trunk.caption_vocab_size) == (
        K, VOCAB, T5_VOCAB)
    assert (trunk.text_encoder, trunk.encoder_projection, trunk.positions) == (
        "native", False, "rope")
    assert PreferenceRewardTask().config == trunk
    mesh = partitioning.make_mesh()  # the 8 test devices as 8x H100: data 1 x fsdp 8
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert rl.RLConfig().num_frames == FRAMES
    init = str(tmp_path / "musicrl_r") if experiment.endswith("_ru.gin") else musicgen["run"]
    assert gin.query_parameter("rl_finetune.init_checkpoint").scoped_configurable_fn() == init
    assert gin.query_parameter("rl_finetune.reference_checkpoint").scoped_configurable_fn() == (
        musicgen["run"])  # the KL anchor is always the converted MusicGen
    assert gin.query_parameter("prepare_music_data.tokenizer_dir").scoped_configurable_fn() == (
        musicgen["codec"])


def _train_preference_reward(musicgen, task, workdir):
    """A few Bradley-Terry steps on pairs of the data's train clips (the one with the lower mean
    token id wins): cheap, and unlike fresh params (a zero head) not constant."""
    tasks.register_tasks(musicgen["data_dir"], "musicgen_tiny")
    clips = tasks.seqio_source("train", CAPTION_LENGTH, FRAMES).arrays
    codes = clips["audio_codes"]
    other = np.roll(codes, 1, axis=0)
    pairs = ArraySource({"caption_tokens": clips["caption_tokens"], "tokens_a": codes,
                         "tokens_b": other, "choice": (codes.mean((1, 2)) > other.mean((1, 2)))
                         .astype(np.int32)})
    one_device = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
    trainer.train(dataclasses.replace(task, train_source=pairs, eval_source=pairs), workdir,
                  num_steps=4, batch_size=8, eval_every=100, eval_at_start=False,
                  checkpoint_every=4, show_progress=False, mesh=one_device)


def test_musicrl_u_on_the_converted_musicgen_with_encodec_tokens(musicgen, tmp_path):
    run_dir = str(tmp_path / "rl")
    files = [os.path.join(musicgen["run"], "config.gin"), "experiments/musicgen_small_u.gin"]
    bindings = [*_macros(musicgen, run_dir),
                "MusicLMConfig.dtype = 'float32'",  # CPU; remat 'dots' as the file says
                *[f"reward_trunk/MusicLMConfig.{k} = {v}" for k, v in dict(
                    embed_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1,
                    num_decoder_layers=1, dtype="'float32'").items()],
                "PreferenceRewardTask.num_audio_layers = 1",
                "train_rl.num_steps = 2", "train_rl.captions_per_step = 8",  # fsdp 8
                "RLConfig.samples_per_caption = 2",
                "train_rl.log_every = 1", "train_rl.eval_every = 0",
                "train_rl.checkpoint_every = 2", "train_rl.audio_every = 0",
                "train_rl.show_progress = False",
                "rl/make_optimizer.learning_rate = 1e-3", "rl/make_optimizer.warmup_steps = 1"]
    # A preference reward on the EnCodec tokens as the experiment configures it, trained where
    # PREFERENCE_REWARD_DIR points (on one device, outside the experiment's fsdp=8 mesh).
    parse_gin(files, bindings)
    reward_task = PreferenceRewardTask()
    gin.clear_config()
    _train_preference_reward(musicgen, reward_task, os.path.join(run_dir, "reward"))
    parse_gin(files, bindings)

    result = run_job()  # rl_finetune: prepare (cached) data, restore, reward stats, 2 steps

    assert result["step"] == 2
    metrics = result["train"]
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    kl = [k for k in metrics if k.startswith("kl")]
    assert kl and all(np.isfinite(metrics[k]) for k in kl)
    config = music_lm.MusicLMConfig()
    before, _ = export.restore_policy_params(musicgen["run"], config)
    after = traverse_util.flatten_dict(
        jax.device_get(partitioning.unbox(result["policy_params"])), sep="/")
    assert set(after) == set(before)
    frozen = {k for k in before if music_lm.in_text_encoder(k.split("/")[0])}
    assert frozen and any("encoder_0" in k for k in frozen)  # T5's layers are in the set
    changed = {k for k in before if not np.array_equal(np.asarray(after[k]), before[k])}
    assert changed and not changed & frozen, sorted(changed & frozen)[:5]
    assert result["summary"]["init_checkpoint"] == os.path.abspath(musicgen["run"])
