"""Check 2: yamllint over configs/ and docker/ with the repository's .yamllint.yaml."""

from __future__ import annotations

import sys

from deploy_support import REPO, require_package, run


def test_yamllint():
    require_package("yamllint", "pip install yamllint")
    result = run([sys.executable, "-m", "yamllint", "--strict", "-c", str(REPO / ".yamllint.yaml"),
                  "configs", "docker", ".yamllint.yaml"])
    assert result.returncode == 0, result.stdout + result.stderr
