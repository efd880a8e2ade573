"""Automatic regions: where each concept's subject is in the layout pass (issue 5)."""
