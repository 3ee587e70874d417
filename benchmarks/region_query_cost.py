"""What a region query costs beside a slice query of the same image (issue 26: at most 2x).

Usage: python benchmarks/region_query_cost.py [--images N] [--queries N] [--repeats N]

Indexes the first ``--images`` slices of ``kaggle-lungs-2d`` (8-bit lung-window TIFFs of
512 x 512) into a temporary store, with their lung masks as region masks (each lung one
region) and the lesions the model finds, then times, through the Python API on one thread
each, ``--queries`` slice queries (``Retriever.query``) and the same images' region queries
(``Retriever.query(..., region=RegionBox)``, a 64 x 64 box in the right lung), interleaved,
``--repeats`` times; prints the median seconds per query of each and their ratio. Both
include reading the file and the model's one forward pass; a region query adds the region's
vector (:func:`lungcbir.regions.region_vector`) and its search among the stored regions.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lungcbir.config import Settings
from lungcbir.datasets import data_root
from lungcbir.regions import RegionBox
from lungcbir.retrieval import Retriever


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = Path(data_root()) / "kaggle-lungs-2d"
    images = sorted((folder / "images").glob("*.tif"))[:args.images]
    with tempfile.TemporaryDirectory() as work:
        chosen = Path(work) / "images"
        masks = Path(work) / "masks"
        chosen.mkdir()
        masks.mkdir()
        for image in images:
            (chosen / image.name).symlink_to(image.resolve())
            (masks / image.name).symlink_to((folder / "masks" / image.name).resolve())
        retriever = Retriever(db_url=f"sqlite:///{work}/db.sqlite", index_dir=f"{work}/index",
                              settings=Settings.from_environment())
        began = time.perf_counter()
        report = retriever.index_dataset([chosen], regions=masks)
        print(f"indexed {report.indexed} slices with {report.regions} regions in "
              f"{time.perf_counter() - began:.1f} s (failed {report.failed})")
        queries = [str(chosen / image.name) for image in images[:args.queries]]
        box = RegionBox(128, 200, 192, 264)
        retriever.query(queries[0], k=5)  # model and index loaded before timing
        retriever.query(queries[0], k=5, region=box)
        slice_times, region_times = [], []
        for _ in range(args.repeats):
            for path in queries:
                began = time.perf_counter()
                retriever.query(path, k=5)
                slice_times.append(time.perf_counter() - began)
                began = time.perf_counter()
                retriever.query(path, k=5, region=box)
                region_times.append(time.perf_counter() - began)
        slice_median, region_median = statistics.median(slice_times), statistics.median(region_times)
        print(f"slice query  median {1000 * slice_median:.1f} ms ({len(slice_times)} queries)")
        print(f"region query median {1000 * region_median:.1f} ms ({len(region_times)} queries)")
        print(f"region / slice: {region_median / slice_median:.2f}")


if __name__ == "__main__":
    main()
