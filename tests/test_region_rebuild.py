"""Making a store's regions again in place (lungcbir.region_rebuild, ``lungcbir rebuild-regions``):
lesions for slices indexed without them, marked regions taken back from the store, a store of
an earlier region recipe made searchable again, files gone or changed, a run that stops half
way, and the command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

import lungcbir.regions
from lungcbir.cli import main
from lungcbir.errors import StoreError
from lungcbir.regions import RegionBox, region_dimension
from lungcbir.research.nodule_benchmark import R1_WEIGHTS
from lungcbir.retrieval import Retriever
from lungcbir.store import Store
from lungcbir.web import create_app

SOLID_BOX = RegionBox(26, 43, 37, 54)


def _regions(store: Store) -> dict[tuple[str, int, tuple[int, int, int, int], str], tuple[int, np.ndarray]]:
    """Every stored region by (file name, frame, box, source): its area and vector."""
    database = store.database.regions
    vectors = {int(i): v for ids, chunk in database.iter_vectors() for i, v in zip(ids, chunk)}
    found = database.read(vectors)
    rows = store.records({region.image_id for region in found.values()})
    keyed = {}
    for region in found.values():
        row = rows[region.image_id]
        key = (Path(row.path).name, row.frame, region.bbox, region.source)
        assert key not in keyed  # one region per box and source on a slice
        keyed[key] = (region.area, vectors[region.id])
    return keyed


def _assert_same_regions(rebuilt: dict, fresh: dict) -> None:
    assert sorted(rebuilt) == sorted(fresh)
    for key, (area, vector) in fresh.items():
        assert rebuilt[key][0] == area
        np.testing.assert_allclose(rebuilt[key][1], vector, atol=2e-3)  # float16 as stored


def _slice_side(store: Store) -> tuple[int, bytes]:
    """The slices' generation and index file: what a rebuild of the regions must not touch."""
    store.checkpoint()
    return store.database.generation(), store.index_path.read_bytes()


@pytest.fixture
def copied(nodule_dir, tmp_path) -> Path:
    """The nodule phantom's images and masks, in a folder of this test's own (files change here)."""
    out = tmp_path / "nodules"
    shutil.copytree(nodule_dir / "png", out / "png")
    shutil.copytree(nodule_dir / "regions", out / "regions")
    return out


def _index_with_recipe_r1(retriever: Retriever, folder: Path, monkeypatch) -> None:
    """Index as the version that made recipe r1 did: r1's weights (a context block: another
    vector length) and r1 in the regions' model id."""
    with monkeypatch.context() as patched:
        patched.setattr(lungcbir.regions, "REGION_RECIPE", "r1")
        patched.setattr(lungcbir.regions, "REGION_BLOCK_WEIGHTS", R1_WEIGHTS)
        report = retriever.index_dataset([folder / "png"], regions=folder / "regions")
    assert (report.indexed, report.regions) == (12, 24)
    assert retriever.store().database.regions.model_id.endswith("/r1")


def test_a_store_indexed_without_lesion_regions_gets_those_index_dataset_stores(phantom_dir, findings_weights,
                                                                              store_paths, tmp_path):
    retriever = Retriever(weights=findings_weights, **store_paths)
    assert retriever.index_dataset([phantom_dir / "png"], lesion_regions=False).regions == 0
    store = retriever.store()
    assert store.database.regions.count() == 0
    before = _slice_side(store)
    report = retriever.rebuild_regions()
    fresh = Retriever(weights=findings_weights, db_url=f"sqlite:///{tmp_path}/fresh.sqlite",
                      index_dir=tmp_path / "fresh")
    expected = fresh.index_dataset([phantom_dir / "png"]).regions
    assert expected > 0 and (report.slices, report.rebuilt, report.unreadable) == (12, 12, 0)
    assert report.regions == {"lesion": expected} and report.warnings == []
    assert store.database.regions.model_id == f"{retriever.model.model_id}/r2"  # claimed by the rebuild
    _assert_same_regions(_regions(store), _regions(fresh.store()))
    assert _slice_side(store) == before  # the slices and their index are as they were
    assert store.check() == [] and store.stats().region_index_vectors == expected
    again = retriever.rebuild_regions(lesion_regions=False)  # and turned off again: none
    assert again.stored == 0 and store.database.regions.count() == 0 and store.check() == []


