"""Docs that run: every ```python and ```bash block of README.md and docs/*.md is executed.

Conventions (for anyone writing docs; keep each file's blocks under ~15 s here):

- One Markdown file = one test. Its blocks run in document order in ONE fresh Python process
  (like a notebook: a python block sees the names earlier python blocks defined), with the
  working directory set to an empty temporary folder (so `out/...` paths land there),
  PYTHONPATH set to this checkout's src/, and the Hugging Face hub offline.
- A ```bash block runs with `bash -euo pipefail` in the same folder. `rankwise` there is this
  checkout's CLI (`python -m rankwise.cli`). `make ...` lines are not run (make is what runs
  this test); every other command is.
- Speed: the block runner and every `rankwise` command are forks of one server per xdist
  worker that imported torch, transformers and rankwise once (tests/docs_fork.py): still a
  separate process each, with its own argv, folder, environment, stdio and exit status, minus
  ~4 s of imports. `RANKWISE_DOCS_FORK=0` runs each in a fresh interpreter instead.
- Other fences (```text, ```console, plain ```) are output or illustrations, and never run.
- Markers: HTML comments directly above the opening fence (invisible on GitHub), or the same
  text in a comment inside the block (`# doc-test: ...`):

    <!-- doc-test: skip REASON -->             do not run this block; a reason is required
    <!-- doc-test: replace "OLD" with "NEW" --> substitute before running (repeatable; one per
                                               line): long runs get short flags, e.g.
                                               replace "--heal-minutes 15" with "--heal-minutes 0.05"
    <!-- doc-test: setup                        python run before the block (stand-ins for names
    ids = torch.randint(0, 100, (1, 8))          a snippet assumes, e.g. `ids`, `data`, or files
    -->                                          a bash block reads); may span lines

  In NEW and in setup code, `{tiny_llama}` and `{tiny_bert}` expand to folders holding tiny
  random models with the bundled models' architectures and tokenizers (a 2-layer Llama with
  SmolLM2's tokenizer; a 2-layer BERT with MiniLM's), so an example written for
  `smollm2-135m` runs in seconds: replace "smollm2-135m" with "{tiny_llama}".
- Tracebacks name the Markdown file and line of the failing statement.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"doc-test:\s*(.*)", re.S)
REPLACE = re.compile(r'replace\s+"((?:[^"\\]|\\.)*)"\s+with\s+"((?:[^"\\]|\\.)*)"')
FORK_CLIENT = str(Path(__file__).with_name("docs_fork.py"))
TIMEOUT_S = 600  # per file, for a loaded machine; all docs together take ~90 s on two idle cores


@dataclass
class Block:
    """One runnable fenced block: its language, first code line (1-based) and directives."""

    lang: str
    line: int
    source: str
    skip: str | None = None
    setup: list[str] = field(default_factory=list)
    replace: list[tuple[str, str]] = field(default_factory=list)


def _directive(block: Block, text: str, where: str) -> None:
    text = text.strip()
    if text.startswith("skip"):
        reason = text[4:].strip()
        if not reason:
            raise ValueError(f"{where}: `doc-test: skip` needs a reason")
        block.skip = reason
    elif text.startswith("setup"):
        block.setup.append(textwrap.dedent(text[5:]).strip("\n"))
    elif text.startswith("replace"):
        pairs = REPLACE.findall(text)
        if not pairs:
            raise ValueError(f'{where}: write `doc-test: replace "OLD" with "NEW"`, got {text!r}')
        block.replace.extend((a.replace('\\"', '"'), b.replace('\\"', '"')) for a, b in pairs)
    else:
        raise ValueError(f"{where}: unknown doc-test directive {text!r} (skip, setup, replace)")


def parse(path: Path) -> list[Block]:
    """The python/bash blocks of a Markdown file with the markers that apply to them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, comments, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("<!--") and "doc-test:" in line:
            start = i
            while "-->" not in lines[i]:
                i += 1
            body = "\n".join(lines[start : i + 1])
            comments.append((start + 1, body[body.index("<!--") + 4 : body.rindex("-->")]))
            i += 1
            continue
        fence = FENCE.match(line)
        if fence is None:
            if line.strip():
                comments = []  # markers apply only to the fence right below them
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        lang = fence.group(1)
        if lang in ("python", "bash"):
            block = Block(lang, i + 2, "\n".join(lines[i + 1 : end]) + "\n")
            for at, body in comments:
                _directive(block, MARKER.search(body).group(1), f"{path.name}:{at}")
            for n, code in enumerate(lines[i + 1 : end], start=i + 2):
                found = re.search(r"#\s*doc-test:\s*(.*)$", code)
                if found:
                    _directive(block, found.group(1), f"{path.name}:{n}")
            blocks.append(block)
        comments = []
        i = end + 1
    return blocks


