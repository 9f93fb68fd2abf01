"""Can a map be trusted? Sanity checks (model randomisation) and faithfulness metrics."""
