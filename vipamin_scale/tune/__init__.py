"""`vipamin-scale tune`: choose hyper-parameters on val by successive halving, then retrain the
winner on train+val over several seeds and test it (the VTAB protocol, made budget-aware).

    vipamin-scale tune tune=lr init=vipamin hydra.run.dir=tunes/vipamin-lr
    vipamin-scale tune tune=vipamin +tune.space.prompt.length=[5,10,50] tune.launcher=local tune.workers=4
    vipamin-scale tune tune=vtab data=vtab_select data.root=/data/vtab/dtd       # a full grid (mode=grid)
    vipamin-scale tune tune=lr tune.select_draws=3 tune.extend_edges=2 \\
        tune.draw_roots=[shards/4shot_seed0,shards/4shot_seed1,shards/4shot_seed2]   # mean over 3 few-shot draws
    vipamin-scale report tunes/vipamin-lr                                         # the rung table and plot

The modules, in the order a tune uses them:
    space.py      the search space (`tune.space`): grids, candidates, checks, a grid leaf's edges
    halving.py    successive halving's rungs and promotion, a candidate's score over draws (pure)
    launchers.py  how trials run: inline, local subprocesses, Slurm (`tune.launcher`; the contract)
    search.py     the rungs, the edge rounds, the final runs, the run directory's layout, resume
    report.py     tune.json, tune.md and the val-against-budget plot

Then the winner trains for R epochs on `tune.final_train_split` (default `<train>+<val>`, the union
of the two splits; see vipamin_scale/data/wds.py) with train.seed = init.seed = 0..N-1,
N = tune.final_seeds, and is tested: test accuracy mean and sample sd (n-1; none for one seed) over
the seeds.
"""
from vipamin_scale.tune.halving import draw_score, promote, rung_budgets
from vipamin_scale.tune.launchers import (LAUNCHERS, InlineLauncher, Launcher, LocalLauncher, SlurmLauncher, Trial,
                                          make_launcher, register, trial_config)
from vipamin_scale.tune.report import plot_tune, tune_markdown
from vipamin_scale.tune.search import TuneResult, check_splits, draws, main_task, run_tune, val_score
from vipamin_scale.tune.space import candidates, edges, hydra_value, parse_space, step_beyond

__all__ = ["LAUNCHERS", "InlineLauncher", "Launcher", "LocalLauncher", "SlurmLauncher", "Trial", "TuneResult",
           "candidates", "check_splits", "draw_score", "draws", "edges", "hydra_value", "main_task", "make_launcher",
           "parse_space", "plot_tune", "promote", "register", "rung_budgets", "run_tune", "step_beyond",
           "trial_config", "tune_markdown", "val_score"]
