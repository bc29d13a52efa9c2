"""Samplers by short name: the one mapping that the CLI, the trainer and the evaluation share.

Every sampler is a stock Diffusers scheduler, built from another scheduler's config with
``from_config`` (the noise schedule, prediction type and timestep spacing carry over, as in
``pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``):

=========  ======================================  =============================================
name       Diffusers class                         sampler
=========  ======================================  =============================================
ddim       ``DDIMScheduler``                       DDIM (Song et al. 2021); deterministic at eta 0
dpm        ``DPMSolverMultistepScheduler``         DPM-Solver++(2M) (Lu et al. 2022b)
euler      ``EulerDiscreteScheduler``              Euler (Karras et al. 2022, Algorithm 2 without churn)
euler_a    ``EulerAncestralDiscreteScheduler``     Euler ancestral (stochastic)
ddpm       ``DDPMScheduler``                       ancestral DDPM sampling (Ho et al. 2020, Algorithm 2)
pndm       ``PNDMScheduler``                       PLMS (Liu et al. 2022)
=========  ======================================  =============================================
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

__all__ = ["SCHEDULER_NAMES", "scheduler_class", "scheduler_from_name"]

# name -> (Diffusers class name, config overrides). The classes are imported on first use, so that
# `latentdiff.cli` can read the names without importing Diffusers.
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    # Force the "++" (data-prediction) variant even when the source config is an older DPM-Solver's.
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}

SCHEDULER_NAMES: tuple[str, ...] = tuple(_SCHEDULERS)
"""The short names, in the order of the table above."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of: {', '.join(SCHEDULER_NAMES)}")
    return name.lower()


def scheduler_class(name: str) -> type:
    """The Diffusers scheduler class for a short ``name`` (``ddim``, ``dpm``, ...).

    Raises:
        ValueError: ``name`` is not a known scheduler; the message lists the known ones.
    """
    class_name, _ = _SCHEDULERS[_check_name(name)]
    return getattr(importlib.import_module("diffusers"), class_name)


def scheduler_from_name(name: str, config: Mapping[str, Any]) -> Any:
    """Build the scheduler called ``name`` from another scheduler's ``config`` (``scheduler.config``).

    Example::

        pipe.scheduler = scheduler_from_name("dpm", pipe.scheduler.config)

    Raises:
        ValueError: ``name`` is not a known scheduler; the message lists the known ones.
    """
    name = _check_name(name)
    _, overrides = _SCHEDULERS[name]
    return scheduler_class(name).from_config(config, **overrides)