def test_marked_regions_survive_a_rebuild_without_the_masks_folder(nodule_dir, tiny_weights, store_paths):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([nodule_dir / "png"], regions=nodule_dir / "regions")
    store = retriever.store()
    fresh = _regions(store)
    first_ids = set(store.database.regions.read(range(1, 100)))
    assert len(fresh) == 24
    report = retriever.rebuild_regions()
    assert (report.rebuilt, report.regions, report.warnings) == (12, {"mask": 24}, [])
    _assert_same_regions(_regions(store), fresh)  # same boxes, areas and vectors
    assert not first_ids & set(store.database.regions.read(range(1, 100)))  # made again, not left alone
    assert store.check() == [] and Store(**store_paths, read_only=True).check() == []
    answer = retriever.query(str(nodule_dir / "png" / "phantom01" / "phantom01_s001.png"), k=3,
                             region=SOLID_BOX, per_patient=0)
    assert len(answer.neighbors) == 3 and answer.note is None


def test_a_store_of_another_region_recipe_is_refused_then_answers_after_the_rebuild(copied, tiny_weights,
                                                                                    store_paths, monkeypatch, tmp_path):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    _index_with_recipe_r1(retriever, copied, monkeypatch)
    query = str(copied / "png" / "phantom02" / "phantom02_s001.png")
    with pytest.raises(StoreError, match="made with region recipe r1.*`lungcbir rebuild-regions`"):
        retriever.query(query, region=SOLID_BOX)
    before = _slice_side(retriever.store())
    report = retriever.rebuild_regions()
    assert (report.set_aside, report.rebuilt, report.regions, report.warnings) == (24, 12, {"mask": 24}, [])
    store = retriever.store()
    model_id = retriever.model.model_id
    assert store.database.regions.model_id == f"{model_id}/r2"
    assert store.database.regions.dimension == region_dimension(retriever.model.settings.unet.bottleneck_channels)
    assert _slice_side(store) == before and store.check() == []
    fresh = Retriever(weights=tiny_weights, db_url=f"sqlite:///{tmp_path}/fresh.sqlite", index_dir=tmp_path / "fresh")
    fresh.index_dataset([copied / "png"], regions=copied / "regions")
    _assert_same_regions(_regions(store), _regions(fresh.store()))  # marked regions taken back from the r1 rows
    answer = Retriever(weights=tiny_weights, **store_paths).query(query, k=2, region=SOLID_BOX, per_patient=0)
    assert len(answer.neighbors) == 2 and answer.note is None


def test_a_file_gone_or_changed_is_one_warning_and_the_other_slices_are_rebuilt(copied, tiny_weights, store_paths,
                                                                               monkeypatch):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    _index_with_recipe_r1(retriever, copied, monkeypatch)
    gone = copied / "png" / "phantom01" / "phantom01_s000.png"
    changed = copied / "png" / "phantom02" / "phantom02_s003.png"
    store = retriever.store()
    gone_id, changed_id = store.ids_for([str(gone)])[0], store.ids_for([str(changed)])[0]
    gone.unlink()
    pixels = cv2.imread(str(changed), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(changed), 255 - pixels)
    report = retriever.rebuild_regions()
    assert (report.slices, report.rebuilt, report.unreadable, report.removed) == (12, 10, 2, 4)
    assert report.regions == {"mask": 20} and len(report.warnings) == 2
    assert report.warnings[0].startswith(f"{gone}: cannot be read again (file does not exist)")
    assert report.warnings[1].startswith(f"{changed}: changed since it was indexed")
    assert all("2 region(s) of another recipe were removed" in line for line in report.warnings)
    regions = store.database.regions
    assert regions.of_images([gone_id, changed_id]) == {} and regions.pending_slices() == 0
    assert regions.count() == 20 and store.count() == 12 and store.check() == []
    # once the regions are of the recipe in use, a slice that cannot be read keeps them
    shutil.copy(copied / "png" / "phantom01" / "phantom01_s001.png", gone)  # another content
    again = retriever.rebuild_regions()
    assert (again.unreadable, again.removed, again.regions) == (2, 0, {"mask": 20})
    assert "has no regions" in again.warnings[0]
    third = copied / "png" / "phantom03" / "phantom03_s002.png"
    third.unlink()
    last = retriever.rebuild_regions()
    assert any(line.startswith(f"{third}:") and "its 2 region(s) were kept as they were" in line
               for line in last.warnings)
    assert regions.count() == 20 and store.check() == []


