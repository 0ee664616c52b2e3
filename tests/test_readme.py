"""Every output path a README command reads was written by an earlier README command."""

import os
import re
import shlex

import pytest

pytest.importorskip("detectron2")

from d2_helpers import REPO, make_cfg  # noqa: E402

WRITES = ("OUTPUT_DIR", "--output-dir", "-o", "--out", "--output")


def readme_commands():
    """(kind, text) of every command in README.md's ```bash blocks (continuations joined) and of
    every ```python block, in order."""
    text = open(os.path.join(REPO, "README.md")).read()
    out = []
    for kind, body in re.findall(r"```(bash|python)\n(.*?)```", text, re.S):
        if kind == "python":
            out.append(("python", body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                out.append(("bash", line))
    return out


def written_and_read(kind, command):
    """(folders or files the command writes, output/ paths it reads)."""
    if kind == "python":
        return [], [p for p in re.findall(r"[\"'](output/[^\"']+)[\"']", command)]
    tokens = shlex.split(command)
    writes, reads = [], []
    for i, tok in enumerate(tokens):
        if i and tokens[i - 1] in WRITES:
            writes.append(tok.rstrip("/"))
        elif tok.startswith("output/"):
            reads.append(tok)
    if "--config-file" in tokens and "OUTPUT_DIR" not in tokens:
        config = tokens[tokens.index("--config-file") + 1]
        if config.endswith(".yaml") and os.path.isfile(os.path.join(REPO, config)):  # not a user's own file
            writes.append(
                make_cfg(os.path.relpath(os.path.join(REPO, config), os.path.join(REPO, "configs"))).OUTPUT_DIR
            )
    return writes, reads


def test_every_read_output_path_was_written_before():
    commands = readme_commands()
    assert len(commands) > 20
    written, missing = [], []
    for kind, command in commands:
        writes, reads = written_and_read(kind, command)
        for path in reads:
            if not any(path == w or path.startswith(w + "/") for w in written):
                missing.append(f"{path!r} in: {command[:120]}")
        written += writes
    assert missing == []


def test_the_check_can_fail():
    writes, reads = written_and_read(
        "bash",
        "python tools/run_net.py --eval-only --config-file configs/toy/fpn_toy.yaml "
        "MODEL.WEIGHTS output/nowhere/model_final.pth",
    )
    assert writes == ["output/toy/fpn_toy"] and reads == ["output/nowhere/model_final.pth"]
