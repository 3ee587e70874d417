"""Write a labels CSV (path + dataset, diagnosis, contrast, infection) for ../shared/data.

Usage: python examples/shared_data_labels.py labels.csv
Then:  lungcbir index-dataset ../shared/data/... --labels labels.csv
"""

import csv
import sys
from pathlib import Path

from lungcbir.datasets import data_root

root = data_root()
rows = []
diagnoses = {"covid": "COVID-19", "cap": "CAP", "normal": "normal"}
infection = {}
with open(root / "covid-ct-md" / "slice_labels.csv", newline="") as handle:
    for row in csv.DictReader(handle):
        infection[row["path"]] = "yes" if row["infection"] == "1" else "no"
for path in sorted((root / "covid-ct-md").glob("*/*/*.dcm")):
    relative = str(path.relative_to(root / "covid-ct-md"))
    rows.append({"path": path, "dataset": "covid-ct-md", "diagnosis": diagnoses[path.parts[-3]],
                 "infection": infection.get(relative, "")})
with open(root / "tcga-ct-slices" / "overview.csv", newline="") as handle:
    for row in csv.DictReader(handle):
        contrast = "yes" if row["Contrast"] == "True" else "no"
        for folder, name in (("dicom", row["dicom_name"]), ("tiff", row["tiff_name"])):
            if (root / "tcga-ct-slices" / folder / name).exists():
                rows.append({"path": root / "tcga-ct-slices" / folder / name, "dataset": "tcga-ct-slices",
                             "contrast": contrast})
for path in sorted((root / "covid19-ct-lungmask" / "ct").glob("*.png")):
    rows.append({"path": path, "dataset": "covid19-ct-lungmask", "diagnosis": "COVID-19", "infection": "yes"})
for path in sorted((root / "kaggle-lungs-2d" / "images").glob("*.tif")):
    rows.append({"path": path, "dataset": "kaggle-lungs-2d"})

with open(sys.argv[1], "w", newline="") as handle:
    writer = csv.DictWriter(handle, ["path", "dataset", "diagnosis", "contrast", "infection"])
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "path": Path(row["path"]).resolve()})
print(f"wrote {len(rows)} rows to {sys.argv[1]}")
