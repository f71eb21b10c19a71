"""The one entry point: `python -m musicrl_jax.main --gin_file=... --gin_bindings=...`.

A gin file selects the stage by binding `run.job` (e.g. `run.job = @train`); everything the
stage varies is a binding. User errors (bad binding, missing file, impossible mesh or batch)
print one paragraph and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

from absl import app, flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF (via seqio/CLU) only for errors

PROG = "python -m musicrl_jax.main"
FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Gin config files (searched in gin_search_paths).")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'train.num_steps=10'.")
flags.DEFINE_list("gin_search_paths", [], "Extra directories to search for gin files.")

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEARCH_PATHS = (os.path.join(PACKAGE_ROOT, "gin_configs"), ".", PACKAGE_ROOT)


def maybe_initialize_distributed():
    """Multi-host: JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, or a TPU pod's
    auto-detected cluster, start jax.distributed before anything touches the devices; one
    process splits a CPU-only host into a device per core (`partitioning.use_cpu_cores`).

    A GKE TPU slice announces itself with TPU_WORKER_HOSTNAMES; a Cloud TPU VM slice only through
    its metadata server, so launch/tpu_run.sh sets MUSICRL_DISTRIBUTED=auto to ask for
    argument-less auto-detection there."""
    import jax
    if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                                   int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
    elif (os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1
          or os.environ.get("MUSICRL_DISTRIBUTED") == "auto"):
        jax.distributed.initialize()
    else:  # one process: on a CPU-only host, one device per core
        from musicrl_jax.partitioning import use_cpu_cores
        use_cpu_cores()


class _GinSearchNoise(std_logging.Filter):
    """gin logs an error for every search path an include is *not* found in; only the final
    failure matters, and that one becomes a ConfigError."""

    def filter(self, record):
        return not record.getMessage().startswith("Path not found")


def parse_gin(gin_files, gin_bindings, search_paths=()):
    """Parses gin files and bindings, turning gin's errors into ConfigErrors that say the fix."""
    import gin

    std_logging.getLogger().addFilter(_GinSearchNoise())

    from musicrl_jax import registry  # noqa: F401  (registers every configurable)
    from musicrl_jax.errors import ConfigError

    for path in (*search_paths, *DEFAULT_SEARCH_PATHS):
        gin.add_config_file_search_path(path)
    for gin_file in gin_files:
        try:
            gin.parse_config_file(gin_file)
        except (IOError, OSError) as err:
            raise ConfigError(
                f"--gin_file={gin_file}: file not found (searched {', '.join(DEFAULT_SEARCH_PATHS)}"
                f"). Fix: give a path relative to the repository or gin_configs/, e.g. "
                f"--gin_file=local/pretrain.gin. ({err})") from err
        except ValueError as err:
            raise ConfigError(f"--gin_file={gin_file}: {err}\nFix: correct that line of the "
                              "file; every configurable name must exist in musicrl_jax.") from err
    for binding in gin_bindings:
        try:
            gin.parse_config(binding)
        except (ValueError, SyntaxError) as err:
            raise ConfigError(
                f"--gin_bindings={binding!r}: {err}\nFix: use 'configurable.parameter=value' with "
                "a configurable and parameter that exist (see the run's config.gin for the "
                "operative names).") from err
    try:
        gin.finalize()
    except ValueError as err:
        raise ConfigError(f"gin config: {err}") from err


def run_job():
    from musicrl_jax.registry import run
    return run()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]} (use --gin_bindings).")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep Orbax/CLU chatter out of the progress bar
    maybe_initialize_distributed()
    from musicrl_jax.audio.synthesis import SynthesisUnavailableError
    from musicrl_jax.errors import Preempted, report_user_errors
    from musicrl_jax.training.trainer import TrainingDivergedError
    try:
        # Also the user's to fix: a diverged loss (in the config) and a missing FluidSynth or
        # soundfont (to install), as their messages say.
        with report_user_errors(PROG, TrainingDivergedError, SynthesisUnavailableError):
            parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
            run_job()
    except Preempted as err:
        # Exit 0 like a finished run: nothing failed, and the saved step resumes. Later stages
        # of the job did not run.
        logging.flush()
        print(f"\nmusicrl_jax: preempted: {err}", file=sys.stderr)
        sys.exit(0)


if __name__ == "__main__":
    app.run(main)
