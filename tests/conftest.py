"""Shared fixtures. Every test sees 8 virtual CPU devices so sharding is real."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests build many identical tiny programs (and subprocess runs of the CLI): a persistent
# compilation cache shared by the session turns their recompiles into cache hits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="musicrl_jax_xla_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

from musicrl_jax.data import toy  # noqa: E402
from musicrl_jax.models import music_lm  # noqa: E402
from musicrl_jax.training.tasks import MusicLMTask  # noqa: E402

TINY = music_lm.MusicLMConfig(caption_vocab_size=64, codebook_size=32, num_codebooks=2,
                              embed_dim=32, num_heads=2, head_dim=16, mlp_dim=64,
                              num_encoder_layers=1, num_decoder_layers=2,
                              max_caption_length=8, max_frames=12)


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(scope="session")
def tiny_config():
    return TINY


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A mel-RVQ tokenizer matching TINY (K=2, 32 entries), fitted on synthetic tones."""
    import importlib.util

    from musicrl_jax.audio.tokenizer import MelRVQTokenizer
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "tokenizer.py")
    spec = importlib.util.spec_from_file_location("bench_tokenizer", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return MelRVQTokenizer(num_codebooks=TINY.num_codebooks, codebook_size=TINY.codebook_size,
                           kmeans_max_iters=10, griffin_lim_iters=4).fit(
                               bench.synthetic_clips(4, 2.0, seed=0))


@pytest.fixture(scope="session")
def tiny_music_data(tmp_path_factory):
    """The `tiny` music data (53 / 5 / 2 clips), built once for the session: (data_dir,
    assets). Modules that read it through seqio call `tasks.register_tasks(data_dir, "tiny")`
    in their own fixture (another module may have registered other data since)."""
    from musicrl_jax.data import musicrl_music
    data_dir = str(tmp_path_factory.mktemp("tiny_music_data"))
    return data_dir, musicrl_music.prepare_music_data(data_dir, "tiny")


_init_params = jax.jit(music_lm.init_params, static_argnums=0)


def lm_params(config, seed):
    """Unboxed `music_lm.init_params(config, PRNGKey(seed))`, jitted: the same params bit for
    bit, from one compile instead of one per eager op of the model's forward pass."""
    return nn.meta.unbox(_init_params(config, jax.random.PRNGKey(seed)))


@pytest.fixture(scope="session")
def tiny_params():
    return lm_params(TINY, 0)


def toy_task(config=TINY, num_train=256, num_eval=64, noise=0.05, caption_dropout=0.1):
    kwargs = dict(num_frames=config.max_frames, num_codebooks=config.num_codebooks,
                  codebook_size=config.codebook_size, caption_length=config.max_caption_length,
                  noise=noise)
    return MusicLMTask(train_source=toy.toy_source("train", num_train, **kwargs),
                       eval_source=toy.toy_source("validation", num_eval, **kwargs),
                       config=config, caption_dropout=caption_dropout)
