"""Every command-line entry point answers a user's mistake (a wrong or missing directory, a file
of the wrong kind, unreadable audio, another sample rate, an empty captions file) with exit
status 2 and one paragraph on stderr, `<prog>: error: <message naming the input and the fix>`,
never a traceback. In-process through each main(argv); two subprocesses show that the real
processes print no traceback either."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")


def _benchmark(name: str):
    """A benchmarks/ script as a module (they import their siblings by name)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    spec = importlib.util.spec_from_file_location(f"cli_errors_{name}",
                                                  os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _main(module: str):
    if module.startswith("benchmarks/"):
        return _benchmark(module.split("/")[1]).main
    package = importlib.import_module(module)
    if not hasattr(package, "main"):  # a package run with -m: its __main__
        package = importlib.import_module(f"{module}.__main__")
    return package.main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer):
    """Paths the cases name: a saved tokenizer inside a dataset-like assets folder, clips at the
    tokenizer's rate and at another, and files of the wrong kind."""
    root = tmp_path_factory.mktemp("inputs")
    tiny_tokenizer.save(root / "assets" / "tokenizer")
    rate = tiny_tokenizer.sample_rate
    tone = np.sin(np.linspace(0, 2000, rate)).astype(np.float32) * 0.3
    (root / "wavs_ok").mkdir()
    sf.write(root / "wavs_ok" / "clip.wav", tone, rate)
    (root / "wavs_22k").mkdir()
    sf.write(root / "wavs_22k" / "clip.wav", tone, 22050)
    (root / "not_audio.wav").write_text("not audio\n")
    (root / "a_file").write_text("a file where a directory belongs\n")
    (root / "empty.txt").write_text("\n  \n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 caption\n")
    (root / "captions.txt").write_text("calm piano\n")
    (root / "captions.jsonl").write_text(json.dumps(
        {"caption": "calm piano", "caption_tokens": [5, 1]}) + "\n")
    np.savez(root / "no_codes.npz", other=np.zeros(3))
    (root / "empty_dir").mkdir()
    (root / "hub_without_config").mkdir()
    return {"root": str(root), "assets": str(root / "assets"),
            "tokenizer": str(root / "assets" / "tokenizer")}


