"""The ``lungcbir`` command: parses arguments, calls the Python API, formats the answers.

Exit status (every command):

* 0: success;
* 1: some input files could not be read (they are listed; everything else was done; for
  ``rebuild-regions``: stored slices whose files are gone, unreadable or changed);
* 2: bad usage or no usable input;
* 3: model weights missing or unusable;
* 4: database or index problem;
* 5: another indexing run holds the write lock of the index (use ``--wait``);
* 130: interrupted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from .config import DB_ENV, DEFAULT_DB_URL, DEFAULT_INDEX_DIR, DEFAULT_RUNTIME, INDEX_DIR_ENV, RUNTIME_ENV, Settings
from .errors import FilterError, LungCBIRError, ReadError, RegionError, SegError
from .focus import DEFAULT_FOCUS, FOCUSES
from .runtimes import RUNTIMES
from .vector_index import INDEX_KIND_REGISTRY
from .websecurity import (
    KEEP_ALIVE_SECONDS,
    SlowClientProtocol,
    WebSettings,
    check_exposure,
    check_viewer_template,
    default_allowed_hosts,
    is_loopback,
    load_token,
    token_file_warning,
)
from .work_queue import DEFAULT_CLAIM_TIMEOUT_S

EXIT_SOME_FAILED = 1
EXIT_INTERRUPTED = 130
#: Neighbours drawn in ``<name>_matches.png`` (the best ones); the table and JSON list all k.
MATCH_PICTURE_NEIGHBORS = 8


def friendly_errors(command):
    """Turn our exceptions into one line on stderr and a documented exit status."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except LungCBIRError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; everything committed before this point is kept", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


def _settings() -> Settings:
    """The configuration of this invocation: read once by :func:`main`, else now."""
    context = click.get_current_context(silent=True)
    settings = context.find_object(Settings) if context is not None else None
    return settings if settings is not None else Settings.from_environment()


def store_options(command):
    command = click.option("--index-dir", default=lambda: _settings().index_dir, show_default=DEFAULT_INDEX_DIR,
                           help=f"Folder of the FAISS index (env {INDEX_DIR_ENV}).")(command)
    command = click.option("--db", "db_url", default=lambda: _settings().db_url, show_default=DEFAULT_DB_URL,
                           help=f"SQLAlchemy database URL, relative paths from the working directory "
                                f"(env {DB_ENV}).")(command)
    return command


def indexing_run_options(command):
    """What every run that reads files and writes the store takes (index-dataset, rebuild-regions)."""
    for option in reversed((
            click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024)),
            click.option("--quiet", is_flag=True, help="No progress bar."),
            click.option("--wait", is_flag=True,
                         help="Wait for another indexing run on the same index instead of failing."),
            click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
                         help="Processes that read and decode files while the model runs."),
            click.option("--commit-every", default=64, show_default=True, type=click.IntRange(1),
                         help="Slices per database transaction; a killed run loses at most this many."))):
        command = option(command)
    return command


def _set_runtime(context: click.Context, parameter: click.Parameter, value: str | None) -> None:
    """``--runtime``: kept in the invocation's Settings, which every model of it is loaded with."""
    if value is not None:
        root = context.find_root()
        root.obj = dataclasses.replace(_settings(), runtime=value)


def _load_model(weights, device):
    from .inference import LungModel

    return LungModel.load(weights, device, settings=_settings())


def model_options(command):
    command = click.option("--runtime", type=click.Choice(RUNTIMES), expose_value=False, callback=_set_runtime,
                           help=f"Where the network runs (env {RUNTIME_ENV}; default {DEFAULT_RUNTIME}: "
                                f"ONNX Runtime on the CPU, torch on CUDA).")(command)
    command = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)(command)
    command = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                           help="Model weights file (default: the bundled model).")(command)
    return command


def _retriever(db_url=None, index_dir=None, weights=None, device="cpu", batch_size=16, **options):
    from .retrieval import Retriever

    return Retriever(db_url=db_url, index_dir=index_dir, weights=weights, device=device, batch_size=batch_size,
                     settings=_settings(), **options)


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _ensure_folder(path: str) -> Path:
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LungCBIRError(f"{folder}: cannot create output folder ({error.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise LungCBIRError(f"{folder}: output folder is not writable")
    return folder


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lungcbir")
@click.pass_context
@friendly_errors
def main(context: click.Context) -> None:
    """Lung CT image retrieval: segment lungs with a U-Net and find similar stored slices.

    \b
    Example:
      lungcbir make-phantom sample/
      lungcbir index-dataset sample/dicom
      lungcbir query sample/png/phantom01/phantom01_s005.png --k 3
    """
    context.obj = Settings.from_environment()  # once per invocation; a bad value stops here, in one line


@main.command("index-dataset")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--labels", type=click.Path(dir_okay=False),
              help="CSV with a 'path' column plus label columns (patient_id, series_uid: the slice's identity).")
@click.option("--case-pattern", metavar="REGEX",
              help="For files without DICOM or labels identity: a regex searched in the path relative to the "
                   "indexed folder; group 1 = patient, group 2 (optional) = series.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out matching files or folders (repeatable).")
@indexing_run_options
@click.option("--study", metavar="UID", help="DICOMweb sources: only this study.")
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), metavar="YYYY-MM-DD",
              help="DICOMweb sources: only studies dated on or after this day.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False),
              help="DICOMweb sources: keep a copy of every fetched instance in this folder.")
@click.option("--claim-timeout", default=DEFAULT_CLAIM_TIMEOUT_S, show_default=True, type=click.FloatRange(min=1),
              metavar="SECONDS", help="DICOMweb sources: a series claimed by a run that stopped renewing its "
                                      "claim for this long (it was killed) is taken over by another run.")
@click.option("--regions", "regions", type=click.Path(file_okay=False), metavar="MASKS",
              help="A folder of region masks (PNG, TIFF or NIfTI; the images' relative paths; non-zero = region): "
                   "each connected region is stored as a region for `query --region`.")
@click.option("--no-lesion-regions", is_flag=True,
              help="Do not store the lesions the model finds as regions (stored by default).")
