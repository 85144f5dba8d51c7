"""The frozen teacher, run co-located in the trainer (see teacher/frozen.py)."""
