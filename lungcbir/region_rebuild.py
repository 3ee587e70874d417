"""Making a store's regions again in place (``lungcbir rebuild-regions``): every stored slice's
regions recomputed with the model and region recipe in use, without touching the slices' rows
or their index.

A store whose regions were made with an earlier recipe cannot answer region queries (the
vectors of two recipes cannot be compared), and a slice indexed without regions (before
``--regions`` existed, or with ``--no-lesion-regions``) gets none from a later index run. A
:class:`RegionRebuilder` reads each stored slice again from its file (or its DICOMweb
archive), checks that its content is the one indexed (SHA-256), segments it and stores its
regions: the marked ones from a masks folder when one is given, else those stored with the
slice (each mask inside its box gives the region back exactly), and the lesions the model's
lesion output finds.

A run that stops half way (a crash, Ctrl-C) never leaves a store answering with two recipes:

1. its first transaction sets every region of another recipe aside
   (:meth:`lungcbir.database.RegionRows.begin_rebuild`: moved to the ``regions_pending``
   table, no longer searched, marked ones with their masks) and switches the store's region
   model id to the one in use, so the regions table only ever holds vectors of one recipe;
2. each batch of slices then has its regions replaced in one transaction (its pending rows
   deleted in the same one), so a slice has either its old or its new regions, never half;
3. region queries meanwhile answer from the slices rebuilt so far and say how many slices
   still wait (their regions are not searched); ``lungcbir check`` lists them too;
4. a rerun does the whole job again (what was rebuilt is rebuilt once more, identically), taking
   marked regions back from the pending rows of the slices not reached, and the region index
   catches up with the database at the end (its change log; see :mod:`lungcbir.vector_index`).

The caller holds the index folder's write lock (:meth:`lungcbir.Retriever.rebuild_regions`).
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from contextlib import closing
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .database import NewRegion, SliceSource
from .errors import LungCBIRError, ReadError
from .indexing import FILES_PER_COMMIT, RegionMasks, read_files, slice_regions
from .inference import LungModel
from .io import CTSlice, read_file
from .regions import FoundRegion, connected_regions, region_dimension, region_model_id
from .store import Store


@dataclass
class RegionRebuildReport:
    """What a ``rebuild-regions`` run did."""

    slices: int = 0  # stored slices seen
    rebuilt: int = 0  # slices whose regions were made again
    #: slices whose source could not be read as indexed (gone, unreadable, changed since)
    unreadable: int = 0
    #: regions stored by this run, by source ("mask": marked, "lesion": found by the model)
    regions: dict[str, int] = field(default_factory=dict)
    set_aside: int = 0  # regions of another recipe set aside by this run's first transaction
    removed: int = 0  # regions of another recipe removed with slices that could not be read
    #: one line per file that could not be read as indexed, or whose region mask is missing or unusable
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def stored(self) -> int:
        """Regions stored by this run, all sources."""
        return sum(self.regions.values())


@dataclass
class _Batch:
    """Stored slices read back, not yet stored: the slices read (by id) and the files that could
    not be read as indexed (path -> reason, once per file)."""

    sources: list[SliceSource] = field(default_factory=list)
    read: dict[int, CTSlice] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)

    def take(self, path: str, sources: list[SliceSource], outcome: list[CTSlice] | ReadError) -> None:
        """One file's (or archive instance's) stored slices and what reading it again gave: a slice
        is used only when the file's content is the one indexed (same SHA-256)."""
        self.sources += sources
        if isinstance(outcome, ReadError):
            self.problems[path] = f"cannot be read again ({outcome.reason})"
            return
        frames = {item.frame: item for item in outcome}
        found = {}
        for source in sources:
            item = frames.get(source.frame)
            if item is None or item.sha256 != source.sha256:  # none of the file's slices is used then
                self.problems[path] = "changed since it was indexed (another SHA-256)"
                return
            found[source.id] = item
        self.read.update(found)


