"""Scale-out on Ray (Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications", OSDI
2018): batch scoring of many images and fitting many product models, locally or on a cluster.

* :func:`batch_predict`: the input images are cut into fixed chunks; Ray Data maps the chunks over a
  pool of actors that each load the model once (``map_batches`` with a callable class); every actor
  writes each finished chunk as one Parquet part file, atomically (temporary name, then rename), into
  the output folder, which is a Parquet dataset (``pyarrow.parquet.read_table(OUT)``). A re-run skips
  the chunks whose part exists, so an interrupted job resumes without duplicates or gaps. A manifest
  pins the model and the input list: a re-run with another model or other inputs is refused.
* :func:`fit_many`: one Ray task per category folder, each fitting and saving a model.

Without ``address``, a local Ray instance is started on this machine (and stopped afterwards); with
``address`` (``"auto"``, ``"ray://head:10001"`` ...), the job runs on that cluster, whose workers must
see the same model and image paths (a shared file system).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .atomic import write_bytes, write_text
from .errors import AnomalensError, ConfigError, DatasetError

SCHEMA_FIELDS = ("path", "pred_score", "normalized_score", "pred_label", "p_value", "p_value_at_floor", "anomalous_area_pct", "n_regions", "error")


def _init_ray(address: str | None, workers: int):
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=max(workers, 1), **kwargs)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
    return True


class _ChunkScorer:
    """Ray actor: loads the model once, scores chunks, writes each chunk's Parquet part atomically."""

    def __init__(self, model_dir: str, engine: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        from .runtime import load_inference_model

        self.model = load_inference_model(model_dir, engine, threads=max(1, threads))

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq

        done, errors = [], []
        for paths_json, part in zip(batch["paths"], batch["part"]):
            paths = json.loads(paths_json)
            rows = {k: [] for k in SCHEMA_FIELDS}
            for p in self.model.predict(paths):
                s = p.summary()
                for k in SCHEMA_FIELDS:
                    rows[k].append(s.get(k) if k != "path" else s["path"])
            table = pa.table(
                {
                    "path": pa.array(rows["path"], pa.string()),
                    "pred_score": pa.array(rows["pred_score"], pa.float64()),
                    "normalized_score": pa.array(rows["normalized_score"], pa.float64()),
                    "pred_label": pa.array(rows["pred_label"], pa.int8()),
                    "p_value": pa.array(rows["p_value"], pa.float64()),
                    "p_value_at_floor": pa.array(rows["p_value_at_floor"], pa.bool_()),
                    "anomalous_area_pct": pa.array(rows["anomalous_area_pct"], pa.float64()),
                    "n_regions": pa.array(rows["n_regions"], pa.int32()),
                    "error": pa.array(rows["error"], pa.string()),
                }
            )
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf)
            # atomic: a part is either complete or absent (its temporary ".part-*.tmp": Parquet readers skip ".")
            write_bytes(part, buf.getvalue().to_pybytes())
            done.append(len(paths))
            errors.append(sum(e is not None for e in rows["error"]))
        return {"part": list(batch["part"]), "n": done, "errors": errors}


@dataclass
class BatchSummary:
    """What :func:`batch_predict` did.

    Attributes:
        n_images: images in the input. n_chunks: chunks in all. n_skipped: chunks already written.
        n_errors: error rows written by this run. seconds: wall time, Ray start-up included.
        images_per_second: of this run, start-up included. steady_images_per_second: after the first
        part arrived (actors up, model loaded).
    """

    out: Path
    n_images: int
    n_chunks: int
    n_skipped: int
    n_scored: int = 0
    n_errors: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    steady_images_per_second: float = 0.0
    workers: int = 1


def _chunks(paths: Sequence[str], size: int) -> list[list[str]]:
    return [list(paths[i : i + size]) for i in range(0, len(paths), size)]


