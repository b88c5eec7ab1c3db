"""The Dockerfile, parsed (no Docker engine runs here): a Ray 2.60 CUDA base matching the package's
pins, exactly pyproject.toml's dependency pins, a non-root user, nothing secret baked in, and a build
context that carries only the package."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
# Name parts (split at "_") that mark a credential: AWS_SECRET_ACCESS_KEY, HF_TOKEN, not TOKENIZERS_*.
SECRET_PARTS = {
    "KEY",
    "SECRET",
    "TOKEN",
    "PASSWORD",
    "PASSWD",
    "CREDENTIAL",
    "CREDENTIALS",
    "AUTH",
    "PRIVATE",
}
SECRET_VALUE = re.compile(
    r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|-----BEGIN|\bhf_[A-Za-z0-9]{20,}|\bghp_[A-Za-z0-9]{20,}"
)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # a comment inside a continued instruction
        buf += " " + line
        if line.endswith("\\"):
            buf = buf[:-1]
            continue
        word, _, args = buf.strip().partition(" ")
        out.append((word.upper(), args.strip()))
        buf = ""
    return out


def substitute(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def key_values(args: str) -> dict[str, str]:
    """ENV/ARG arguments: `K=V K2=V2`, `K V` (legacy ENV) or a bare `K` (ARG without default)."""
    parts = shlex.split(args)
    if len(parts) >= 2 and "=" not in parts[0]:
        return {parts[0]: " ".join(parts[1:])}
    return {k: v for k, _, v in (p.partition("=") for p in parts)}


def normalise(req: str) -> tuple[str, tuple[str, ...], str]:
    r = Requirement(req)
    return canonicalize_name(r.name), tuple(sorted(r.extras)), str(r.specifier)


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def pinned(pyproject: dict, name: str) -> str:
    for dep in pyproject["project"]["dependencies"]:
        r = Requirement(dep)
        if canonicalize_name(r.name) == name:
            (spec,) = r.specifier
            assert spec.operator == "=="
            return spec.version
    raise LookupError(name)


def base_image(steps) -> str:
    args: dict[str, str] = {}
    for word, rest in steps:
        if word == "ARG":
            args.update(key_values(rest))
        if word == "FROM":
            return substitute(rest.split()[0], args)
    raise AssertionError("no FROM")


def test_base_is_the_ray_cuda_image_of_our_ray_and_python(steps, pyproject):
    image = base_image(steps)
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu(\d+)", image)
    assert m, f"base image {image!r} is not a rayproject/ray <version>-py<python>-cu<cuda> image"
    ray_version, major, minor, _cuda = m.groups()
    assert ray_version == pinned(pyproject, "ray") == "2.60.0"
    requires = pyproject["project"]["requires-python"]  # ">=3.11,<3.12"
    assert f">={major}.{minor}" in requires and f"<{major}.{int(minor) + 1}" in requires
    assert sum(word == "FROM" for word, _ in steps) == 1


def test_pip_pins_equal_pyproject(steps, pyproject):
    """The dependency layer installs exactly pyproject's `dependencies`, pin for pin; the package
    itself is installed with --no-deps on top, so nothing else can slip in."""
    installs = [shlex.split(rest) for word, rest in steps if word == "RUN" and "pip install" in rest]
    requirements, package_installs = [], []
    for argv in installs:
        words = [w for w in argv if w not in ("&&",)]
        i = words.index("install")
        tail = words[i + 1 :]
        if "--no-deps" in tail:
            package_installs.append(tail)
            continue
        requirements += [w for w in tail if not w.startswith("-")]
    ours = sorted(normalise(r) for r in requirements)
    theirs = sorted(normalise(r) for r in pyproject["project"]["dependencies"])
    assert ours == theirs
    assert ("torch", (), "==2.13.0") in ours  # pinned in the same pip call as everything else
    assert package_installs and all("." in tail for tail in package_installs)


def test_runs_as_a_non_root_user_from_the_start(steps):
    users = [(i, rest) for i, (word, rest) in enumerate(steps) if word == "USER"]
    assert users, "no USER: the image would run as whatever the base leaves"
    for _, user in users:
        name, _, group = user.partition(":")
        assert name not in ("root", "0") and group not in ("root", "0"), user
    # The last USER is numeric, so the kubelet can enforce runAsNonRoot, and matches the chart.
    uid = users[-1][1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 1000
    values = yaml.safe_load((REPO / "helm" / "chuxin-ray" / "values.yaml").read_text(encoding="utf-8"))
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    first_run = next(i for i, (word, _) in enumerate(steps) if word == "RUN")
    assert users[0][0] < first_run, "a RUN before the first USER runs as root"


def test_nothing_secret_is_baked_in(steps):
    for word, rest in steps:
        if word in ("ENV", "ARG", "LABEL"):
            for key, value in key_values(rest).items():
                parts = set(key.upper().split("_"))
                assert not parts & SECRET_PARTS, f"{word} {key}: credentials come from the pod, not the image"
                assert not SECRET_VALUE.search(value), f"{word} {key} holds something secret-looking"
        if word in ("COPY", "ADD"):
            sources = [s for s in shlex.split(rest) if not s.startswith("--")][:-1]
            for src in sources:
                assert not re.search(r"(^|/)\.(aws|env|kube|netrc|git|ssh)|\.pem$|id_rsa|credentials", src), (
                    src
                )
                assert "://" not in src, f"{word} {src}: no downloads at build time"
        assert not SECRET_VALUE.search(rest)


def test_build_context_holds_only_the_package(steps):
    ignore = [ln.strip() for ln in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()]
    rules = [ln for ln in ignore if ln and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore should exclude everything, then allow what the image needs"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    sources = [
        src
        for word, rest in steps
        if word == "COPY"
        for src in [x for x in shlex.split(rest) if not x.startswith("--")][:-1]
    ]
    assert sources
    for src in sources:
        assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"
        assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"


def test_ray_version_agrees_across_image_chart_and_llm_image(steps, pyproject):
    ray = pinned(pyproject, "ray")
    chart = yaml.safe_load((REPO / "helm" / "chuxin-ray" / "Chart.yaml").read_text(encoding="utf-8"))
    values = yaml.safe_load((REPO / "helm" / "chuxin-ray" / "values.yaml").read_text(encoding="utf-8"))
    assert values["ray"]["version"] == ray == chart["annotations"]["chuxin-ray/ray-version"]
    assert chart["appVersion"] == pyproject["project"]["version"]
    # The LLM service runs the stock Ray LLM image of the same Ray and Python (vLLM's pins conflict
    # with the training stack, so it is not this Dockerfile); the Dockerfile says so.
    llm = values["llm"]["image"]
    assert llm["repository"] == "rayproject/ray-llm"
    assert llm["tag"].startswith(f"{ray}-py311-")
    assert f"rayproject/ray-llm:{llm['tag']}" in DOCKERFILE.read_text(encoding="utf-8")
    base_suffix = base_image(steps).split(":", 1)[1].removeprefix(f"{ray}-")
    assert llm["tag"] == f"{ray}-{base_suffix}"  # same Python and CUDA as the training image