# (entry point, argv with {root}/{assets}/{tokenizer} placeholders, what stderr must say)
CASES = [
    # The example: the assets folder instead of its tokenizer/ subfolder.
    ("musicrl_jax.audio.listen",
     ["--tokenizer", "{assets}", "--wav", "{root}/wavs_ok/clip.wav", "--out_dir", "{root}/o"],
     ["--tokenizer {assets}", "looks like a dataset assets folder", "Fix: pass",
      "{tokenizer}"]),
    ("musicrl_jax.audio.listen",
     ["--tokenizer", "{root}/missing", "--wav", "{root}/wavs_ok/clip.wav", "--out_dir",
      "{root}/o"],
     ["--tokenizer {root}/missing", "does not exist", "tokenizer.save"]),
    ("musicrl_jax.audio.listen",
     ["--tokenizer", "{root}/a_file", "--wav", "{root}/wavs_ok/clip.wav", "--out_dir",
      "{root}/o"],
     ["--tokenizer {root}/a_file", "is a file, not a tokenizer directory"]),
    ("musicrl_jax.audio.listen",
     ["--tokenizer", "{tokenizer}", "--wav", "{root}/missing.wav", "--out_dir", "{root}/o"],
     ["--wav {root}/missing.wav: no such file", "Fix:"]),
    ("musicrl_jax.audio.listen",
     ["--tokenizer", "{tokenizer}", "--wav", "{root}/not_audio.wav", "--out_dir", "{root}/o"],
     ["--wav {root}/not_audio.wav: not readable audio", "Fix:"]),
    ("musicrl_jax.audio.listen",
     ["--tokenizer", "{tokenizer}", "--wav", "{root}/wavs_22k/clip.wav", "--out_dir",
      "{root}/o"],
     ["--wav {root}/wavs_22k/clip.wav is 22050 Hz", "reads 16000 Hz", "Fix: resample"]),
    ("musicrl_jax.audio.listen",
     ["--tokenizer", "{tokenizer}", "--tokens", "{root}/captions.txt", "--out_dir", "{root}/o"],
     ["--tokens {root}/captions.txt: not a NumPy", "Fix:"]),
    ("musicrl_jax.audio.listen",
     ["--tokenizer", "{tokenizer}", "--tokens", "{root}/no_codes.npz", "--out_dir", "{root}/o"],
     ["--tokens {root}/no_codes.npz: no 'codes' array", "Fix:"]),
    ("musicrl_jax.audio.listen",
     ["--tokenizer", "{tokenizer}", "--wav", "{root}/wavs_ok/clip.wav", "--out_dir",
      "{root}/a_file"],
     ["--out_dir {root}/a_file: cannot create", "Fix:"]),

    ("musicrl_jax.generate",
     ["--artifact", "{root}/missing", "--caption", "calm", "--out_dir", "{root}/o"],
     ["--artifact {root}/missing: no such directory", "Fix:"]),
    ("musicrl_jax.generate",
     ["--artifact", "{root}/empty_dir", "--caption", "calm", "--out_dir", "{root}/o"],
     ["{root}/empty_dir has no manifest.json", "Fix: re-export"]),
    ("musicrl_jax.generate",
     ["--artifact", "{root}/empty_dir", "--captions_file", "{root}/empty.txt", "--out_dir",
      "{root}/o"],
     ["--captions_file {root}/empty.txt holds no captions", "Fix:"]),
    ("musicrl_jax.generate",
     ["--artifact", "{root}/empty_dir", "--captions_file", "{root}/binary.txt", "--out_dir",
      "{root}/o"],
     ["--captions_file {root}/binary.txt: not UTF-8 text", "Fix:"]),
    ("musicrl_jax.generate",
     ["--artifact", "{root}/empty_dir", "--captions_file", "{root}/missing.txt", "--out_dir",
      "{root}/o"],
     ["--captions_file {root}/missing.txt: no such file", "Fix:"]),

    ("musicrl_jax.export",
     ["--checkpoint_dir", "{root}/missing", "--assets_dir", "{assets}", "--out", "{root}/o"],
     ["No policy checkpoint directory at {root}/missing", "Fix:"]),
    ("musicrl_jax.export",
     ["--checkpoint_dir", "{root}/empty_dir", "--assets_dir", "{assets}", "--out", "{root}/o"],
     ["No complete checkpoint in {root}/empty_dir", "Fix:"]),

    ("musicrl_jax.convert",
     ["musicgen", "--source", "{root}/missing", "--out", "{root}/o"],
     ["{root}/missing: not a directory", "Fix:"]),
    ("musicrl_jax.convert",
     ["encodec", "--source", "{root}/hub_without_config", "--out", "{root}/o"],
     ["{root}/hub_without_config: no config.json", "Fix:"]),
    ("musicrl_jax.convert",
     ["encodec", "--source", "{root}/hub_without_config", "--out", "{root}/a_file"],
     ["--out {root}/a_file: cannot create", "Fix:"]),

    ("musicrl_jax.listening",
     ["make-batch", "--out", "{root}/batch", "--captions", "{root}/empty.txt", "--model-a", "a",
      "--model-b", "b", "--wavs-a", "{root}/wavs_ok", "--wavs-b", "{root}/wavs_ok"],
     ["--captions {root}/empty.txt holds no captions", "Fix:"]),
    ("musicrl_jax.listening",
     ["make-batch", "--out", "{root}/batch", "--captions", "{root}/captions.jsonl",
      "--model-a", "a", "--model-b", "b", "--wavs-a", "{root}/wavs_ok", "--wavs-b",
      "{root}/wavs_ok", "--tokenizer", "{assets}"],
     ["--tokenizer {assets}", "looks like a dataset assets folder", "{tokenizer}"]),
    ("musicrl_jax.listening",
     ["make-batch", "--out", "{root}/batch", "--captions", "{root}/captions.jsonl",
      "--model-a", "a", "--model-b", "b", "--wavs-a", "{root}/wavs_22k", "--wavs-b",
      "{root}/wavs_ok", "--tokenizer", "{tokenizer}"],
     ["--wavs-a {root}/wavs_22k/clip.wav is 22050 Hz", "Fix: resample"]),
    ("musicrl_jax.listening",
     ["summary", "--db", "{root}/missing.db"],
     ["--db {root}/missing.db: no such database"]),
    ("musicrl_jax.listening",
     ["serve", "--batch", "{root}/empty_dir", "--db", "{root}/votes.db"],
     ["No batch manifest at {root}/empty_dir", "Fix:"]),

    ("musicrl_jax.data.build",
     ["--data_dir", "{root}/a_file"],
     ["--data_dir {root}/a_file: cannot create", "Fix:"]),
    ("musicrl_jax.data.build",
     ["--data_dir", "{root}/data", "--config", "no_such_config"],
     ["argument --config: invalid choice: 'no_such_config'"]),
    ("musicrl_jax.data.build",
     ["--data_dir", "{root}/data", "--config", "musicgen_tiny"],
     ["prepare_music_data.tokenizer_dir", "is not set", "--tokenizer_dir"]),
    ("musicrl_jax.data.build",
     ["--data_dir", "{root}/data", "--config", "musicgen_tiny", "--tokenizer_dir", "{assets}",
      "--caption_vocab", "{root}/captions.txt"],
     ["prepare_music_data.tokenizer_dir={assets}", "looks like a dataset assets folder",
      "{tokenizer}"]),

    ("musicrl_jax.data.corpus",
     ["--out_dir", "{root}/a_file"],
     ["--out_dir {root}/a_file: cannot create", "Fix:"]),
    ("musicrl_jax.data.corpus",
     ["--out_dir", "{root}/corpus", "--num_clips", "0"],
     ["num_clips must be positive, got 0"]),
    ("musicrl_jax.data.corpus",
     ["--out_dir", "{root}/corpus", "--soundfont", "{root}/missing.sf2"],
     ["{root}/missing.sf2", "not found", "apt-get install"]),

    ("benchmarks/collection",
     ["--tokenizer_dir", "{root}/missing"],
     ["--tokenizer_dir={root}/missing: no fitted tokenizer there", "Fix:"]),
    ("benchmarks/collection",
     ["--tokenizer_dir", "{assets}"],
     ["--tokenizer_dir={assets}", "looks like a dataset assets folder", "{tokenizer}"]),
    ("benchmarks/decode",
     ["--model", "no_such_size"],
     ["--model=no_such_size: no ", "Fix: choose one of"]),
    ("benchmarks/tokenizer",
     ["--corpus_dir", "{root}/empty_dir"],
     ["{root}/empty_dir/manifest.jsonl is missing", "Fix:"]),
    ("benchmarks/tokenizer",
     ["--save_dir", "{root}/a_file"],
     ["--save_dir {root}/a_file: cannot create", "Fix:"]),
    ("benchmarks/lm_quality",
     ["--checkpoint", "{root}/missing", "--data_dir", "{root}/empty_dir"],
     ["Caption vocabulary {root}/empty_dir/", "is missing", "Fix:"]),
    ("benchmarks/musicgen_memory",
     ["--sizes", "small,huge"],
     ["--sizes: unknown ['huge']"]),
]

