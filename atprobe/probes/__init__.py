"""One module per probe: ``probe(model, data, config) -> pandas.DataFrame``."""
