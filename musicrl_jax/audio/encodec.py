"""EnCodec in JAX: a pretrained neural codec (Défossez et al. 2022) as an ``AudioTokenizer``.

    waveform [B, samples] -> SEANet encoder (convs, residual blocks, ELU, 2-layer LSTM)
      -> embeddings [B, frames, D] -> residual vector quantiser -> codes int32 [B, frames, K]
    codes -> sum of the K codewords -> SEANet decoder (LSTM, transposed convs) -> waveform

Everything is a pure function of a flat ``{name: array}`` params pytree and a hashable
``EncodecSpec``, so ``encode_batch``/``decode_batch`` jit and run on device inside RL collection.
Weight norm is folded into plain weights when a checkpoint is converted, so the forward pass
never sees ``g``/``v``. Arithmetic follows transformers' ``EncodecModel`` (padding, trims,
gate order), which the tests check code-for-code and to 1e-4 on waveforms.

Frame contract (as for every AudioTokenizer here): ``n`` samples give ``ceil(n / hop)`` frames
and ``t`` frames decode to ``t * hop`` samples, ``hop = prod(upsampling_ratios)``.

``convert_encodec(source, out)`` turns a model-hub directory (e.g. facebook/encodec_32khz)
into a saved tokenizer that ``load_tokenizer(out)`` reads back; its command line is
``python -m musicrl_jax.convert encodec``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zipfile
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from musicrl_jax import hub
from musicrl_jax.audio.tokenizer import CONFIG_FILENAME, AudioTokenizer, write_saved_tokenizer
from musicrl_jax.errors import ConfigError

__all__ = [
    "EncodecSpec",
    "EncodecTokenizer",
    "convert_encodec",
    "encodec_decode",
    "encodec_encode",
    "param_shapes",
    "spec_from_hub_config",
]

WEIGHTS_FILENAME = "encodec_weights.npz"
_FORMAT_VERSION = 1
# fp32 matmuls/convs on GPU/TPU too: codes are argmins, and TF32 rounding would flip them.
_HIGHEST = jax.lax.Precision.HIGHEST
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge",
              "circular": "wrap"}

# transformers' EncodecConfig defaults, used only for keys a config.json leaves out.
_HUB_DEFAULTS: dict[str, Any] = {
    "target_bandwidths": [1.5, 3.0, 6.0, 12.0, 24.0], "sampling_rate": 24000,
    "audio_channels": 1, "normalize": False, "chunk_length_s": None, "overlap": None,
    "hidden_size": 128, "num_filters": 32, "num_residual_layers": 1,
    "upsampling_ratios": [8, 5, 4, 2], "norm_type": "weight_norm", "kernel_size": 7,
    "last_kernel_size": 7, "residual_kernel_size": 3, "dilation_growth_rate": 2,
    "use_causal_conv": True, "pad_mode": "reflect", "compress": 2, "num_lstm_layers": 2,
    "trim_right_ratio": 1.0, "codebook_size": 1024, "codebook_dim": None,
    "use_conv_shortcut": True,
}


# ---------------------------------------------------------------------------
# Architecture description
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncodecSpec:
    """Static shape of an EnCodec model (hashable: it is a jit static argument)."""

    sample_rate: int
    hidden_size: int
    num_filters: int
    num_residual_layers: int
    upsampling_ratios: tuple[int, ...]
    kernel_size: int
    last_kernel_size: int
    residual_kernel_size: int
    dilation_growth_rate: int
    use_causal_conv: bool
    pad_mode: str
    compress: int
    num_lstm_layers: int
    trim_right_ratio: float
    use_conv_shortcut: bool
    codebook_size: int
    num_codebooks: int
    bandwidth: float

    @property
    def hop(self) -> int:
        return int(np.prod(self.upsampling_ratios))

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["upsampling_ratios"] = list(self.upsampling_ratios)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> "EncodecSpec":
        """Inverse of ``to_json``; ValueError naming ``where`` on a bad field."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{where}: spec is missing keys {missing}.")
        values = dict((n, data[n]) for n in names)
        try:
            values["upsampling_ratios"] = tuple(int(r) for r in values["upsampling_ratios"])
            for n in names:
                if n in ("use_causal_conv", "use_conv_shortcut"):
                    if not isinstance(values[n], bool):
                        raise ValueError(f"{n}={values[n]!r} is not a boolean")
                elif n in ("trim_right_ratio", "bandwidth"):
                    values[n] = float(values[n])
                elif n == "pad_mode":
                    if values[n] not in _PAD_MODES:
                        raise ValueError(f"pad_mode={values[n]!r} not in {sorted(_PAD_MODES)}")
                elif n != "upsampling_ratios":
                    if isinstance(values[n], bool) or int(values[n]) != values[n] \
                            or values[n] < 1:
                        raise ValueError(f"{n}={values[n]!r} is not a positive integer")
                    values[n] = int(values[n])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: bad spec ({err}).") from err
        if not values["upsampling_ratios"] or min(values["upsampling_ratios"]) < 1:
            raise ValueError(f"{where}: bad spec (upsampling_ratios="
                             f"{list(values['upsampling_ratios'])}).")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class _Conv:
    name: str  # params hold name + ".weight" [k, in, out] and name + ".bias" [out]
    cin: int
    cout: int
    kernel: int
    stride: int = 1
    dilation: int = 1
    transpose: bool = False


