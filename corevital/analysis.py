"""Analysis: read the Parquet tables of a run or a whole sweep into one pandas DataFrame."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds

from corevital.table import SCHEMA


def parquet_files(path: str | Path, name: str = "summaries.parquet") -> list[str]:
    """Every job's `name` under a job dir or a sweep dir (any depth), sorted."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(root.rglob(name))
    if not files:
        raise FileNotFoundError(f"no {name} under {root}")
    return [str(f) for f in files]


def load_sweep(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """All rows of all jobs under `path`, reading only `columns` (all when None)."""
    dataset = ds.dataset(parquet_files(path), schema=SCHEMA, format="parquet")
    return dataset.to_table(columns=columns).to_pandas()
