"""core: the lowest layer: config schema, errors, files, locks, prompts, graders, metric declarations."""
