"""lungcbir: content-based retrieval of lung CT slices with a U-Net.

Example:
    >>> from lungcbir import Retriever
    >>> retriever = Retriever()                        # doctest: +SKIP
    >>> retriever.index_dataset(["scans/"])            # doctest: +SKIP
    >>> retriever.query("slice.dcm", k=5).neighbors    # doctest: +SKIP
"""

from importlib import import_module
from typing import TYPE_CHECKING

# Names are imported on first use, so ``import lungcbir.train`` (a training machine) does not
# pull in the database and index libraries.
_EXPORTS = {
    "LungCBIRError": "errors", "ReadError": "errors", "StoreError": "errors", "WeightsError": "errors",
    "LungModel": "inference", "Segmentation": "inference",
    "CTSlice": "io", "read_file": "io",
    "IndexReport": "retrieval", "Neighbor": "retrieval", "QueryResult": "retrieval", "Retriever": "retrieval",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .errors import LungCBIRError, ReadError, StoreError, WeightsError
    from .inference import LungModel, Segmentation
    from .io import CTSlice, read_file
    from .retrieval import IndexReport, Neighbor, QueryResult, Retriever


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
