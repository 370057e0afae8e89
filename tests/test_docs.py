"""The API reference builds from the docstrings with no warning (`make docs`, strict)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_api_reference_builds_without_a_warning_and_documents_the_test_kit(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr, done.stderr
    page = (site / "reference" / "testing" / "index.html").read_text()
    anchors = set(re.findall(r'id="(orchestrator\.[\w.]+)"', page))
    assert {"orchestrator.testing.SagaKit.run", "orchestrator.testing.assert_saga"} <= anchors
    assert "orchestrator.testing.plugin.orchestrator_kit" in anchors
