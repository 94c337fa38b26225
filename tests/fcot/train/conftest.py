"""Shared data for the training tests: small synthetic document-VQA sets (fcot data synth)."""

from __future__ import annotations

import pytest

from fcot.data.synth import SynthConfig, synthesize


def synth_jsonl(tmp_path_factory, *, n: int, seed: int, size: int, font_size: int) -> str:
    """A fresh synthetic set of ``n`` ``size``-px pages, one question each; returns its data.jsonl."""
    out = tmp_path_factory.mktemp(f"synth{n}") / "d"
    synthesize(out, SynthConfig(n=n, seed=seed, width=size, height=size, font_size=font_size, density=0.3,
                                qa_per_image=1), progress=False)
    return str(out / "data.jsonl")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """Four 448 px pages (one InternVL tile each)."""
    return synth_jsonl(tmp_path_factory, n=4, seed=0, size=448, font_size=24)
