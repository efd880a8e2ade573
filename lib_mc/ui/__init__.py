"""The Multi-Concept panel (gradio 3.41 for A1111, 4.40 for Forge)."""
