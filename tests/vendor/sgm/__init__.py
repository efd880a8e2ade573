# vendored: `from .models import AutoencodingEngine, DiffusionEngine` trimmed (the full model,
# its text encoders and VAE are not vendored; the tests build the UNet alone)
from .util import get_configs_path, instantiate_from_config

__version__ = "0.1.0"
