"""Builds the music dataset (corpus, tokenizer, caption vocabulary, TFDS splits) and prints counts.

python -m musicrl_jax.data.build --data_dir DIR [--config demo|paper]
(A separate module: TFDS builders cannot be defined in `__main__`.)
"""

import argparse
import time

from musicrl_jax.data.musicrl_music import MusicrlMusic, prepare_music_data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--config", default="demo",
                        choices=[c.name for c in MusicrlMusic.BUILDER_CONFIGS])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    assets = prepare_music_data(args.data_dir, args.config)
    builder = MusicrlMusic(config=args.config, data_dir=args.data_dir)
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"musicrl_music/{args.config}: {splits} in {time.perf_counter() - start:.0f}s; "
          f"assets (corpus, tokenizer, vocab) in {assets}")


if __name__ == "__main__":
    main()
