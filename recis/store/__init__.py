"""Table storage: ids, rows, optimizer slots (``RowStore``)."""

from recis.store.row_store import NewRows, RowStore

__all__ = ["NewRows", "RowStore"]
