"""lungcbir: content-based retrieval of lung CT slices with a U-Net.

Example:
    >>> from lungcbir import Retriever
    >>> retriever = Retriever()                        # doctest: +SKIP
    >>> retriever.index_dataset(["scans/"])            # doctest: +SKIP
    >>> retriever.query("slice.dcm", k=5).neighbors    # doctest: +SKIP
"""

from .errors import LungCBIRError, ReadError, StoreError, WeightsError
from .inference import LungModel, Segmentation
from .io import CTSlice, read_file
from .retrieval import IndexReport, Neighbor, QueryResult, Retriever

__all__ = ["CTSlice", "IndexReport", "LungCBIRError", "LungModel", "Neighbor", "QueryResult", "ReadError",
           "Retriever", "Segmentation", "StoreError", "WeightsError", "read_file"]
__version__ = "0.1.0"
