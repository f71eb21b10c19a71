"""Where a KV-cache decode step's time goes: a `jax.profiler` trace of `decoding.sample`,
every executed XLA op's time summed by kind.

  matmul     dots and fusions that contain a dot (projections, MLP, attention scores/values,
             the K codebook heads)
  sampling   the sampler's softmax / inverse-CDF / RNG work (exponentials, reduce-windows,
             sorts, rng ops, and fusions of them)
  other      everything else XLA runs (cache updates, elementwise, copies, loop control)
  dispatch   wall time not covered by any op: the runtime's per-op launch cost between ops

The op kinds come from the compiled program's HLO (the same executable the trace ran). The
trace (Perfetto JSON) stays under --trace_dir for a closer look (ui.perfetto.dev).

Usage:
  python benchmarks/decode_profile.py --embed_dim 256 --layers 4 --head_dim 64 --frames 150
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
from flax.linen import meta  # noqa: E402

import decode  # noqa: E402  (the sibling benchmark's model loading and sampler)
from musicrl_jax import decoding  # noqa: E402
from musicrl_jax.errors import report_user_errors  # noqa: E402
from musicrl_jax.models import music_lm  # noqa: E402

SAMPLING_OPS = ("exponential", "reduce-window", "sort", "rng", "log", "cumsum", "random")


def op_kinds(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> matmul / sampling / other, from the compiled module's text."""
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(1)
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    kinds = {}
    for lines in bodies.values():
        for line in lines:
            match = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([\w\-]+)\(", line)
            if not match:
                continue
            name, opcode = match.groups()
            called = re.findall(r"calls=%?([\w.\-]+)", line)
            text = " ".join([opcode] + [" ".join(bodies.get(c, [])) for c in called])
            if re.search(r"\b(dot|convolution)\(", text) or opcode == "dot":
                kinds[name] = "matmul"
            elif any(op in text or op in name for op in SAMPLING_OPS):
                kinds[name] = "sampling"
            else:
                kinds[name] = "other"
    return kinds


@report_user_errors("python benchmarks/decode_profile.py")
def main(argv=None):
    parser_args = decode.parse_args(argv if argv is not None else sys.argv[1:])
    config = decode.load_config(parser_args)
    params = meta.unbox(music_lm.init_params(config, jax.random.PRNGKey(parser_args.seed)))
    method = decode.jax_method(config, params, parser_args.batch, parser_args.frames,
                               use_cache=True, seed=parser_args.seed)
    sampling = decoding.SamplingConfig()
    hlo = decoding._sample_jit.lower(
        config, params, *decode.sample_inputs(config, parser_args.batch, parser_args.seed),
        jax.numpy.float32(sampling.temperature), jax.numpy.float32(sampling.guidance_weight),
        num_frames=parser_args.frames, top_k=sampling.top_k, guidance=False,
        use_cache=True).compile().as_text()
    kinds = op_kinds(hlo)
    for _ in range(2):  # compile and warm up
        method.run()
    trace_dir = tempfile.mkdtemp(prefix="decode_profile_")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        method.run()
        wall = time.perf_counter() - start
    path = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"),
                     recursive=True)[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    seconds = collections.Counter()
    loops = {name for name in kinds if name.startswith("while")}
    for event in events:
        # Loop ops' spans contain their bodies' ops: count the bodies only.
        if event.get("ph") == "X" and event["name"] in kinds and event["name"] not in loops:
            seconds[kinds[event["name"]]] += event.get("dur", 0) / 1e6
    steps = parser_args.frames + config.num_codebooks - 1
    seconds["dispatch"] = max(wall - sum(seconds.values()), 0.0)
    print(f"decode, embed {config.embed_dim}, {config.num_decoder_layers} layers, batch "
          f"{parser_args.batch}, {steps} steps: {wall * 1e3 / steps:.2f} ms per step")
    for kind in ("matmul", "sampling", "other", "dispatch"):
        print(f"  {kind:9s} {seconds[kind] * 1e3 / steps:6.2f} ms/step  "
              f"{seconds[kind] / wall:5.1%}")
    print(f"trace: {path}")
    return {"wall_s": wall, "steps": steps, **{k: float(v) for k, v in seconds.items()}}


if __name__ == "__main__":
    main()
