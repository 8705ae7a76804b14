"""The ``atprobe`` command line (installed as ``atprobe.cli``)."""
