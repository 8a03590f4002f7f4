"""Fixtures of the pretrained-model CLI tests (helpers in pretrained_fixtures.py)."""

from __future__ import annotations

import pytest
from pretrained_fixtures import save_tiny


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(folder, model, tokenizer) of a tiny random Llama HF folder with a ChatML template."""
    folder = tmp_path_factory.mktemp("tiny-hf")
    model, tok = save_tiny(folder)
    return folder, model, tok
