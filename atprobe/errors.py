"""The one exception type the CLI turns into a one-line error."""


class AtprobeError(Exception):
    """A user-facing error: bad input, a foreign or corrupt file, a nonsense option.

    The message is one line and names the problem; the CLI prints it and exits 2.
    """


def check_choice(value: str, choices: tuple[str, ...] | list[str], what: str) -> str:
    """``value`` if it is one of ``choices``, else a one-line error listing them."""
    if value not in choices:
        raise AtprobeError(f"unknown {what} {value!r}: choose from {', '.join(choices)}")
    return value
