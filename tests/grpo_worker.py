"""``python tests/grpo_worker.py CONFIG``: ``diffalign train CONFIG`` with the test reward ``test_mean_red``
registered, for runs launched with torchrun (the CLI alone knows only the package's scorers)."""

import sys

import online_rewards  # noqa: F401 (registers the test_mean_red scorer)

from diffalign.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", sys.argv[1]]))
