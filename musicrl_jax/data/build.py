"""Builds the music dataset (corpus, tokenizer, caption vocabulary, TFDS splits) and prints counts.

python -m musicrl_jax.data.build --data_dir DIR [--config demo|paper]
python -m musicrl_jax.data.build --data_dir DIR --config musicgen \
    --tokenizer_dir CKPT/tokenizer --caption_vocab CKPT/spiece.model   # a converted MusicGen
(A separate module: TFDS builders cannot be defined in `__main__`.)
"""

import argparse
import time

from musicrl_jax.audio.synthesis import SynthesisUnavailableError
from musicrl_jax.data.musicrl_music import MusicrlMusic, prepare_music_data
from musicrl_jax.errors import make_output_dir, report_user_errors

PROG = "python -m musicrl_jax.data.build"


# A missing FluidSynth or soundfont is the user's to install, as its message says.
@report_user_errors(PROG, SynthesisUnavailableError)
def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--config", default="demo",
                        choices=[c.name for c in MusicrlMusic.BUILDER_CONFIGS])
    parser.add_argument("--tokenizer_dir", help="a pretrained codec's tokenizer directory "
                        "(the musicgen configs: `convert encodec`'s output)")
    parser.add_argument("--caption_vocab", help="a pretrained SentencePiece model (the musicgen "
                        "configs: the converted checkpoint's T5 spiece.model)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    make_output_dir(args.data_dir, "--data_dir")
    assets = prepare_music_data(args.data_dir, args.config, args.tokenizer_dir,
                                args.caption_vocab)
    builder = MusicrlMusic(config=args.config, data_dir=args.data_dir)
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"musicrl_music/{args.config}: {splits} in {time.perf_counter() - start:.0f}s; "
          f"assets (corpus, tokenizer, vocab) in {assets}")


if __name__ == "__main__":
    main()