@store_options
@model_options
@friendly_errors
def index_dataset(paths, labels, case_pattern, exclude, batch_size, quiet, wait, workers, commit_every, study,
                  since, cache_dir, claim_timeout, regions, no_lesion_regions, db_url, index_dir, weights, device):
    """Index every CT image under PATHS (folders are walked recursively).

    A PATH starting with http:// or https:// is a DICOMweb service root (a PACS): its CT
    series are found with QIDO-RS and fetched with WADO-RS; credentials come from
    LUNGCBIR_DICOMWEB_TOKEN or LUNGCBIR_DICOMWEB_USER/_PASSWORD. The series go into a queue
    in the database, and each run claims one series at a time: runs on several machines
    against one PostgreSQL database share the work.
    Files already indexed (same SHA-256, or same SOP Instance UID) are skipped; unreadable
    files are reported and indexing goes on. Exit status 1 when some files failed (the rest
    is stored).

    \b
    Example:
      lungcbir index-dataset ../shared/data/kaggle-lungs-2d/images --labels labels.csv
      lungcbir index-dataset http://localhost:8042/dicom-web --since 2024-01-01
      lungcbir index-dataset exports/ --case-pattern '^(ID_[0-9]+)_Z'
      lungcbir index-dataset nodules/images --regions nodules/masks
    """
    from tqdm import tqdm

    retriever = _retriever(db_url, index_dir, weights, device, batch_size, files_per_commit=commit_every,
                           workers=workers)
    bar = tqdm(unit="file", disable=not _show_progress(quiet), file=sys.stderr)
    report = retriever.index_dataset(paths, labels=labels, exclude=exclude, wait=wait,
                                     on_total=lambda total: setattr(bar, "total", total),
                                     on_file=lambda _: bar.update(), study=study,
                                     since=since.date() if since else None, cache_dir=cache_dir,
                                     case_pattern=case_pattern, claim_timeout=claim_timeout, regions=regions,
                                     lesion_regions=not no_lesion_regions)
    bar.close()
    for failure in report.failures:
        click.echo(f"failed: {failure.path}: {failure.reason}", err=True)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if report.unmatched_labels:
        click.echo(f"warning: {report.unmatched_labels} row(s) of the labels CSV name no file indexed here "
                   "(relative paths are read from the CSV's folder)", err=True)
    rate = report.indexed / report.seconds if report.seconds else 0.0
    regions_note = f"; {report.regions} region(s) stored" if report.regions else ""
    click.echo(f"indexed {report.indexed}, skipped {report.skipped} (already indexed), "
               f"failed {report.failed} in {report.seconds:.1f} s ({rate:.1f} slices/s){regions_note}")
    if report.failures:
        sys.exit(EXIT_SOME_FAILED)


def parse_where(pairs) -> dict[str, str]:
    """``--where`` values as a filter (:func:`lungcbir.retrieval.parse_filters`), bad ones as usage errors."""
    from .retrieval import parse_filters

    try:
        return parse_filters(pairs)
    except FilterError as error:
        raise click.BadParameter(str(error), param_hint="--where") from None


def _same(path: str) -> str:
    return path


def _read_inputs(paths, name: Callable[[str], str] = _same, study: str | None = None, series: str | None = None):
    """Read query/segment inputs; yields (path, slices) and collects failures. ``name`` says
    how messages name a path (a fetched file by its archive URL). A DICOMweb URL stands for
    one series of ``study`` in that archive (``series``, or the study's only CT series)."""
    from .dicomweb import DicomwebSource, is_dicomweb_url
    from .io import find_image_files, read_file

    failures = []
    readable = []
    for url in [path for path in paths if is_dicomweb_url(path)]:
        if study is None:
            raise click.UsageError(f"{url}: a DICOMweb archive needs --study (and --series when it has several)")
        slices, fetch_failures = DicomwebSource(url).series_slices(study, series)
        for failure in fetch_failures:
            click.echo(f"failed: {failure}", err=True)
            failures.append(failure.path)
        if slices:
            readable.append((f"{url}/studies/{study}" + (f"/series/{series}" if series else ""), slices))
    paths = [path for path in paths if not is_dicomweb_url(path)]
    if not paths:
        return readable, failures
    files = list(find_image_files(paths))
    if not files:
        raise LungCBIRError(f"no images found in {', '.join(paths)}")
    for path in files:
        try:
            readable.append((path, read_file(path, max_voxels=_settings().max_voxels)))
        except ReadError as error:
            click.echo(f"failed: {name(error.path)}: {error.reason}", err=True)
            failures.append(name(path))
    return readable, failures


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--k", default=5, show_default=True, type=click.IntRange(1, 1000), help="Neighbours per query.")
@click.option("--out", default="lungcbir-output", show_default=True, type=click.Path(file_okay=False),
              help="Folder for <name>_mask.png, <name>_overlay.png and, for DICOM queries, <name>_seg.dcm.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query slice, one per line.")
@click.option("--where", multiple=True, metavar="KEY=VALUE",
              help="Only stored slices whose label or metadata KEY equals VALUE (repeatable).")
@click.option("--per-patient", default=1, show_default=True, type=click.IntRange(0),
              help="At most this many results per patient/series (0: no limit), so results are different cases.")
@click.option("--by-series", is_flag=True,
              help="Treat each IMAGE (a DICOM series folder or a NIfTI volume) as one case and rank stored cases.")
@click.option("--no-pictures", is_flag=True, help="Write no mask, overlay or matches files (nothing in --out).")
@click.option("--other-patients", is_flag=True,
              help="Leave out every slice of the query's own patient (of its stored copy, or its DICOM PatientID).")
@click.option("--together", is_flag=True,
              help="Search once with all IMAGEs together (the mean of their vectors): more like these.")
@click.option("--unlike", multiple=True, type=click.Path(), metavar="IMAGE",
              help="With --together: less like this (repeatable; the mean of these is subtracted).")
@click.option("--study", metavar="UID", help="With a DICOMweb URL as IMAGE: the study to fetch the query from.")
@click.option("--series", "series_uid", metavar="UID",
              help="With --study: the series (default: the study's only CT series).")
@click.option("--focus", type=click.Choice(FOCUSES), default=str(DEFAULT_FOCUS), show_default=True,
              help="What similar means: the same level of the lungs (anatomy), the same kind and amount of "
                   "disease (findings), or both (balanced).")
@click.option("--region", "region_box", metavar="X0,Y0,X1,Y1",
              help="Search the stored regions (marked or found lesions) for ones like this box of IMAGE "
                   "(pixels of the image; X1, Y1 exclusive).")
