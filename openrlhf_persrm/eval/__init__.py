"""``persrm eval``: how well a judge tells a person's real text from a negative.

* :mod:`.metrics`: pure functions, judgments in, metrics dict out (accuracy, bootstrap
  intervals over pairs, position consistency, format failures);
* :mod:`.judges`: the :class:`~.judges.Judge` protocol, the ``random``, ``length`` and
  ``stylometry`` baselines and the ``model`` judge (judge format + strict parser);
* :mod:`.run`: :func:`~.run.run_eval`, which reads pairs, judges and writes the results;
* :mod:`.report`: Markdown tables, plots and :func:`~.report.compare` for several judges;
* :mod:`.cli`: ``make_parser()`` and ``main(argv)``.

Importing this package is cheap: numpy, matplotlib, torch and httpx load only when used.

``--endpoint`` goes through ``openrlhf_persrm.judges.openai_backend.OpenAIJudge``;
``--model`` through ``openrlhf_persrm.judges.local.LocalJudge``.
"""

from .config import EvalConfig
from .metrics import Judged, bootstrap_ci, compute_metrics

__all__ = ["EvalConfig", "Judged", "bootstrap_ci", "compute_metrics"]
