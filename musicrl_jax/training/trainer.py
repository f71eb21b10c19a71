"""The one supervised training loop (LM pretraining and every reward model).

A pure jitted step (state, batch) -> (state, metrics) with explicit shardings, gradient
accumulation by micro-batches, warmup+cosine AdamW with clipping, periodic evaluation,
NaN/Inf detection, Orbax checkpoints with automatic resume, CLU metric writers and a progress bar.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from musicrl_jax import partitioning
from musicrl_jax.checkpoints import Checkpointer, abstract_like
from musicrl_jax.errors import ConfigError, Preempted
from musicrl_jax.models import music_lm


class TrainingDivergedError(RuntimeError):
    """A loss or metric became NaN/Inf."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@gin.configurable
def make_optimizer(total_steps: int, learning_rate: float = 1e-3, warmup_steps: int = 100,
                   end_learning_rate_fraction: float = 0.1, weight_decay: float = 0.01,
                   b1: float = 0.9, b2: float = 0.98, clip_norm: float = 1.0):
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=learning_rate * end_learning_rate_fraction)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    return tx, schedule


def freeze(tx, config):
    """`tx`, except that the params `config` freezes (the LM's text encoder under
    freeze_text_encoder) never move: their gradients and updates are zeroed, so neither Adam nor
    weight decay drifts them. The state keeps `tx`'s layout (checkpoints of frozen and unfrozen
    runs restore alike), at the cost of Adam moments, held at zero, for the frozen params."""
    if not music_lm.frozen_text_encoder(config):
        return tx  # nothing frozen: the very same transformation

    def zero_frozen(tree):
        def leaf(path, x):
            top = getattr(path[0], "key", None) if path else None  # the top-level param name
            return jnp.zeros_like(x) if music_lm.in_text_encoder(top) else x
        return jax.tree_util.tree_map_with_path(leaf, tree)

    def update(updates, state, params=None, **extra_args):
        updates, state = tx.update(zero_frozen(updates), state, params, **extra_args)
        return zero_frozen(updates), state

    return optax.GradientTransformationExtraArgs(tx.init, update)


def create_train_state(task, tx, mesh, seed: int):
    """Sharded TrainState initialised directly on the mesh, and its shardings."""
    def init(rng):
        params = task.init_params(rng)
        # Boxed params make optimizer moments inherit the same logical axes.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return partitioning.sharded_init(init, mesh, jax.random.PRNGKey(seed))