@dataclasses.dataclass(frozen=True)
class _Res:
    block: tuple[_Conv, ...]  # each preceded by an ELU
    shortcut: _Conv | None


@dataclasses.dataclass(frozen=True)
class _Lstm:
    name: str  # params: name + ".w_ih{l}" [H, 4H], ".w_hh{l}" [H, 4H], ".b{l}" [4H]
    dim: int
    layers: int


_ELU = "elu"


def _res_block(spec: EncodecSpec, name: str, dim: int, dilation: int) -> _Res:
    hidden = dim // spec.compress
    block = (_Conv(f"{name}.block.1", dim, hidden, spec.residual_kernel_size, 1, dilation),
             _Conv(f"{name}.block.3", hidden, dim, 1))
    shortcut = _Conv(f"{name}.shortcut", dim, dim, 1) if spec.use_conv_shortcut else None
    return _Res(block, shortcut)


def _encoder_ops(spec: EncodecSpec) -> list:
    """The encoder as transformers numbers its ``encoder.layers`` (ELUs take an index too)."""
    layers: list = []

    def name() -> str:
        return f"encoder.layers.{len(layers)}"

    layers.append(_Conv(name(), 1, spec.num_filters, spec.kernel_size))
    scaling = 1
    for ratio in reversed(spec.upsampling_ratios):
        dim = scaling * spec.num_filters
        for j in range(spec.num_residual_layers):
            layers.append(_res_block(spec, name(), dim, spec.dilation_growth_rate ** j))
        layers.append(_ELU)
        layers.append(_Conv(name(), dim, dim * 2, ratio * 2, ratio))
        scaling *= 2
    dim = scaling * spec.num_filters
    layers.append(_Lstm(name(), dim, spec.num_lstm_layers))
    layers.append(_ELU)
    layers.append(_Conv(name(), dim, spec.hidden_size, spec.last_kernel_size))
    return layers


