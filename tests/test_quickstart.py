"""scripts/quickstart.py: its default adapter folder is temporary; a folder the user names is kept."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def qs():
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(ROOT, "scripts/quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_removes_its_temp_folder_keeps_a_named_one(qs, tmp_path, monkeypatch, capsys):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    qs.main(["--max-new-tokens", "2"])
    assert "same tokens as each row alone: True" in capsys.readouterr().out
    assert os.listdir(tmp) == []
    kept = tmp_path / "adapters"
    qs.main(["--max-new-tokens", "2", "--out", str(kept)])
    assert sorted(os.listdir(kept)) == [f"adapter{i}_r{r}" for i, r in enumerate((4, 8, 16, 32))]
