"""Image concepts and a kept background (PnP-MIX), shared by the blend and conductor sessions:
the pictures inverted over the sampler's levels (inversion.py), reference rows diluted with the
background (dilution.py), guided appearance attention in the concept rows' decoder
self-attention (attention.py), the prediction outside every region taken from the kept
background (mixing.py), and one batch's state tying them into a session's calls (batch.py)."""