def _decoder_ops(spec: EncodecSpec) -> list:
    layers: list = []

    def name() -> str:
        return f"decoder.layers.{len(layers)}"

    scaling = 2 ** len(spec.upsampling_ratios)
    layers.append(_Conv(name(), spec.hidden_size, scaling * spec.num_filters, spec.kernel_size))
    layers.append(_Lstm(name(), scaling * spec.num_filters, spec.num_lstm_layers))
    for ratio in spec.upsampling_ratios:
        dim = scaling * spec.num_filters
        layers.append(_ELU)
        layers.append(_Conv(name(), dim, dim // 2, ratio * 2, ratio, transpose=True))
        for j in range(spec.num_residual_layers):
            layers.append(_res_block(spec, name(), dim // 2, spec.dilation_growth_rate ** j))
        scaling //= 2
    layers.append(_ELU)
    layers.append(_Conv(name(), spec.num_filters, 1, spec.last_kernel_size))
    return layers


def _convs(ops: list) -> list[_Conv]:
    out = []
    for op in ops:
        if isinstance(op, _Conv):
            out.append(op)
        elif isinstance(op, _Res):
            out.extend(op.block + ((op.shortcut,) if op.shortcut else ()))
    return out


def param_shapes(spec: EncodecSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every array in an EnCodec params pytree."""
    shapes: dict[str, tuple[int, ...]] = {}
    ops = _encoder_ops(spec) + _decoder_ops(spec)
    for conv in _convs(ops):
        shapes[conv.name + ".weight"] = (conv.kernel, conv.cin, conv.cout)
        shapes[conv.name + ".bias"] = (conv.cout,)
    for lstm in (op for op in ops if isinstance(op, _Lstm)):
        for layer in range(lstm.layers):
            shapes[f"{lstm.name}.w_ih{layer}"] = (lstm.dim, 4 * lstm.dim)
            shapes[f"{lstm.name}.w_hh{layer}"] = (lstm.dim, 4 * lstm.dim)
            shapes[f"{lstm.name}.b{layer}"] = (4 * lstm.dim,)
    shapes["quantizer.embed"] = (spec.num_codebooks, spec.codebook_size, spec.hidden_size)
    return shapes


# ---------------------------------------------------------------------------
# Forward pass (activations are [batch, time, channels])
# ---------------------------------------------------------------------------


def _pad_time(x: jax.Array, left: int, right: int, mode: str) -> jax.Array:
    length = x.shape[1]
    extra = 0
    # Reflection needs more samples than the pad; like transformers, zero-extend first.
    if mode == "reflect" and length <= max(left, right):
        extra = max(left, right) - length + 1
        x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
    x = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode=_PAD_MODES[mode])
    return x[:, :x.shape[1] - extra]


def _conv(params: Mapping[str, jax.Array], op: _Conv, x: jax.Array,
          spec: EncodecSpec) -> jax.Array:
    w, b = params[op.name + ".weight"], params[op.name + ".bias"]
    if op.transpose:
        return _conv_transpose(w, b, op, x, spec)
    k_eff = (op.kernel - 1) * op.dilation + 1
    pad_total = k_eff - op.stride
    length = x.shape[1]
    # Right-pad so the last window is complete: output ceil(length / stride) frames.
    frames = -(-(length - k_eff + pad_total) // op.stride)
    extra = frames * op.stride + k_eff - pad_total - length
    if spec.use_causal_conv:
        x = _pad_time(x, pad_total, extra, spec.pad_mode)
    else:
        right = pad_total // 2
        x = _pad_time(x, pad_total - right, right + extra, spec.pad_mode)
    y = jax.lax.conv_general_dilated(
        x, w, (op.stride,), "VALID", rhs_dilation=(op.dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"), precision=_HIGHEST)
    return y + b


def _conv_transpose(w: jax.Array, b: jax.Array, op: _Conv, x: jax.Array,
                    spec: EncodecSpec) -> jax.Array:
    # Polyphase form: output phase r of block u is sum_a x[u - a] @ w[a * stride + r], an
    # ordinary stride-1 conv to stride * out channels; no zeros inserted between inputs.
    batch, frames, _ = x.shape
    k, s = op.kernel, op.stride
    blocks = -(-k // s)
    w = jnp.pad(w, ((0, blocks * s - k), (0, 0), (0, 0)))
    w = w.reshape(blocks, s, op.cin, op.cout)[::-1].transpose(0, 2, 1, 3)
    x = jnp.pad(x, ((0, 0), (blocks - 1, blocks - 1), (0, 0)))
    y = jax.lax.conv_general_dilated(
        x, w.reshape(blocks, op.cin, s * op.cout), (1,), "VALID",
        dimension_numbers=("NWC", "WIO", "NWC"), precision=_HIGHEST)
    y = y.reshape(batch, (frames + blocks - 1) * s, op.cout)[:, :(frames - 1) * s + k] + b
    pad_total = k - s
    if spec.use_causal_conv:
        right = math.ceil(pad_total * spec.trim_right_ratio)
    else:
        right = pad_total // 2
    left = pad_total - right
    return y[:, left:y.shape[1] - right]


def _lstm(params: Mapping[str, jax.Array], op: _Lstm, x: jax.Array) -> jax.Array:
    h_seq = x
    batch = x.shape[0]
    for layer in range(op.layers):
        w_hh = params[f"{op.name}.w_hh{layer}"]
        # Input projections for all steps at once; the scan only does the recurrence.
        gates_in = jnp.einsum("btc,cg->tbg", h_seq, params[f"{op.name}.w_ih{layer}"],
                              precision=_HIGHEST) + params[f"{op.name}.b{layer}"]

        def step(carry, g_in, w_hh=w_hh):
            h, c = carry
            g = g_in + jnp.matmul(h, w_hh, precision=_HIGHEST)
            i, f, gg, o = jnp.split(g, 4, axis=-1)  # PyTorch gate order
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(gg)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((batch, op.dim), x.dtype)
        _, hs = jax.lax.scan(step, (zeros, zeros), gates_in)
        h_seq = hs.transpose(1, 0, 2)
    return h_seq + x  # EnCodec's LSTM is residual


def _run(params: Mapping[str, jax.Array], ops: list, x: jax.Array,
         spec: EncodecSpec) -> jax.Array:
    for op in ops:
        if op == _ELU:
            x = jax.nn.elu(x)
        elif isinstance(op, _Conv):
            x = _conv(params, op, x, spec)
        elif isinstance(op, _Lstm):
            x = _lstm(params, op, x)
        else:
            y = x
            for conv in op.block:
                y = _conv(params, conv, jax.nn.elu(y), spec)
            x = (_conv(params, op.shortcut, x, spec) if op.shortcut else x) + y
    return x


def _check_num_codebooks(num_codebooks: int | None, spec: EncodecSpec) -> int:
    if num_codebooks is None:
        return spec.num_codebooks
    if not 1 <= int(num_codebooks) <= spec.num_codebooks:
        raise ValueError(f"num_codebooks={num_codebooks}, expected 1..{spec.num_codebooks} "
                         "(a prefix of the residual quantiser's stages).")
    return int(num_codebooks)


@functools.partial(jax.jit, static_argnames=("spec", "num_codebooks"))
def encodec_encode(params: Mapping[str, jax.Array], waveforms: jax.Array, spec: EncodecSpec,
                   num_codebooks: int | None = None) -> jax.Array:
    """float ``[B, samples]`` -> int32 codes ``[B, ceil(samples / hop), K]``."""
    k = _check_num_codebooks(num_codebooks, spec)
    residual = _run(params, _encoder_ops(spec), waveforms[:, :, None].astype(jnp.float32), spec)
    codes = []
    for embed in params["quantizer.embed"][:k]:
        # Same expression as transformers so near-ties round the same way.
        dist = (jnp.sum(residual ** 2, axis=-1, keepdims=True)
                - 2 * jnp.matmul(residual, embed.T, precision=_HIGHEST)
                + jnp.sum(embed ** 2, axis=-1))
        idx = jnp.argmin(dist, axis=-1).astype(jnp.int32)
        residual = residual - embed[idx]
        codes.append(idx)
    return jnp.stack(codes, axis=-1)


@functools.partial(jax.jit, static_argnames=("spec",))
def encodec_decode(params: Mapping[str, jax.Array], codes: jax.Array,
                   spec: EncodecSpec) -> jax.Array:
    """int codes ``[B, frames, k]`` (k <= K: a prefix of the stages) -> ``[B, frames * hop]``."""
    k = _check_num_codebooks(codes.shape[-1], spec)
    embed = params["quantizer.embed"]
    quantized = embed[0][codes[..., 0]]
    for i in range(1, k):
        quantized = quantized + embed[i][codes[..., i]]
    return _run(params, _decoder_ops(spec), quantized, spec)[..., 0]


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


class EncodecTokenizer(AudioTokenizer):
    """A pretrained EnCodec as an AudioTokenizer (mono, ``spec.sample_rate`` Hz).

    ``encode_batch``/``decode_batch`` take and return device arrays and can be called inside
    ``jax.jit``; ``encodec_encode(params, x, spec)``/``encodec_decode`` are the same as pure
    functions of the params, for callers that pass weights explicitly (sharding, donation).
    """

    codec_name = "encodec"

    def __init__(self, spec: EncodecSpec, params: Mapping[str, Any]):
        expected = param_shapes(spec)
        missing = sorted(set(expected) - set(params))
        extra = sorted(set(params) - set(expected))
        if missing or extra:
            raise ValueError(f"EnCodec params do not match the spec: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}.")
        for name, shape in expected.items():
            if tuple(np.shape(params[name])) != shape:
                raise ValueError(f"EnCodec param {name!r} has shape "
                                 f"{tuple(np.shape(params[name]))}, expected {shape}.")
        self.spec = spec
        self.params = {name: jnp.asarray(params[name], jnp.float32) for name in expected}

    @property
    def sample_rate(self) -> int:
        return self.spec.sample_rate

    @property
    def samples_per_frame(self) -> int:
        return self.spec.hop

    @property
    def num_codebooks(self) -> int:
        return self.spec.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.spec.codebook_size

    # -- device-side, jittable --------------------------------------------

    def encode_batch(self, waveforms: jax.Array, num_codebooks: int | None = None) -> jax.Array:
        """float ``[B, samples]`` -> int32 ``[B, frames, K]`` (jit-compiled per shape)."""
        return encodec_encode(self.params, waveforms, self.spec, num_codebooks)

    def decode_batch(self, codes: jax.Array) -> jax.Array:
        """int ``[B, frames, k]`` -> float32 ``[B, frames * hop]``. Codes are not range-checked
        here (out-of-range indices clamp); ``decode`` checks them."""
        return encodec_decode(self.params, codes, self.spec)

    # -- AudioTokenizer ---------------------------------------------------

    def fit(self, waveforms: Sequence[np.ndarray] | np.ndarray, *,
            sample_rate: int | None = None) -> "EncodecTokenizer":
        raise NotImplementedError(
            "EncodecTokenizer is pretrained and cannot be fitted here. Convert a checkpoint "
            "instead: convert_encodec('path/to/encodec_32khz', 'out_dir'), then "
            "load_tokenizer('out_dir').")

    def encode(self, waveform: np.ndarray, *, sample_rate: int | None = None,
               num_codebooks: int | None = None) -> np.ndarray:
        """float ``[samples]`` -> int32 ``[ceil(samples / hop), K]`` (batched likewise)."""
        k = _check_num_codebooks(num_codebooks, self.spec)
        wav = self._check_waveform(waveform, sample_rate, 1)
        codes = np.asarray(self.encode_batch(jnp.asarray(np.atleast_2d(wav)), k))
        return codes if wav.ndim == 2 else codes[0]

    def decode(self, tokens: np.ndarray, *, num_codebooks: int | None = None) -> np.ndarray:
        """int ``[frames, k]`` -> float32 ``[frames * hop]`` (batched likewise); ``k`` is
        ``num_codebooks`` (default K), fewer columns decoding the first stages only."""
        k = _check_num_codebooks(num_codebooks, self.spec)
        toks = self._check_tokens(tokens, k)
        audio = np.asarray(self.decode_batch(jnp.asarray(toks.reshape(-1, *toks.shape[-2:]))))
        return audio if toks.ndim == 3 else audio[0]

    # -- persistence ------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        config = {"codec": self.codec_name, "format_version": _FORMAT_VERSION,
                  "spec": self.spec.to_json()}
        write_saved_tokenizer(directory, config, WEIGHTS_FILENAME, self.params)

    @classmethod
    def _load(cls, directory: str, config: Mapping[str, Any]) -> "EncodecTokenizer":
        config_path = os.path.join(directory, CONFIG_FILENAME)
        fix = "convert the checkpoint again with convert_encodec(source, directory)"
        if config.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{config_path}: format_version is "
                             f"{config.get('format_version')!r}, expected {_FORMAT_VERSION}; "
                             f"{fix}.")
        if not isinstance(config.get("spec"), dict):
            raise ValueError(f"{config_path} is corrupt: no 'spec' object; {fix}.")
        try:
            spec = EncodecSpec.from_json(config["spec"], config_path)
        except ValueError as err:
            raise ValueError(f"{err} Fix: {fix}.") from err
        weights_path = os.path.join(directory, WEIGHTS_FILENAME)
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"{weights_path} is missing; {fix}.")
        try:
            with np.load(weights_path, allow_pickle=False) as data:
                params = {name: np.asarray(data[name], np.float32) for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{weights_path} is corrupt ({err}); {fix}.") from err
        try:
            return cls(spec, params)
        except ValueError as err:
            raise ValueError(f"{weights_path} does not match {config_path}: {err} "
                             f"Fix: {fix}.") from err


# ---------------------------------------------------------------------------
# Conversion from the model hub's layout
# ---------------------------------------------------------------------------


def _hub_field(config: Mapping[str, Any], name: str) -> Any:
    return config.get(name, _HUB_DEFAULTS[name])


def spec_from_hub_config(config: Mapping[str, Any], path: str,
                         bandwidth: float | None = None) -> tuple[EncodecSpec, int]:
    """(spec, number of quantiser stages stored in the checkpoint) from a hub config.json.

    ``bandwidth`` (kbps) picks K as transformers does; default: the smallest of
    ``target_bandwidths`` (transformers' default; encodec_32khz has only 2.2 -> K = 4).
    """
    def bad(field: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: {field}={_hub_field(config, field)!r} {why}")

    for field, wanted in (("audio_channels", 1), ("normalize", False),
                          ("chunk_length_s", None), ("norm_type", "weight_norm")):
        if _hub_field(config, field) != wanted:
            raise bad(field, f"is not supported (need {wanted!r}): the tokenizer is mono, "
                             "its tokens carry no loudness scale, and it decodes a clip in one "
                             "piece. Fix: use a mono, unnormalised checkpoint such as "
                             "facebook/encodec_32khz or facebook/encodec_24khz.")
    if _hub_field(config, "pad_mode") not in _PAD_MODES:
        raise bad("pad_mode", f"is not one of {sorted(_PAD_MODES)}. Fix: use the config.json "
                              "that came with the checkpoint.")
    hidden = _hub_field(config, "hidden_size")
    codebook_dim = _hub_field(config, "codebook_dim")
    if codebook_dim is not None and codebook_dim != hidden:
        raise bad("codebook_dim", f"differs from hidden_size={hidden!r}, which EnCodec's "
                                  "quantiser cannot use. Fix: set codebook_dim to hidden_size.")
    ints = {}
    for field in ("sampling_rate", "hidden_size", "num_filters", "num_residual_layers",
                  "kernel_size", "last_kernel_size", "residual_kernel_size",
                  "dilation_growth_rate", "compress", "num_lstm_layers", "codebook_size"):
        value = _hub_field(config, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(field, "is not a positive integer. Fix: use the config.json that came "
                             "with the checkpoint.")
        ints[field] = value
    ratios = _hub_field(config, "upsampling_ratios")
    if (not isinstance(ratios, (list, tuple)) or not ratios
            or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ratios)):
        raise bad("upsampling_ratios", "is not a list of positive integers. Fix: use the "
                                       "config.json that came with the checkpoint.")
    bandwidths = _hub_field(config, "target_bandwidths")
    if (not isinstance(bandwidths, (list, tuple)) or not bandwidths
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0
                   for b in bandwidths)):
        raise bad("target_bandwidths", "is not a list of positive kbps values. Fix: use the "
                                       "config.json that came with the checkpoint.")
    causal = bool(_hub_field(config, "use_causal_conv"))
    trim = float(_hub_field(config, "trim_right_ratio"))
    if not causal and trim != 1.0:
        raise bad("trim_right_ratio", "must be 1.0 for non-causal convolutions. Fix: use the "
                                      "config.json that came with the checkpoint.")
    if bandwidth is None:
        bandwidth = bandwidths[0]
    if bandwidth not in bandwidths:
        raise ConfigError(f"{path}: bandwidth {bandwidth} kbps is not one of the checkpoint's "
                          f"target_bandwidths {list(bandwidths)}. Fix: pick one of those.")
    # As transformers: frames/s rounded up, stages stored = floor(max kbps / kbps per stage).
    hop = int(np.prod(ratios))
    frame_rate = math.ceil(ints["sampling_rate"] / hop)
    stored = int(1000 * bandwidths[-1] // (frame_rate * math.ceil(math.log2(
        ints["codebook_size"]))))
    per_stage = math.log2(ints["codebook_size"]) * frame_rate
    k = min(int(max(1, math.floor(bandwidth * 1000 / per_stage))), stored)
    if k < 1:
        raise bad("target_bandwidths", f"holds no quantiser stage at {frame_rate} frames/s "
                                       "(needs a larger bandwidth). Fix: use the config.json "
                                       "that came with the checkpoint.")
    spec = EncodecSpec(
        sample_rate=ints["sampling_rate"], hidden_size=hidden, num_filters=ints["num_filters"],
        num_residual_layers=ints["num_residual_layers"], upsampling_ratios=tuple(ratios),
        kernel_size=ints["kernel_size"], last_kernel_size=ints["last_kernel_size"],
        residual_kernel_size=ints["residual_kernel_size"],
        dilation_growth_rate=ints["dilation_growth_rate"], use_causal_conv=causal,
        pad_mode=_hub_field(config, "pad_mode"), compress=ints["compress"],
        num_lstm_layers=ints["num_lstm_layers"], trim_right_ratio=trim,
        use_conv_shortcut=bool(_hub_field(config, "use_conv_shortcut")),
        codebook_size=ints["codebook_size"], num_codebooks=k, bandwidth=float(bandwidth))
    return spec, stored


def _take_conv(take: hub.TensorTaker, names: set[str], conv: _Conv) -> dict[str, np.ndarray]:
    """One conv's folded weight [k, in, out] and bias from its hub tensors."""
    prefix = conv.name + ".conv"
    # torch layouts: Conv1d [out, in, k], ConvTranspose1d [in, out, k]; weight norm's g is
    # per first-axis channel in both (dim=0), so the norm runs over axes 1 and 2.
    shape = ((conv.cin, conv.cout) if conv.transpose else (conv.cout, conv.cin)) + (conv.kernel,)
    new, legacy = f"{prefix}.parametrizations.weight.original", f"{prefix}.weight_"
    if f"{prefix}.weight" in names:  # weight norm already removed
        weight = take(f"{prefix}.weight", shape)
    else:
        g_name, v_name = ((legacy + "g", legacy + "v") if legacy + "v" in names
                          else (new + "0", new + "1"))
        g = take(g_name, (shape[0], 1, 1))
        v = take(v_name, shape)
        weight = v * (g / np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=(1, 2),
                                          keepdims=True)).astype(np.float32))
    order = (2, 0, 1) if conv.transpose else (2, 1, 0)
    return {conv.name + ".weight": np.ascontiguousarray(weight.transpose(order)),
            conv.name + ".bias": take(f"{prefix}.bias", (conv.cout,))}


def _take_params(spec: EncodecSpec, stored: int, take: hub.TensorTaker,
                 names: set[str]) -> dict[str, np.ndarray]:
    params: dict[str, np.ndarray] = {}
    ops = _encoder_ops(spec) + _decoder_ops(spec)
    for conv in _convs(ops):
        params.update(_take_conv(take, names, conv))
    for lstm in (op for op in ops if isinstance(op, _Lstm)):
        h4 = (4 * lstm.dim,)
        for layer in range(lstm.layers):
            p = f"{lstm.name}.lstm."
            params[f"{lstm.name}.w_ih{layer}"] = take(f"{p}weight_ih_l{layer}", h4 + (lstm.dim,)).T
            params[f"{lstm.name}.w_hh{layer}"] = take(f"{p}weight_hh_l{layer}", h4 + (lstm.dim,)).T
            params[f"{lstm.name}.b{layer}"] = (take(f"{p}bias_ih_l{layer}", h4)
                                              + take(f"{p}bias_hh_l{layer}", h4))
    embeds = []
    for i in range(stored):
        p = f"quantizer.layers.{i}.codebook."
        embeds.append(take(p + "embed", (spec.codebook_size, spec.hidden_size)))
        # Training-time k-means state: checked for shape, not needed to encode or decode.
        for buffer, shape in (("inited", (1,)), ("cluster_size", (spec.codebook_size,)),
                              ("embed_avg", (spec.codebook_size, spec.hidden_size))):
            if p + buffer in names:
                take(p + buffer, shape)
    params["quantizer.embed"] = np.stack(embeds[:spec.num_codebooks])
    return params


def convert_encodec(source: str, out: str, *, bandwidth: float | None = None
                    ) -> EncodecTokenizer:
    """Converts a model-hub EnCodec directory (config.json + safetensors) into a tokenizer
    saved in ``out`` (``load_tokenizer(out)`` reads it). ``bandwidth``: see
    ``spec_from_hub_config``. Raises ConfigError naming the file/tensor on a bad checkpoint."""
    source = os.fspath(source)
    config = hub.read_config(source, ["encodec"])
    spec, stored = spec_from_hub_config(config, os.path.join(source, hub.CONFIG_FILE), bandwidth)
    tensors = hub.read_tensors(source)
    take = hub.TensorTaker(tensors, source)
    params = _take_params(spec, stored, take, set(tensors))
    take.finish()
    tokenizer = EncodecTokenizer(spec, params)
    tokenizer.save(out)
    return tokenizer