def batch_predict(
    model_dir: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    address: str | None = None,
    workers: int = 2,
    chunk_size: int = 16,
    engine: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> BatchSummary:
    """Score every image of ``inputs`` on Ray; one Parquet row per image in the dataset folder ``out``.

    Args:
        model_dir: a fitted model directory (readable by every Ray worker).
        inputs: image files and/or folders (searched recursively), or text files listing one path a line
            (``.txt``).
        out: output Parquet dataset folder (created; parts ``part-NNNNN-HASH.parquet``).
        address: Ray cluster address; None starts a local instance with ``workers`` CPUs.
        workers: scoring actors (each loads the model once and uses one CPU thread).
        chunk_size: images per part file (the unit of resumption).
        engine: ``"auto"`` (default), ``"onnxruntime"`` or ``"torch"`` (:func:`anomalens.load_detector`):
            under ``"auto"`` each worker runs the detector's graph on ONNX Runtime (exported into the
            model folder once, by this process, before the workers start), with evidence.
        progress: ``progress(images done, images in all)``.

    Returns:
        A :class:`BatchSummary`.

    Raises:
        DatasetError: no input images. AnomalensError: ``out`` holds the results of another model or
        another input list. ModelFileError: the model cannot be loaded. ConfigError: an unknown
        engine (``"onnx"`` included: say ``"onnxruntime"``), or a video or MuSc model.
    """
    from .contract import check_engine
    from .data import expand_inputs
    from .serialization import read_config

    check_engine(engine)

    paths: list[str] = []
    listed: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file() and p.suffix.lower() == ".txt":
            paths.extend(line.strip() for line in p.read_text().splitlines() if line.strip())
        else:
            listed.append(p)
    if listed:
        paths.extend(str(p) for p in expand_inputs(listed))
    if not paths:
        raise DatasetError("no input images")
    cfg = read_config(model_dir)  # fails early on a bad model directory
    if cfg.get("detector") in ("musc", "video"):
        raise ConfigError(f"{model_dir} is a {cfg['detector']} model: batch-predict scores images one chunk at a time "
                          f"({'use anomalens video predict' if cfg['detector'] == 'video' else 'MuSc scores a whole batch together: use anomalens predict'})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    manifest = {"model_config_sha256": cfg["config_sha256"], "inputs_sha256": digest, "n_images": len(paths), "chunk_size": chunk_size}
    mpath = out / "_manifest.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if old != manifest:
            raise AnomalensError(
                f"{out} holds results of another run (model, inputs or chunk size differ): use a new output folder"
            )
    else:
        write_text(mpath, json.dumps(manifest, indent=2))
    for pattern in (".part-*.tmp", "_tmp-*"):  # half-written parts of an interrupted run ("_tmp-*": older versions)
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)
    chunks = _chunks(paths, chunk_size)
    todo = []
    for k, chunk in enumerate(chunks):
        tag = hashlib.sha256("\n".join(chunk).encode()).hexdigest()[:10]
        part = out / f"part-{k:05d}-{tag}.parquet"
        if not part.exists():
            todo.append({"paths": json.dumps(chunk), "part": str(part)})
    summary = BatchSummary(out, len(paths), len(chunks), len(chunks) - len(todo), workers=workers)
    done_images = sum(len(c) for c in chunks) - sum(len(json.loads(t["paths"])) for t in todo)
    if progress:
        progress(done_images, len(paths))
    if not todo:
        return summary
    from .runtime import load_inference_model

    load_inference_model(model_dir, engine)  # export once here (when needed), not in every actor at once
    import ray
    import ray.data

    t0 = time.perf_counter()
    started = _init_ray(address, workers)
    try:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        scored = ds.map_batches(
            _ChunkScorer,
            fn_constructor_kwargs={"model_dir": str(Path(model_dir).absolute()), "engine": engine, "threads": 1},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),  # a fixed pool (``concurrency=`` is deprecated)
            num_cpus=1,
        )
        t_first, n_first = None, 0
        for row in scored.iter_rows():
            if t_first is None:  # steady state starts once the actors are up and the first part is in
                t_first, n_first = time.perf_counter(), int(row["n"])
            summary.n_scored += int(row["n"])
            summary.n_errors += int(row["errors"])
            done_images += int(row["n"])
            if progress:
                progress(done_images, len(paths))
    finally:
        if started:
            ray.shutdown()
    t_end = time.perf_counter()
    summary.seconds = t_end - t0
    summary.images_per_second = summary.n_scored / summary.seconds if summary.seconds else 0.0
    if t_first is not None and summary.n_scored > n_first and t_end > t_first:
        summary.steady_images_per_second = (summary.n_scored - n_first) / (t_end - t_first)
    return summary


@dataclass
class FitResult:
    """One model of :func:`fit_many`: category, model directory, images, seconds, threshold, or error."""

    category: str
    model_dir: str
    n_images: int = 0
    seconds: float = 0.0
    threshold: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


def _fit_one(category_dir: str, model_dir: str, detector: str, params: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    from .detectors import create_detector

    t0 = time.perf_counter()
    try:
        det = create_detector(detector, **params).fit(category_dir)
        det.save(model_dir)
        return {"n_images": det.fit_info["n_train_images"], "seconds": time.perf_counter() - t0, "threshold": det.threshold}
    except AnomalensError as exc:
        return {"error": str(exc), "seconds": time.perf_counter() - t0}


def category_folders(root: str | os.PathLike) -> list[Path]:
    """Sub-folders of ``root`` that are MVTec AD categories (``train/good``) or hold images directly.

    Raises:
        DatasetError: ``root`` is not a folder or has no such sub-folder.
    """
    from .data import is_mvtec_category, list_images

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if is_mvtec_category(d):
            found.append(d)
            continue
        try:
            if list_images(d):
                found.append(d)
        except DatasetError:
            continue
    if not found:
        raise DatasetError(f"{root} has no category folder (MVTec layout train/good, or a folder of images)")
    return found


def fit_many(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    detector: str = "patchcore",
    params: dict | None = None,
    address: str | None = None,
    workers: int = 2,
    progress: Callable[[FitResult, int, int], None] | None = None,
) -> list[FitResult]:
    """Fit one model per category folder of ``root`` in parallel on Ray; models go to ``out/<category>``.

    A category that fails (too few images for the false-alarm rate, an unreadable image...) gets a
    :class:`FitResult` with ``error``; the others still finish.

    Raises:
        DatasetError: ``root`` has no category folder.
    """
    import ray

    cats = category_folders(root)
    out = Path(out)
    started = _init_ray(address, workers)
    results: list[FitResult] = []
    try:
        remote = ray.remote(num_cpus=1)(_fit_one)
        pending = {
            remote.remote(str(c.absolute()), str((out / c.name).absolute()), detector, params or {}): c for c in cats
        }
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            c = pending.pop(ready[0])
            r = ray.get(ready[0])
            res = FitResult(c.name, str(out / c.name), **r)
            results.append(res)
            if progress:
                progress(res, len(results), len(cats))
    finally:
        if started:
            ray.shutdown()
    return sorted(results, key=lambda r: r.category)
