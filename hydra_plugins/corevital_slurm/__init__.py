"""CoreVital's SLURM launcher, where Hydra looks for launchers (it instantiates only classes
defined in the `hydra_plugins` package). The behaviour lives in corevital/runner/slurm.py."""

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _PluginSlurmLauncher


class SlurmLauncher(_PluginSlurmLauncher):
    """`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): see corevital.runner.slurm."""

    def launch(self, job_overrides, initial_job_idx):
        from corevital.runner import slurm

        return slurm.launch(self, job_overrides, initial_job_idx)
