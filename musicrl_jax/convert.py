"""Model-hub checkpoints into this project's formats: `python -m musicrl_jax.convert KIND ...`.

  musicgen --source DIR --out RUN_DIR
      A MusicGen (transformers' MusicgenForConditionalGeneration layout: config.json with
      text_encoder/audio_encoder/decoder, model.safetensors or shards) becomes a pretrained-LM
      run directory: RUN_DIR/checkpoints (Orbax, kind 'music_lm', step 0, the same TrainState a
      pretraining run saves, so RL, evaluation and export restore it sharded as they restore
      pretraining) and RUN_DIR/config.gin binding the MusicLMConfig that expresses it. The T5
      text encoder comes along (frozen); the EnCodec audio tensors are left to the audio
      converter. The hub folder's spiece.model, if present, is copied to
      RUN_DIR/vocab/captions.model (the caption vocabulary MusicGen was trained with).
      Captions for it are T5 SentencePiece ids plus EOS (pad 0, eos 1), which
      seqio.SentencePieceVocabulary(spiece.model) with add_eos gives: copy spiece.model to
      DATA_DIR/musicrl_music_assets/CONFIG/vocab/captions.model and bind
      `train_caption_vocabulary.tempo_pieces = False` so the data build keeps it. Include
      RUN_DIR/config.gin and point `demo.pretrained_lm` / `rl_finetune.init_checkpoint` at
      RUN_DIR.

  encodec --source DIR --out TOKENIZER_DIR [--bandwidth KBPS]
      An EnCodec (e.g. facebook/encodec_32khz, MusicGen's audio codec) becomes an
      EncodecTokenizer directory (musicrl_jax.audio.encodec: SEANet + RVQ in JAX, weight norm
      folded) that load_tokenizer reads; the number of codebooks follows the bandwidth.

Errors (not a MusicGen/EnCodec folder, missing shard, a tensor whose shape or dtype does not match
config.json, tensors left over) print one paragraph and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from typing import Any, Callable

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF (via CLU) only for errors

from musicrl_jax import hub  # noqa: E402
from musicrl_jax.errors import ConfigError, make_output_dir, report_user_errors  # noqa: E402

LM_KIND = "music_lm"  # what a pretraining run's checkpoints hold (tasks.PretrainTask.kind)
GIN_FILE = "config.gin"
VOCAB_FILE = os.path.join("vocab", "captions.model")  # generate.VOCAB_FILE's layout
SPIECE_FILE = "spiece.model"  # T5's SentencePiece model in a MusicGen hub folder
PROG = "python -m musicrl_jax.convert"


# --- MusicGen ------------------------------------------------------------------------------------

def _section(config: dict, name: str, path: str, model_types: tuple[str, ...]) -> dict:
    section = config.get(name)
    if not isinstance(section, dict) or section.get("model_type") not in model_types:
        found = section.get("model_type") if isinstance(section, dict) else None
        raise ConfigError(f"{path}: the '{name}' section has model_type={found!r}, expected one "
                          f"of {list(model_types)}. Fix: pass a MusicGen checkpoint "
                          "(e.g. facebook/musicgen-small); other text encoders are not supported.")
    return section


def _require(section: dict, key: str, path: str, where: str):
    if key not in section:
        raise ConfigError(f"{path}: '{where}' lacks {key!r}. Fix: use the config.json that came "
                          "with the checkpoint.")
    return section[key]


def musicgen_config(config: dict, path: str, *, max_caption_length: int = 64,
                    max_frames: int | None = None, dtype: str = "float32"):
    """The MusicLMConfig expressing the MusicGen that `config` (its config.json, read from
    `path`) describes; ConfigError for what the LM cannot express."""
    from musicrl_jax.models.music_lm import MusicLMConfig

    dec = _section(config, "decoder", path, ("musicgen_decoder",))
    text = _section(config, "text_encoder", path, ("t5",))
    audio = config.get("audio_encoder") if isinstance(config.get("audio_encoder"), dict) else {}

    def need(section, key, where):
        return _require(section, key, path, where)

    vocab = int(need(dec, "vocab_size", "decoder"))
    num_codebooks = int(need(dec, "num_codebooks", "decoder"))
    hidden = int(need(dec, "hidden_size", "decoder"))
    heads = int(need(dec, "num_attention_heads", "decoder"))
    if hidden % heads:
        raise ConfigError(f"{path}: decoder hidden_size={hidden} is not a multiple of "
                          f"num_attention_heads={heads}. Fix: use the checkpoint's own config.")
    if int(dec.get("audio_channels", 1)) != 1:
        raise ConfigError(f"{path}: a stereo MusicGen (audio_channels="
                          f"{dec['audio_channels']}) interleaves two delay patterns, which the LM "
                          "does not express. Fix: convert a mono MusicGen.")
    # Our BOS and delay-pattern fill is the one id past the codebook (special_token).
    for where, section in (("decoder", dec), ("top level", config)):
        for key in ("pad_token_id", "bos_token_id", "decoder_start_token_id"):
            if section.get(key) is not None and int(section[key]) != vocab:
                raise ConfigError(f"{path}: {where} {key}={section[key]}, but the LM uses id "
                                  f"vocab_size={vocab} for BOS and the delay pattern's padding. "
                                  "Fix: use a checkpoint with pad = bos = vocab_size (as "
                                  "MusicGen).")
    if audio.get("codebook_size") not in (None, vocab):
        raise ConfigError(f"{path}: audio_encoder codebook_size={audio['codebook_size']} but "
                          f"decoder vocab_size={vocab}. Fix: use the checkpoint's own config.")
    activation = dec.get("activation_function", "gelu")
    if activation != "gelu":
        raise ConfigError(f"{path}: decoder activation_function={activation!r}; the converter "
                          "knows MusicGen's 'gelu'. Fix: convert a MusicGen checkpoint.")
    # scale_embedding is not read: transformers computes embed_scale but never applies it.

    projection_needed = int(need(text, "d_model", "text_encoder")) != hidden
    if projection_needed and dec.get("cross_attention_hidden_size") is not None:
        raise ConfigError(f"{path}: decoder cross_attention_hidden_size is set while the text "
                          "encoder and decoder widths differ; MusicGen then has no "
                          "enc_to_dec_proj and cannot run. Fix: use the checkpoint's own config.")
    projection = projection_needed
    proj = str(text.get("feed_forward_proj", "relu"))
    text_mlp = {"relu": "relu", "gated-gelu": "gated_gelu", "gelu": "gelu"}.get(proj)
    if text_mlp is None:
        raise ConfigError(f"{path}: text_encoder feed_forward_proj={proj!r}; the T5 encoder "
                          "supports 'relu', 'gelu' and 'gated-gelu'. Fix: use a T5 or T5 v1.1 "
                          "text encoder.")
    position_limit = int(dec.get("max_position_embeddings", 2048))
    if max_frames is None:
        # 500 frames: 10 s at EnCodec-32kHz's 50 Hz; the KV cache is sized by it.
        max_frames = max(1, min(500, position_limit - num_codebooks + 1))
    try:
        return MusicLMConfig(
            caption_vocab_size=int(need(text, "vocab_size", "text_encoder")),
            codebook_size=vocab, num_codebooks=num_codebooks, embed_dim=hidden,
            num_heads=heads, head_dim=hidden // heads, mlp_dim=int(need(dec, "ffn_dim", "decoder")),
            num_encoder_layers=int(need(text, "num_layers", "text_encoder")),
            num_decoder_layers=int(need(dec, "num_hidden_layers", "decoder")),
            max_caption_length=max_caption_length, max_frames=max_frames, dtype=dtype,
            positions="sinusoidal", norm="layer", norm_epsilon=1e-5,  # torch LayerNorm's eps
            mlp="gelu", text_encoder="t5", text_embed_dim=int(text["d_model"]),
            text_num_heads=int(need(text, "num_heads", "text_encoder")),
            text_head_dim=int(need(text, "d_kv", "text_encoder")),
            text_mlp_dim=int(need(text, "d_ff", "text_encoder")), text_mlp=text_mlp,
            text_norm_epsilon=float(text.get("layer_norm_epsilon", 1e-6)),
            relative_attention_buckets=int(text.get("relative_attention_num_buckets", 32)),
            relative_attention_max_distance=int(text.get("relative_attention_max_distance", 128)),
            encoder_projection=projection, freeze_text_encoder=True, null_caption="mask")
    except ValueError as err:
        raise ConfigError(f"{path}: {err}") from err


def musicgen_params(config, take: hub.TensorTaker, names: set[str]) -> dict[str, Any]:
    """Our (unboxed) param tree from the hub tensors; `take(name, shape)` checks each tensor
    against the shape config.json implies."""
    embed, heads, head_dim, mlp = (config.embed_dim, config.num_heads, config.head_dim,
                                   config.mlp_dim)
    text_embed, text_heads, text_head_dim, text_mlp = config.text_dims

    def linear(name, out_dim, in_dim):  # torch Linear weight [out, in] -> kernel [in, out]
        return take(f"{name}.weight", (out_dim, in_dim)).T

    def attention(prefix, names_, in_dim, n_heads, dim):
        """Our {query,key,value: [in, heads, head_dim], out: [heads, head_dim, in]}."""
        q, k, v, o = names_
        inner = n_heads * dim
        return {"query": linear(f"{prefix}.{q}", inner, in_dim).reshape(in_dim, n_heads, dim),
                "key": linear(f"{prefix}.{k}", inner, in_dim).reshape(in_dim, n_heads, dim),
                "value": linear(f"{prefix}.{v}", inner, in_dim).reshape(in_dim, n_heads, dim),
                "out": linear(f"{prefix}.{o}", in_dim, inner).reshape(n_heads, dim, in_dim)}

    def layer_norm(prefix):
        return {"scale": take(f"{prefix}.weight", (embed,)),
                "bias": take(f"{prefix}.bias", (embed,))}

    def rms_norm(prefix):
        return {"scale": take(f"{prefix}.weight", (text_embed,))}

    params: dict[str, Any] = {}
    # T5 encoder. Its input embedding is tied to `shared`; some saves hold both copies.
    shared, tied = "text_encoder.shared.weight", "text_encoder.encoder.embed_tokens.weight"
    table_shape = (config.caption_vocab_size, text_embed)
    table = take(shared if shared in names else tied, table_shape)
    if shared in names and tied in names:
        take(tied, table_shape)
    params["caption_embed"] = {"embedding": table}
    t5 = "text_encoder.encoder"
    params["relative_attention_bias"] = take(
        f"{t5}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        (config.relative_attention_buckets, text_heads))
    for i in range(config.num_encoder_layers):
        block = f"{t5}.block.{i}.layer"
        ff = f"{block}.1.DenseReluDense"
        if config.text_mlp == "gated_gelu":
            mlp_params = {"wi_gate": linear(f"{ff}.wi_0", text_mlp, text_embed),
                          "wi_up": linear(f"{ff}.wi_1", text_mlp, text_embed)}
        else:
            mlp_params = {"wi": linear(f"{ff}.wi", text_mlp, text_embed)}
        mlp_params["wo"] = linear(f"{ff}.wo", text_embed, text_mlp)
        params[f"encoder_{i}"] = {
            "pre_attention_norm": rms_norm(f"{block}.0.layer_norm"),
            "self_attention": attention(f"{block}.0.SelfAttention", "qkvo", text_embed,
                                        text_heads, text_head_dim),
            "pre_mlp_norm": rms_norm(f"{block}.1.layer_norm"),
            "mlp": mlp_params}
    params["encoder_norm"] = rms_norm(f"{t5}.final_layer_norm")
    if config.encoder_projection:
        params["encoder_projection"] = linear("enc_to_dec_proj", embed, text_embed)
        params["encoder_projection_bias"] = take("enc_to_dec_proj.bias", (embed,))

    # Decoder.
    dec = "decoder.model.decoder"
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    for i in range(config.num_decoder_layers):
        layer = f"{dec}.layers.{i}"
        params[f"decoder_{i}"] = {
            "pre_self_attention_norm": layer_norm(f"{layer}.self_attn_layer_norm"),
            "self_attention": attention(f"{layer}.self_attn", projections, embed, heads, head_dim),
            "pre_cross_attention_norm": layer_norm(f"{layer}.encoder_attn_layer_norm"),
            "cross_attention": attention(f"{layer}.encoder_attn", projections, embed, heads,
                                         head_dim),
            "pre_mlp_norm": layer_norm(f"{layer}.final_layer_norm"),
            "mlp": {"wi": linear(f"{layer}.fc1", mlp, embed),
                    "wo": linear(f"{layer}.fc2", embed, mlp)}}
    params["decoder_norm"] = layer_norm(f"{dec}.layer_norm")
    vocab, num_codebooks = config.codebook_size, config.num_codebooks
    params["audio_embedding"] = np.stack([
        take(f"{dec}.embed_tokens.{k}.weight", (vocab + 1, embed)) for k in range(num_codebooks)])
    params["heads"] = np.stack([
        take(f"decoder.lm_heads.{k}.weight", (vocab, embed)).T for k in range(num_codebooks)],
        axis=1)
    take.finish(ignore_prefixes=("audio_encoder.",))  # EnCodec: the audio converter's
    return params


def _check_layout(config, params) -> None:
    """The converted tree must be exactly the one MusicLM initialises (a converter bug else)."""
    import jax
    from flax import traverse_util

    from musicrl_jax import partitioning
    from musicrl_jax.models import music_lm

    abstract = partitioning.unbox(jax.eval_shape(
        lambda rng: music_lm.init_params(config, rng), jax.random.PRNGKey(0)))
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
    got = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise RuntimeError(f"converted params do not match MusicLM's layout: {diff[:6]}")


def gin_text(config, source: str) -> str:
    lines = [f"# MusicGen from {source}, written by musicrl_jax.convert.",
             "# Include it in a stage's gin file so lm_config matches the checkpoint."]
    lines += [f"MusicLMConfig.{field.name} = {getattr(config, field.name)!r}"
              for field in dataclasses.fields(config)]
    return "\n".join(lines) + "\n"


def write_lm_run(out: str, config, params, meta: dict) -> str:
    """Saves `params` as a pretraining run's step-0 checkpoint in out/checkpoints (TrainState
    with a fresh optimizer state, so `reward_tasks.restore_params` finds the layout it
    expects) and out/config.gin; returns the checkpoints directory."""
    import jax
    import jax.numpy as jnp

    from musicrl_jax.checkpoints import Checkpointer
    from musicrl_jax.training import trainer

    text = gin_text(config, meta.get("converted_from", "?"))
    params = jax.tree.map(jnp.asarray, params)
    tx, _ = trainer.make_optimizer(total_steps=1)  # restore reads only its state's structure
    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params))
    directory = os.path.join(out, "checkpoints")
    checkpointer = Checkpointer(directory, save_every=1, keep=1, async_save=False, kind=LM_KIND)
    try:
        checkpointer.save(0, state, meta={"gin": text,
                                          "model_config": dataclasses.asdict(config), **meta},
                          force=True)
    finally:
        checkpointer.close()
    with open(os.path.join(out, GIN_FILE), "w") as f:
        f.write(text)
    return directory


def _fresh_output(out: str) -> None:
    if os.path.isdir(out) and os.listdir(out):
        raise ConfigError(f"--out {out} exists and is not empty. Fix: pass a new directory "
                          "(the converter never mixes into an existing run).")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file. Fix: pass a directory path.")


def convert_musicgen(source: str, out: str, *, max_caption_length: int = 64,
                     max_frames: int | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Converts the MusicGen hub folder `source` into the LM run directory `out`; returns
    what it wrote ({'config', 'checkpoints', 'gin', 'vocab', 'num_params'})."""
    source, out = os.path.abspath(source), os.path.abspath(out)
    _fresh_output(out)
    hub_config = hub.read_config(source, ["musicgen"])
    path = os.path.join(source, hub.CONFIG_FILE)
    config = musicgen_config(hub_config, path, max_caption_length=max_caption_length,
                             max_frames=max_frames, dtype=dtype)
    tensors = hub.read_tensors(source)
    params = musicgen_params(config, hub.TensorTaker(tensors, source), set(tensors))
    del tensors
    _check_layout(config, params)
    os.makedirs(out, exist_ok=True)
    checkpoints = write_lm_run(out, config, params, {"converted_from": source})
    vocab = None
    if os.path.isfile(os.path.join(source, SPIECE_FILE)):
        vocab = os.path.join(out, VOCAB_FILE)
        os.makedirs(os.path.dirname(vocab), exist_ok=True)
        shutil.copyfile(os.path.join(source, SPIECE_FILE), vocab)
    return {"config": config, "checkpoints": checkpoints, "gin": os.path.join(out, GIN_FILE),
            "vocab": vocab, "num_params": int(sum(np.size(v) for v in _leaves(params)))}


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def _musicgen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True,
                        help="hub folder: config.json + model.safetensors (or shards + index)")
    parser.add_argument("--out", required=True, help="new run directory to write")
    parser.add_argument("--max_caption_length", type=int, default=64,
                        help="caption tokens the LM's data and init use (T5 has no limit)")
    parser.add_argument("--max_frames", type=int, default=None,
                        help="longest clip in frames; sizes the KV cache (default: 500 or the "
                             "checkpoint's max_position_embeddings - K + 1, if smaller)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype (params stay float32)")


