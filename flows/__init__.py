"""hfbatch flows: the training chain, bulk inference and the CLI."""
