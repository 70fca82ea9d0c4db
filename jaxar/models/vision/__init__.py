"""Image tokenizers for visual autoregressive models (VQ-VAE, VAR's multi-scale residual quantizer)."""