def test_a_rebuild_stopped_half_way_never_answers_with_two_recipes_and_a_rerun_finishes_it(
        copied, tiny_weights, store_paths, monkeypatch):
    retriever = Retriever(weights=tiny_weights, files_per_commit=4, **store_paths)
    _index_with_recipe_r1(retriever, copied, monkeypatch)
    query = str(copied / "png" / "phantom02" / "phantom02_s001.png")
    replace = Store.replace_regions

    def stop_at(batch: int):
        calls = []

        def replacing(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == batch:
                raise KeyboardInterrupt  # Ctrl-C, or a crash, before this batch's transaction
            return replace(self, *args, **kwargs)
        return replacing

    with monkeypatch.context() as patched:  # stopped before its first batch was stored
        patched.setattr(Store, "replace_regions", stop_at(1))
        with pytest.raises(KeyboardInterrupt):
            retriever.rebuild_regions()
    reader = Retriever(weights=tiny_weights, **store_paths)  # another process
    with pytest.raises(StoreError, match=r"regions of 12 slice\(s\) are being made again: run `lungcbir "
                                         r"rebuild-regions`"):
        reader.query(query, region=SOLID_BOX)
    with monkeypatch.context() as patched:  # stopped after its first batch
        patched.setattr(Store, "replace_regions", stop_at(2))
        with pytest.raises(KeyboardInterrupt):
            retriever.rebuild_regions()
    reader = Retriever(weights=tiny_weights, **store_paths)
    answer = reader.query(query, k=10, region=SOLID_BOX, per_patient=0)
    store = reader.store(create=False)
    dimension = region_dimension(reader.model.settings.unet.bottleneck_channels)
    assert store.database.regions.count() == 8 and store.region_vectors.current().d == dimension
    assert len(answer.neighbors) == 8 and "regions of 8 slice(s) are not searched" in answer.note
    assert {n.path for n in answer.neighbors} <= {str(p) for p in sorted((copied / "png").rglob("*.png"))[:4]}
    assert any("8 slices wait for their regions" in problem for problem in store.check())
    client = TestClient(create_app(reader), base_url="http://localhost", raise_server_exceptions=False)
    web = client.post("/api/query", files={"file": ("q.png", Path(query).read_bytes(), "image/png")},
                      data={"region": "26,43,37,54", "k": "10", "per_patient": "0"})
    assert web.status_code == 200 and len(web.json()["neighbors"]) == 8, web.text
    assert "regions of 8 slice(s) are not searched" in web.json()["note"]
    writer = Store(**store_paths)  # a slice not rebuilt yet is removed meanwhile: its pending regions go with it
    last = str(sorted((copied / "png").rglob("*.png"))[-1])
    assert writer.remove(writer.ids_for([last])) == 1 and writer.database.regions.pending_slices() == 7
    report = retriever.rebuild_regions()  # the rerun finishes it
    assert (report.set_aside, report.rebuilt, report.regions) == (0, 11, {"mask": 22})
    store = Store(**store_paths, read_only=True)
    assert store.database.regions.pending_slices() == 0 and store.check() == []
    answer = Retriever(weights=tiny_weights, **store_paths).query(query, k=3, region=SOLID_BOX, per_patient=0)
    assert answer.note is None and len(answer.neighbors) == 3


def test_marked_regions_come_from_a_masks_folder_when_given(nodule_dir, tiny_weights, store_paths, tmp_path):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([nodule_dir / "png"])  # indexed without --regions: no regions
    masks = tmp_path / "masks"
    shutil.copytree(nodule_dir / "regions", masks)
    (masks / "phantom03" / "phantom03_s000.png").unlink()
    retriever.workers = 2  # files read in worker processes, as index-dataset --workers
    report = retriever.rebuild_regions(regions=masks)
    assert (report.rebuilt, report.regions) == (12, {"mask": 22})
    assert len(report.warnings) == 1 and "phantom03_s000.png: no region mask in" in report.warnings[0]
    fresh = Retriever(weights=tiny_weights, db_url=f"sqlite:///{tmp_path}/fresh.sqlite", index_dir=tmp_path / "fresh")
    fresh.index_dataset([nodule_dir / "png"], regions=nodule_dir / "regions")
    expected = {key: value for key, value in _regions(fresh.store()).items() if key[0] != "phantom03_s000.png"}
    _assert_same_regions(_regions(retriever.store()), expected)


def test_cli_rebuild_regions_summary_exit_status_and_bad_masks_folder(copied, tiny_weights, store_paths,
                                                                      monkeypatch):
    retriever = Retriever(weights=tiny_weights, **store_paths)
    _index_with_recipe_r1(retriever, copied, monkeypatch)
    args = ["--db", store_paths["db_url"], "--index-dir", store_paths["index_dir"], "--weights", tiny_weights]
    runner = CliRunner()
    refused = runner.invoke(main, ["query", str(copied / "png" / "phantom01" / "phantom01_s001.png"), "--region",
                                   "26,43,37,54", "--no-pictures", *args])
    assert refused.exit_code == 4 and "`lungcbir rebuild-regions`" in refused.output
    bad = runner.invoke(main, ["rebuild-regions", "--regions", str(copied / "no-such-folder"), "--quiet", *args])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert bad.output.strip().splitlines() == [f"error: {copied / 'no-such-folder'}: the region masks folder "
                                               f"does not exist"]
    assert retriever.store().database.regions.model_id.endswith("/r1")  # refused before anything was written
    (copied / "png" / "phantom01" / "phantom01_s002.png").unlink()
    result = runner.invoke(main, ["rebuild-regions", "--quiet", *args])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("warning: ") and "phantom01_s002.png: cannot be read again" in lines[0]
    assert lines[1].startswith("rebuilt the regions of 11 of 12 slice(s), 1 unreadable or changed: 22 region(s) "
                               "stored (mask 22); 24 region(s) of another recipe replaced in ")
    answer = runner.invoke(main, ["query", str(copied / "png" / "phantom02" / "phantom02_s001.png"), "--region",
                                  "26,43,37,54", "--no-pictures", *args])
    assert answer.exit_code == 0, answer.output


def test_slices_of_a_dicomweb_archive_are_fetched_again_from_it(phantom_dir, findings_weights, store_paths,
                                                                monkeypatch):
    from sqlalchemy import update

    import lungcbir.dicomweb
    from lungcbir.database import ImageRecord
    from lungcbir.errors import ReadError
    from lungcbir.io import read_file

    retriever = Retriever(weights=findings_weights, **store_paths)
    retriever.index_dataset([phantom_dir / "dicom"], lesion_regions=False)
    store = retriever.store()
    files = {}
    with store.engine.begin() as connection:  # as if indexed from an archive: each row's path its WADO-RS URL
        for row_id, path in connection.execute(ImageRecord.__table__.select().with_only_columns(
                ImageRecord.id, ImageRecord.path)).all():
            url = f"http://pacs.invalid/dicom-web/studies/1.2/series/1.3/instances/1.4.{row_id}"
            files[url] = path
            connection.execute(update(ImageRecord).where(ImageRecord.id == row_id).values(path=url))
    unreachable = sorted(files)[0]

    def fetch(url: str):
        if url == unreachable:
            raise ReadError(url, "HTTP 404 from the archive")
        item = read_file(files[url])[0]
        item.path = url
        return item

    monkeypatch.setattr(lungcbir.dicomweb, "fetch_slice", fetch)
    report = retriever.rebuild_regions()
    assert (report.slices, report.rebuilt, report.unreadable) == (12, 11, 1) and report.stored > 0
    assert report.warnings == [f"{unreachable}: cannot be read again (HTTP 404 from the archive); it has no regions"]
    assert store.check() == []


def test_a_store_of_the_version_before_gains_the_pending_table_and_reads_without_it(nodule_dir, tiny_weights,
                                                                                   store_paths):
    from sqlalchemy import text

    retriever = Retriever(weights=tiny_weights, **store_paths)
    retriever.index_dataset([nodule_dir / "png"], regions=nodule_dir / "regions")
    store = retriever.store()
    store.checkpoint()
    with store.engine.begin() as connection:  # as the version before this one made it
        connection.execute(text("DROP TABLE regions_pending"))
    store.engine.dispose()
    old = Store(**store_paths, create=False, read_only=True)
    assert old.database.regions.pending_slices() == 0 and old.check() == []
    answer = Retriever(weights=tiny_weights, **store_paths).query(
        str(nodule_dir / "png" / "phantom01" / "phantom01_s001.png"), k=2, region=SOLID_BOX, per_patient=0)
    assert len(answer.neighbors) == 2 and answer.note is None
    old.engine.dispose()
    report = Retriever(weights=tiny_weights, **store_paths).rebuild_regions()  # a writer creates the table
    assert report.regions == {"mask": 24} and Store(**store_paths, read_only=True).check() == []


def test_slices_of_another_model_are_refused_with_the_advice_to_re_index(nodule_dir, tiny_weights,
                                                                       other_tiny_weights, store_paths, tmp_path):
    Retriever(weights=other_tiny_weights, **store_paths).index_dataset([nodule_dir / "png"],
                                                                       regions=nodule_dir / "regions")
    with pytest.raises(StoreError, match="re-index into a new --db and --index-dir with this model"):
        Retriever(weights=tiny_weights, **store_paths).rebuild_regions()
    store = Store(**store_paths, read_only=True)
    assert store.database.regions.count() == 24 and store.database.regions.pending_slices() == 0  # untouched
    missing = CliRunner().invoke(main, ["rebuild-regions", "--quiet", "--db", f"sqlite:///{tmp_path}/none.sqlite",
                                        "--index-dir", str(tmp_path / "none"), "--weights", tiny_weights])
    assert missing.exit_code == 4 and missing.output.startswith("error: no database at ")
    assert len(missing.output.strip().splitlines()) == 1