@click.option("--region-mask", type=click.Path(dir_okay=False), metavar="MASK",
              help="As --region, the region given as a mask of IMAGE's size (non-zero = region).")
@store_options
@model_options
@friendly_errors
def query(images, k, out, as_json, where, per_patient, by_series, no_pictures, other_patients, together, unlike,
          study, series_uid, focus, region_box, region_mask, db_url, index_dir, weights, device):
    """Find the K stored slices most similar to each query IMAGE.

    Writes the lung mask (0/255, the image's own size), an overlay of the lung contour and a
    strip of the query beside its best 8 neighbours (<name>_matches.png) and, for a DICOM
    query, the mask as a DICOM SEG (<name>_seg.dcm) for each query to --out (unless
    --no-pictures), then prints the neighbours.

    \b
    Example:
      lungcbir query scan.dcm --k 5 --out results/ --json
      lungcbir query scan.dcm --focus findings --other-patients
      lungcbir query https://pacs/dicom-web --study 1.2.3 --series 1.2.3.4 --by-series
      lungcbir query slice.dcm --region 200,180,240,220 --other-patients --json

    With --region or --region-mask the neighbours are stored regions (each with its slice's
    fields and "region": {"bbox", "area"} in --json); a box outside the image or empty, or a
    mask of another size or empty, is bad usage (exit status 2).
    """
    from .regions import region_bbox
    from .visualize import mask_png, match_strip, outline_region, overlay, write_png

    filters = parse_where(where)
    if unlike and not together:
        raise click.UsageError("--unlike goes with --together")
    region = _query_region(region_box, region_mask, images, together or by_series or bool(study))
    retriever = _retriever(db_url, index_dir, weights, device)
    if together:
        _query_together(retriever, images, unlike, k, filters, per_patient, other_patients, as_json, focus)
        return
    if by_series:
        if _query_series(retriever, images, k, filters, as_json, focus, other_patients, study, series_uid):
            sys.exit(EXIT_SOME_FAILED)
        return
    folder = None if no_pictures else _ensure_folder(out)
    inputs, failures = _read_inputs(images, study=study, series=series_uid)
    if region is not None and (len(inputs) != 1 or len(inputs[0][1]) != 1):
        raise RegionError("a region query takes one IMAGE of one slice")
    for path, slices in inputs:
        results = [retriever.query_region(slices[0], region, k, filters, per_patient, other_patients)] \
            if region is not None else retriever.query_slices(slices, k, filters, per_patient, other_patients, focus)
        for result in results:
            mask_path = overlay_path = matches_path = lesion_path = None
            written = {}
            if folder is not None:
                name = result.query.name
                lesion = result.segmentation.lesion_mask
                mask_path, overlay_path = folder / f"{name}_mask.png", folder / f"{name}_overlay.png"
                write_png(str(mask_path), mask_png(result.mask))
                if lesion is not None:  # a model with a lesion output: the lesion map beside the mask
                    lesion_path = folder / f"{name}_lesion.png"
                    write_png(str(lesion_path), mask_png(lesion))
                query_overlay = overlay(result.query, result.mask, lesion)
                if result.region is not None:
                    x0, y0, x1, y1 = region_bbox(result.region)
                    outline_region(query_overlay, (x0, y0, x1, y1), result.region[y0:y1, x0:x1])
                write_png(str(overlay_path), query_overlay)
                matches_path = folder / f"{name}_matches.png"
                found = retriever.neighbor_slices(result.neighbors[:MATCH_PICTURE_NEIGHBORS])
                lesions = retriever.lesion_masks([item for _, item, _ in found])
                outlines = retriever.region_masks([neighbor for neighbor, _, _ in found])
                pictures = [(overlay(item, mask, found_lesion), f"#{neighbor.rank}  {neighbor.score:.3f}")
                            for (neighbor, item, mask), found_lesion in zip(found, lesions)]
                for (neighbor, _, _), (picture, _) in zip(found, pictures):
                    if neighbor.region is not None:
                        outline_region(picture, neighbor.region["bbox"], outlines.get(neighbor.region["id"]))
                write_png(str(matches_path), match_strip(query_overlay, pictures))
                if result.query.source_format == "dicom":
                    try:
                        seg = retriever.write_dicom_seg([result.query], folder / f"{name}_seg.dcm", [result.mask],
                                                        [lesion])
                        written["seg"] = str(seg.path)
                    except (ReadError, SegError) as error:  # the rest of the answer still stands
                        click.echo(f"failed: {error}", err=True)
                        failures.append(error.path)
            if as_json:
                click.echo(json.dumps({
                    "query": path, "mask": _text(mask_path), "lesion_mask": _text(lesion_path),
                    "overlay": _text(overlay_path),
                    "matches": _text(matches_path), **written, **result.summary_json(), "focus": focus,
                    "neighbors": [n.to_json() for n in result.neighbors]}))
            else:
                shown = f"  mask {mask_path}" if mask_path else ""
                seg_note = f"  seg {written['seg']}" if "seg" in written else ""
                lesions = "" if result.lesion_fraction is None else f"  lesion fraction {result.lesion_fraction:.3f}"
                if result.region is not None:
                    lesions += f"  region {','.join(str(v) for v in region_bbox(result.region))} " \
                               f"({int(result.region.sum())} px)"
                click.echo(f"{path}  lung fraction {result.lung_fraction:.3f}{lesions}  quality {result.quality.value} "
                           f"({result.quality_score:.2f}){shown}{seg_note}")
                if result.warning:
                    click.echo(f"  warning: {result.warning}")
                    continue
                if result.note:
                    click.echo(f"  note: {result.note}")
                _print_label_summary(result.label_summary(), len(result.neighbors))
                _print_neighbors(result.neighbors)
    if failures:
        sys.exit(EXIT_SOME_FAILED)


