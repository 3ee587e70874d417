"""Write a lung mask PNG for every slice in a folder, using only the Python API.

Usage: python examples/segment_folder.py IN_FOLDER OUT_FOLDER
"""

import os
import sys

import cv2

from lungcbir import LungModel, ReadError, read_file
from lungcbir.io import find_image_files

source, target = sys.argv[1], sys.argv[2]
os.makedirs(target, exist_ok=True)
model = LungModel.load()  # the bundled weights
for path in find_image_files([source]):
    try:
        slices = read_file(path)
    except ReadError as error:
        print(f"skipped {error}")
        continue
    for item, result in zip(slices, model.segment(slices)):
        out = os.path.join(target, f"{item.name}_mask.png")
        cv2.imwrite(out, result.mask.astype("uint8") * 255)
        print(f"{path}: lung fraction {result.lung_fraction:.3f} -> {out}")
