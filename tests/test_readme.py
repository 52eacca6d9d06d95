"""The user documents hold what they show: README.md and docs/*.md.

- the kernel examples run as printed (README's first screen and docs/kernels.md);
- every relative link of README.md, DESIGN.md and docs/*.md reaches a file, and its #anchor a
  heading there; README links every page of docs/;
- every `elbokto` command of their bash blocks parses with the CLI's own parsers (the jobs
  themselves are stubbed out), and the lm-eval model args are DiffusionLM's arguments.
"""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
USER_DOCS = [README, *DOCS]
LINKED_DOCS = [README, ROOT / "DESIGN.md", *DOCS]


def blocks(path: Path, language: str) -> list[str]:
    """The fenced code blocks of one language, dedented (a block may sit in a list item)."""
    found = re.findall(rf"^( *)```{language}\n(.*?)^\1```", path.read_text(), re.S | re.M)
    return [
        "".join(line[len(indent) :] + "\n" for line in body.splitlines()) for indent, body in found
    ]


def name(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- the kernel examples ----------------------------------------------------------------------

KERNEL_EXAMPLES = [
    (path, block)
    for path in USER_DOCS
    for block in blocks(path, "python")
    if "from elbokto_kernels import" in block
]


def test_readme_first_screen_has_the_kernel_example():
    first_screen = README.read_text().split("## Documentation")[0]
    assert "from elbokto_kernels import" in first_screen
    assert len(first_screen.splitlines()) <= 70
    assert any(path == README for path, _ in KERNEL_EXAMPLES)
    assert any(path.name == "kernels.md" for path, _ in KERNEL_EXAMPLES)


@pytest.mark.parametrize(
    "path, example",
    KERNEL_EXAMPLES,
    ids=[f"{name(p)}-{i}" for i, (p, _) in enumerate(KERNEL_EXAMPLES)],
)
def test_kernel_example_runs(path, example):
    scope: dict = {}
    exec(compile(example, name(path), "exec"), scope)
    assert scope["elbo"].shape == (2,) and scope["hidden"].grad is not None


@pytest.mark.parametrize("path", USER_DOCS, ids=name)
def test_every_python_block_compiles(path):
    for block in blocks(path, "python"):
        compile(block, name(path), "exec")


# --- links -----------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"^ *```.*?^ *```", "", path.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", LINKED_DOCS, ids=name)
def test_relative_links_reach_a_file_and_a_heading(path):
    for link in links(path):
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        target_path = (path.parent / target).resolve() if target else path
        assert target_path.exists(), f"{name(path)}: {link}: no such file"
        if anchor:
            assert anchor in anchors(target_path), f"{name(path)}: {link}: no such heading"


def test_readme_links_every_docs_page():
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in links(README)}
    assert DOCS and set(DOCS) <= linked, set(DOCS) - linked


# --- commands --------------------------------------------------------------------------------


def commands(path: Path) -> list[list[str]]:
    """The argv of every `elbokto ...` or `... -m elbokto.cli ...` line of the bash blocks."""
    found = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["elbokto"]:
                found.append(words[1:])
            elif "elbokto.cli" in words and words[words.index("elbokto.cli") - 1] == "-m":
                found.append(words[words.index("elbokto.cli") + 1 :])
    return found


COMMANDS = [(path, argv) for path in USER_DOCS for argv in commands(path)]


def test_the_documents_show_commands():
    shown = {argv[0] if argv[0] != "eval" else " ".join(argv[:2]) for _, argv in COMMANDS}
    assert {"train", "generate", "diagnose", "merge", "eval winrate", "eval lm-eval"} <= shown


@pytest.fixture
def stubbed_jobs(monkeypatch, tmp_path):
    """The CLI with its jobs replaced: a command parses its flags, builds its configs, and stops."""
    from transformers import training_args

    from elbokto import demo, online, run
    from elbokto.demo import online as online_demo
    from elbokto.eval import winrate

    monkeypatch.chdir(tmp_path)  # a name like runs/x is a hub id unless runs/ exists here
    # The commands are a GPU machine's: --bf16 parses as it would there.
    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: True)
    ran = []
    for module, job, result in [
        (run, "train", None),
        (run, "generate_text", []),
        (run, "diagnose", []),
        (run, "merge", "merged"),
        (run, "precompute_ref", SimpleNamespace(uids=torch.zeros(0), meta={"epochs": 1})),
        (demo, "run_seeds", None),
        (online, "train_online", None),
        (online_demo, "run_online_demo", None),
        (
            winrate,
            "run_winrate",
            {
                k: 0
                for k in (
                    "awr",
                    "ci_low",
                    "ci_high",
                    "n",
                    "wins",
                    "ties",
                    "losses",
                    "inconsistent",
                    "errors",
                )
            },
        ),
    ]:
        monkeypatch.setattr(
            module, job, lambda *a, _job=job, _result=result, **k: ran.append(_job) or _result
        )
    return ran


CLI_COMMANDS = [c for c in COMMANDS if c[1][:2] != ["eval", "lm-eval"]]
LM_EVAL_COMMANDS = [c for c in COMMANDS if c[1][:2] == ["eval", "lm-eval"]]


def ids(commands):
    return [
        f"{name(path)}-{' '.join(argv[:2] if argv[0] == 'eval' else argv[:1])}-{i}"
        for i, (path, argv) in enumerate(commands)
    ]


@pytest.mark.parametrize("path, argv", CLI_COMMANDS, ids=ids(CLI_COMMANDS))
def test_command_parses(stubbed_jobs, path, argv):
    from elbokto.cli import main

    try:
        rc = main(argv)
    except SystemExit as exit:  # argparse refusing a flag
        pytest.fail(f"{name(path)}: elbokto {shlex.join(argv)}: exit {exit.code}")
    assert rc == 0 and stubbed_jobs, f"{name(path)}: elbokto {shlex.join(argv)}"


@pytest.mark.parametrize("path, argv", LM_EVAL_COMMANDS, ids=ids(LM_EVAL_COMMANDS))
def test_lm_eval_model_args_are_diffusion_lm_arguments(path, argv):
    pytest.importorskip("lm_eval")
    from elbokto.eval.harness import DiffusionLM

    accepted = set(inspect.signature(DiffusionLM.__init__).parameters)
    assert argv[argv.index("--model") + 1] == "elbokto"
    model_args = argv[argv.index("--model_args") + 1]
    names = {pair.partition("=")[0] for pair in model_args.split(",")}
    assert names <= accepted, f"{name(path)}: not DiffusionLM arguments: {names - accepted}"
