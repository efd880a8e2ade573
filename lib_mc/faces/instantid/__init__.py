"""InstantID's two models, loaded without diffusers: the IP-Adapter (Resampler + to_k_ip/to_v_ip
per cross-attention) and the IdentityNet (an SDXL ControlNet whose context is the face tokens),
and where users keep their files."""

from .files import IDENTITYNET_NAMES, IP_ADAPTER_NAMES, find_instantid, instantid_folders
from .identitynet import IdentityNet, load_identitynet
from .ip_adapter import IPAdapter, cross_attention_names, load_ip_adapter
from .resampler import Resampler

__all__ = ["IDENTITYNET_NAMES", "IP_ADAPTER_NAMES", "find_instantid", "instantid_folders", "IdentityNet",
           "load_identitynet", "IPAdapter", "cross_attention_names", "load_ip_adapter", "Resampler"]
