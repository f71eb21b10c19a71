"""Start from MusicGen, end to end and offline: a tiny random MusicGen (with a T5 spiece.model)
and a tiny EnCodec in the model-hub layout are converted with `python -m musicrl_jax.convert`,
the LM is exported with `python -m musicrl_jax.export` and `python -m musicrl_jax.generate`
writes WAVs from the artifact in a fresh process. The served codes equal `decoding.sample` on
the converted checkpoint with the same seed, and the WAVs are EnCodec's decode of those codes
at EnCodec's rate."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import sentencepiece as spm  # noqa: E402
import soundfile as sf  # noqa: E402
from flax import traverse_util  # noqa: E402
from test_musicgen import K, VOCAB, _tiny_musicgen  # noqa: E402

from musicrl_jax import decoding, export  # noqa: E402
from musicrl_jax.models import music_lm  # noqa: E402
from musicrl_jax.training import rl_finetune  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# EnCodec at 800 Hz with hop 2 * 2 = 4 (200 frames/s); 64 entries = 6 bits, so 4.8 kbps is
# exactly the MusicGen's 4 codebooks of VOCAB.
SAMPLE_RATE, HOP, BANDWIDTH = 800, 4, 4.8
FRAMES, BATCH, SEED, GUIDANCE, CAPTION_LENGTH = 10, 2, 5, 3.0, 16
CAPTIONS = ["calm piano melody", "fast drums with bass"]
MOODS = ("calm", "fast", "sad", "happy", "slow")
INSTRUMENTS = ("piano", "drums", "bass", "cello", "guitar", "melody")
# 30 short captions for the stand-in T5 vocabulary.
TRAINING_CAPTIONS = [f"{mood} {instrument} with {INSTRUMENTS[(i + m + 1) % len(INSTRUMENTS)]}"
                     for m, mood in enumerate(MOODS) for i, instrument in enumerate(INSTRUMENTS)]


def _tiny_encodec(seed: int = 0):
    """A random EncodecModel whose codes are the MusicGen's (4 codebooks of VOCAB at its
    bandwidth). Codebooks are drawn at random (transformers zeroes them) so audio depends on
    the codes."""
    torch.manual_seed(seed)
    config = transformers.EncodecConfig(
        codebook_size=VOCAB, hidden_size=8, num_filters=4, upsampling_ratios=[2, 2],
        codebook_dim=8, num_lstm_layers=1, target_bandwidths=[BANDWIDTH],
        sampling_rate=SAMPLE_RATE, normalize=False)
    assert (config.num_quantizers, config.hop_length) == (K, HOP)
    model = transformers.EncodecModel(config).eval()
    with torch.no_grad():
        for layer in model.quantizer.layers:
            layer.codebook.embed.copy_(torch.randn_like(layer.codebook.embed))
    return model


def _train_spiece(path: str) -> None:
    """A T5-style SentencePiece model (pad 0, eos 1, unk 2, no bos), smaller than T5's vocab."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_CAPTIONS * 10), model_writer=model, vocab_size=60,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        character_coverage=1.0, num_threads=1, minloglevel=2)
    with open(path, "wb") as f:
        f.write(model.getvalue())


