"""Serving export: a checkpoint exported with jax.export and run by `generate` in a fresh process
gives exactly the codes `decoding.sample` gives from the checkpoint, with no training code
imported; broken artifacts and bad captions are one-paragraph errors with exit status 2."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf
from conftest import TINY
from flax import traverse_util

from musicrl_jax import decoding, export, generate
from musicrl_jax.checkpoints import Checkpointer
from musicrl_jax.data import vocab
from musicrl_jax.errors import ConfigError
from musicrl_jax.training import rl, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["calm piano", "fast drums", "sad cello", "happy flute", "calm drums"]
MOODS, INSTRUMENTS = ("calm", "fast", "sad", "happy"), ("piano", "drums", "cello", "flute")
# Word orders varied enough that SentencePiece keeps whole words (captions fit TINY's 8 tokens).
TRAINING_CAPTIONS = [caption for m in MOODS for i in INSTRUMENTS
                     for caption in (f"{m} {i}", f"{i} {m}", f"{m} {m} {i}")]
# Loaded by generate's process only through the audio tokenizer module's gin decorator; no
# config is read. Everything else here would mean the training stack came along.
FORBIDDEN_MODULES = ("flax", "optax", "orbax", "seqio", "tensorflow", "musicrl_jax.training",
                     "musicrl_jax.models", "musicrl_jax.decoding", "musicrl_jax.checkpoints",
                     "musicrl_jax.export")


def _save_checkpoint(directory, state, kind):
    checkpointer = Checkpointer(directory, kind=kind, async_save=False)
    checkpointer.save(1, state, force=True)
    checkpointer.close()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_params, tiny_tokenizer):
    """A tiny pretrain checkpoint (TrainState) exported through the CLI with its config.gin."""
    root = tmp_path_factory.mktemp("export")
    assets = root / "assets"
    tiny_tokenizer.save(assets / "tokenizer")
    vocab.train_caption_vocabulary(TRAINING_CAPTIONS * 20, str(assets / "vocab"), vocab_size=40,
                                   tempo_pieces=False)  # TINY embeds 64 caption ids
    tx, _ = trainer.make_optimizer(total_steps=1)
    state = trainer.TrainState(step=jax.numpy.ones((), jax.numpy.int32), params=tiny_params,
                               opt_state=tx.init(tiny_params))
    run_dir = root / "pretrain"
    _save_checkpoint(str(run_dir / "checkpoints"), state, "music_lm")
    (run_dir / "config.gin").write_text("".join(
        f"MusicLMConfig.{name} = {value!r}\n"
        for name, value in dataclasses.asdict(TINY).items()))
    artifact = root / "artifact"
    manifest = export.main(["--checkpoint_dir", str(run_dir / "checkpoints"),
                            "--gin_config", str(run_dir / "config.gin"),
                            "--assets_dir", str(assets), "--out", str(artifact)])
    return {"root": root, "artifact": str(artifact), "manifest": manifest}


def test_manifest_records_shapes_and_checksums(exported):
    manifest = exported["manifest"]
    assert manifest["source"]["kind"] == "music_lm" and manifest["source"]["step"] == 1
    assert manifest["max_caption_length"] == TINY.max_caption_length
    assert manifest["outputs"]["codes"]["shape"] == [4, TINY.max_frames, TINY.num_codebooks]
    assert {generate.PARAMS_FILE, generate.VOCAB_FILE, *generate.PROGRAM_FILES.values(),
            "tokenizer/codebooks.npz"} <= set(manifest["files"])
    for relative, entry in manifest["files"].items():
        assert generate.sha256_file(os.path.join(exported["artifact"], relative)) == entry["sha256"]
    assert not os.path.exists(exported["artifact"] + ".partial")


def test_generate_in_fresh_process_matches_decoding_sample(exported, tiny_params, tmp_path):
    """Two runs (conditional; guided at T=0.7) in one fresh process; 5 captions in batches of 4
    so the padded last batch is exercised."""
    settings = [(1.0, 1.0), (0.7, 3.0)]
    runs = [["--artifact", exported["artifact"], *[a for c in CAPTIONS for a in ("--caption", c)],
             "--out_dir", str(tmp_path / f"run{i}"), "--seed", "3", "--temperature", str(t),
             "--guidance", str(g)] for i, (t, g) in enumerate(settings)]
    script = (
        "import json, sys\n"
        "from musicrl_jax import generate\n"
        f"for argv in {runs!r}:\n"
        "    generate.main(argv)\n"
        f"prefixes = {FORBIDDEN_MODULES!r}\n"
        "print('LOADED=' + json.dumps(sorted(m for m in sys.modules\n"
        "      if any(m == p or m.startswith(p + '.') for p in prefixes))))\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # While it runs: the data pipeline's tokens (pieces + EOS, padded) and decoding.sample's
    # codes from them, checked against the fresh process's below.
    try:
        sentencepiece = vocab.load_caption_vocabulary(
            str(exported["root"] / "assets" / "vocab"))
        tokens = np.zeros((len(CAPTIONS), TINY.max_caption_length), np.int32)
        for row, caption in zip(tokens, CAPTIONS):
            ids = [*sentencepiece.encode(caption), decoding.EOS_ID]
            row[:len(ids)] = ids
        expected = [decoding.sample(
            TINY, tiny_params, tokens, decoding.example_rngs(jax.random.PRNGKey(3), len(tokens)),
            num_frames=TINY.max_frames,
            sampling=decoding.SamplingConfig(temperature=temperature, guidance_weight=guidance))
            for temperature, guidance in settings]
    finally:
        stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    loaded = json.loads(stdout.split("LOADED=")[-1])
    assert loaded == [], f"generate imported training-stack modules: {loaded}"

    hop = json.load(open(os.path.join(exported["artifact"], "tokenizer", "config.json")))[
        "hop_length"]
    for i in range(len(settings)):
        out = np.load(tmp_path / f"run{i}" / "codes.npz")
        np.testing.assert_array_equal(out["caption_tokens"], tokens)
        np.testing.assert_array_equal(out["codes"], np.asarray(expected[i]["codes"]))
        wavs = sorted(p for p in os.listdir(tmp_path / f"run{i}") if p.endswith(".wav"))
        assert len(wavs) == len(CAPTIONS)
        audio, rate = sf.read(tmp_path / f"run{i}" / wavs[-1])
        assert rate == 16000 and len(audio) == TINY.max_frames * hop


def test_rl_checkpoint_params_restore(tmp_path, tiny_params):
    """An RLState checkpoint (the RL loop's layout, with beta) gives back its policy params."""
    params = jax.tree.map(lambda x: x + 1.0, tiny_params)
    tx, _ = trainer.make_optimizer(total_steps=1)
    state = rl.RLState(step=jax.numpy.ones((), jax.numpy.int32), params=params,
                       opt_state=tx.init(params), beta=jax.numpy.float32(0.1))
    _save_checkpoint(str(tmp_path / "checkpoints"), state, "music_rl")
    flat, source = export.restore_policy_params(str(tmp_path), TINY)
    assert source["kind"] == "music_rl"
    expected = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    assert set(flat) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(flat[name], value)


def _copy(exported, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(exported["artifact"], copy)
    return copy


def _truncate_params(artifact):
    path = artifact / generate.PARAMS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_program_byte(artifact):
    path = artifact / generate.PROGRAM_FILES["conditional"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _remove_vocab(artifact):
    os.remove(artifact / generate.VOCAB_FILE)


def _bump_version(artifact):
    path = artifact / generate.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["format_version"] = generate.FORMAT_VERSION + 1
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage,message", [
    (_truncate_params, f"{generate.PARAMS_FILE} is truncated or corrupted"),
    (_flip_program_byte, f"{generate.PROGRAM_FILES['conditional']} is corrupted: its sha256"),
    (_remove_vocab, "captions.model is missing"),
    (_bump_version, f"format_version is {generate.FORMAT_VERSION + 1}"),
])
def test_damaged_artifact_exits_2_naming_the_problem(exported, tmp_path, capsys, damage,
                                                     message):
    artifact = _copy(exported, tmp_path)
    damage(artifact)
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--artifact", str(artifact), "--caption", "calm piano",
                       "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_caption_too_long_names_caption_count_and_limit(exported, tmp_path, capsys):
    long_caption = " ".join(["calm piano"] * 6)
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--artifact", exported["artifact"], "--caption", "calm piano",
                       "--caption", long_caption, "--out_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    count = len(vocab.load_caption_vocabulary(
        str(exported["root"] / "assets" / "vocab")).encode(long_caption)) + 1
    err = capsys.readouterr().err
    assert f"Caption 1 ('{long_caption[:60]}" in err
    assert f"is {count} tokens long (with EOS), but the model reads at most " \
           f"{TINY.max_caption_length}" in err


def test_missing_artifact_cli_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "musicrl_jax.generate", "--artifact", str(tmp_path / "nope"),
         "--caption", "calm piano", "--out_dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert f"--artifact {tmp_path / 'nope'}: no such directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_export_refuses_a_reward_model_checkpoint(tmp_path, tiny_params):
    _save_checkpoint(str(tmp_path / "checkpoints"), {"params": tiny_params}, "text_reward")
    with pytest.raises(ConfigError, match="holds a 'text_reward' checkpoint, not a music LM policy"):
        export.restore_policy_params(str(tmp_path), TINY)
