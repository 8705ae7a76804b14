"""The command group itself: the version it reports is the installed package's."""

from __future__ import annotations

from importlib.metadata import version

import atprobe
from tests.conftest import run_cli


def test_version_is_single_sourced():
    # pyproject.toml takes the version from atprobe.__version__, so the installed metadata,
    # the module and `atprobe --version` agree.
    assert version("atprobe") == atprobe.__version__
    assert run_cli("--version").output == f"atprobe, version {atprobe.__version__}\n"
