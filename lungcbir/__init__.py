"""lungcbir: content-based retrieval of lung CT slices with a U-Net.

Example (on synthetic slices, in a temporary folder):
    >>> import tempfile
    >>> from lungcbir import Retriever
    >>> from lungcbir.phantom import write_phantom
    >>> folder = tempfile.mkdtemp()
    >>> _ = write_phantom(folder, slices=4, size=64, patients=2)
    >>> retriever = Retriever(db_url=f"sqlite:///{folder}/db.sqlite", index_dir=f"{folder}/index")
    >>> retriever.index_dataset([f"{folder}/dicom"]).indexed
    8
    >>> result = retriever.query(f"{folder}/png/phantom01/phantom01_s002.png", k=2, per_patient=0)
    >>> len(result.neighbors), result.mask.shape
    (2, (64, 64))
"""

from importlib import import_module
from typing import TYPE_CHECKING

# Names are imported on first use, so ``import lungcbir.train`` (a training machine) does not
# pull in the database and index libraries.
_EXPORTS = {
    "LungCBIRError": "errors", "ReadError": "errors", "StoreError": "errors", "WeightsError": "errors",
    "LungModel": "inference", "Segmentation": "inference",
    "CTSlice": "io", "read_file": "io",
    "IndexReport": "indexing", "Neighbor": "retrieval", "QueryResult": "retrieval", "Retriever": "retrieval",
    "RegionBox": "regions", "RegionError": "errors",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

if TYPE_CHECKING:
    # ``X as X`` marks an explicit re-export (for type checkers and ruff's F401).
    from .errors import LungCBIRError as LungCBIRError
    from .errors import ReadError as ReadError
    from .errors import RegionError as RegionError
    from .errors import StoreError as StoreError
    from .errors import WeightsError as WeightsError
    from .indexing import IndexReport as IndexReport
    from .inference import LungModel as LungModel
    from .inference import Segmentation as Segmentation
    from .io import CTSlice as CTSlice
    from .io import read_file as read_file
    from .regions import RegionBox as RegionBox
    from .retrieval import Neighbor as Neighbor
    from .retrieval import QueryResult as QueryResult
    from .retrieval import Retriever as Retriever


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
