"""InstantID's two models, loaded without diffusers: the IP-Adapter (Resampler + to_k_ip/to_v_ip
per cross-attention) and the IdentityNet (an SDXL ControlNet whose context is the face tokens)."""
