"""The gold reward (issue 14, item 3): the training raters' own mean utility of a clip as they
hear it, usable as an RL reward only because the panel is simulated. An RL run on it shows what
the RL machinery reaches when the reward is right, apart from how well reward models are learnt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from musicrl_jax import collection, raters
from musicrl_jax.errors import ConfigError


def caption_key(caption_tokens) -> tuple[int, ...]:
    """A caption's ids without padding (0) and end-of-sequence (1): the same caption tokenised
    for prompts and for the pretraining task maps to one key."""
    return tuple(int(t) for t in np.asarray(caption_tokens) if t > 1)


@dataclasses.dataclass
class PanelReward:
    """A `rewards.RewardModel` stand-in scoring clips by `panel`'s mean noise-free utility
    (`collection.hear` then `RaterPanel.utilities`), through a host callback inside jit.
    metas: caption key (`caption_key`) -> the caption's metadata, for every caption scored."""
    config: Any  # the policy's MusicLMConfig (the codes it reads)
    tokenizer: Any
    panel: raters.RaterPanel
    metas: Mapping[tuple[int, ...], Mapping[str, Any]]
    params: Any = dataclasses.field(default_factory=dict)
    checkpoint_dir: str = "panel"
    kind: str = "panel_reward"

    @classmethod
    def from_prompts(cls, config, tokenizer, panel, prompts: Sequence[collection.Prompts]):
        metas = {caption_key(t): m for p in prompts for t, m in zip(p.caption_tokens, p.metas)}
        return cls(config=config, tokenizer=tokenizer, panel=panel, metas=metas)

    def host_scores(self, caption_tokens, audio_codes) -> np.ndarray:
        metas = [self.metas[caption_key(c)] for c in np.asarray(caption_tokens)]
        attributes = collection.hear(self.tokenizer, np.asarray(audio_codes), metas)
        return self.panel.utilities(attributes).mean(axis=0).astype(np.float32)

    def score(self, params, caption_tokens, audio_codes, audio_mask=None):
        """Jittable: [batch] mean utility (the mask is ignored: RL clips are full length)."""
        del params, audio_mask
        return jax.pure_callback(self.host_scores,
                                 jax.ShapeDtypeStruct(caption_tokens.shape[:1], jnp.float32),
                                 caption_tokens, audio_codes)

    def validate_tokens(self, caption_tokens, audio_codes, audio_mask=None):
        unknown = [caption_key(c) for c in np.asarray(caption_tokens)
                   if caption_key(c) not in self.metas]
        if unknown:
            raise ConfigError(
                f"panel reward: {len(unknown)} caption(s) without metadata, e.g. ids "
                f"{list(unknown[0])[:12]}; the panel can only judge captions of the corpus it "
                "was given. Fix: build PanelReward.from_prompts with every split the run "
                "prompts with or normalises on.")
        codes = np.asarray(audio_codes)
        if codes.ndim != 3 or codes.shape[-1] != self.config.num_codebooks:
            raise ConfigError(f"panel reward: audio_codes have shape {codes.shape}; expected "
                              f"[batch, frames, {self.config.num_codebooks}].")