def _query_region(box: str | None, mask_path: str | None, images, elsewhere: bool):
    """The query region of ``--region`` or ``--region-mask`` (None without either); a mask is
    checked against the image's size by the query itself."""
    from .regions import RegionBox

    if box is None and mask_path is None:
        return None
    if box is not None and mask_path is not None:
        raise click.UsageError("give --region or --region-mask, not both")
    if elsewhere:
        raise click.UsageError("--region and --region-mask query one slice: not with --together, --by-series "
                               "or --study")
    if box is not None or mask_path is None:
        return RegionBox.parse(box or "")
    from .io import read_region_mask

    try:
        planes = read_region_mask(mask_path, _settings().max_voxels)
    except ReadError as error:
        raise RegionError(f"the region mask {error.path}: {error.reason}") from None
    if len(planes) != 1:
        raise RegionError(f"the region mask {mask_path} has {len(planes)} planes; give one plane (PNG, TIFF)")
    return planes[0]


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _print_neighbors(neighbors) -> None:
    click.echo(f"  {'rank':>4}  {'score':>6}  {'pct':>5}  {'anat':>5}  {'find':>5}  {'patient/series/slice':<32}  "
               "path  labels")

    def number(value, width=5, digits=2):
        return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    for n in neighbors:
        where = "/".join(str(v) if v is not None else "-" for v in
                         (n.patient_id, (n.series_uid or "")[-12:] or None, n.slice_index))
        labels = ", ".join(f"{key}={value}" for key, value in n.labels.items())
        copies = f"  (+{len(n.copies)} cop{'y' if len(n.copies) == 1 else 'ies'}: " \
                 f"{', '.join(os.path.relpath(c['path']) for c in n.copies)})" if n.copies else ""
        if n.region is not None:
            copies += f"  region {','.join(str(v) for v in n.region['bbox'])} ({n.region['area']} px, " \
                      f"{n.region['source']})"
        click.echo(f"  {n.rank:>4}  {n.score:6.3f}  {number(n.percentile, 5, 1)}  {number(n.anatomy_score)}  "
                   f"{number(n.findings_score)}  {where:<32}  {_shown_path(n)}  {labels}{copies}")


def _shown_path(neighbor) -> str:
    """A stored path as the table shows it: relative to the working directory (rows keep absolute
    paths; a table pasted into a report should not show the machine's folders), archive URLs as
    they are."""
    return neighbor.url or os.path.relpath(neighbor.path)


def _query_together(retriever, images, unlike, k, filters, per_patient, other_patients, as_json, focus) -> None:
    """One search with every slice of IMAGES together, less like UNLIKE; one result printed."""
    liked, failures = _read_inputs(images)
    disliked, unlike_failures = _read_inputs(unlike) if unlike else ([], [])
    examples = [item for _, items in liked for item in items]
    if not examples:
        raise LungCBIRError("no readable example to search with")
    result = retriever.query_together(examples, [item for _, items in disliked for item in items], k, filters,
                                      per_patient, other_patients, focus=focus)
    if as_json:
        click.echo(json.dumps({"queries": [path for path, _ in liked], "unlike": [path for path, _ in disliked],
                               "focus": focus, "neighbors": [n.to_json() for n in result.neighbors]}))
    else:
        unlike_note = f", less like {len(result.unlike)}" if result.unlike else ""
        click.echo(f"together: {len(result.queries)} example slice(s){unlike_note}")
        _print_neighbors(result.neighbors)
    if failures or unlike_failures:
        sys.exit(EXIT_SOME_FAILED)


def _print_label_summary(summary: dict[str, dict[str, int]], count: int) -> None:
    """"6 of 8: diagnosis COVID-19" for each label key (its most frequent value)."""
    for key, values in summary.items():
        value, times = next(iter(values.items()))
        click.echo(f"  {times} of {count}: {key} {value}")


