"""Exit codes of every fedtune command (documented in README.md and docs/operations.md)."""

OK = 0                # completed
FAILED = 1            # the run failed, or an audit found a problem
BAD_INPUT = 2         # an operator mistake: settings, files, keys, addresses; nothing was started or changed
STOPPED_BUDGET = 3    # stopped early: the nodes' privacy budgets or policies refused further rounds
STOPPED_NODES = 4     # stopped early: too few nodes connected or answered before a deadline
DIVERGED = 5          # stopped early: training diverged (non-finite or exploding loss)
INTERRUPTED = 130     # SIGINT
TERMINATED = 143      # SIGTERM
