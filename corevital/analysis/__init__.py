"""analysis: reading a job or a sweep back (`load_sweep`), `corevital evaluate` as functions,
plots and the report. The names users reach for are here:

    load_sweep, parquet_files                      the Parquet tables as one DataFrame (tables.py)
    evaluate, attach_answers, label_traces,
    load_traces, rank_signals                      grading and ranking (evaluate.py)
    grade                                          one output against its answer (core/grading.py)
    auroc, auroc_interval, prr, roc_curve          the scores (scoring.py)
"""

from corevital.analysis.evaluation import attach_answers, evaluate, label_traces, load_traces, rank_signals
from corevital.analysis.scoring import auroc, auroc_interval, prr, roc_curve
from corevital.analysis.tables import load_sweep, parquet_files
from corevital.core.grading import grade

__all__ = [
    "parquet_files",
    "load_sweep",
    "attach_answers",
    "evaluate",
    "label_traces",
    "load_traces",
    "rank_signals",
    "grade",
    "auroc",
    "auroc_interval",
    "prr",
    "roc_curve",
]
