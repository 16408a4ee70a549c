"""`python -m corevital.run`: the Hydra app, whose code is corevital/runner/app.py."""

from corevital.runner.app import cli, exit_without_teardown

if __name__ == "__main__":
    exit_without_teardown(cli)