def _microbatches(batch, num_micro: int):
    """[B, ...] -> [num_micro, B/num_micro, ...] taking rows i::num_micro, so each device's
    contiguous shard of the batch stays on that device."""
    def split(x):
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(task, tx, seed: int, grad_accum_steps: int = 1) -> Callable:
    tx = freeze(tx, getattr(task, "config", None))

    def grads_and_sums(params, batch, rng):
        def loss_fn(p):
            loss_sum, weight, sums = task.loss(p, batch, rng)
            return loss_sum, (weight, sums)
        (_, (weight, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, weight, sums

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
        if grad_accum_steps == 1:
            grads, weight, sums = grads_and_sums(state.params, batch, rng)
        else:
            micro = _microbatches(batch, grad_accum_steps)

            def accumulate(carry, inputs):
                index, micro_batch = inputs
                grads, weight, sums = grads_and_sums(state.params, micro_batch,
                                                     jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, carry, (grads, weight, sums)), None

            zero = jax.eval_shape(grads_and_sums, state.params,
                                  jax.tree.map(lambda x: x[0], micro), rng)
            zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
            (grads, weight, sums), _ = jax.lax.scan(
                accumulate, zero, (jnp.arange(grad_accum_steps), micro))
        # Sum-then-divide keeps accumulation exactly equal to one large batch.
        weight = jnp.maximum(weight.astype(jnp.float32), 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: v / weight for k, v in sums.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(params)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(task) -> Callable:
    def eval_step(params, batch):
        loss_sum, weight, sums = task.loss(params, batch, jax.random.PRNGKey(0))
        return weight, sums
    return eval_step


def jit_train_step(train_step, state_shardings, mesh, batch_example):
    batch_shardings = {k: partitioning.batch_sharding(mesh, np.ndim(v))
                       for k, v in batch_example.items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def evaluate(eval_step, params, source, batch_size, mesh, max_batches=None) -> dict[str, float]:
    totals: dict[str, float] = {}
    total_weight = 0.0
    for batch in source.eval_batches(batch_size, max_batches):
        weight, sums = eval_step(params, partitioning.shard_batch(batch, mesh))
        total_weight += float(weight)
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return {k: v / max(total_weight, 1.0) for k, v in totals.items()}


def check_finite(metrics: dict[str, float], step: int, where: str = "training"):
    bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
    if bad:
        raise TrainingDivergedError(
            f"{where} diverged at step {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}. "
            "The last saved checkpoint is intact. Fix: lower make_optimizer.learning_rate, "
            "raise warmup_steps or lower make_optimizer.clip_norm, then rerun (it resumes "
            "from that checkpoint).")


class PreemptionFlag:
    """Turns SIGTERM (what schedulers send before preempting) into a save-and-stop request."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_history(workdir: str) -> dict[int, dict]:
    """{step: eval metrics}; later lines win (a resumed run rewrites the steps it redid)."""
    return {row["step"]: row["eval"] for row in read_metrics(workdir) if "eval" in row}


def write_operative_config(workdir: str):
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.gin"), "w") as f:
            f.write(gin.operative_config_str())


class RunLog:
    """What every training loop records: `metrics.jsonl` and TensorBoard scalars (written by
    process 0), a progress bar, and throughput over the steps since the last reading."""

    def __init__(self, workdir: str, *, total: int, initial: int, desc: str,
                 show_progress: bool = True):
        self.is_main = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(os.path.join(workdir, "tensorboard"),
                                                           just_logging=not self.is_main)
        self._file = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.is_main else None
        self._show = show_progress and self.is_main
        self.progress = tqdm(total=total, initial=initial, desc=desc, disable=not self._show,
                             dynamic_ncols=True)
        self.restart_clock(initial)

    def restart_clock(self, step: int) -> None:
        """Throughput counts from here (call after work that is not training, e.g. eval)."""
        self._tick, self._since = time.perf_counter(), step

    def steps_per_sec(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self._since) / max(now - self._tick, 1e-9)
        self._tick, self._since = now, step
        return rate

    def record(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        """TensorBoard `kind/name` scalars; a jsonl row (train metrics flat, others nested)."""
        self.writer.write_scalars(step, {f"{kind}/{k}": v for k, v in metrics.items()})
        if self._file:
            row = {"step": step, **metrics} if kind == "train" else {"step": step, kind: metrics}
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()

    def say(self, label: str, metrics: dict[str, float]) -> None:
        if self._show:
            self.progress.write(label + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def close(self) -> None:
        self.progress.close()
        self.writer.flush()
        if self._file:
            self._file.close()


@gin.configurable
def train(task=gin.REQUIRED, workdir: str = gin.REQUIRED, *, num_steps: int = 100, batch_size: int = 32,
          grad_accum_steps: int = 1, eval_every: int = 50, eval_batch_size: int | None = None,
          eval_max_batches: int | None = None, log_every: int = 10,
          checkpoint_every: int = 50, keep_checkpoints: int = 3, seed: int = 0,
          eval_at_start: bool = True, show_progress: bool = True, mesh=None) -> dict[str, Any]:
    """Trains `task` for `num_steps` updates, resuming from `workdir/checkpoints` if present.

    Returns {'step', 'train': last train metrics, 'eval': last eval metrics}.
    """
    mesh = partitioning.make_mesh() if mesh is None else mesh
    partitioning.check_batch_size(batch_size, mesh, "train.batch_size")
    eval_batch_size = eval_batch_size or batch_size
    partitioning.check_batch_size(eval_batch_size, mesh, "train.eval_batch_size")
    if batch_size % grad_accum_steps or (batch_size // grad_accum_steps) % partitioning.batch_divisor(mesh):
        raise ConfigError(
            f"train.batch_size={batch_size} must split into grad_accum_steps={grad_accum_steps} "
            f"micro-batches that are each divisible by the mesh batch axes "
            f"({partitioning.batch_divisor(mesh)}). Fix: change batch_size or grad_accum_steps.")
    os.makedirs(workdir, exist_ok=True)
    rules = partitioning.logical_axis_rules()

    tx, schedule = make_optimizer(total_steps=num_steps)
    with partitioning.mesh_context(mesh, rules):
        state, state_shardings = create_train_state(task, tx, mesh, seed)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=checkpoint_every,
                                keep=keep_checkpoints, kind=task.kind)
    if checkpointer.latest_step() is not None:
        # The latest readable step: a damaged newer one is moved aside, not a stop.
        state = checkpointer.restore(abstract_like(state))
        logging.info("Resumed from step %d in %s", int(state.step), workdir)
    start = int(state.step)
    config = getattr(task, "config", None)
    model_meta = ({"model_config": dataclasses.asdict(config)}  # what export rebuilds it from
                  if dataclasses.is_dataclass(config) else None)

    example = task.train_source.train_batch(0, partitioning.host_local_batch_size(batch_size))
    with partitioning.mesh_context(mesh, rules):
        train_step = jit_train_step(make_train_step(task, tx, seed, grad_accum_steps),
                                    state_shardings, mesh, example)
        eval_step = jax.jit(make_eval_step(task))
    flops = getattr(task, "flops_per_example", None)
    flops_per_step = flops(example) * batch_size if flops else None

    log = RunLog(workdir, total=num_steps, initial=start, desc=f"train {task.kind}",
                 show_progress=show_progress)
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}

    def run_eval(done):
        metrics = evaluate(eval_step, state.params, task.eval_source, eval_batch_size, mesh,
                           eval_max_batches)
        check_finite(metrics, done, "evaluation")
        log.record(done, metrics, "eval")
        log.say(f"[{task.kind}] step {done}: eval ", metrics)
        return metrics

    local_batch = partitioning.host_local_batch_size(batch_size)
    step = start
    preempted_at = None
    try:
        with partitioning.mesh_context(mesh, rules), PreemptionFlag() as preemption:
            if eval_at_start and eval_every and start == 0:
                eval_metrics = run_eval(0)
            log.restart_clock(start)
            for step in range(start, num_steps):
                batch = partitioning.shard_batch(task.train_source.train_batch(step, local_batch), mesh)
                state, metrics = train_step(state, batch)
                done = step + 1
                if done % log_every == 0 or done == num_steps or done == start + 1:
                    train_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    check_finite(train_metrics, done)
                    train_metrics["steps_per_sec"] = log.steps_per_sec(done)
                    train_metrics["examples_per_sec"] = train_metrics["steps_per_sec"] * batch_size
                    if flops_per_step:
                        train_metrics["tflops_per_device"] = (
                            flops_per_step * train_metrics["steps_per_sec"] / jax.device_count() / 1e12)
                    train_metrics["learning_rate"] = float(schedule(step))
                    log.record(done, train_metrics)
                    log.progress.set_postfix(loss=f"{train_metrics.get('loss', float('nan')):.4f}")
                if done == start + 1:
                    write_operative_config(workdir)
                if eval_every and (done % eval_every == 0 or done == num_steps):
                    eval_metrics = run_eval(done)
                    log.restart_clock(done)
                # Read once: a SIGTERM arriving during the save must not stop an unsaved step.
                stop = preemption.requested
                checkpointer.save(done, state, meta=model_meta, force=done == num_steps or stop)
                log.progress.update(1)
                if stop:
                    logging.warning("SIGTERM: saved step %d, stopping.", done)
                    preempted_at = done
                    break
            step = int(state.step)
        # Split-level metrics that per-batch averages cannot give (recall@k, correlations, ECE).
        if hasattr(task, "heldout_metrics") and eval_every:
            heldout = {k: float(v) for k, v in task.heldout_metrics(state.params).items()}
            eval_metrics = {**eval_metrics, **heldout}
            log.record(step, heldout, "heldout")
            log.say(f"[{task.kind}] held-out: ", heldout)
    finally:
        log.close()
        checkpointer.close()
    if preempted_at is not None:
        raise Preempted(f"{workdir}: SIGTERM; saved step {preempted_at} of {num_steps}. Rerun "
                        "the same command to resume.")
    return {"step": step, "train": train_metrics, "eval": eval_metrics, "state": state}
