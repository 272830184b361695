"""Fashion-MNIST for the tests that need it (Debian's dataset-fashion-mnist).

Where it is not installed those tests skip, except under TUNEQDM_REQUIRE_DATA=1 (set by
.ci/run, which installs it): there a missing dataset fails them instead of hiding them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tuneqdm_core.builtin.scenes import DATA_DIR


def fashion_dir() -> Path:
    return Path(os.environ.get("TUNEQDM_FASHION_DIR", DATA_DIR))


_present = (fashion_dir() / "train-images-idx3-ubyte.gz").is_file()
needs_fashion = pytest.mark.skipif(
    not _present and os.environ.get("TUNEQDM_REQUIRE_DATA") != "1",
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
