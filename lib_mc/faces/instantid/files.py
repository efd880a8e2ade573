"""Where users already keep InstantID's two files, under the names they were published with:
- sd-webui-controlnet (A1111) and Forge's built-in ControlNet: `ip-adapter_instant_id_sdxl.bin`
  and `control_instant_id_sdxl.safetensors` in models/ControlNet (or the extension's own models
  folder);
- InstantID's own download (its `checkpoints` folder): `ip-adapter.bin` and the diffusers folder
  `ControlNetModel/`, e.g. copied to models/instantid;
- ComfyUI's habit: models/instantid for the adapter, models/controlnet for the IdentityNet.
Each folder is searched with its direct subfolders. The InstantID-specific names win over the
generic `ip-adapter.bin`, wherever they are."""

from __future__ import annotations

import os

from ...auto.sam import ModelFileError

IP_ADAPTER_NAMES = ("ip-adapter_instant_id_sdxl.bin", "ip-adapter_instant_id_sdxl.safetensors",
                    "ip-adapter.bin", "ip-adapter.safetensors")
IDENTITYNET_NAMES = ("control_instant_id_sdxl.safetensors", "ControlNetModel")   # a file, or diffusers' folder


def instantid_folders(models_path: str, extensions_path: str | None = None) -> list[str]:
    """Search order: our own folder, then the ControlNet folders of A1111/Forge, then others'."""
    folders = [os.path.join(models_path, name) for name in ("instantid", "InstantID", "ControlNet", "controlnet")]
    if extensions_path:
        folders.append(os.path.join(extensions_path, "sd-webui-controlnet", "models"))
    folders.append(os.path.join(models_path, "ipadapter"))
    return folders


def _places(folders: list[str]) -> list[str]:
    """Each existing folder, then its subfolders (sorted, so the pick does not depend on the disk)."""
    found = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        found.append(folder)
        found += [os.path.join(folder, d) for d in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, d))]
    return found


def _first(names: tuple[str, ...], places: list[str], folder_ok: bool) -> str | None:
    for name in names:
        for place in places:
            path = os.path.join(place, name)
            if os.path.isfile(path) or (folder_ok and os.path.isdir(path)):
                return path
    return None


def find_instantid(folders: list[str]) -> tuple[str, str]:
    """(IP-Adapter path, IdentityNet path); ModelFileError naming what is missing and where it looked."""
    places = _places(folders)
    adapter = _first(IP_ADAPTER_NAMES, places, folder_ok=False)
    net = _first(IDENTITYNET_NAMES, places, folder_ok=True)
    if adapter and net:
        return adapter, net
    missing = []
    if not adapter:
        missing.append(f"InstantID's IP-Adapter ({' or '.join(IP_ADAPTER_NAMES)})")
    if not net:
        missing.append("InstantID's IdentityNet (control_instant_id_sdxl.safetensors, or the ControlNetModel folder "
                       "with config.json and diffusion_pytorch_model.safetensors)")
    raise ModelFileError(f"{' and '.join(missing)} not found; searched {', '.join(folders)} and their subfolders. "
                         "Put ip-adapter_instant_id_sdxl.bin and control_instant_id_sdxl.safetensors in one of them "
                         "(models/ControlNet is where the ControlNet extension and Forge keep them)")
