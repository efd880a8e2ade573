"""Run by the WebUI at start-up and after "Install from URL": installs what Multi-Concept needs
beyond the host, only when missing, with the host's own helpers. The engine itself runs on what
A1111 and Forge already ship (torch, numpy, Pillow, safetensors, gradio); automatic regions
use Segment Anything when a checkpoint is in models/sam."""

import launch

# import name -> pip requirement
REQUIREMENTS: dict[str, str] = {"segment_anything": "segment-anything==1.0",
                                "onnxruntime": "onnxruntime",   # the face detector of automatic regions
                                "cv2": "opencv-python"}         # mask clean-up; both WebUIs ship it already

for module, requirement in REQUIREMENTS.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"Multi-Concept requirement: {requirement}")
