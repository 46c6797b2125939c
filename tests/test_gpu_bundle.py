"""tools/gpu_bundle.py's choice of wheels (issue 39, item 3), without the network: what the GPU image lacks or holds
at a refused version is carried, torch never; the fetch itself is `make gpu-bundle`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def bundle():
    spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "tools" / "gpu_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wheels_carried_are_what_the_image_lacks_or_holds_too_old():
    b = bundle()
    versions, asked = b.needed()
    assert {"lm-eval", "rouge-score", "gguf", "transformers", "torch"} <= set(versions)  # skipbench[lmeval]'s tree
    held = b.image()
    assert held["transformers"] == Version("5.17.0") and held["pandas"] is None and "gguf" not in held
    carry = b.to_carry(versions, asked, held)
    assert "transformers" in carry  # 5.17 there, >=5.20 asked by skipbench
    assert {"gguf", "rouge-score", "lm-eval"} <= set(carry)  # not in the image
    assert not set(carry) & b.IMAGE_CORE  # what the image's compiled packages are built on stays the image's
    assert "torch" not in carry and "skipbench" not in carry  # the image's CUDA torch; the project is built apart
    assert "pandas" not in carry and "accelerate" not in carry  # there, at a version every requirement accepts
    # a package there at a version a requirement refuses is carried; at one every requirement accepts, it is not
    assert "accelerate" in b.to_carry(versions, asked, {**held, "accelerate": Version("0.1")})
    assert "transformers" not in b.to_carry(versions, asked, {**held, "transformers": Version(versions["transformers"])})
    # the requirements on packages whose version in the image is unknown are listed, not silently passed
    assert any(r.startswith("pandas") for r in b.unchecked(versions, asked, held))
