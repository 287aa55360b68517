"""Fixtures of the command-line tests."""
import pytest

import gim_fast.models


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the arguments must be refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded: {args}")
    monkeypatch.setattr(gim_fast.models, "load_pretrained", refuse)
