"""What the methods and the trainer both use to change and drive a diffusion pipeline: the cross-attention K/V
projections and their deltas and LoRAs (``kv``), concept tokens in the text encoders (``tokens``), prompt
encoding and the denoising objective (``objectives``)."""