def _query_series(retriever, inputs, k, filters, as_json, focus, other_patients=False, study=None,
                  series=None) -> bool:
    """Answer every source (a series folder or a volume); True when any file of any source failed."""
    from .retrieval import series_in_order

    any_failed = False
    for source in inputs:
        readable, failures = _read_inputs([source], study=study, series=series)
        any_failed = any_failed or bool(failures)
        if not readable:
            continue  # every file of this source failed; each was listed
        slices = series_in_order(readable)
        try:
            result = retriever.query_series(slices, k, filters, focus=focus, other_patients=other_patients)
        except LungCBIRError as error:  # not one series: this source only
            click.echo(f"failed: {source}: {error}", err=True)
            any_failed = True
            continue
        matches = result.matches
        if as_json:
            note = {"note": result.note} if result.note else {}
            click.echo(json.dumps({"query": source, "slices": len(slices), "focus": focus, **note,
                                   "label_summary": result.label_summary(),
                                   "cases": [m.to_json() for m in matches]}))
            continue
        click.echo(f"{source}: {len(slices)} slices, {sum(level is not None for level in result.levels)} "
                   "with lungs (paired by lung level)")
        if result.note:
            click.echo(f"  note: {result.note}")
        _print_label_summary(result.label_summary(), len(matches))
        for m in matches:
            click.echo(f"  {m.rank:>3}  {m.score:6.3f}  {m.case}")
            for pair in m.pairs:
                n = pair.neighbor
                levels = "" if pair.level_difference is None else \
                    f", level {pair.query_level:.2f} ~ {n.level:.2f}"
                click.echo(f"         query slice {pair.query_slice} ~ {n.path} (slice {n.slice_index}, "
                           f"{n.score:.3f}{levels})")
    return any_failed


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the masks.")
@click.option("--format", "output_format", type=click.Choice(["png", "nifti", "dicom-seg"]), default=None,
              help="png: one 0/255 PNG per slice; nifti: one volume per NIfTI input; dicom-seg: one DICOM "
                   "Segmentation per DICOM series (<folder or file stem>_seg.dcm). "
                   "Default: PNG for 2-D inputs, NIfTI for NIfTI volumes.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option("--study", metavar="UID", help="For a DICOMweb URL input: the study whose CT series to segment.")
@click.option("--stow", is_flag=True,
              help="With --format dicom-seg and a DICOMweb URL input: also store each SEG in that archive (STOW-RS).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per input image (per slice of a NIfTI volume), one per line.")
@model_options
@friendly_errors
def segment(images, out, output_format, batch_size, study, stow, as_json, weights, device):
    """Write lung masks for each IMAGE: PNG (0/255) for 2-D images, NIfTI for NIfTI volumes,
    or a DICOM SEG per DICOM series with --format dicom-seg.

    An IMAGE starting with http:// or https:// is a DICOMweb service root: the CT series of
    --study are fetched from it (a SEG is then named <series UID>_seg.dcm).

    Each mask comes with a quality verdict: ok, doubtful (check the mask by eye) or no-lungs
    (not a CT slice, or no lungs in view). With --json, one object per 2-D image, and one per
    slice of a NIfTI volume (all naming the volume's one mask file, with "slice": its index).

    \b
    Example:
      lungcbir segment slice.tif volume.nii.gz --out masks/ --json
      lungcbir segment ../shared/data/covid-ct-md/covid/P001 --format dicom-seg --out segs/
      lungcbir segment http://localhost:8042/dicom-web --study 1.2.3 --format dicom-seg --stow --out segs/
    """
    import tempfile

    from .dicomweb import DicomwebSource, is_dicomweb_url

    urls = [image for image in images if is_dicomweb_url(image)]
    if urls and not study:
        raise click.UsageError("a DICOMweb URL input needs --study UID")
    if stow and (output_format != "dicom-seg" or len(urls) != 1):
        raise click.UsageError("--stow needs --format dicom-seg and one DICOMweb URL input")
    retriever = _retriever(weights=weights, device=device, batch_size=batch_size)
    folder = _ensure_folder(out)
    with tempfile.TemporaryDirectory(prefix="lungcbir-dicomweb-") as download:
        sources: list[DicomwebSource] = []
        fetched: list[str] = []
        failures: list[str] = []
        for url in urls:  # fetched to a temporary folder, then read like local series
            source = DicomwebSource(url, cache_dir=Path(download) / str(len(sources)))
            series_folders, fetch_failures = source.download(study)
            for failure in fetch_failures:
                click.echo(f"failed: {failure}", err=True)
                failures.append(failure.path)
            sources.append(source)
            fetched += list(series_folders)

        def shown(path: str) -> str:  # a fetched series or file by its URL, never the temporary folder
            return next((url for source in sources if (url := source.cached_url(path))), path)

        local = [image for image in images if not is_dicomweb_url(image)] + sorted(fetched)
        inputs, unreadable = _read_inputs(local, shown)
        failures += unreadable
        if output_format == "dicom-seg":
            refused, written = _segment_to_seg(retriever, inputs, local, folder, shown)
            failures += refused
            if stow and written:
                sources[0].store([seg.path for seg in written])
                click.echo(f"stored {len(written)} SEG(s) in {sources[0].root}")
        else:
            failures += _segment_to_masks(retriever, inputs, output_format, folder, as_json, shown)
    if failures:
        sys.exit(EXIT_SOME_FAILED)


def _segment_to_masks(retriever, inputs, output_format, folder, as_json=False, name: Callable[[str], str] = _same
                      ) -> list[str]:
    from .io import READERS, reader_for_format

    failures = []
    for path, slices in inputs:
        reader = reader_for_format(slices[0].source_format)
        mask_format = output_format or reader.mask_formats[0]
        if mask_format not in reader.mask_formats:
            takes = " or ".join(r.input_description for r in READERS if mask_format in r.mask_formats)
            click.echo(f"failed: {name(path)}: {mask_format} output needs a {takes} input", err=True)
            failures.append(name(path))
            continue
        results = retriever.segment_slices(slices)
        target = reader.write_masks(path, slices, [r.mask for r in results], folder, mask_format)
        if as_json:
            for item, result in zip(slices, results):
                mask = folder / f"{item.name}_mask.png" if mask_format == "png" else target
                frame = {"slice": item.frame} if item.source_format == "nifti" else {}
                click.echo(json.dumps({"image": name(path), **frame, "mask": str(mask), **result.summary_json()}))
        else:
            counts: dict[str, int] = {}
            for result in results:
                counts[result.quality.value] = counts.get(result.quality.value, 0) + 1
            verdict = (results[0].quality.value if len(results) == 1
                       else ", ".join(f"{count} {name}" for name, count in counts.items()))
            click.echo(f"{name(path)} -> {target}  quality {verdict}")
    return failures


def _segment_to_seg(retriever, inputs, images, folder, name: Callable[[str], str] = _same
                    ) -> tuple[list[str], list]:
    """Write one SEG per series; returns the failed paths and what was written. ``name`` says
    how messages name a path (fetched series folders and files by their DICOMweb URL)."""
    from .dicom_seg import group_series

    series, refused = group_series(inputs, named=images)
    for failure in refused:
        click.echo(f"failed: {name(failure.path)}: {failure.reason}", err=True)
    failures, written_all = [name(failure.path) for failure in refused], []
    for item in series:
        try:
            written = retriever.write_dicom_seg(item.slices, folder / f"{item.name}_seg.dcm")
        except (ReadError, SegError) as error:
            click.echo(f"failed: {name(error.path)}: {error.reason}", err=True)
            failures.append(name(error.path))
            continue
        written_all.append(written)
        derived = (f", identifiers derived for {written.sources_with_derived} of {len(item.slices)} source files"
                   if written.derived else "")
        click.echo(f"{name(item.source)} -> {written.path} ({written.frames} frames{derived})")
    return failures, written_all


@main.command()
@click.option("--json", "as_json", is_flag=True)
@store_options
@friendly_errors
def stats(as_json, db_url, index_dir):
    """Show what is in the database and the index.

    \b
    Example:
      lungcbir stats --db postgresql://user@host/lungcbir
    """
    from dataclasses import asdict

    from .store import Store

    summary = Store(db_url, index_dir, create=False, read_only=True).stats()
    if as_json:
        click.echo(json.dumps(asdict(summary)))
        return
    for key, value in asdict(summary).items():
        if key == "identity":  # how the patients were found: one line per source
            value = ", ".join(f"{source} {found['patients']} patient(s) in {found['slices']} slice(s)"
                              for source, found in sorted(value.items())) or None
        if key == "regions":  # by source: marked (mask) and found by the model (lesion)
            value = ", ".join(f"{source} {count}" for source, count in sorted((value or {}).items())) or "0"
        click.echo(f"{key:>15}: {value if value is not None else '-'}")


@main.command()
@click.option("--files", "verify_files", is_flag=True, help="Also check that indexed files exist unchanged.")
@store_options
@friendly_errors
def check(verify_files, db_url, index_dir):
    """Verify that the database and the index agree (ids, count, dimension, model).

    Prints each problem; exit status 4 if there is any. An index file behind the
    database only by rows added since its last checkpoint is a note, not a problem:
    searches add those rows from the database.

    \b
    Example:
      lungcbir check --files
    """
    from .store import Store

    store = Store(db_url, index_dir, create=False, read_only=True)
    problems = store.check(verify_files)
    for note in store.notes():
        click.echo(f"note: {note}")
    for problem in problems:
        click.echo(f"problem: {problem}")
    if problems:
        click.echo(f"{len(problems)} problem(s); `lungcbir rebuild-index` repairs problems of the index, "
                   f"`lungcbir index-dataset PATH` indexes changed files again, `lungcbir remove PATH` "
                   f"forgets files that are gone, `lungcbir rebuild-regions` makes regions of another recipe "
                   f"again", err=True)
        sys.exit(4)
    click.echo("ok: database and index agree")


@main.command("rebuild-index")
@click.option("--kind", type=click.Choice(list(INDEX_KIND_REGISTRY)), default=None,
              help="Index type (remembered): " + "; ".join(f"{kind.name} = {kind.description}" for kind in
                                                          INDEX_KIND_REGISTRY.values()) + ". Default: as before.")
@click.option("--wait", is_flag=True, help="Wait for a running indexing run to finish.")
@store_options
@friendly_errors
def rebuild_index(kind, wait, db_url, index_dir):
    """Rebuild the FAISS index from the vectors stored in the database.

    \b
    Example:
      lungcbir rebuild-index --kind ivf
    """
    from .store import Store
    from .vector_index import describe_index

    store = Store(db_url, index_dir, create=False)
    with store.write_lock(wait):
        index = store.rebuild_index(kind)
    click.echo(f"rebuilt index: {index.ntotal} vectors of dimension {index.d}, {describe_index(index)}")


@main.command("rebuild-regions")
@click.option("--regions", "regions", type=click.Path(file_okay=False), metavar="MASKS",
              help="Take the marked regions from this folder of region masks (as index-dataset --regions; each "
                   "image's path relative to any folder above it) instead of those stored with the slices.")
@click.option("--no-lesion-regions", is_flag=True,
              help="Do not store the lesions the model finds as regions (stored by default).")
@indexing_run_options
@store_options
@model_options
@friendly_errors
def rebuild_regions(regions, no_lesion_regions, batch_size, quiet, wait, workers, commit_every, db_url, index_dir,
                    weights, device):
    """Make every stored slice's regions again with this model and region recipe, in place.

    For a store whose regions were made with an earlier region recipe (refused for region
    queries until then), and for slices indexed without regions (before --regions, or with
    --no-lesion-regions). The slices and their index are not touched. Each slice is read again
    from its file and must be unchanged: a file gone, unreadable or changed is a warning (its
    regions are kept if of this recipe, else removed) and exit status 1. Marked regions come
    from MASKS, else from those stored; a stopped run is finished by running it again.

    \b
    Example:
      lungcbir rebuild-regions
      lungcbir rebuild-regions --regions nodules/masks --no-lesion-regions
    """
    from tqdm import tqdm

    retriever = _retriever(db_url, index_dir, weights, device, batch_size, files_per_commit=commit_every,
                           workers=workers)
    bar = tqdm(unit="slice", disable=not _show_progress(quiet), file=sys.stderr)
    report = retriever.rebuild_regions(regions, lesion_regions=not no_lesion_regions, wait=wait,
                                       on_total=lambda total: setattr(bar, "total", total),
                                       on_slice=lambda _: bar.update())
    bar.close()
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    sources = ", ".join(f"{source} {count}" for source, count in sorted(report.regions.items()))
    aside = f"; {report.set_aside} region(s) of another recipe replaced" if report.set_aside else ""
    click.echo(f"rebuilt the regions of {report.rebuilt} of {report.slices} slice(s), {report.unreadable} "
               f"unreadable or changed: {report.stored} region(s) stored{f' ({sources})' if sources else ''}"
               f"{aside} in {report.seconds:.1f} s")
    if report.unreadable:
        sys.exit(EXIT_SOME_FAILED)


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--id", "ids", multiple=True, type=int, help="Row id to remove (repeatable).")
@click.option("--under", multiple=True, type=click.Path(), help="Remove everything below this folder.")
@click.option("--wait", is_flag=True, help="Wait for a running indexing run to finish.")
@store_options
@friendly_errors
def remove(paths, ids, under, wait, db_url, index_dir):
    """Remove images (by file PATH, --id or --under FOLDER) from the database and the index together.

    \b
    Example:
      lungcbir remove --under /archive/old-study/
    """
    from .store import Store

    if not (paths or ids or under):
        raise click.UsageError("name what to remove: PATH..., --id N or --under FOLDER")
    store = Store(db_url, index_dir, create=False)
    # a PATH that names no stored image is a mistake (a typo, another spelling): say so, exit 1
    missing = [path for path in paths if not store.ids_for([path])]
    for path in missing:
        click.echo(f"failed: {path}: not stored (nothing removed for it)", err=True)
    with store.write_lock(wait):
        removed = store.remove(store.ids_for(paths, ids, under))
    click.echo(f"removed {removed} image(s)")
    if missing:
        sys.exit(EXIT_SOME_FAILED)


@main.command()
@click.option("--images", multiple=True, required=True, type=click.Path(file_okay=False, exists=True),
              help="Folder of CT slices (repeatable, paired with --masks in order).")
@click.option("--masks", multiple=True, required=True, type=click.Path(file_okay=False, exists=True),
              help="Folder of lung masks with the same file names.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Weights file to write.")
@click.option("--epochs", default=40, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--learning-rate", default=2e-3, show_default=True)
@click.option("--val-fraction", default=0.15, show_default=True, type=click.FloatRange(0, 0.9),
              help="Share of patients/volumes held out for checkpoint choice.")
@click.option("--group-regex", default=r"^(.+?)_[kzs]_?(\d+)", show_default=True,
              help="First group = patient/volume of a file name (files without a match are their own "
                   "group); second group, if any = the slice's number in it.")
@click.option("--base-channels", default=8, show_default=True, type=click.IntRange(2, 64),
              help="Width of the first U-Net level (the rest double).")
@click.option("--contrastive", default=0.5, show_default=True, type=click.FloatRange(0),
              help="Weight of the contrastive objective that shapes the retrieval vector (0: off).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0),
              help="Processes preparing augmented views (use several with --device cuda).")
@click.option("--init", "initial_weights", metavar="W.pt|bundled",
              help="Start from trained weights (fine-tuning) instead of random ones.")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT.state.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--quiet", is_flag=True)
@friendly_errors
def train(images, masks, out, epochs, batch_size, learning_rate, val_fraction, group_regex, base_channels,
          contrastive, workers, initial_weights, seed, resume, device, quiet):
    """Train a lung U-Net on pairs of image and mask folders.

    \b
    Example:
      lungcbir train --images ct/ --masks lungs/ --images more/ct --masks more/lungs --out my.pt
      lungcbir train --images ct/ --masks lungs/ --out tuned.pt --init bundled --learning-rate 4e-4
    """
    from tqdm import tqdm

    from .train import TrainConfig, split_by_group, training_samples
    from .train import train as run_training

    if len(images) != len(masks):
        raise click.UsageError("give --images and --masks the same number of times")
    config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                         base_channels=base_channels, contrastive_weight=contrastive)
    samples = training_samples(list(zip(images, masks)), config.input_size, group_regex)
    train_set, val_set = split_by_group(samples, val_fraction, seed)
    click.echo(f"{len(train_set)} training slices, {len(val_set)} validation slices "
               f"({len({s.group for s in val_set})} held-out groups)")
    bar = tqdm(disable=not _show_progress(quiet), file=sys.stderr, unit="batch")

    def on_step(step, steps, loss):
        bar.total = steps
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.refresh()

    def on_epoch(report):
        bar.reset()
        click.echo(f"epoch {report.epoch}/{epochs}: loss {report.loss:.4f}, val Dice mean "
                   f"{report.val_dice_mean:.4f} min {report.val_dice_min:.4f}"
                   f"{'  (best, saved)' if report.best else ''}")

    run_training(train_set, val_set, out, config, device=device, resume=resume, on_epoch=on_epoch, on_step=on_step,
                 workers=workers, initial_weights=initial_weights)
    bar.close()


@main.command()
@click.option("--images", multiple=True, type=click.Path(file_okay=False, exists=True))
@click.option("--masks", multiple=True, type=click.Path(file_okay=False, exists=True))
@click.option("--held-out", is_flag=True,
              help="Use the bundled model's held-out test slices of ../shared/data, reported per dataset.")
@click.option("--postprocess/--no-postprocess", default=None,
              help="Force mask clean-up on or off (default: as saved with the weights).")
@click.option("--include-lesions/--lung-output-only", default=None,
              help="Force joining the lesion output's pixels that touch the lungs to the mask on or off "
                   "(default: as saved with the weights; see MODEL_CARD.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary and per-image scores as JSON.")
@model_options
@friendly_errors
def evaluate(images, masks, held_out, postprocess, include_lesions, as_json, weights, device):
    """Per-image Dice and IoU of the model against ground-truth masks (at the masks' resolution).

    With --held-out and a model with a lesion head, also the lesion Dice and the Spearman rho of
    predicted vs true lesion_fraction on the held-out COVID-19 patients.

    \b
    Example:
      lungcbir evaluate --images ct/ --masks lungs/
      lungcbir evaluate --held-out
    """
    import numpy as np

    from .datasets import covid_slices, kaggle_slices
    from .evaluate import evaluate_lesions, evaluate_segmentation, evaluation_groups, lesion_fractions

    if len(images) != len(masks):
        raise click.UsageError("give --images and --masks the same number of times")
    if not images and not held_out:
        raise click.UsageError("give --images DIR --masks DIR, or --held-out")
    groups = evaluation_groups(list(zip(images, masks)), held_out)
    model = _load_model(weights, device)
    if postprocess is not None:
        model.settings.postprocess = postprocess
    if include_lesions is not None:
        model.settings.include_lesions = include_lesions
    report = {}
    for name, pairs in groups.items():
        evaluation = evaluate_segmentation(model, pairs)
        report[name] = evaluation
        if as_json:
            continue
        summary = evaluation.summary()
        click.echo(f"{name}: {summary['images']} images, model {model.model_id}")
        click.echo(f"  Dice  mean {summary['dice_mean']:.4f}  median {summary['dice_median']:.4f}  "
                   f"min {summary['dice_min']:.4f}")
        click.echo(f"  IoU   mean {summary['iou_mean']:.4f}  median {summary['iou_median']:.4f}  "
                   f"min {summary['iou_min']:.4f}")
        click.echo("  worst five:")
        for score in evaluation.worst(5):
            click.echo(f"    {score.dice:.4f}  {score.path}")
    lesions = None
    if held_out and model.has_lesion_head:  # the lesion head, on the held-out COVID-19 patients
        lesions = evaluate_lesions(model, [(s.image, s.mask, s.infection) for s in covid_slices()["test"]
                                           if s.infection is not None])
        if not as_json:
            summary = lesions.summary()
            click.echo(f"covid19-ct-lungmask test lesions: {summary['images']} images "
                       f"({summary['images_with_lesions']} with lesions)")
            click.echo(f"  lesion Dice  mean {summary['dice_mean_with_lesions']:.4f} (slices with lesions)  "
                       f"median {summary['dice_median_with_lesions']:.4f}  pooled {summary['dice_pooled']:.4f}")
            click.echo(f"  lesion_fraction  Spearman rho {summary['fraction_spearman']:.4f}  "
                       f"mean abs error {summary['fraction_mean_abs_error']:.4f}")
        # the Kaggle slices are lesion-free: whatever is called lesion there is a false alarm
        clean = lesion_fractions(model, [s.image for s in kaggle_slices()["test"]])
        clean_summary = {"images": len(clean), "median": float(np.median(clean)), "mean": float(clean.mean()),
                         "max": float(clean.max())}
        if not as_json:
            click.echo(f"kaggle-lungs-2d test (lesion-free): predicted lesion_fraction median "
                       f"{clean_summary['median']:.4f}  mean {clean_summary['mean']:.4f}  "
                       f"max {clean_summary['max']:.4f}")
    if as_json:
        answer = {name: {"summary": e.summary(), "images": [vars(s) for s in e.scores]}
                  for name, e in report.items()}
        if lesions is not None:
            answer["covid19-ct-lungmask test lesions"] = {"summary": lesions.summary(),
                                                          "images": [vars(s) for s in lesions.scores]}
            answer["kaggle-lungs-2d test lesion-free"] = {"summary": clean_summary}
        click.echo(json.dumps(answer))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (localhost only by default; any other needs a token or --insecure).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--token-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the access token (chmod 600); else env LUNGCBIR_TOKEN. Clients send "
                   "'Authorization: Bearer <token>'; the page asks for it once.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Host header name clients use to reach the server (repeatable; default: localhost, "
                   "127.0.0.1, ::1 and --host). Other names get 400.")
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without a token.")
@click.option("--max-decodes", default=WebSettings.max_decodes, show_default=True, type=click.IntRange(1, 64),
              help="Uploads decoded at the same time (each may take hundreds of MB while decoded).")
