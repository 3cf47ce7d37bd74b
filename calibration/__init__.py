"""Label-free calibration of the step-cascade gate threshold.

Picks the gate threshold from UNLABELED calibration problems so that the
per-problem cost of a new problem stays under a budget B with a stated
guarantee. Pure numpy/scipy; it only sees arrays:

* ``costs``: float array, shape (n_problems, n_thresholds), the cost of
  problem i with the gate at ``thresholds[j]`` (any cost unit, same as B).
* ``order``: candidate indices from cheapest (least escalating) to most
  escalating, given by the caller or by :func:`order_by_mean_cost`.

Methods:

* :func:`select_conformal` -- split conformal, P(cost > B) <= alpha marginally;
  needs exchangeability and cost monotone along ``order``.
* :func:`select_ltt` / :func:`select_ltt_path` / :func:`bonferroni_ltt` --
  Learn-then-Test, P(P(cost > B) > alpha) <= delta; needs i.i.d. problems,
  no monotonicity.
* :func:`select_ltt_paths` -- Learn-then-Test for threshold vectors (N-tier
  cascades): fixed-sequence along several paths through the grid
  (:func:`grid_paths` of a :func:`product_grid`), Bonferroni over paths;
  P(P(cost > B) > alpha) <= delta; i.i.d. problems, no monotonicity.
* :func:`select_risk_control` -- conformal risk control, E[cost] <= B.
* :class:`BudgetPacer` -- online pacing of a stream of requests along the same ordered
  settings: mean cost <= B + O(1/n) for any sequence of requests (no exchangeability).
"""

from .conformal import conformal_quantile, min_n_conformal, select_conformal
from .errors import CalibrationError, InfeasibleBudgetError, InsufficientDataError
from .ltt import PValueMethod, bonferroni_ltt, ltt_pvalues, min_n_ltt, select_ltt, select_ltt_path
from .metrics import auroc
from .multi import grid_paths, product_grid, select_ltt_paths
from .pacing import BudgetPacer, replay_pacer
from .risk import risk_control_bound, select_risk_control
from .selection import Selection, choose_by_objective, order_by_mean_cost

__all__ = [
    "auroc",
    "BudgetPacer",
    "replay_pacer",
    "CalibrationError",
    "InfeasibleBudgetError",
    "InsufficientDataError",
    "PValueMethod",
    "Selection",
    "bonferroni_ltt",
    "choose_by_objective",
    "conformal_quantile",
    "grid_paths",
    "ltt_pvalues",
    "min_n_conformal",
    "min_n_ltt",
    "order_by_mean_cost",
    "product_grid",
    "risk_control_bound",
    "select_conformal",
    "select_ltt",
    "select_ltt_path",
    "select_ltt_paths",
    "select_risk_control",
]
