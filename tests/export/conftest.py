"""Fixtures of the export tests: a tiny compressed Llama directory."""

from __future__ import annotations

import pytest
from export_helpers import compressed


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory):
    """(directory written by save_compressed, the in-memory compressed model)."""
    from rankwise.compress import save_compressed

    model = compressed()
    out = tmp_path_factory.mktemp("compressed") / "tiny-30"
    save_compressed(model, out)
    return out, model
