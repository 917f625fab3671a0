"""The arena: train and measure architectures side by side, then write a report (which wins where).

`effarch arena` (see `effarch.arena.cli`) or `run_arena(ArenaOptions(...))`. A run is a set of cells
(one training run or one measurement each) whose figures go to results.json as they finish; re-running
resumes, and report.md, the plots and results.json land in one folder.
"""

from effarch.arena.runner import ArenaOptions, ArenaRun, run_arena
from effarch.arena.suites import FULL, QUICK, SUITES, Suite, TaskSpec

__all__ = ["ArenaOptions", "ArenaRun", "run_arena", "Suite", "TaskSpec", "QUICK", "FULL", "SUITES"]
