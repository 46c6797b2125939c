"""`make gpu-bundle`: the wheels a GPU machine of the device tool needs to run skipbench with no network (issue 39).

The machine's image (tools/gpu_image.txt) has Python 3.12, its own CUDA torch and most of what skipbench needs. This
walks the requirements of `skipbench[lmeval]` as installed here (importlib.metadata, markers read for Linux x86-64
CPython 3.12), keeps each package the image lacks or holds at a version some requirement refuses (transformers 5.17
against >=5.20), and fetches the version installed here as a wheel for that platform (`pip download`, binary only);
a package published only as a source archive is built into a wheel here (`pip wheel`: those are pure Python). torch
is never carried: the image's CUDA build is the point. The project's own wheel joins them. It writes DIR/README.txt
with the one install line and refuses a folder above 60 MiB. Usage: python tools/gpu_bundle.py DIR [--dry-run]
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60 * 2**20
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"]
NEVER = {"torch", "skipbench"}  # the image's CUDA torch; the project, built from this checkout
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*.whl && "
           "export PYTHONPATH=/tmp/site  # over the image's packages, its torch kept")


def image() -> dict[str, Version | None]:
    """The image's packages: name -> version where known, else None (present, version not read)."""
    out = {}
    for line in (ROOT / "tools" / "gpu_image.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version) if version else None
    return out


def needed(root: str = "skipbench", extras: tuple[str, ...] = ("lmeval",)) -> tuple[dict[str, str], dict[str, list]]:
    """Every distribution `root[extras]` needs on the target, as installed here (name -> version), and the
    requirements that name each (name -> [Requirement])."""
    versions: dict[str, str] = {}
    asked: dict[str, list] = {}

    def walk(name: str, wanted: tuple[str, ...]) -> None:
        key = canonicalize_name(name)
        first = key not in versions
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"gpu_bundle: '{name}' is required but not installed here; run make setup first")
        versions[key] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({**TARGET, "extra": e}) for e in ("", *wanted)):
                asked.setdefault(canonicalize_name(req.name), []).append(req)
                if first or wanted:
                    walk(req.name, tuple(req.extras))

    walk(root, extras)
    return versions, asked


def to_carry(versions: dict[str, str], asked: dict[str, list], held: dict[str, Version | None]) -> dict[str, str]:
    """The packages the image lacks, or holds at a version a requirement refuses: name -> the version here."""
    out = {}
    for name, version in sorted(versions.items()):
        if name in NEVER:
            continue
        have = held.get(name, "missing")
        if have == "missing" or (have is not None and any(not r.specifier.contains(have, prereleases=True)
                                                          for r in asked.get(name, []))):
            out[name] = version
    return out


def fetch(carry: dict[str, str], folder: Path) -> None:
    pip = [sys.executable, "-m", "pip"]
    platforms = [x for p in PLATFORMS for x in ("--platform", p)]
    for name, version in carry.items():
        got = subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                              "--implementation", "cp", *platforms, "-d", str(folder), f"{name}=={version}"],
                             capture_output=True, text=True)
        if got.returncode:  # no wheel for the platform: a source archive, built here (pure Python)
            subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(folder), f"{name}=={version}"], check=True)
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(folder), str(ROOT)], check=True)


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python tools/gpu_bundle.py DIR [--dry-run]")
    folder = Path(argv[0])
    versions, asked = needed()
    carry = to_carry(versions, asked, image())
    print("carried:", ", ".join(f"{n}=={v}" for n, v in carry.items()))
    if "--dry-run" in argv:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    fetch(carry, folder)
    size = sum(p.stat().st_size for p in folder.glob("*.whl"))
    (folder / "README.txt").write_text(
        f"Wheels for a GPU machine with no network (skipbench {versions['skipbench']}; tools/gpu_bundle.py): "
        f"{len(list(folder.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB.\n{INSTALL.replace('DIR', str(folder))}\n")
    if size > LIMIT:
        raise SystemExit(f"gpu_bundle: {size / 2**20:.1f} MiB of wheels, above the {LIMIT / 2**20:.0f} MiB limit")
    print(f"wrote {folder}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1:])
