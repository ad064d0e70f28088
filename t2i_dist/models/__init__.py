"""Model families (one folder each) and the registry that finds them by `model.family`."""
