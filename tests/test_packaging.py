"""The torch floor: what pyproject.toml accepts is what `LATENTDIFF_TORCH=lowest` tests."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _torch_requirement() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    requirements = re.findall(r'"(torch\s*[<>=!~][^"]*)"', text)
    assert len(requirements) == 1, requirements
    return requirements[0].replace(" ", "")


def test_torch_is_a_floor_and_the_lowest_torch_file_tests_that_floor():
    requirement = _torch_requirement()
    match = re.fullmatch(r"torch>=(\d+)\.(\d+)", requirement)
    assert match, f"torch must be a lower bound only (never pinned), got {requirement!r}"
    lowest = dict(
        line.split("==") for line in (ROOT / "scripts" / "torch-lowest.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert set(lowest) == {"torch", "torchvision"}
    assert lowest["torch"].split(".")[:2] == [match.group(1), match.group(2)], (requirement, lowest)
    # torchvision 0.N pairs with torch 2.(N - 15) from torch 2.0 / torchvision 0.15 on
    assert int(lowest["torchvision"].split(".")[1]) - 15 == int(lowest["torch"].split(".")[1])


def test_the_installed_torch_meets_the_floor():
    floor = tuple(int(part) for part in _torch_requirement().removeprefix("torch>=").split("."))
    installed = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert installed >= floor, (torch.__version__, floor)