def _prog(module: str) -> str:
    if module.startswith("benchmarks/"):
        return f"python {module}.py"
    return f"python -m {module}"


def _fill(text: str, inputs) -> str:
    return text.format(**inputs)


def assert_one_paragraph(err: str, prog: str, expected: list[str]) -> None:
    assert "Traceback" not in err, err
    paragraph = err.strip().split("\n\n")[-1]  # anything logged before is not the report
    assert f"{prog}: error: " in paragraph, err
    for text in expected:
        assert text in paragraph, f"{text!r} not in:\n{paragraph}"


@pytest.mark.parametrize("module,argv,expected", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_user_mistake_exits_2_with_one_paragraph(module, argv, expected, inputs, capsys):
    main = _main(module)
    with pytest.raises(SystemExit) as exit_info:
        main([_fill(arg, inputs) for arg in argv])
    assert exit_info.value.code == 2
    assert_one_paragraph(capsys.readouterr().err, _prog(module),
                         [_fill(text, inputs) for text in expected])


@pytest.mark.parametrize("module,argv,expected", [
    ("musicrl_jax.main", ["--gin_file=no_such_file.gin"],
     ["--gin_file=no_such_file.gin: file not found", "Fix:"]),
    CASES[0],
])
def test_real_process_prints_no_traceback(module, argv, expected, inputs):
    result = subprocess.run([sys.executable, "-m", module, *(_fill(a, inputs) for a in argv)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert_one_paragraph(result.stderr, f"python -m {module}",
                         [_fill(text, inputs) for text in expected])
