"""Shared fixtures: synthetic slides with painted "tumour" and a deterministic mock model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests._support import ColourProbe, mock_card
from wsi_scan.io.model_files import LoadedModel
from wsi_scan.io.synthetic import SyntheticSlide, write_synthetic_slide

SlideFactory = Callable[..., Path]


@pytest.fixture
def mock_model() -> LoadedModel:
    card = mock_card()
    return LoadedModel(ColourProbe(card.mean, card.std).eval(), card, "mock", "0" * 64)


@pytest.fixture
def make_slide(tmp_path: Path) -> SlideFactory:
    """Write a synthetic pyramidal TIFF: make_slide(name, size_wh=..., mpp=..., tissue=..., tumour=...)."""

    def make(name: str = "slide.tif", **kw: Any) -> Path:
        kw.setdefault("size_wh", (3000, 2400))
        kw.setdefault("mpp", 0.243)
        kw.setdefault("tissue", ((300, 300, 2700, 2100),))
        return write_synthetic_slide(tmp_path / name, SyntheticSlide(**kw))

    return make
