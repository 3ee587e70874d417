"""Index a folder of CT slices and query one of them, using only the Python API.

Usage: python examples/index_and_query.py FOLDER QUERY_IMAGE
       (without arguments: writes and uses the synthetic phantom in ./sample)
"""

import sys

from lungcbir import Retriever
from lungcbir.phantom import write_phantom

if len(sys.argv) == 3:
    folder, query = sys.argv[1], sys.argv[2]
else:
    write_phantom("sample", slices=12, patients=2)
    folder, query = "sample/dicom", "sample/png/phantom01/phantom01_s005.png"

retriever = Retriever(db_url="sqlite:///db/example.sqlite", index_dir="index/example")
report = retriever.index_dataset([folder])
print(f"indexed {report.indexed}, skipped {report.skipped}, failed {report.failed}")
for failure in report.failures:
    print(f"  {failure.path}: {failure.reason}")

result = retriever.query(query, k=5)
print(f"{query}: lung fraction {result.lung_fraction:.3f}")
for neighbor in result.neighbors:
    print(f"  {neighbor.rank}. {neighbor.score:.3f}  {neighbor.path}  patient {neighbor.patient_id}"
          f"  slice {neighbor.slice_index}")
