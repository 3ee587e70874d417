"""The ``lungcbir`` command: parses arguments, calls the Python API, formats the answers.

Exit status (every command):

* 0: success;
* 1: some input files could not be read (they are listed; everything else was done);
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
from pathlib import Path

import click

from .errors import LungCBIRError, ReadError
from .store import DEFAULT_DB_URL, DEFAULT_INDEX_DIR

EXIT_SOME_FAILED = 1
EXIT_INTERRUPTED = 130


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


def store_options(command):
    command = click.option("--index-dir", envvar="LUNGCBIR_INDEX_DIR", default=DEFAULT_INDEX_DIR,
                           show_default=True, help="Folder of the FAISS index (env LUNGCBIR_INDEX_DIR).")(command)
    command = click.option("--db", "db_url", envvar="LUNGCBIR_DB", default=DEFAULT_DB_URL, show_default=True,
                           help="SQLAlchemy database URL (env LUNGCBIR_DB).")(command)
    return command


def model_options(command):
    command = click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)(command)
    command = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                           help="Model weights file (default: the bundled model).")(command)
    return command


def _retriever(db_url=DEFAULT_DB_URL, index_dir=DEFAULT_INDEX_DIR, weights=None, device="cpu", batch_size=16,
               **options):
    from .retrieval import Retriever

    return Retriever(db_url=db_url, index_dir=index_dir, weights=weights, device=device, batch_size=batch_size,
                     **options)


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
def main() -> None:
    """Lung CT image retrieval: segment lungs with a U-Net and find similar stored slices.

    \b
    Example:
      lungcbir make-phantom sample/
      lungcbir index-dataset sample/dicom
      lungcbir query sample/png/phantom01/phantom01_s005.png --k 3
    """


@main.command("index-dataset")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--labels", type=click.Path(dir_okay=False), help="CSV with a 'path' column plus label columns.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out matching files or folders (repeatable).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--wait", is_flag=True, help="Wait for another indexing run on the same index instead of failing.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Processes that read and decode files while the model runs.")
@click.option("--commit-every", default=64, show_default=True, type=click.IntRange(1),
              help="Slices per database transaction; a killed run loses at most this many.")
@store_options
@model_options
@friendly_errors
def index_dataset(paths, labels, exclude, batch_size, quiet, wait, workers, commit_every, db_url, index_dir,
                  weights, device):
    """Index every CT image under PATHS (folders are walked recursively).

    Files already indexed (same SHA-256) are skipped; unreadable files are reported and
    indexing goes on. Exit status 1 when some files failed (the rest is stored).

    \b
    Example:
      lungcbir index-dataset ../shared/data/kaggle-lungs-2d/images --labels labels.csv
    """
    from tqdm import tqdm

    retriever = _retriever(db_url, index_dir, weights, device, batch_size, files_per_commit=commit_every,
                           workers=workers)
    bar = tqdm(unit="file", disable=not _show_progress(quiet), file=sys.stderr)
    report = retriever.index_dataset(paths, labels=labels, exclude=exclude, wait=wait,
                                     on_total=lambda total: setattr(bar, "total", total),
                                     on_file=lambda _: bar.update())
    bar.close()
    for failure in report.failures:
        click.echo(f"failed: {failure.path}: {failure.reason}", err=True)
    rate = report.indexed / report.seconds if report.seconds else 0.0
    click.echo(f"indexed {report.indexed}, skipped {report.skipped} (already indexed), "
               f"failed {report.failed} in {report.seconds:.1f} s ({rate:.1f} slices/s)")
    if report.failures:
        sys.exit(EXIT_SOME_FAILED)


def parse_where(pairs) -> dict[str, str]:
    filters = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--where")
        filters[key.strip()] = value.strip()
    return filters


def _read_inputs(paths):
    """Read query/segment inputs; yields (path, slices) and collects failures."""
    from .io import find_image_files, read_file

    failures = []
    files = list(find_image_files(paths))
    if not files:
        raise LungCBIRError(f"no images found in {', '.join(paths)}")
    readable = []
    for path in files:
        try:
            readable.append((path, read_file(path)))
        except ReadError as error:
            click.echo(f"failed: {error}", err=True)
            failures.append(path)
    return readable, failures


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--k", default=5, show_default=True, type=click.IntRange(1, 1000), help="Neighbours per query.")
@click.option("--out", default="lungcbir-output", show_default=True, type=click.Path(file_okay=False),
              help="Folder for <name>_mask.png and <name>_overlay.png.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query slice, one per line.")
@click.option("--where", multiple=True, metavar="KEY=VALUE",
              help="Only stored slices whose label or metadata KEY equals VALUE (repeatable).")
@click.option("--per-patient", default=1, show_default=True, type=click.IntRange(0),
              help="At most this many results per patient/series (0: no limit), so results are different cases.")
@click.option("--by-series", is_flag=True,
              help="Treat each IMAGE (a DICOM series folder or a NIfTI volume) as one case and rank stored cases.")
@store_options
@model_options
@friendly_errors
def query(images, k, out, as_json, where, per_patient, by_series, db_url, index_dir, weights, device):
    """Find the K stored slices most similar to each query IMAGE.

    Writes the lung mask (0/255, the image's own size), an overlay of the lung contour and a
    strip of the query beside its neighbours (<name>_matches.png) for each query to --out,
    then prints the neighbours.

    \b
    Example:
      lungcbir query scan.dcm --k 5 --out results/ --json
    """
    from .visualize import mask_png, match_strip, overlay, write_png

    filters = parse_where(where)
    retriever = _retriever(db_url, index_dir, weights, device)
    if by_series:
        _query_series(retriever, images, k, filters, as_json)
        return
    folder = _ensure_folder(out)
    inputs, failures = _read_inputs(images)
    for path, slices in inputs:
        for result in retriever.query_slices(slices, k, filters, per_patient):
            name = result.query.name
            mask_path, overlay_path = folder / f"{name}_mask.png", folder / f"{name}_overlay.png"
            write_png(str(mask_path), mask_png(result.mask))
            query_overlay = overlay(result.query, result.mask)
            write_png(str(overlay_path), query_overlay)
            matches_path = folder / f"{name}_matches.png"
            write_png(str(matches_path), match_strip(query_overlay, _neighbor_pictures(retriever, result)))
            if as_json:
                click.echo(json.dumps({
                    "query": path, "mask": str(mask_path), "overlay": str(overlay_path),
                    "matches": str(matches_path), **result.summary_json(),
                    "neighbors": [n.to_json() for n in result.neighbors]}))
            else:
                click.echo(f"{path}  lung fraction {result.lung_fraction:.3f}  quality {result.quality.value} "
                           f"({result.quality_score:.2f})  mask {mask_path}")
                if result.warning:
                    click.echo(f"  warning: {result.warning}")
                    continue
                click.echo(f"  {'rank':>4}  {'score':>6}  {'patient/series/slice':<32}  path  labels")
                for n in result.neighbors:
                    where = "/".join(str(v) if v is not None else "-" for v in
                                     (n.patient_id, (n.series_uid or "")[-12:] or None, n.slice_index))
                    labels = ", ".join(f"{key}={value}" for key, value in n.labels.items())
                    click.echo(f"  {n.rank:>4}  {n.score:6.3f}  {where:<32}  {n.path}  {labels}")
    if failures:
        sys.exit(EXIT_SOME_FAILED)


def _neighbor_pictures(retriever, result) -> list:
    """Overlays of the neighbours (their own masks) captioned with rank and score."""
    from .visualize import overlay

    found = []
    for neighbor in result.neighbors:
        try:
            found.append((neighbor, retriever.stored_slice(neighbor.id)))
        except LungCBIRError:
            continue  # the stored file is gone; the table still lists it
    segmentations = retriever.segment_slices([item for _, item in found])  # one batched model call
    return [(overlay(item, segmentation.mask), f"#{neighbor.rank}  {neighbor.score:.3f}")
            for (neighbor, item), segmentation in zip(found, segmentations)]


def _query_series(retriever, inputs, k, filters, as_json):
    from .io import dicom_series_positions

    for source in inputs:
        readable, failures = _read_inputs([source])
        slices = [item for _, items in readable for item in items]
        positions = dicom_series_positions([path for path, _ in readable])
        slices.sort(key=lambda item: (positions.get(item.path, 0), item.frame))
        matches = retriever.query_series(slices, k, filters)
        if as_json:
            click.echo(json.dumps({"query": source, "slices": len(slices), "cases": [
                {"rank": m.rank, "case": m.case, "patient_id": m.patient_id, "series_uid": m.series_uid,
                 "score": round(m.score, 6),
                 "pairs": [{"query_slice": q, "id": n.id, "path": n.path, "slice_index": n.slice_index,
                            "score": round(n.score, 6)} for q, n in m.pairs]} for m in matches]}))
            continue
        click.echo(f"{source}: {len(slices)} slices")
        for m in matches:
            click.echo(f"  {m.rank:>3}  {m.score:6.3f}  {m.case}")
            for q, n in m.pairs:
                click.echo(f"         query slice {q} ~ {n.path} (slice {n.slice_index}, {n.score:.3f})")
        if failures:
            sys.exit(EXIT_SOME_FAILED)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the masks.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per input image (per slice of a NIfTI volume), one per line.")
@model_options
@friendly_errors
def segment(images, out, batch_size, as_json, weights, device):
    """Write lung masks for each IMAGE: PNG (0/255) for 2-D images, NIfTI for NIfTI volumes.

    Each mask comes with a quality verdict: ok, doubtful (check the mask by eye) or no-lungs
    (not a CT slice, or no lungs in view). With --json, one object per 2-D image, and one per
    slice of a NIfTI volume (all naming the volume's one mask file, with "slice": its index).

    \b
    Example:
      lungcbir segment slice.tif volume.nii.gz --out masks/ --json
    """
    import numpy as np

    from .visualize import mask_png, write_png

    retriever = _retriever(weights=weights, device=device, batch_size=batch_size)
    folder = _ensure_folder(out)
    inputs, failures = _read_inputs(images)
    for path, slices in inputs:
        results = retriever.segment_slices(slices)
        if slices[0].source_format == "nifti":
            import nibabel

            source = nibabel.load(path)
            volume = np.stack([r.mask.T for r in results], axis=2).astype(np.uint8)
            target = folder / f"{slices[0].name.rsplit('_z', 1)[0]}_mask.nii.gz"
            nibabel.save(nibabel.Nifti1Image(volume, source.affine), str(target))
            if as_json:
                for item, result in zip(slices, results):
                    click.echo(json.dumps({"image": path, "slice": item.frame, "mask": str(target),
                                           **result.summary_json()}))
        else:
            target = folder / f"{slices[0].name}_mask.png"
            write_png(str(target), mask_png(results[0].mask))
            if as_json:
                click.echo(json.dumps({"image": path, "mask": str(target), **results[0].summary_json()}))
        if not as_json:
            counts = {}
            for result in results:
                counts[result.quality.value] = counts.get(result.quality.value, 0) + 1
            verdict = (results[0].quality.value if len(results) == 1
                       else ", ".join(f"{count} {name}" for name, count in counts.items()))
            click.echo(f"{path} -> {target}  quality {verdict}")
    if failures:
        sys.exit(EXIT_SOME_FAILED)


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

    summary = Store(db_url, index_dir, create=False).stats()
    if as_json:
        click.echo(json.dumps(asdict(summary)))
        return
    for key, value in asdict(summary).items():
        click.echo(f"{key:>15}: {value if value is not None else '-'}")


@main.command()
@click.option("--files", "verify_files", is_flag=True, help="Also check that indexed files exist unchanged.")
@store_options
@friendly_errors
def check(verify_files, db_url, index_dir):
    """Verify that the database and the index agree (ids, count, dimension, model).

    Prints each problem; exit status 4 if there is any.

    \b
    Example:
      lungcbir check --files
    """
    from .store import Store

    problems = Store(db_url, index_dir, create=False).check(verify_files)
    for problem in problems:
        click.echo(f"problem: {problem}")
    if problems:
        click.echo(f"{len(problems)} problem(s); `lungcbir rebuild-index` repairs index problems", err=True)
        sys.exit(4)
    click.echo("ok: database and index agree")


@main.command("rebuild-index")
@click.option("--kind", type=click.Choice(["auto", "flat", "ivf", "hnsw"]), default=None,
              help="Index type (remembered): auto = exact below 100k vectors, IVF (float16) above. Default: as before.")
@click.option("--wait", is_flag=True, help="Wait for a running indexing run to finish.")
@store_options
@friendly_errors
def rebuild_index(kind, wait, db_url, index_dir):
    """Rebuild the FAISS index from the vectors stored in the database.

    \b
    Example:
      lungcbir rebuild-index --kind ivf
    """
    from .store import Store, describe_index

    store = Store(db_url, index_dir, create=False)
    with store.write_lock(wait):
        index = store.rebuild_index(kind)
    click.echo(f"rebuilt index: {index.ntotal} vectors of dimension {index.d}, {describe_index(index)}")


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
    with store.write_lock(wait):
        removed = store.remove(store.ids_for(paths, ids, under))
    click.echo(f"removed {removed} image(s)")


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

    from .train import TrainConfig, group_of, load_sample, pair_folders, position_of, split_by_group
    from .train import train as run_training

    if len(images) != len(masks):
        raise click.UsageError("give --images and --masks the same number of times")
    config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                         base_channels=base_channels, contrastive_weight=contrastive)
    samples = []
    for image_dir, mask_dir in zip(images, masks):
        for image, mask in pair_folders(image_dir, mask_dir):
            group = group_of(image, group_regex)
            samples.append(dataclasses.replace(load_sample(image, mask, config.input_size, group), series=group,
                                               position=position_of(image, group_regex)))
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
@click.option("--json", "as_json", is_flag=True, help="Print the summary and per-image scores as JSON.")
@model_options
@friendly_errors
def evaluate(images, masks, held_out, postprocess, as_json, weights, device):
    """Per-image Dice and IoU of the model against ground-truth masks (at the masks' resolution).

    \b
    Example:
      lungcbir evaluate --images ct/ --masks lungs/
      lungcbir evaluate --held-out
    """
    from .datasets import covid_slices, kaggle_slices
    from .evaluate import evaluate_segmentation
    from .inference import LungModel
    from .train import pair_folders

    if len(images) != len(masks):
        raise click.UsageError("give --images and --masks the same number of times")
    if not images and not held_out:
        raise click.UsageError("give --images DIR --masks DIR, or --held-out")
    groups = {}
    if images:
        groups["given folders"] = [pair for image_dir, mask_dir in zip(images, masks)
                                   for pair in pair_folders(image_dir, mask_dir)]
    if held_out:
        groups["kaggle-lungs-2d test"] = [(s.image, s.mask) for s in kaggle_slices()["test"]]
        groups["covid19-ct-lungmask test"] = [(s.image, s.mask) for s in covid_slices()["test"]]
    model = LungModel.load(weights, device)
    if postprocess is not None:
        model.settings.postprocess = postprocess
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
    if as_json:
        click.echo(json.dumps({name: {"summary": e.summary(), "images": [vars(s) for s in e.scores]}
                               for name, e in report.items()}))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (localhost only by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@store_options
@model_options
@friendly_errors
def serve(host, port, db_url, index_dir, weights, device):
    """Serve the web page and the REST API (OpenAPI docs at /docs).

    \b
    Example:
      lungcbir serve --port 8000    # then open http://127.0.0.1:8000
    """
    import uvicorn

    from .web import create_app

    retriever = _retriever(db_url, index_dir, weights, device)
    retriever.model  # load once before the first request, and fail early on bad weights
    retriever.store(create=False)
    uvicorn.run(create_app(retriever), host=host, port=port, log_level="info")


@main.command("evaluate-retrieval")
@click.option("--data", type=click.Path(file_okay=False, exists=True), help="Shared data folder (default ../shared/data).")
@click.option("--segmentation-only", type=click.Path(dir_okay=False, exists=True),
              help="Weights of a segmentation-only U-Net, shown as a baseline column.")
@click.option("--variants", is_flag=True, help="Also show pooling alternatives.")
@click.option("--json", "as_json", is_flag=True)
@model_options
@friendly_errors
def evaluate_retrieval(data, segmentation_only, variants, as_json, weights, device):
    """Retrieval quality on the shared data (anatomical level, infection, diagnosis, contrast).

    Every number is shown with its chance level; the query's own patient is always excluded.

    \b
    Example:
      lungcbir evaluate-retrieval --data ../shared/data
    """
    from pathlib import Path

    from .evaluate_retrieval import format_table, standard_comparison
    from .inference import LungModel

    model = LungModel.load(weights, device)
    baseline = LungModel.load(segmentation_only, device) if segmentation_only else None
    count, measures = standard_comparison(model, baseline, variants, Path(data) if data else None)
    if as_json:
        click.echo(json.dumps([vars(m) for m in measures]))
    else:
        click.echo(f"{count} slices of ../shared/data; own patient excluded from every query")
        click.echo(format_table(measures))


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


if __name__ == "__main__":
    main()
