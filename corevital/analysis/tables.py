"""Analysis: read the Parquet tables of a job or a whole sweep into one pandas DataFrame.

Every job writes `summaries.parquet` (one row per trace, step and layer) and
`traces.parquet` (one row per trace, with its signals and health flags). Both
tables are only ever written whole (temporary name, then rename), and a rerun deletes a job's
old ones before it starts, so every file found is a finished job's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from corevital.core.files import outputs_under
from corevital.output.table import SCHEMA, TRACES_SCHEMA

TABLES = {"summaries": ("summaries.parquet", SCHEMA), "traces": ("traces.parquet", TRACES_SCHEMA)}
Filters = pc.Expression | Sequence[tuple[str, str, Any]] | Sequence[Sequence[tuple[str, str, Any]]]


def parquet_files(path: str | Path, name: str = "summaries.parquet") -> list[str]:
    """Every job's `name` under a job dir or a sweep dir (any depth), sorted."""
    root = Path(path)
    files = [root] if root.is_file() else outputs_under(root, name)
    if not files:
        raise FileNotFoundError(f"no {name} under {root}")
    return [str(f) for f in files]


def load_sweep(
    path: str | Path, columns: list[str] | None = None, filters: Filters | None = None, table: str = "summaries"
) -> pd.DataFrame:
    """All rows of all jobs under `path` (a sweep dir, a job dir or one file) as one DataFrame.

    columns: read only these (projection). filters: rows to keep, pushed down to the Parquet
    reader (row groups whose statistics rule them out are not read), either a pyarrow
    expression (`pc.field("seed") == 1`) or pandas-style tuples (`[("seed", "in", [1, 2])]`,
    a list of lists for OR). table: "summaries" or "traces". A user metric's columns
    (`metrics.extra`) come with the jobs that wrote them, null in the others. String columns come back as
    pandas categoricals: a token text or model id repeated over millions of rows is stored once.
    """
    if table not in TABLES:
        raise ValueError(f"table must be one of {sorted(TABLES)} (got {table!r})")
    name, schema = TABLES[table]
    files = parquet_files(path, name)
    if table == "summaries":  # user metrics (metrics.extra) add columns: every job's, null where a job has none
        schema = pa.unify_schemas([schema, *(pq.read_schema(f).remove_metadata() for f in files)])
    dataset = ds.dataset(files, schema=schema, format="parquet")
    if filters is not None and not isinstance(filters, pc.Expression):
        filters = pq.filters_to_expression(filters)
    return dataset.to_table(columns=columns, filter=filters).to_pandas(strings_to_categorical=True)