@click.option("--archive", "archive_url", metavar="URL",
              help="A DICOMweb root the page may fetch a query series from: /?study=UID&series=UID, a viewer's "
                   "launch link (credentials from LUNGCBIR_DICOMWEB_*).")
@click.option("--viewer-url", metavar="TEMPLATE",
              help="Link each result to the site's viewer, e.g. "
                   "'https://pacs.example.org/ohif/viewer?StudyInstanceUIDs={study_uid}' "
                   "(also {series_uid}, {sop_uid}, {patient_id}).")
@click.option("--header-timeout", default=WebSettings.header_seconds, show_default=True,
              type=click.FloatRange(0, min_open=True), metavar="SECONDS",
              help="Time a client has to send a request's headers; then 408 and the connection is closed.")
@click.option("--body-timeout", default=WebSettings.body_seconds, show_default=True,
              type=click.FloatRange(0, min_open=True), metavar="SECONDS",
              help="Time in all the server waits for a request's body (an upload); then 408.")
@store_options
@model_options
@friendly_errors
def serve(host, port, token_file, allowed_hosts, insecure, max_decodes, archive_url, viewer_url, header_timeout,
          body_timeout, db_url, index_dir, weights, device):
    """Serve the web page and the REST API (OpenAPI docs at /docs).

    Without a token the server listens on loopback addresses only; see docs/deployment.md,
    "Exposing the server securely".

    \b
    Example:
      lungcbir serve --port 8000    # then open http://127.0.0.1:8000
      lungcbir serve --host 0.0.0.0 --token-file /etc/lungcbir/token --allowed-host cbir.example.org
    """
    import uvicorn

    from .web import create_app

    token = load_token(token_file)
    check_exposure(host, token, insecure)
    warning = token_file_warning(token_file)
    if warning:
        click.echo(warning, err=True)
    if token is None and insecure and not is_loopback(host):
        click.echo(f"warning: serving on {host} without authentication (--insecure)", err=True)
    settings = WebSettings(token=token, allowed_hosts=default_allowed_hosts(host, allowed_hosts),
                           max_decodes=max_decodes, header_seconds=header_timeout, body_seconds=body_timeout,
                           viewer_url=check_viewer_template(viewer_url) if viewer_url else None,
                           archive_url=archive_url)
    retriever = _retriever(db_url, index_dir, weights, device)
    retriever.model  # load once before the first request, and fail early on bad weights
    retriever.store(create=False, read_only=False)  # saves its index folder when it catches up
    uvicorn.run(create_app(retriever, settings), host=host, port=port, log_level="info", server_header=False,
                http=SlowClientProtocol.with_deadline(settings.header_seconds), timeout_keep_alive=KEEP_ALIVE_SECONDS)