_RUNNER = r'''
import json, os, subprocess, sys
blocks = json.load(open(sys.argv[1], encoding="utf-8"))
namespace = {"__name__": "__main__"}
fork = os.environ.get("RANKWISE_DOCS_FORK")
cli = ('"%s" -S "%s" "%s" cli' % (sys.executable, os.environ["RANKWISE_DOCS_FORK_CLIENT"], fork) if fork
       else '"%s" -c "import sys; from rankwise.cli import main; sys.exit(main())"' % sys.executable)
prelude = ('set -euo pipefail\n'
           'rankwise() { %s "$@"; }\n'
           'make() { echo "doc-test: make $* is not run here"; }\n' % cli)
import time
for b in blocks:
    start = time.perf_counter()
    print(f"--- {b['file']}:{b['line']} ({b['lang']})", flush=True)
    for setup in b["setup"]:
        exec(compile(setup, f"{b['file']} (setup of line {b['line']})", "exec"), namespace)
    if b["lang"] == "python":
        exec(compile("\n" * (b["line"] - 1) + b["source"], b["file"], "exec"), namespace)
    else:
        done = subprocess.run(["bash", "-xc", prelude + b["source"]])
        if done.returncode:
            sys.exit(f"{b['file']}:{b['line']}: bash block failed with exit status {done.returncode}")
    print(f"--- {b['file']}:{b['line']} done in {time.perf_counter() - start:.1f} s", flush=True)
'''


def _docs_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", TQDM_DISABLE="1")


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory) -> Iterator[str]:
    """The socket of a `docs_fork` server (imports once, forks per command); "" when
    RANKWISE_DOCS_FORK=0 asks for a fresh interpreter per command instead."""
    if os.environ.get("RANKWISE_DOCS_FORK") == "0":
        yield ""
        return
    path = str(tmp_path_factory.mktemp("fork") / "docs.sock")
    server = subprocess.Popen([sys.executable, FORK_CLIENT, "serve", path], env=_docs_env())
    deadline = time.monotonic() + 300
    while not os.path.exists(path):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"the docs fork server did not start (exit status {server.poll()})")
        time.sleep(0.05)
    yield path
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Tiny random Llama / BERT folders with the bundled models' tokenizers (see the docstring)."""
    return build_tiny_models(tmp_path_factory.mktemp("doc-models"))


def build_tiny_models(root: Path) -> dict[str, str]:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    import rankwise

    torch.manual_seed(0)
    tok = rankwise.load_tokenizer("smollm2-135m")
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    llama.save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    bert_dir = rankwise.models.model_info("minilm-l6").source_dir()
    btok = AutoTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
    bert = BertModel(BertConfig(vocab_size=len(btok), hidden_size=96, intermediate_size=192,
                                num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=512))
    bert.save_pretrained(root / "tiny-bert")
    btok.save_pretrained(root / "tiny-bert")
    return {"tiny_llama": str(root / "tiny-llama"), "tiny_bert": str(root / "tiny-bert")}


def _expand(text: str, models: dict[str, str]) -> str:
    for key, value in models.items():
        text = text.replace("{" + key + "}", value)
    return text


