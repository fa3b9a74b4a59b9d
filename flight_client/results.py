"""Results in the shapes Feast's call forms return, so code written against Feast keeps working.

`FeatureClient`'s own forms return pyarrow Tables, as they always have. The Feast forms
(`get_historical_features(entity_df=...)`, `get_online_features(features=..., entity_rows=...)`)
return these, with Feast's `to_df()` (and `to_dict()` online) besides `to_arrow()`, `to_pandas()`
and `to_polars()`. pandas and polars are imported only when asked for.

The Tables cannot take these names themselves: pyarrow's `Table` is an immutable extension type (no
methods can be attached), and though it can be subclassed, pyarrow builds every table as a plain
`Table` (a subclass instance cannot be made from Python). A wrapper in their place would break
callers that hand them to pyarrow (`pq.write_table`, `pa.concat_tables`, `isinstance`). So the native
forms keep returning Tables, and `FeatureResult(table)` wraps any of them for the Feast names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    import pandas as pd
    import polars as pl


class FeatureResult:
    """A computed result (the rows are already here): Arrow, with conversions by their usual names.
    `FeatureResult(client.read_table(...))` gives any Table these names."""

    def __init__(self, table: pa.Table):
        self.table = table

    def to_arrow(self) -> pa.Table:
        return self.table

    def to_pandas(self) -> pd.DataFrame:
        return self.to_arrow().to_pandas()

    def to_df(self) -> pd.DataFrame:
        """Feast's name for `to_pandas`."""
        return self.to_pandas()

    def to_polars(self) -> pl.DataFrame:
        try:
            import polars as pl
        except ImportError:
            raise ImportError("to_polars needs polars: pip install 'iceberg-feature-flight[polars]'") from None
        frame = pl.from_arrow(self.to_arrow())
        assert isinstance(frame, pl.DataFrame)  # a Table always gives a DataFrame, not a Series
        return frame

    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object:
        """So that `pa.table(result)`, `polars.DataFrame(result)` and DuckDB read it directly."""
        return self.table.__arrow_c_stream__(requested_schema)

    def __len__(self) -> int:
        return self.table.num_rows

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.table.num_rows} rows: {', '.join(self.table.column_names)})"


class HistoricalResult(FeatureResult):
    """A training set, as Feast's `RetrievalJob`: `to_df()`, `to_arrow()`. The schema metadata
    `flight.snapshots` names the snapshots it was computed from."""


class OnlineResult(FeatureResult):
    """Online features, as Feast's `OnlineResponse`: `to_dict()`, `to_df()`, `to_arrow()`.

    The server adds, per table, a `<table>__<event time>` column (when the row returned was valid);
    like Feast, the conversions leave them out unless `include_event_timestamps=True`.
    """

    def __init__(self, table: pa.Table, event_time_columns: list[str]):
        super().__init__(table)
        self.event_time_columns = event_time_columns

    def to_arrow(self, include_event_timestamps: bool = False) -> pa.Table:
        return self.table if include_event_timestamps else self.table.drop_columns(self.event_time_columns)

    def to_pandas(self, include_event_timestamps: bool = False) -> pd.DataFrame:
        return self.to_arrow(include_event_timestamps).to_pandas()

    def to_df(self, include_event_timestamps: bool = False) -> pd.DataFrame:
        return self.to_pandas(include_event_timestamps)

    def to_dict(self, include_event_timestamps: bool = False) -> dict[str, list[Any]]:
        """Column name -> values, one per entity row in order (Feast's `OnlineResponse.to_dict`)."""
        return self.to_arrow(include_event_timestamps).to_pydict()