def _musicgen_run(args) -> None:
    written = convert_musicgen(args.source, args.out, max_caption_length=args.max_caption_length,
                               max_frames=args.max_frames, dtype=args.dtype)
    cfg = written["config"]
    print(f"MusicGen {args.source}: {written['num_params']:,} params; T5 encoder "
          f"{cfg.num_encoder_layers} layers x {cfg.text_dims[0]}, decoder "
          f"{cfg.num_decoder_layers} layers x {cfg.embed_dim}, {cfg.num_codebooks} codebooks "
          f"of {cfg.codebook_size}, max_frames {cfg.max_frames}")
    print(f"  checkpoint  {written['checkpoints']} (kind {LM_KIND!r}, step 0)")
    print(f"  model gin   {written['gin']}")
    if written["vocab"]:
        print(f"  captions    {written['vocab']} (T5 SentencePiece: pad 0, eos 1)")
    else:
        print(f"  captions    no {SPIECE_FILE} in the source; use the T5 tokenizer's "
              f"{SPIECE_FILE} as the caption vocabulary")


@dataclasses.dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


# --- EnCodec ---------------------------------------------------------------------------------

def _encodec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True,
                        help="hub folder (e.g. facebook/encodec_32khz): config.json + "
                             "*.safetensors")
    parser.add_argument("--out", required=True, help="tokenizer directory to write")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="kbps, one of config.json's target_bandwidths (default: the "
                             "smallest); sets the number of codebooks")


def _encodec_run(args) -> None:
    from musicrl_jax.audio.encodec import convert_encodec

    make_output_dir(args.out, "--out")
    tokenizer = convert_encodec(args.source, args.out, bandwidth=args.bandwidth)
    print(f"EnCodec {args.source}: {tokenizer.sample_rate} Hz, {tokenizer.num_codebooks} "
          f"codebooks of {tokenizer.codebook_size}, {tokenizer.frame_rate:g} frames/s")
    print(f"  tokenizer   {args.out} (load_tokenizer reads it; the LM's audio tokens)")


# One entry per checkpoint kind.
SUBCOMMANDS: dict[str, Subcommand] = {
    "musicgen": Subcommand("MusicGen (hub layout) -> a pretrained music LM run directory",
                           _musicgen_arguments, _musicgen_run),
    "encodec": Subcommand("EnCodec (hub layout) -> an audio tokenizer directory",
                          _encodec_arguments, _encodec_run),
}


@report_user_errors(PROG)
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG,
                                     description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.help,
                                                  description=command.help))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    SUBCOMMANDS[args.kind].run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