def _prepare(path: Path, models: dict[str, str]) -> list[dict]:
    out = []
    for block in parse(path):
        if block.skip:
            continue
        source = block.source
        for old, new in block.replace:
            if old not in source:
                raise AssertionError(f"{path.name}:{block.line}: doc-test replace target {old!r} "
                                     "is not in the block (the docs changed: update the marker)")
            source = source.replace(old, _expand(new, models))
        out.append({"lang": block.lang, "line": block.line, "source": source,
                    "file": str(path.relative_to(ROOT)),
                    "setup": [_expand(s, models) for s in block.setup]})
    return out


def test_markers_parse_and_apply(tmp_path):
    """The conventions above, on a small document."""
    doc = tmp_path / "d.md"
    doc.write_text(textwrap.dedent('''\
        <!-- doc-test: replace "--steps 300" with "--steps 2" -->
        ```bash
        rankwise finetune m --steps 300
        ```
        <!-- doc-test: skip needs a GPU -->
        ```python
        import cuda_only
        ```
        <!-- doc-test: setup
        x = 2
        -->
        ```python
        print(x)  # doc-test: replace "x)" with "x + 1)"
        ```
        ```text
        not code
        ```
        '''))
    bash, skipped, py = parse(doc)
    assert (bash.lang, bash.line, bash.replace) == ("bash", 3, [("--steps 300", "--steps 2")])
    assert skipped.skip == "needs a GPU"
    assert (py.line, py.setup, py.replace) == (13, ["x = 2"], [("x)", "x + 1)")])
    with pytest.raises(ValueError, match="needs a reason"):
        doc.write_text("<!-- doc-test: skip -->\n```python\npass\n```\n")
        parse(doc)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_doc_blocks_run(path, tiny_models, fork_server, tmp_path):
    blocks = _prepare(path, tiny_models)
    if not blocks:
        pytest.skip(f"{path.name} has no runnable blocks")
    (tmp_path / "blocks.json").write_text(json.dumps(blocks), encoding="utf-8")
    (tmp_path / "runner.py").write_text(_RUNNER, encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    env = dict(_docs_env(), RANKWISE_DOCS_FORK=fork_server, RANKWISE_DOCS_FORK_CLIENT=FORK_CLIENT)
    runner = [str(tmp_path / "runner.py"), str(tmp_path / "blocks.json")]
    command = [sys.executable, "-S", FORK_CLIENT, fork_server, "run", *runner] if fork_server else \
        [sys.executable, *runner]
    try:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out, err = (_text(exc.stdout), _text(exc.stderr))
        pytest.fail(f"{path.name}: blocks still running after {TIMEOUT_S} s (shorten them with "
                    f"doc-test markers)\n{out[-3000:]}\n{err[-3000:]}")
    assert done.returncode == 0, f"{path.name}: a block failed\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def test_version_flag_prints_the_package_version(capsys):
    import importlib.metadata

    import rankwise
    from rankwise.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rankwise {rankwise.__version__}"
    assert rankwise.__version__ == importlib.metadata.version("rankwise")


def test_a_forked_command_keeps_its_status_output_folder_and_environment(fork_server, tmp_path):
    """A docs command run through the fork server fails, prints and sees its folder and
    environment as a fresh process would: otherwise a broken docs block could pass."""
    if not fork_server:
        pytest.skip("RANKWISE_DOCS_FORK=0: no fork server")
    script = tmp_path / "script.py"
    script.write_text("import os, signal, sys\n"
                      "print(os.getcwd(), os.environ['DOCS_FORK_PROBE'], sys.argv[1:])\n"
                      "if sys.argv[1] == 'signal': os.kill(os.getpid(), signal.SIGTERM)\n"
                      "sys.exit(int(sys.argv[1]) if sys.argv[1].isdigit() else 0)\n")
    env = dict(_docs_env(), DOCS_FORK_PROBE="seen")

    def client(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-S", FORK_CLIENT, fork_server, *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)

    done = client("run", str(script), "3")
    assert done.returncode == 3 and done.stdout.split() == [str(tmp_path), "seen", "['3']"]
    assert client("run", str(script), "signal").returncode == -15  # the client dies the same way
    bad = client("cli", "no-such-command")
    assert bad.returncode == 2 and "no-such-command" in bad.stderr
    import rankwise

    assert client("cli", "--version").stdout.strip().endswith(rankwise.__version__)
