"""The data stage end to end on the `tiny` config, and the seqio tasks' error handling."""

import dataclasses
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

from musicrl_jax.data import musicrl_music, tasks, vocab
from musicrl_jax.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_data(tiny_music_data):
    data_dir, assets = tiny_music_data  # built once per session (conftest)
    tasks.register_tasks(data_dir, "tiny")
    return data_dir, assets


def test_tiny_dataset_yields_documented_shapes(tiny_data):
    data_dir, assets = tiny_data
    builder = musicrl_music.MusicrlMusic(config="tiny", data_dir=data_dir)
    counts = {name: split.num_examples for name, split in builder.info.splits.items()}
    assert set(counts) == {"train", "validation", "test"} and all(counts.values())
    source = tasks.seqio_source("train", caption_length=40, num_frames=120)
    arrays = source.arrays
    n = counts["train"]
    assert arrays["caption_tokens"].shape == (n, 40)
    assert arrays["audio_codes"].shape == (n, 120, 2)
    assert arrays["audio_mask"].shape == (n, 120)
    # 2 s at 50 frames/s = 100 real frames, then padding with mask 0.
    np.testing.assert_array_equal(arrays["audio_mask"].sum(1), 100)
    assert arrays["audio_codes"][:, 100:].max() == 0
    assert 0 <= arrays["audio_codes"].min() and arrays["audio_codes"].max() < 32
    # Captions end with EOS (1) and decode back to text through the seqio vocabulary.
    vocabulary = vocab.load_caption_vocabulary(f"{assets}/vocab")
    first = arrays["caption_tokens"][0]
    assert 1 in first.tolist()
    assert "BPM" in vocabulary.decode(first.tolist())
    prompts = tasks.prompts("validation", caption_length=40)
    assert len(prompts["caption"]) == counts["validation"]
    assert prompts["caption_tokens"].shape == (counts["validation"], 40)


def test_a_tokenizer_fitted_with_other_settings_is_refitted(tiny_data, tmp_path):
    import os

    from musicrl_jax.audio.tokenizer import MelRVQTokenizer, load_tokenizer
    from musicrl_jax.data import corpus
    data_dir, assets = tiny_data
    builder = musicrl_music.MusicrlMusic(config="tiny", data_dir=data_dir)
    cfg = builder.builder_config
    fitted = load_tokenizer(f"{assets}/tokenizer").config()
    assert (fitted["num_codebooks"], fitted["codebook_size"], fitted["hop_length"],
            fitted["n_fft"], fitted["n_mels"]) == (cfg.num_codebooks, cfg.codebook_size,
                                                    cfg.hop_length, cfg.n_fft, cfg.n_mels)
    # A stale tokenizer (an earlier codec setting) in the assets is refitted, not reused.
    corpus_dir = f"{assets}/corpus"
    train = corpus.load_manifest(corpus_dir, "train")
    stale = MelRVQTokenizer(num_codebooks=1, codebook_size=8, kmeans_max_iters=2).fit(
        [musicrl_music.read_wav(os.path.join(corpus_dir, c.wav)) for c in train[:4]])
    builder._data_dir_root = str(tmp_path)  # `builder.assets` -> a scratch directory
    scratch_tokenizer = f"{musicrl_music.assets_dir(str(tmp_path), 'tiny')}/tokenizer"
    stale.save(scratch_tokenizer)
    refitted = builder._fit_tokenizer(corpus_dir, train)
    assert (refitted.num_codebooks, refitted.codebook_size) == (cfg.num_codebooks,
                                                                cfg.codebook_size)
    assert load_tokenizer(scratch_tokenizer).codebook_size == cfg.codebook_size


def _records_task(records, vocab_dir, name="musicrl_test_records"):

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        return tf.data.Dataset.from_generator(
            lambda: iter(records),
            output_signature={k: tf.TensorSpec(np.shape(v), tf.string if isinstance(v, str)
                                               else tf.int32)
                              for k, v in records[0].items()})

    source = seqio.FunctionDataSource(dataset_fn, splits=["train"])
    # The caption is already text; tokenisation through a real vocabulary is tested above.
    tasks.add_pretrain_task(name, source, seqio.SentencePieceVocabulary(
        vocab.train_caption_vocabulary(["a slow chorale in C major"] * 50, vocab_dir,
                                       vocab_size=40)), codebook_size=16, num_codebooks=2)
    return name


