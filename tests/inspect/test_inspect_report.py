"""The inspect outputs: text table, JSON, PNGs, a self-contained HTML report that renders, and the CLI."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

import rankwise.cli
from rankwise.inspect import inspect_model, write_outputs
from rankwise.inspect.report import format_table

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("screenshot_report", ROOT / "scripts" / "screenshot_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    base = _tiny_llama()
    tuned = _tiny_llama()
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight += 0.1 * torch.outer(torch.randn(32), torch.randn(32))
    out = tmp_path_factory.mktemp("report")
    result = inspect_model(base, name="tiny-llama", compare_to=tuned, progress=False)
    paths = write_outputs(result, out)
    return out, paths, result


def test_outputs_are_written(report_dir):
    out, paths, result = report_dir
    for key in ("json", "table", "spectra", "spectra_png", "heatmaps_png", "update_spectra_png", "html"):
        assert paths[key].is_file() and paths[key].parent == out
    for key in ("spectra_png", "heatmaps_png", "update_spectra_png"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC
    data = json.loads(paths["json"].read_text())
    assert len(data["matrices"]) == len(result.weights.rows) == 15
    q = next(r for r in data["update"]["matrices"] if r["name"] == "model.layers.0.self_attn.q_proj")
    assert q["update_rank"] == 1
    assert data["summary"]["matrices"] == 15


def test_html_is_self_contained_with_images_and_table(report_dir):
    _, paths, result = report_dir
    html = paths["html"].read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= 4  # spectra, heatmaps, update spectra, update heatmaps
    assert all(base64.b64decode(img)[:8] == PNG_MAGIC for img in images)
    # nothing is fetched from elsewhere
    assert not re.search(r'(src|href)="(https?:)?//', html)
    # one table row per matrix, naming it, plus the update table
    assert html.count("<tr>") == 1 + len(result.weights.rows) + 1 + len(result.update.rows)
    for row in result.weights.rows:
        assert f"<td>{row['name']}</td>" in html
    assert "WeLore" in html and "FARMS" in html and "tiny-llama" in html


def test_text_table_has_one_line_per_row():
    rows = [{"name": "a", "shape": [2, 3], "erank": 1.234}, {"name": "bb", "shape": [4, 5], "erank": None}]
    text = format_table(rows, [("name", "matrix", "s"), ("shape", "shape", "shape"), ("erank", "erank", ".2f")])
    lines = text.splitlines()
    assert len(lines) == 4 and "2x3" in lines[2] and "1.23" in lines[2] and lines[3].endswith("-")


def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    shot = _screenshot_module()
    if shot.find_chromium() is None:
        pytest.skip("no chromium on PATH (apt-get install -y chromium)")
    _, paths, _ = report_dir
    png = shot.screenshot(paths["html"], tmp_path / "shot.png", width=900, height=1200)
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (900, 1200)
    assert len(data) > 20_000  # a rendered page with plots, not a blank one


@pytest.fixture
def cli(monkeypatch):
    if "inspect" not in rankwise.cli._SUBCOMMANDS:
        monkeypatch.setattr(rankwise.cli, "_SUBCOMMANDS", (*rankwise.cli._SUBCOMMANDS, "inspect"))
    return rankwise.cli.main


def test_cli_quick_on_a_saved_local_model(cli, tmp_path, capsys):
    _tiny_llama().save_pretrained(tmp_path / "tiny")
    assert cli(["inspect", str(tmp_path / "tiny"), "--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "effective rank per layer" in out and "q_proj" in out and "down_proj" in out
    grid = [line.split() for line in out.splitlines() if re.match(r"^\d+(\s+\d+\.\d)+$", line)]
    assert [row[0] for row in grid] == ["0", "1"] and all(len(row) == 8 for row in grid)
    assert not any((tmp_path).glob("inspect-*"))  # --quick writes nothing


def test_cli_full_writes_the_report(cli, tmp_path, capsys):
    _tiny_llama().save_pretrained(tmp_path / "a")
    _tiny_llama(seed=1).save_pretrained(tmp_path / "b")
    out_dir = tmp_path / "out"
    code = cli(["inspect", str(tmp_path / "a"), "--compare", str(tmp_path / "b"), "--no-data",
                "--no-progress", "--out", str(out_dir)])
    assert code == 0
    assert {"inspect.json", "table.txt", "report.html", "spectra.png", "heatmaps.png"} <= {
        p.name for p in out_dir.iterdir()
    }
    out = capsys.readouterr().out
    assert "report.html" in out and "median alpha" in out


def test_cli_errors_are_clear(cli, tmp_path, capsys):
    assert cli(["inspect", str(tmp_path / "missing"), "--quick"]) == 1
    assert "missing" in capsys.readouterr().err
