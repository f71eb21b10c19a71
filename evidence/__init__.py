"""Studies that compose musicrl_jax's stages into the evidence of docs/RESULTS.md
(`make evidence`). Library code lives in musicrl_jax; only experiment logic lives here."""
