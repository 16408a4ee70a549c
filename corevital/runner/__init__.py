"""runner: the Hydra app, jobs, the manifest, callbacks, threads."""
