# vendored: every import trimmed. Upstream imports denoiser, discretizer, loss, model (the VAE),
# sampling (not vendored), openaimodel and wrappers here; upstream's `sgm/__init__.py` reaches this
# package before `attention.py`, but with the models trimmed `attention.py` can come first, and then
# importing openaimodel here would be a cycle. Import `...openaimodel` / `...wrappers` directly.