def test_out_of_range_token_names_the_clip(tmp_path):
    good = {"clip_id": "good-clip", "caption": "a slow chorale",
            "audio_tokens": np.zeros((8, 2), np.int32)}
    bad = dict(good, clip_id="bad-clip-17", audio_tokens=np.full((8, 2), 99, np.int32))
    name = _records_task([good, bad], str(tmp_path))
    with pytest.raises(ConfigError, match="bad-clip-17.*outside"):
        tasks._task_numpy(name, "train", {"caption_tokens": 16, "audio_codes": 8}, False,
                          tasks.MusicLMFeatureConverter())


def test_record_without_tokens_names_the_field(tmp_path):
    name = _records_task([{"clip_id": "c1", "caption": "a slow chorale"}], str(tmp_path))
    with pytest.raises(ConfigError, match=r"lack the field\(s\) \['audio_tokens'\]"):
        tasks._task_numpy(name, "train", {"caption_tokens": 16, "audio_codes": 8}, False,
                          tasks.MusicLMFeatureConverter())


def test_unregistered_task_is_a_clear_error():
    with pytest.raises(ConfigError, match="not registered"):
        tasks._task_numpy("musicrl_no_such_task", "train", {"caption_tokens": 8}, False)


def test_caption_vocabulary_gives_each_tempo_one_piece_the_lm_reads(tmp_path):
    import io

    import sentencepiece as spm

    from musicrl_jax.models import music_lm
    captions = [f"a slow chorale in C major at {bpm} BPM, 3/4 time" for bpm in range(50, 200, 7)]
    vocab_dir = str(tmp_path / "vocab")
    # A vocabulary from before the tempo pieces is refitted, not silently reused.
    os.makedirs(vocab_dir)
    old = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions * 5), model_writer=old,
                                   vocab_size=60, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    with open(os.path.join(vocab_dir, vocab.VOCAB_FILE), "wb") as f:
        f.write(old.getvalue())
    assert not vocab.caption_vocabulary_is_current(vocab_dir)
    vocab.train_caption_vocabulary(captions * 5, vocab_dir, vocab_size=40)
    assert vocab.caption_vocabulary_is_current(vocab_dir)
    vocabulary = vocab.load_caption_vocabulary(vocab_dir)
    # Tempos the training captions never used (117, 240) are single pieces too.
    for text, bpm in [("a chorale at 117 BPM", 117), ("a slow chorale in C major, 240 BPM", 240),
                      ("a slow chorale in 3/4 time", 0)]:
        ids = vocabulary.encode(text)
        assert vocabulary.decode(ids) == text
        np.testing.assert_array_equal(music_lm.caption_bpm(np.array([ids + [1]])), [bpm])


def test_the_lm_reads_each_captions_tempo_from_the_built_data(tiny_data):
    from musicrl_jax import pipeline
    from musicrl_jax.models import music_lm
    _, assets = tiny_data
    prompts = tasks.prompts("validation", caption_length=64)
    named = np.array(["BPM" in c for c in prompts["caption"]])
    assert named.sum() >= len(named) // 2
    np.testing.assert_array_equal(music_lm.caption_bpm(prompts["caption_tokens"])[named],
                                  prompts["tempo_bpm"][named])
    config = music_lm.MusicLMConfig(caption_vocab_size=512, head_dim=16,
                                    beat_rope_multiples=(1.0,), frames_per_second=50.0)
    pipeline.check_lm_reads_tempos(config, assets)  # the tiny tokenizer makes 50 frames/s
    with pytest.raises(ConfigError, match="frames_per_second = 50"):
        pipeline.check_lm_reads_tempos(dataclasses.replace(config, frames_per_second=25.0),
                                       assets)