def _cli(module: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, f"{module} {args}:\n{result.stderr[-3000:]}"
    return result.stdout


def write_hub_folders(root, encodec_model):
    """A tiny MusicGen (with a T5-style spiece.model) and `encodec_model` saved in the model
    hub's layout under `root`; returns their folders."""
    musicgen_hub, encodec_hub = root / "musicgen_hub", root / "encodec_hub"
    _tiny_musicgen().save_pretrained(str(musicgen_hub), safe_serialization=True)
    _train_spiece(str(musicgen_hub / "spiece.model"))
    encodec_model.save_pretrained(str(encodec_hub))
    return musicgen_hub, encodec_hub


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("musicgen_serving")
    encodec_model = _tiny_encodec()
    musicgen_hub, encodec_hub = write_hub_folders(root, encodec_model)
    run, artifact, out = root / "run", root / "artifact", root / "out"

    _cli("musicrl_jax.convert", "musicgen", "--source", str(musicgen_hub), "--out", str(run),
         "--max_caption_length", str(CAPTION_LENGTH))
    # The run directory doubles as the export's assets dir: vocab/ from the converter above,
    # tokenizer/ from this one.
    _cli("musicrl_jax.convert", "encodec", "--source", str(encodec_hub),
         "--out", str(run / "tokenizer"), "--bandwidth", str(BANDWIDTH))
    _cli("musicrl_jax.export", "--checkpoint_dir", str(run), "--assets_dir", str(run),
         "--out", str(artifact), "--num_frames", str(FRAMES), "--batch_size", str(BATCH))
    process = subprocess.Popen(
        [sys.executable, "-m", "musicrl_jax.generate", "--artifact", str(artifact),
         *[a for c in CAPTIONS for a in ("--caption", c)], "--guidance", str(GUIDANCE),
         "--seed", str(SEED), "--out_dir", str(out)],
        cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # While generate runs: the converted checkpoint sampled in this process.
    try:
        _, _, meta = rl_finetune.policy_checkpoint(str(run))
        config = music_lm.MusicLMConfig(**meta["model_config"])
        flat, _ = export.restore_policy_params(str(run), config)
        pieces = spm.SentencePieceProcessor(model_file=str(musicgen_hub / "spiece.model"))
        tokens = np.zeros((len(CAPTIONS), CAPTION_LENGTH), np.int32)
        for row, caption in zip(tokens, CAPTIONS):
            ids = [*pieces.EncodeAsIds(caption), decoding.EOS_ID]  # T5: pieces + EOS, pad 0
            row[:len(ids)] = ids
        expected = decoding.sample(
            config, traverse_util.unflatten_dict(flat, sep="/"), tokens,
            decoding.example_rngs(jax.random.PRNGKey(SEED), len(tokens)), num_frames=FRAMES,
            sampling=decoding.SamplingConfig(guidance_weight=GUIDANCE))
    finally:
        stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return {"artifact": artifact, "out": out, "stdout": stdout, "tokens": tokens,
            "expected_codes": np.asarray(expected["codes"]), "encodec": encodec_model}


def test_served_codes_equal_sampling_the_converted_checkpoint(served):
    manifest = json.loads((served["artifact"] / "manifest.json").read_text())
    assert (manifest["num_codebooks"], manifest["codebook_size"]) == (K, VOCAB)
    assert manifest["sample_rate"] == SAMPLE_RATE
    assert {"tokenizer/config.json", "vocab/captions.model"} <= set(manifest["files"])
    codes = np.load(served["out"] / "codes.npz")
    np.testing.assert_array_equal(codes["caption_tokens"], served["tokens"])
    assert codes["codes"].shape == (len(CAPTIONS), FRAMES, K)
    assert len(np.unique(codes["codes"])) > 8  # sampled, not a constant
    np.testing.assert_array_equal(codes["codes"], served["expected_codes"])


def test_wavs_are_encodec_decoding_at_its_rate(served):
    wavs = sorted(p for p in os.listdir(served["out"]) if p.endswith(".wav"))
    assert len(wavs) == len(CAPTIONS)
    codes = np.load(served["out"] / "codes.npz")["codes"]
    with torch.no_grad():  # transformers' EnCodec on the served codes: [1, B, K, F] in
        reference = served["encodec"].decode(torch.from_numpy(codes).permute(0, 2, 1)[None],
                                             [None]).audio_values[:, 0].numpy()
    for name, want in zip(wavs, reference):
        audio, rate = sf.read(served["out"] / name, dtype="float32")
        assert rate == SAMPLE_RATE and audio.shape == (FRAMES * HOP,)
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0.5
        # generate peak-normalises to 0.9 and writes PCM-16.
        np.testing.assert_allclose(audio, 0.9 * want / np.abs(want).max(), rtol=0, atol=2e-3)