def read_source(path: str, max_voxels: int | None = None) -> list[CTSlice] | ReadError:
    """A stored slice's source read again: a file, or an archive instance fetched by its WADO-RS
    URL (the row's path) from its archive, as ``query`` shows it; its ReadError when it cannot be."""
    from .dicomweb import fetch_slice, is_dicomweb_url

    try:
        if is_dicomweb_url(path):
            return [fetch_slice(path)]
        return read_file(path, max_voxels=max_voxels)
    except ReadError as error:
        return error
    except LungCBIRError as error:  # an archive that cannot be reached, say: one line, as a read error
        return ReadError(path, str(error).removeprefix(f"{path}: "))


class RegionRebuilder:
    """One ``rebuild-regions`` run: the model, the store and how work is batched (see the module
    docstring for what it does and how a stopped run is finished).

    ``batch_size`` slices go through the model at once; the regions of every
    ``files_per_commit`` slices are replaced in one transaction; ``workers`` processes read
    files; ``lesion_regions``: store the lesions the model's lesion output finds (a model
    with one), as indexing does.

    Example:
        >>> import tempfile
        >>> from lungcbir.phantom import write_phantom
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_phantom(folder, slices=2, size=64, patients=1)
        >>> model, store = LungModel.load(), Store(f"sqlite:///{folder}/db.sqlite", f"{folder}/index")
        >>> from lungcbir.indexing import Indexer
        >>> with store.write_lock():
        ...     _ = Indexer(model, store).run([f"{folder}/png"])  # no masks folder: no marked regions
        ...     report = RegionRebuilder(model, store).run(regions=f"{folder}/masks")
        >>> report.slices, report.rebuilt, report.regions["mask"] > 0
        (2, 2, True)
    """

    def __init__(self, model: LungModel, store: Store, batch_size: int = 16,
                 files_per_commit: int = FILES_PER_COMMIT, workers: int = 1, max_voxels: int | None = None,
                 lesion_regions: bool = True) -> None:
        self.model, self.store = model, store
        self.batch_size, self.files_per_commit, self.workers = batch_size, files_per_commit, workers
        self.max_voxels = max_voxels
        self.lesion_regions = lesion_regions and model.has_lesion_head
        self.region_model_id = region_model_id(model.model_id)

    def run(self, regions: str | os.PathLike | None = None, on_slice: Callable[[str], None] | None = None,
            on_total: Callable[[int], None] | None = None) -> RegionRebuildReport:
        """Make every stored slice's regions again; ``regions``: a folder of region masks (as
        ``index-dataset --regions``; each image's path relative to any folder above it). A slice
        without a usable mask there keeps its stored marked regions (a warning says so).
        ``on_total`` is called once with the number of slices, ``on_slice`` with each slice's path."""
        began = time.perf_counter()
        masks = RegionMasks(regions, None, self.max_voxels) if regions is not None else None  # before any write
        store, model = self.store, self.model
        report = RegionRebuildReport()
        if store.model_id is None:  # nothing indexed: nothing to rebuild, and nothing claimed
            report.seconds = time.perf_counter() - began
            return report
        store.check_model(model.model_id, model.dimension)  # another model's slices: re-index them instead
        report.set_aside = store.begin_region_rebuild(
            self.region_model_id, region_dimension(model.settings.unet.bottleneck_channels))
        if on_total:
            on_total(store.count())
        waiting: deque[tuple[str, list[SliceSource]]] = deque()  # files handed to the readers, in order

        def files() -> Iterator[str]:
            # the stored slices page by page in id order, each file once per page (its slices together)
            after = -1
            while page := store.database.slice_sources(after, self.files_per_commit):
                after = page[-1].id
                by_path: dict[str, list[SliceSource]] = {}
                for source in page:
                    by_path.setdefault(source.path, []).append(source)
                for path, sources in by_path.items():
                    waiting.append((path, sources))
                    yield path

        batch = _Batch()
        # closing: an interrupt stops the readers too
        with closing(read_files(files(), self.workers, self.max_voxels, read_source)) as outcomes:
            for path, outcome in outcomes:
                done, sources = waiting.popleft()
                assert done == path  # read_files answers in the order it was given
                batch.take(path, sources, outcome)
                if len(batch.sources) >= self.files_per_commit:
                    self._rebuild(batch, masks, report, on_slice)
                    batch = _Batch()
        self._rebuild(batch, masks, report, on_slice)
        # the region index catches up with (or is rebuilt from) the database and is saved; the
        # slices' index is left as it is
        store.region_vectors.checkpoint()
        report.seconds = time.perf_counter() - began
        return report

    def _rebuild(self, batch: _Batch, masks: RegionMasks | None, report: RegionRebuildReport,
                 on_slice: Callable[[str], None] | None) -> None:
        """Segment one batch of slices read back and replace their regions, in one transaction."""
        if not batch.sources:
            return
        report.slices += len(batch.sources)
        ready = [source for source in batch.sources if source.id in batch.read]
        marked = self._marked(ready, batch, masks, report)
        results = self.model.segment([batch.read[source.id] for source in ready], self.batch_size,
                                     keep_maps=True) if ready else []
        new: list[tuple[int, NewRegion]] = []
        for source, result in zip(ready, results):
            new += [(source.id, region) for region in slice_regions(
                self.model, result, (source.height, source.width), marked.get(source.id, []), self.lesion_regions)]
        failed = [source for source in batch.sources if source.id not in batch.read]
        regions = self.store.database.regions
        pending = regions.pending_of([source.id for source in failed])
        kept = {image_id: len(found) for image_id, found in regions.of_images(
            [source.id for source in failed if source.id not in pending]).items()}
        # a slice that cannot be read keeps its regions when they are of the recipe in use (still
        # right for its stored row); those set aside cannot be searched any more and are removed
        self.store.replace_regions([source.id for source in ready] + list(pending), new, self.region_model_id)
        report.rebuilt += len(ready)
        report.unreadable += len(failed)
        report.removed += sum(pending.values())
        for kind, count in Counter(region.source for _, region in new).items():
            report.regions[kind] = report.regions.get(kind, 0) + count
        for path, reason in batch.problems.items():
            ids = [source.id for source in failed if source.path == path]
            dropped, left = sum(pending.get(i, 0) for i in ids), sum(kept.get(i, 0) for i in ids)
            outcome = (f"its {dropped} region(s) of another recipe were removed" if dropped else
                       f"its {left} region(s) were kept as they were" if left else "it has no regions")
            report.warnings.append(f"{path}: {reason}; {outcome}")
        if on_slice:
            for source in batch.sources:
                on_slice(source.path)

    def _marked(self, ready: Sequence[SliceSource], batch: _Batch, masks: RegionMasks | None,
                report: RegionRebuildReport) -> dict[int, list[FoundRegion]]:
        """The marked regions of the slices read: from the masks folder when given and it has a
        usable mask for the file, else those stored with the slice (or set aside for this rebuild)."""
        found: dict[int, list[FoundRegion]] = {}
        from_store = list(ready)
        if masks is not None:
            by_path: dict[str, list[SliceSource]] = {}
            for source in ready:
                by_path.setdefault(source.path, []).append(source)
            from_store = []
            for path, sources in by_path.items():
                planes = masks.masks_for([batch.read[source.id] for source in sources])
                if isinstance(planes, dict):
                    for source in sources:
                        found[source.id] = connected_regions(planes[source.frame])
                    continue
                reason = planes if isinstance(planes, str) else f"no region mask in {masks.folder}"
                report.warnings.append(f"{path}: {reason}; its stored marked regions were used")
                from_store += sources
        stored = self.store.database.regions.marked_of([source.id for source in from_store])
        shapes = {source.id: (source.height, source.width) for source in from_store}
        for image_id, marked in stored.items():
            height, width = shapes[image_id]
            for region in marked:
                x0, y0, x1, y1 = region.bbox
                whole = region.mask is not None and region.mask.shape == (y1 - y0, x1 - x0) \
                    and 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
                if not whole:  # cannot be given back exactly: not made up either
                    report.warnings.append(f"slice {image_id}: a stored marked region at {x0},{y0},{x1},{y1} has "
                                           f"no usable mask and was left out")
                    continue
                assert region.mask is not None  # for the type checker: ``whole`` says so
                found.setdefault(image_id, []).append(FoundRegion(region.bbox, region.area, np.asarray(region.mask)))
        return found
