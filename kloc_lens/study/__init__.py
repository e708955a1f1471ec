"""The study, end to end: where is a fact stored, and do edits transfer between perspectives?

:func:`run_study` reproduces, on any hooked model and fact set, the two halves of Wei et al.
(CIKM 2024, "Does Knowledge Localization Hold True?") as resumable work units, with bootstrap
intervals over facts on every number; :func:`write_report` renders ``report.html``. The parts:

- :mod:`~kloc_lens.study.config`: :class:`StudyConfig`, :class:`StudyError`;
- :mod:`~kloc_lens.study.knowledge`: accuracy from both perspectives;
- :mod:`~kloc_lens.study.localization`: causal traces and their headline numbers;
- :mod:`~kloc_lens.study.editing`: edits from both perspectives, scored on both, per layer;
- :mod:`~kloc_lens.study.store`: content-addressed units, written atomically (resume);
- :mod:`~kloc_lens.study.run`: the phases, ranks under ``torchrun``, the result;
- :mod:`~kloc_lens.study.report`: ``report.html`` and ``results.json``.
"""

from kloc_lens.study.config import StudyConfig, StudyError
from kloc_lens.study.editing import Editing, LayerChoice
from kloc_lens.study.figures import report_figures
from kloc_lens.study.knowledge import Knowledge
from kloc_lens.study.localization import Localization
from kloc_lens.study.report import load_study, summary_text, write_report
from kloc_lens.study.run import STUDY_FORMAT, Shard, StudyResult, model_fingerprint, run_study
from kloc_lens.study.store import UnitStore

__all__ = [
    "STUDY_FORMAT",
    "Editing",
    "Knowledge",
    "LayerChoice",
    "Localization",
    "Shard",
    "StudyConfig",
    "StudyError",
    "StudyResult",
    "UnitStore",
    "load_study",
    "model_fingerprint",
    "report_figures",
    "run_study",
    "summary_text",
    "write_report",
]
