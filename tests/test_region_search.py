"""Regions as stored objects and region queries (issue 26 items 1 and 2): storage on both
backends, indexing from a masks folder and from the lesion output, queries through the Python
API, the CLI and the web API, and the bad regions each refuses in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SOLID, disc, records, unit
from fastapi.testclient import TestClient

from lungcbir.cli import main
from lungcbir.database import NewRegion
from lungcbir.errors import RegionError
from lungcbir.inference import LungModel
from lungcbir.io import read_file
from lungcbir.regions import (
    REGION_BLOCK_WEIGHTS,
    RegionBox,
    connected_regions,
    lesion_regions,
    region_dimension,
    region_of,
    region_vector,
)
from lungcbir.retrieval import Retriever
from lungcbir.store import Store
from lungcbir.vector_index import kind_of
from lungcbir.visualize import REGION_COLOUR, outline_region
from lungcbir.web import create_app

SOLID_BOX = RegionBox(26, 43, 37, 54)
GROUND_GLASS_BOX = RegionBox(60, 42, 73, 55)


@pytest.fixture(scope="session")
def bundled_model(bundled_weights) -> LungModel:
    return LungModel.load(bundled_weights)


@pytest.fixture
def indexed(nodule_dir, bundled_weights, store_paths) -> Retriever:
    retriever = Retriever(weights=bundled_weights, **store_paths)
    report = retriever.index_dataset([nodule_dir / "png"], regions=nodule_dir / "regions")
    assert report.failures == [] and report.indexed == 12
    return retriever


def _query(nodule_dir: Path, patient: int = 1, index: int = 1) -> str:
    return str(nodule_dir / "png" / f"phantom{patient:02d}" / f"phantom{patient:02d}_s{index:03d}.png")


# -- storage, on both backends ---------------------------------------------------------------------


def test_marked_regions_are_stored_with_their_slice_box_area_and_vector(nodule_dir, tiny_weights, store_paths):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    report = retriever.index_dataset([nodule_dir / "png"], regions=nodule_dir / "regions")
    assert (report.indexed, report.regions, report.failures, report.warnings) == (12, 24, [], [])
    store = retriever.store(create=False)
    regions = store.database.regions
    stored = regions.read(range(1, 100))
    assert len(stored) == 24 and {region.source for region in stored.values()} == {"mask"}
    solid = [r for r in stored.values() if r.bbox == (27, 44, 36, 53)]
    assert len(solid) == 12 and all(r.area == int(disc((96, 96), *SOLID).sum()) for r in solid)
    rows = store.records({r.image_id for r in stored.values()})
    assert len(rows) == 12  # every region is linked to a stored slice
    assert regions.state()["dimension"] == region_dimension(retriever.model.settings.unet.bottleneck_channels)
    stats = store.stats()
    assert stats.regions == {"mask": 24} and stats.region_index_vectors == 24
    assert store.check() == []
    again = retriever.index_dataset([nodule_dir / "png"], regions=nodule_dir / "regions")
    assert (again.skipped, again.regions, regions.count()) == (12, 0, 24)  # no region twice


def test_a_masks_folder_inside_the_indexed_folder_is_not_indexed_as_images(nodule_dir, tiny_weights, store_paths,
                                                                           tmp_path):
    root = tmp_path / "export"
    shutil.copytree(nodule_dir / "png" / "phantom01", root / "phantom01")
    shutil.copytree(nodule_dir / "regions" / "phantom01", root / "masks" / "phantom01")
    retriever = Retriever(weights=tiny_weights, **store_paths)
    report = retriever.index_dataset([root], regions=root / "masks")
    assert (report.indexed, report.regions, report.warnings) == (4, 8, [])  # the 4 images only, with their masks


def test_removing_a_file_removes_its_regions_and_their_vectors(nodule_dir, tiny_weights, store_paths):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([nodule_dir / "png"], regions=nodule_dir / "regions")
    store = retriever.store()
    regions = store.database.regions
    gone = store.ids_for([_query(nodule_dir)])
    gone_regions = set(regions.ids_of_images(np.array(gone)).tolist())
    assert len(gone_regions) == 2
    vectors = np.stack([v for _, chunk in regions.vectors_of(np.array(sorted(gone_regions))) for v in chunk])
    assert store.remove(gone) == 1
    assert regions.count() == 22 and not gone_regions & set(regions.read(gone_regions))
    _, found = store.search_regions(vectors, 22)
    assert not gone_regions & set(found.ravel().tolist())
    assert store.check() == [] and Store(**store_paths, read_only=True).check() == []


def test_deleting_a_slice_row_any_other_way_cascades_to_its_regions(store_paths):
    from sqlalchemy import text

    store = Store(**store_paths)
    store.check_model("m1", 8)
    store.database.regions.check_model("m1/r1", 8)
    vectors = unit(4, seed=1)
    store.add(records(2), unit(2), [[NewRegion((0, 0, 2, 2), 4, "mask", vectors[0])],
                                    [NewRegion((1, 1, 3, 3), 4, "lesion", vectors[1])]], "m1/r1")
    with store.engine.begin() as connection:
        connection.execute(text("DELETE FROM images WHERE path = '/x/0.png'"))
    assert [r.source for r in store.database.regions.read([1, 2]).values()] == ["lesion"]


def test_a_region_index_behind_its_database_or_corrupt_never_answers_wrong(store_paths, monkeypatch):
    from lungcbir import vector_index

    monkeypatch.setattr(vector_index, "CHECKPOINT_SHARE", 100.0)  # additions are not written: a killed run
    writer = Store(**store_paths)
    writer.check_model("m1", 8)
    writer.database.regions.check_model("m1/r1", 8)
    first, late = unit(20, seed=2), unit(3, seed=3)
    writer.add(records(10), unit(10), [[NewRegion((0, 0, 1, 1), 1, "mask", v) for v in first[2 * i:2 * i + 2]]
                                       for i in range(10)], "m1/r1")
    writer.checkpoint()
    writer.add(records(3, start=100), unit(3, seed=4), [[NewRegion((0, 0, 1, 1), 1, "mask", v)] for v in late],
               "m1/r1")
    behind = Store(**store_paths, read_only=True)  # both files behind by additions: notes, not problems
    notes = behind.notes()
    assert behind.check() == [] and len(notes) == 2, notes
    assert notes[0].startswith("the index file lacks the 3 rows")
    assert notes[1].startswith("regions: the index file lacks the 3 rows")
    reader = Store(**store_paths, read_only=True)
    scores, found = reader.search_regions(late, 1)
    assert found[:, 0].tolist() == [21, 22, 23] and np.allclose(scores[:, 0], 1, atol=2e-3)
    # another process removes a slice: the reader's index in memory must not answer its regions
    writer.remove(writer.ids_for(["/x/100.png"]))
    _, found = reader.search_regions(late[:1], 5)
    assert 21 not in found.ravel().tolist()
    # a corrupt index file is rebuilt from the database, never searched
    path = Path(store_paths["index_dir"]) / "regions.faiss"
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(64)
    path.write_bytes(bytes(data))
    assert any("regions: index file" in p and "checksum" in p for p in Store(**store_paths, read_only=True).check())
    fresh = Store(**store_paths)
    _, found = fresh.search_regions(first[:4], 1)
    assert found[:, 0].tolist() == [1, 2, 3, 4]
    fresh.checkpoint()
    assert fresh.check() == []


def test_rebuild_index_kind_covers_the_region_index(store_paths):
    store = Store(**store_paths)
    store.check_model("m1", 8)
    store.database.regions.check_model("m1/r1", 8)
    vectors = unit(6, seed=5)
    store.add(records(3), unit(3), [[NewRegion((0, 0, 1, 1), 1, "mask", v) for v in vectors[2 * i:2 * i + 2]]
                                    for i in range(3)], "m1/r1")
    store.rebuild_index("hnsw")
    fresh = Store(**store_paths)
    assert kind_of(fresh.region_vectors.current()).name == "hnsw"
    assert fresh.search_regions(vectors, 1)[1][:, 0].tolist() == [1, 2, 3, 4, 5, 6] and fresh.check() == []


def test_a_database_of_an_earlier_version_gains_the_regions_table(store_paths):
    from sqlalchemy import text

    store = Store(**store_paths)
    store.check_model("m1", 8)
    store.add(records(2), unit(2))
    store.checkpoint()
    with store.engine.begin() as connection:  # as an earlier version made it
        connection.execute(text("DROP TABLE region_changes"))
        connection.execute(text("DROP TABLE regions"))
    store.engine.dispose()
    old = Store(**store_paths, create=False, read_only=True)
    assert old.database.regions.count() == 0 and old.check() == [] and old.stats().regions == {}
    old.engine.dispose()
    upgraded = Store(**store_paths)
    assert upgraded.database.regions.count() == 0 and upgraded.check() == []
    upgraded.database.regions.check_model("m1/r1", 8)
    upgraded.add(records(1, start=5), unit(1), [[NewRegion((0, 0, 1, 1), 1, "mask", unit(1)[0])]], "m1/r1")
    assert upgraded.database.regions.count() == 1 and upgraded.check() == []


# -- indexing -------------------------------------------------------------------------------------


def test_mask_problems_name_the_file_in_one_line_and_the_run_goes_on(nodule_dir, tiny_weights, store_paths,
                                                                     tmp_path):
    masks = tmp_path / "masks"
    shutil.copytree(nodule_dir / "regions", masks)
    (masks / "phantom01" / "phantom01_s000.png").unlink()  # missing: indexed without marked regions
    cv2.imwrite(str(masks / "phantom01" / "phantom01_s001.png"), np.full((10, 12), 255, np.uint8))  # wrong size
    (masks / "phantom01" / "phantom01_s002.png").write_bytes(b"not a png")  # unreadable
    runner = CliRunner()
    args = ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"], "--weights", tiny_weights]
    result = runner.invoke(main, ["index-dataset", str(nodule_dir / "png"), "--regions", str(masks), "--quiet",
                                  *args], catch_exceptions=False)
    lines = result.output.splitlines()
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert any(line.startswith("warning: ") and "phantom01_s000.png: no region mask" in line for line in lines)
    assert any(line.startswith("failed: ") and "phantom01_s001.png: region mask" in line
               and "is 12x10 pixels, the image 96x96" in line for line in lines)
    assert any(line.startswith("failed: ") and "phantom01_s002.png: region mask" in line for line in lines)
    assert "indexed 10, skipped 0 (already indexed), failed 2" in result.output
    assert "18 region(s) stored" in result.output
    shutil.copy(nodule_dir / "regions" / "phantom01" / "phantom01_s001.png", masks / "phantom01")
    shutil.copy(nodule_dir / "regions" / "phantom01" / "phantom01_s002.png", masks / "phantom01")
    again = runner.invoke(main, ["index-dataset", str(nodule_dir / "png"), "--regions", str(masks), "--quiet",
                                 *args], catch_exceptions=False)
    assert again.exit_code == 0 and "indexed 2, skipped 10" in again.output and "4 region(s) stored" in again.output


def test_region_masks_may_be_nifti_volumes_matched_by_plane(tiny_weights, store_paths, tmp_path):
    import nibabel

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    volume = np.random.default_rng(1).integers(-1000, 400, (64, 64, 3)).astype(np.int16)
    marked = np.zeros((64, 64, 3), np.uint8)
    marked[10:20, 30:40, 1] = 1  # only the middle plane has a region
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(images / "scan.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(marked, np.eye(4)), str(masks / "scan.nii.gz"))
    retriever = Retriever(weights=tiny_weights, **store_paths)
    report = retriever.index_dataset([images], regions=masks)
    assert (report.indexed, report.regions, report.failures) == (3, 1, [])
    region = next(iter(retriever.store(create=False).database.regions.read([1]).values()))
    frame = retriever.store(create=False).records([region.image_id])[region.image_id].frame
    planes = read_file(str(images / "scan.nii.gz"))
    from lungcbir.io import read_region_mask

    expected = connected_regions(read_region_mask(masks / "scan.nii.gz")[frame])[0]
    assert frame == 1 and region.bbox == expected.bbox and region.area == 100 and planes[1].shape == (64, 64)


def test_lesions_the_model_finds_are_stored_as_regions_unless_turned_off(phantom_dir, findings_weights, tmp_path):
    found = Retriever(weights=findings_weights, db_url=f"sqlite:///{tmp_path}/a.sqlite", index_dir=tmp_path / "a")
    report = found.index_dataset([phantom_dir / "png"])
    counts = found.store(create=False).database.regions.counts()
    assert report.regions > 0 and set(counts) == {"lesion"} and sum(counts.values()) == report.regions
    off = Retriever(weights=findings_weights, db_url=f"sqlite:///{tmp_path}/b.sqlite", index_dir=tmp_path / "b")
    assert off.index_dataset([phantom_dir / "png"], lesion_regions=False).regions == 0
    assert off.store(create=False).database.regions.count() == 0
    result = CliRunner().invoke(main, ["index-dataset", str(phantom_dir / "png"), "--no-lesion-regions", "--quiet",
                                       "--db", f"sqlite:///{tmp_path}/c.sqlite", "--index-dir", str(tmp_path / "c"),
                                       "--weights", findings_weights], catch_exceptions=False)
    assert result.exit_code == 0 and "region(s) stored" not in result.output
    on = CliRunner().invoke(main, ["index-dataset", str(phantom_dir / "png"), "--quiet", "--db",
                                   f"sqlite:///{tmp_path}/d.sqlite", "--index-dir", str(tmp_path / "d"),
                                   "--weights", findings_weights], catch_exceptions=False)
    assert on.exit_code == 0 and f"; {report.regions} region(s) stored" in on.output


def test_lesion_regions_below_the_minimum_size_are_left_out():
    lesions = np.zeros((512, 512), bool)
    lesions[10:18, 10:18] = True  # 64 pixels here, 16 at the 256 input: kept
    lesions[100:107, 100:107] = True  # 49 here, about 12 there: left out
    assert [region.area for region in lesion_regions(lesions, 256)] == [64]


def test_regions_stored_with_another_recipe_are_refused_with_a_message_to_rebuild_them(nodule_dir, tiny_weights,
                                                                                      store_paths, monkeypatch):
    import lungcbir.regions
    from lungcbir.errors import StoreError

    with monkeypatch.context() as patched:  # a store indexed by the version that made recipe r1
        patched.setattr(lungcbir.regions, "REGION_RECIPE", "r1")
        Retriever(weights=tiny_weights, **store_paths).index_dataset([nodule_dir / "png"],
                                                                     regions=nodule_dir / "regions")
    retriever = Retriever(weights=tiny_weights, **store_paths)
    model_id = retriever.model.model_id
    assert retriever.store(create=False).database.regions.model_id == f"{model_id}/r1"
    expected = "made with region recipe r1, this version of lungcbir makes r2 .*`lungcbir rebuild-regions`"
    with pytest.raises(StoreError, match=expected):  # a query
        retriever.query(_query(nodule_dir), region=SOLID_BOX)
    with pytest.raises(StoreError, match=expected):  # adding to the store
        retriever.index_dataset([nodule_dir / "png"], regions=nodule_dir / "regions")
    result = CliRunner().invoke(main, ["query", _query(nodule_dir), "--region", "26,43,37,54", "--no-pictures",
                                       "--db", store_paths["db_url"], "--index-dir", str(store_paths["index_dir"]),
                                       "--weights", tiny_weights])
    assert result.exit_code == 4 and "region recipe r1" in result.output and "rebuild-regions" in result.output
    assert len(result.output.strip().splitlines()) == 1
    client = TestClient(create_app(retriever), base_url="http://localhost", raise_server_exceptions=False)
    png = Path(_query(nodule_dir)).read_bytes()
    answer = client.post("/api/query", files={"file": ("q.png", png, "image/png")}, data={"region": "26,43,37,54"})
    assert answer.status_code == 409 and "region recipe r1" in answer.json()["detail"], answer.text


# -- the region vector ------------------------------------------------------------------------------


def test_the_region_vector_is_a_unit_vector_of_the_documented_length(nodule_dir, bundled_model):
    centre = np.asarray(bundled_model.settings.centre)
    item = read_file(_query(nodule_dir))[0]
    maps = bundled_model.segment([item], keep_maps=True)[0].maps
    assert maps is not None
    solid = region_of(SOLID_BOX, item.shape)
    vector = region_vector(maps, solid, centre)
    assert vector.shape == (region_dimension(bundled_model.settings.unet.bottleneck_channels),)
    assert abs(float(np.linalg.norm(vector)) - 1) < 1e-5 and sum(REGION_BLOCK_WEIGHTS.values()) == pytest.approx(1)
    glass = region_vector(maps, region_of(GROUND_GLASS_BOX, item.shape), centre)
    other = read_file(_query(nodule_dir, patient=2, index=2))[0]
    other_maps = bundled_model.segment([other], keep_maps=True)[0].maps
    assert other_maps is not None
    other_solid = region_vector(other_maps, region_of(SOLID_BOX, other.shape), centre)
    assert float(vector @ other_solid) > float(vector @ glass)  # like to like


def test_connected_regions_are_the_8_connected_parts_largest_first():
    mask = np.zeros((20, 20), np.uint8)
    mask[2:5, 2:5] = 7
    mask[5, 5] = 1  # touches the first diagonally: the same region
    mask[10:18, 12:14] = 255
    found = connected_regions(mask)
    assert [(r.bbox, r.area) for r in found] == [((12, 10, 14, 18), 16), ((2, 2, 6, 6), 10)]
    assert found[1].full((20, 20)).sum() == 10 and connected_regions(mask, min_area=11)[0].area == 16


# -- queries: the Python API --------------------------------------------------------------------------


def test_a_region_query_finds_regions_of_the_same_kind_in_other_patients(indexed, nodule_dir):
    solid = indexed.query(_query(nodule_dir), k=4, region=SOLID_BOX, per_patient=0, other_patients=True)
    assert len(solid.neighbors) == 4
    assert all(n.region is not None and n.region["bbox"][0] < 48 for n in solid.neighbors)  # left: solid
    assert {n.patient_id for n in solid.neighbors} <= {"phantom02", "phantom03"}
    assert solid.neighbors[0].region is not None and set(solid.neighbors[0].region) == {"id", "bbox", "area", "source"}
    mask = region_of(GROUND_GLASS_BOX, (96, 96))
    glass = indexed.query(_query(nodule_dir), k=4, region=mask, per_patient=0, other_patients=True)
    assert all(n.region is not None and n.region["bbox"][0] > 48 for n in glass.neighbors)  # right: ground glass
    assert glass.region is not None and glass.summary_json()["region"] == {"bbox": [60, 42, 73, 55], "area": 169}


def test_a_region_query_finds_its_own_stored_region_first(indexed, nodule_dir):
    result = indexed.query(_query(nodule_dir), k=1, region=disc((96, 96), *SOLID))
    assert result.neighbors[0].path == _query(nodule_dir) and result.neighbors[0].score > 0.999


def test_region_queries_take_filters_per_patient_and_other_patients(indexed, nodule_dir):
    one_each = indexed.query(_query(nodule_dir), k=5, region=SOLID_BOX)
    assert len({n.patient_id for n in one_each.neighbors}) == len(one_each.neighbors) == 3
    assert one_each.note is not None and "3 of 5" in one_each.note
    two_each = indexed.query(_query(nodule_dir), k=6, region=SOLID_BOX, per_patient=2)
    assert sorted(n.patient_id for n in two_each.neighbors) == ["phantom01", "phantom01", "phantom02", "phantom02",
                                                                "phantom03", "phantom03"]
    only = indexed.query(_query(nodule_dir), k=3, region=SOLID_BOX, per_patient=0, where={"patient_id": "phantom03"})
    assert len(only.neighbors) == 3 and {n.patient_id for n in only.neighbors} == {"phantom03"}
    others = indexed.query(_query(nodule_dir), k=10, region=SOLID_BOX, per_patient=0, other_patients=True)
    assert len(others.neighbors) == 10 and "phantom01" not in {n.patient_id for n in others.neighbors}


def test_bad_regions_are_refused_with_one_line():
    for text in ("1,2,3", "1,2,3,4,5", "a,b,c,d", "1.5,2,3,4", ""):
        with pytest.raises(RegionError, match="X0,Y0,X1,Y1"):
            RegionBox.parse(text)
    with pytest.raises(RegionError, match="outside the image"):
        region_of(RegionBox(0, 0, 97, 10), (96, 96))
    with pytest.raises(RegionError, match="outside the image"):
        region_of(RegionBox(-1, 0, 10, 10), (96, 96))
    with pytest.raises(RegionError, match="is empty"):
        region_of(RegionBox(5, 5, 5, 10), (96, 96))
    with pytest.raises(RegionError, match="same size"):
        region_of(np.ones((10, 10), bool), (96, 96))
    with pytest.raises(RegionError, match="empty"):
        region_of(np.zeros((96, 96), bool), (96, 96))


def test_a_region_query_of_a_store_without_regions_says_how_to_make_them(phantom_dir, tiny_weights, store_paths):
    from lungcbir.errors import StoreError

    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "png"])
    with pytest.raises(StoreError) as refused:
        retriever.query(phantom_dir / "png" / "phantom01" / "phantom01_s001.png", region=RegionBox(1, 1, 9, 9))
    # the slices are stored already: index-dataset would skip them, rebuild-regions gives them regions
    assert "lungcbir rebuild-regions --regions MASKS" in str(refused.value)
    assert "index-dataset" not in str(refused.value)


# -- the CLI ----------------------------------------------------------------------------------------


def test_cli_region_query_json_carries_the_region_and_the_picture_outlines_it(indexed, nodule_dir, store_paths,
                                                                              bundled_weights, tmp_path):
    args = ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"], "--weights", bundled_weights]
    result = CliRunner().invoke(main, ["query", _query(nodule_dir), "--region", "26,43,37,54", "--k", "3",
                                       "--json", "--out", str(tmp_path / "out"), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output.splitlines()[-1])
    assert answer["region"] == {"bbox": [26, 43, 37, 54], "area": 121}
    first = answer["neighbors"][0]
    assert {"rank", "id", "path", "score", "patient_id", "series_uid", "labels"} <= set(first)
    assert first["region"]["bbox"] == [27, 44, 36, 53] and first["region"]["area"] == 49
    picture = cv2.imread(answer["matches"])
    assert (picture == np.array(REGION_COLOUR, np.uint8)).all(axis=-1).sum() > 50
    table = CliRunner().invoke(main, ["query", _query(nodule_dir), "--region-mask",
                                      str(nodule_dir / "regions" / "phantom01" / "phantom01_s001.png"),
                                      "--no-pictures", *args], catch_exceptions=False)
    assert table.exit_code == 0 and "region 27,43,72,54 (130 px)" in table.output and "px, mask)" in table.output


@pytest.mark.parametrize("options, message", [
    (["--region", "26,43,37"], "X0,Y0,X1,Y1"),
    (["--region", "0,0,200,20"], "outside the image"),
    (["--region", "30,30,20,40"], "is empty"),
    (["--region-mask", "SMALL"], "same size"),
    (["--region-mask", "EMPTY"], "is empty"),
    (["--region-mask", "MISSING"], "does not exist"),
])
def test_cli_bad_regions_are_one_line_and_exit_status_2(indexed, nodule_dir, store_paths, bundled_weights, tmp_path,
                                                       options, message):
    cv2.imwrite(str(tmp_path / "SMALL.png"), np.full((10, 10), 255, np.uint8))
    cv2.imwrite(str(tmp_path / "EMPTY.png"), np.zeros((96, 96), np.uint8))
    options = [str(tmp_path / f"{o}.png") if o in ("SMALL", "EMPTY", "MISSING") else o for o in options]
    result = CliRunner().invoke(main, ["query", _query(nodule_dir), *options, "--no-pictures", "--db",
                                       store_paths["db_url"], "--index-dir", store_paths["index_dir"],
                                       "--weights", bundled_weights], catch_exceptions=False)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_cli_stats_and_check_cover_regions(indexed, store_paths):
    args = ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"]]
    stats = CliRunner().invoke(main, ["stats", "--json", *args], catch_exceptions=False)
    summary = json.loads(stats.output)
    assert summary["regions"]["mask"] == 24 and summary["region_index_vectors"] == sum(summary["regions"].values())
    assert CliRunner().invoke(main, ["check", *args]).exit_code == 0
    (Path(store_paths["index_dir"]) / "regions.faiss").unlink()
    broken = CliRunner().invoke(main, ["check", *args])
    assert broken.exit_code == 4 and "problem: regions: index file" in broken.output


# -- the web API ------------------------------------------------------------------------------------


def test_web_query_takes_a_region_box_or_a_region_mask(indexed, nodule_dir):
    client = TestClient(create_app(indexed), base_url="http://localhost", raise_server_exceptions=False)
    png = Path(_query(nodule_dir)).read_bytes()
    boxed = client.post("/api/query", files={"file": ("q.png", png, "image/png")},
                        data={"k": "3", "region": "26,43,37,54", "per_patient": "0", "other_patients": "true"})
    assert boxed.status_code == 200, boxed.text
    answer = boxed.json()
    assert answer["region"] == {"bbox": [26, 43, 37, 54], "area": 121} and len(answer["neighbors"]) == 3
    assert all(n["region"]["bbox"][0] < 48 and n["patient_id"] != "phantom01" for n in answer["neighbors"])
    assert all(not n["path"].startswith("/") for n in answer["neighbors"])  # file names, never server folders
    mask = cv2.imencode(".png", region_of(GROUND_GLASS_BOX, (96, 96)).astype(np.uint8) * 255)[1].tobytes()
    masked = client.post("/api/query", files={"file": ("q.png", png, "image/png"),
                                              "region_mask": ("m.png", mask, "image/png")}, data={"k": "2"})
    assert masked.status_code == 200 and all(n["region"]["bbox"][0] > 48 for n in masked.json()["neighbors"])
    outlined = cv2.imdecode(np.frombuffer(client.get(masked.json()["overlay"]).content, np.uint8), cv2.IMREAD_COLOR)
    assert (outlined == np.array(REGION_COLOUR, np.uint8)).all(axis=-1)[40:58, 56:77].any()  # the query's region
    plain = client.post("/api/query", files={"file": ("q.png", png, "image/png")}, data={"k": "2"}).json()
    assert "region" not in plain and all("region" not in n for n in plain["neighbors"])


@pytest.mark.parametrize("data, mask, status, message", [
    ({"region": "1,2,3"}, None, 422, "X0,Y0,X1,Y1"),
    ({"region": "0,0,500,5"}, None, 422, "outside the image"),
    ({"region": "5,5,5,9"}, None, 422, "is empty"),
    ({"region": "1," * 5000}, None, 422, "X0,Y0,X1,Y1"),
    ({}, np.ones((10, 10), np.uint8), 422, "same size"),
    ({}, np.zeros((96, 96), np.uint8), 422, "is empty"),
    ({"region": "1,1,5,5"}, np.ones((96, 96), np.uint8), 422, "not both"),
    ({}, "notes.txt", 415, "region mask"),
])
def test_web_bad_regions_are_refused_with_one_line(indexed, nodule_dir, data, mask, status, message):
    client = TestClient(create_app(indexed), base_url="http://localhost", raise_server_exceptions=False)
    files = {"file": ("q.png", Path(_query(nodule_dir)).read_bytes(), "image/png")}
    if isinstance(mask, str):
        files["region_mask"] = (mask, b"hello", "text/plain")
    elif mask is not None:
        files["region_mask"] = ("m.png", cv2.imencode(".png", mask)[1].tobytes(), "image/png")
    answer = client.post("/api/query", files=files, data=data)
    assert answer.status_code == status and message in answer.json()["detail"], answer.text


# -- the picture ------------------------------------------------------------------------------------


def test_outline_region_draws_the_region_and_a_box_around_it():
    picture = np.zeros((64, 64, 3), np.uint8)
    mask = disc((10, 10), 5, 5, 4)
    outline_region(picture, (20, 20, 30, 30), mask)
    drawn = (picture == np.array(REGION_COLOUR, np.uint8)).all(axis=-1)
    assert drawn[20:30, 20:30].any() and drawn[17, 17:33].all() and not drawn[25, 25]
    boxed = outline_region(np.zeros((64, 64, 3), np.uint8), (20, 20, 30, 30))  # no mask: the box alone
    assert (boxed == np.array(REGION_COLOUR, np.uint8)).all(axis=-1)[17, 17:33].all()


@pytest.mark.slow
def test_concurrent_indexers_store_each_region_once(nodule_dir, tiny_weights, backend, store_paths, tmp_path):
    import subprocess
    import sys

    if backend != "postgresql":
        pytest.skip("several machines share a server database; SQLite is the single-machine store")
    png, masks = nodule_dir / "png", nodule_dir / "regions"
    # a mask's name is the image's path relative to the folder indexed: a patient's folder has its own
    folders = [(png, masks), (png / "phantom02", masks / "phantom02"), (png, masks)]
    runs = [subprocess.Popen(
        [sys.executable, "-m", "lungcbir.cli", "index-dataset", str(images), "--regions", str(regions),
         "--quiet", "--commit-every", "2", "--db", store_paths["db_url"],
         "--index-dir", str(tmp_path / f"index{number}"), "--weights", tiny_weights],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for number, (images, regions) in enumerate(folders)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], outputs
    for number in range(3):
        store = Store(store_paths["db_url"], tmp_path / f"index{number}")
        store.checkpoint()
        assert store.database.regions.count() == 24 and store.region_vectors.current().ntotal == 24
        assert store.check() == []


# -- the page's region search (issue 27 expectation 3) ----------------------------------------------


def _picture(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)


def _cyan(picture: np.ndarray) -> np.ndarray:
    return (picture == np.array(REGION_COLOUR, np.uint8)).all(axis=-1)


def test_web_region_neighbours_thumbnails_outline_their_region(indexed, nodule_dir, tmp_path):
    client = TestClient(create_app(indexed), base_url="http://localhost", raise_server_exceptions=False)
    png = Path(_query(nodule_dir)).read_bytes()
    answer = client.post("/api/query", files={"file": ("q.png", png, "image/png")},
                         data={"k": "3", "region": "26,43,37,54", "per_patient": "0", "other_patients": "true"}).json()
    for neighbor in answer["neighbors"]:
        url = neighbor["thumbnail_url"]
        assert url == f"/api/images/{neighbor['id']}/thumbnail?region={neighbor['region']['id']}"
        cyan = _cyan(_picture(client.get(url)))
        x0, y0, x1, y1 = neighbor["region"]["bbox"]
        assert cyan[y0:y1, x0:x1].any() and cyan[y0 - 10:y1 + 10, x0 - 10:x1 + 10].sum() == cyan.sum()  # there only
        plain = client.get(f"/api/images/{neighbor['id']}/thumbnail")
        assert not _cyan(_picture(plain)).any()  # a slice answer's thumbnail outlines nothing
    # a region of another slice, an unknown one, or no number: refused in one line, no server path
    first, second = answer["neighbors"][:2]
    for query, status in [(f"{first['id']}/thumbnail?region={second['region']['id']}", 404),
                          (f"{first['id']}/thumbnail?region=999999", 404),
                          (f"{first['id']}/thumbnail?region=0", 422),
                          (f"{first['id']}/thumbnail?region={2**70}", 422),
                          (f"{first['id']}/thumbnail?region=..%2Fetc", 422)]:
        refused = client.get(f"/api/images/{query}")
        assert refused.status_code == status, (query, refused.text)
        assert str(tmp_path.parent) not in refused.text and str(nodule_dir) not in refused.text


def test_web_region_query_on_a_store_without_regions_says_how_to_make_them(phantom_dir, tiny_weights, store_paths):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "png"])
    client = TestClient(create_app(retriever), base_url="http://localhost", raise_server_exceptions=False)
    png = (phantom_dir / "png" / "phantom01" / "phantom01_s001.png").read_bytes()
    answer = client.post("/api/query", files={"file": ("q.png", png, "image/png")}, data={"region": "1,1,9,9"})
    # not "the image database is not available": the store is fine, it holds no regions
    assert answer.status_code == 409, answer.text
    detail = answer.json()["detail"]
    assert "rebuild-regions --regions MASKS" in detail and "\n" not in detail
    assert "sqlite" not in detail and "postgres" not in detail and "/" not in detail.split("`")[0]


def test_regions_index_into_a_compact_store_with_few_regions(nodule_dir, tiny_weights, store_paths):
    """The region index takes the store's index kind; a compact store's first regions are too few
    to train a compact index on (indexing stopped with a FAISS traceback): they are searched exactly."""
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.store().rebuild_index("compact")
    report = retriever.index_dataset([nodule_dir / "png"], regions=nodule_dir / "regions")
    assert (report.indexed, report.regions, report.failures) == (12, 24, [])
    store = retriever.store(create=False)
    assert store.stats().region_index_vectors == 24 and store.check() == []


# -- copies of the same pixels and score percentiles (region answers as slice answers) -----------------


@pytest.fixture
def copied(nodule_dir, bundled_weights, store_paths, tmp_path) -> tuple[Retriever, list[str]]:
    """The nodule store plus two more files of phantom01_s001's pixels (a PNG written otherwise
    and a TIFF: other bytes, the same pixels), each with the same marked regions; neither has a
    patient (a file of its own), so each copy is another case than phantom01. Returns the
    retriever and the three files of those pixels."""
    source = Path(_query(nodule_dir))
    pixels = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
    marked = cv2.imread(str(nodule_dir / "regions" / "phantom01" / "phantom01_s001.png"), cv2.IMREAD_UNCHANGED)
    masks = tmp_path / "masks"
    shutil.copytree(nodule_dir / "regions", masks)
    for name in ("a", "b"):
        (tmp_path / "copies" / name).mkdir(parents=True)
        (masks / name).mkdir()
        cv2.imwrite(str(masks / name / "x.png"), marked)
    cv2.imwrite(str(tmp_path / "copies" / "a" / "x.png"), pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    cv2.imwrite(str(tmp_path / "copies" / "b" / "x.tif"), pixels)
    retriever = Retriever(weights=bundled_weights, **store_paths)
    report = retriever.index_dataset([nodule_dir / "png", tmp_path / "copies"], regions=masks)
    assert report.failures == [] and report.indexed == 14
    return retriever, [str(source), str(tmp_path / "copies" / "a" / "x.png"), str(tmp_path / "copies" / "b" / "x.tif")]


def _shown(neighbors) -> list[tuple[str, tuple]]:
    """Every (file, region box) an answer shows, neighbours and their copies."""
    return [(n.path, tuple(n.region["bbox"])) for n in neighbors] + \
        [(c["path"], tuple(n.region["bbox"])) for n in neighbors for c in n.copies]


def test_the_same_region_on_copies_of_a_slice_comes_once_with_its_copies(copied, nodule_dir):
    # the solid nodule of phantom01_s001 on its three files filled ranks 1-3 of a region query
    retriever, files = copied
    result = retriever.query(_query(nodule_dir), k=5, region=disc((96, 96), *SOLID), per_patient=0)
    assert len(result.neighbors) == 5 and result.note is None  # k distinct regions: more are stored
    shown = _shown(result.neighbors)
    assert len(set(shown)) == len(shown)  # no region twice
    first = result.neighbors[0]  # whichever file of those pixels the index ranks first
    assert first.score > 0.999 and first.path in files and sum(n.path in files for n in result.neighbors) == 1
    assert sorted([first.path] + [c["path"] for c in first.copies]) == sorted(files)
    stored = retriever.store(create=False).records([c["id"] for c in first.copies])
    assert sorted(row.path for row in stored.values()) == sorted(c["path"] for c in first.copies)  # slice ids
    # the other regions of those slices (the ground-glass patch) are not copies of the nodule
    glass = retriever.query(_query(nodule_dir), k=24, region=disc((96, 96), *SOLID), per_patient=0)
    patches = [n for n in glass.neighbors if n.path in files]
    assert len(patches) == 2 and {tuple(n.region["bbox"]) for n in patches} == {(27, 44, 36, 53), (61, 43, 72, 54)}
    assert all(len(n.copies) == 2 for n in patches)


def test_region_copies_keep_per_patient_and_other_patients(copied, nodule_dir):
    retriever, files = copied
    solid = disc((96, 96), *SOLID)
    one_each = retriever.query(_query(nodule_dir), k=5, region=solid)  # per_patient 1
    assert len(one_each.neighbors) == 3  # phantom01 (with its copies), phantom02, phantom03
    own = [n for n in one_each.neighbors if n.path in files]
    assert len(own) == 1 and len(own[0].copies) == 2  # the copies, other cases, are not more cases
    assert {n.patient_id for n in one_each.neighbors} - {own[0].patient_id} == {"phantom02", "phantom03"}
    others = retriever.query(_query(nodule_dir), k=4, region=solid, per_patient=0, other_patients=True)
    # the query's own patient is left out, and the copies of its pixels with it (as for slices)
    assert len(others.neighbors) == 4 and "phantom01" not in {n.patient_id for n in others.neighbors}
    assert not {path for path, _ in _shown(others.neighbors)} & set(files)
    two_each = retriever.query(_query(nodule_dir), k=6, region=solid, per_patient=2, other_patients=True)
    assert sorted(n.patient_id for n in two_each.neighbors) == ["phantom02", "phantom02", "phantom03", "phantom03"]


def test_region_neighbours_carry_their_percentile_among_pairs_of_stored_regions(indexed, nodule_dir, store_paths,
                                                                               bundled_weights):
    solid = disc((96, 96), *SOLID)
    result = indexed.query(_query(nodule_dir), k=24, region=solid, per_patient=0)
    percentiles = [n.percentile for n in result.neighbors]
    assert len(percentiles) == 24 and all(p is not None and 0 <= p <= 100 for p in percentiles)
    best, worst = result.neighbors[0], result.neighbors[-1]
    assert best.percentile is not None and worst.percentile is not None
    assert best.percentile > 90 and best.percentile > worst.percentile  # a strong match, a weak one
    assert percentiles == sorted(percentiles, reverse=True)  # the same order as the scores
    # query --json and the web API carry it
    args = ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"], "--weights", bundled_weights]
    printed = CliRunner().invoke(main, ["query", _query(nodule_dir), "--region", "26,43,37,54", "--k", "24",
                                        "--per-patient", "0", "--json", "--no-pictures", *args],
                                 catch_exceptions=False)
    assert printed.exit_code == 0, printed.output
    neighbors = json.loads(printed.output.splitlines()[-1])["neighbors"]
    assert all(0 <= n["percentile"] <= 100 for n in neighbors)
    assert neighbors[0]["percentile"] > neighbors[-1]["percentile"]
    client = TestClient(create_app(indexed), base_url="http://localhost", raise_server_exceptions=False)
    answer = client.post("/api/query", files={"file": ("q.png", Path(_query(nodule_dir)).read_bytes(), "image/png")},
                         data={"k": "24", "region": "26,43,37,54", "per_patient": "0"})
    assert answer.status_code == 200, answer.text
    served = answer.json()["neighbors"]
    assert all(0 <= n["percentile"] <= 100 for n in served) and served[0]["percentile"] > served[-1]["percentile"]
    assert [n["percentile"] for n in served] == [n["percentile"] for n in neighbors]  # one core, two shells
