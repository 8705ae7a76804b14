"""atprobe: probes for adversarially trained image classifiers.

The library is plain functions over models and tensors; the ``atprobe`` command
(``atprobe.cli``) is a thin shell over it.
"""

# The only place the version is written: pyproject.toml reads it (setuptools dynamic version).
__version__ = "0.1.0"

from atprobe.errors import AtprobeError  # noqa: E402,F401
