"""Evaluation: the shapes prompt-adherence judge, the prompt suite, FID and CLIP score."""