@main.command("evaluate-retrieval")
@click.option("--data", type=click.Path(file_okay=False, exists=True),
              help="Shared data folder (default ../shared/data).")
@click.option("--segmentation-only", type=click.Path(dir_okay=False, exists=True),
              help="Weights of a segmentation-only U-Net, shown as a baseline column.")
@click.option("--variants", is_flag=True, help="Also show pooling alternatives.")
@click.option("--split", "split_name", type=click.Choice(["report", "choice"]), default="report", show_default=True,
              help="Patients of the per-focus table: choose on 'choice', report 'report'.")
@click.option("--baseline", "baselines", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Weights of another model, a column of the per-focus table (repeatable).")
@click.option("--json", "as_json", is_flag=True)
@model_options
@friendly_errors
def evaluate_retrieval(data, segmentation_only, variants, split_name, baselines, as_json, weights, device):
    """Retrieval quality on the shared data (anatomical level, infection, diagnosis, contrast),
    then per search focus on one half of the choice / report split by patient (the mixed store
    with normal patients, infection burden).

    Every number is shown with its chance level; the query's own patient is always excluded.

    \b
    Example:
      lungcbir evaluate-retrieval --data ../shared/data --split report
    """
    from pathlib import Path

    from .research.retrieval_benchmark import SPLITS, focus_comparison, format_table, standard_comparison

    model = _load_model(weights, device)
    baseline = _load_model(segmentation_only, device) if segmentation_only else None
    root = Path(data) if data else None
    count, measures = standard_comparison(model, baseline, variants, root)
    others = {"seg-only U-Net": baseline} if baseline else {}
    others.update({Path(path).stem: _load_model(path, device) for path in baselines})
    focus = focus_comparison(model, SPLITS[split_name], others, root)
    if as_json:
        click.echo(json.dumps({"measures": [vars(m) for m in measures], "focus": [vars(m) for m in focus]}))
    else:
        click.echo(f"{count} slices of ../shared/data; own patient excluded from every query")
        click.echo(format_table(measures))
        click.echo(f"\nper search focus, {split_name} split (mixed store: normal patients included)")
        click.echo(format_table(focus))


@main.command("make-phantom")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--slices", default=12, show_default=True, type=click.IntRange(2, 500))
@click.option("--patients", default=2, show_default=True, type=click.IntRange(1, 100))
@friendly_errors
def make_phantom(out, slices, patients):
    """Write SYNTHETIC chest CT phantom series (DICOM + PNG + masks) to OUT, for trying things out.

    \b
    Example:
      lungcbir make-phantom sample/ --slices 12 --patients 2
    """
    from .phantom import write_phantom

    _ensure_folder(out)
    for folder in write_phantom(out, slices, patients=patients):
        click.echo(f"wrote {folder}")
    click.echo(f"synthetic data (not patient data) in {out}: dicom/, png/, masks/")


def run() -> None:
    """The ``lungcbir`` program: the command line, in a process of its own.

    As the owner of its process it quiets what the libraries print about broken files, which
    the command line reports in one line each: C decoders' stderr goes through a filter
    (:mod:`lungcbir.stderr_filter`) and Python warnings are off (reader processes turn them
    off themselves). ``main`` itself, as tests and embedders call it, changes nothing of the
    process.
    """
    import warnings

    from .stderr_filter import install

    install()
    warnings.simplefilter("ignore")
    main()


if __name__ == "__main__":
    run()
