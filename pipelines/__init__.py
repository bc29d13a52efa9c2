"""Diffusers pipelines of latentdiff, one self-contained file each (Diffusers' single-file policy).

Installed as ``latentdiff.pipelines``.
"""
