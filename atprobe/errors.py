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


#: The largest seed: every seed is an integer in ``[0, 2**63)``, the range that
#: ``torch.manual_seed``, ``torch.Generator.manual_seed``, ``numpy.random.default_rng`` (no
#: negatives) and ``atprobe.starts`` (which hashes the seed as 64 bits, so -1 would alias
#: 2**64 - 1) all accept, one to one.
SEED_MAX = 2**63 - 1


def check_seed(value, what: str = "seed") -> int:
    """``value`` as an int if it is an integer in ``[0, SEED_MAX]``, else a one-line error."""
    import operator

    if isinstance(value, bool):
        raise AtprobeError(f"{what} must be an integer in [0, 2**63), got {value!r}")
    try:
        seed = operator.index(value)
    except TypeError:
        raise AtprobeError(f"{what} must be an integer in [0, 2**63), got {value!r}") from None
    if not 0 <= seed <= SEED_MAX:
        raise AtprobeError(f"{what} must be in [0, 2**63) (0 to {SEED_MAX}), got {seed}")
    return seed
