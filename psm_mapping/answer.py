"""The answers of a built store: maps and month x hour cubes, written as the config asks.

The builder (:mod:`psm_mapping.run`: region -> store) hands its filled store here; ``psm-map
query STORE`` opens one through the session (:func:`map_from_store`). Both go through the views
over the engine: :func:`psm_mapping.query.answer_maps` (in memory when small, else streamed
window by window) and :func:`psm_mapping.cube.answer_cube` (tile by tile, streamed past memory).
"""
from __future__ import annotations

import time

from .embed import MetadataOptions
from .outcome import MapRun, fault_message
from .store import FAULT, EmbeddingStore


def check_answer(cfg, model_config, md: MetadataOptions, zooms: int | None = None) -> None:
    """The answer's early refusals, before the store or any output is touched (a cube the model
    cannot make, too many COG bands, the cube's output names taken)."""
    if cfg.is_cube:
        from .cube import check_cube_run

        check_cube_run(cfg, model_config, md, zooms=zooms)


def answer_store(store: EmbeddingStore, queries, model, md: MetadataOptions, cfg, grid_or_store, tags: dict,
                 region=None) -> tuple[dict, float, object]:
    """Compute and write what ``cfg`` asks of ``store``: a map (``cfg.out``, its STAC and previews)
    or a cube. ``grid_or_store``: a grid (its mask: NaN outside the region) or the store. Returns
    (outputs, the clock when the answer was computed, the maps or the cube)."""
    if cfg.is_cube:
        from .cube import answer_cube

        outputs, cube, t = answer_cube(store, queries, model, md, cfg, grid_or_store, tags, region)
        return outputs, t, cube
    from .outputs import build_map_result, write_outputs
    from .query import answer_maps

    # in memory when small, else streamed window by window into the writers (bounded memory)
    maps = answer_maps(store, queries, model=model, metadata=md)
    t = time.perf_counter()
    result = build_map_result(maps, grid_or_store, tags, region, score=cfg.score)
    outputs = write_outputs(result, cfg.out, fmt=cfg.format, previews=cfg.previews, overwrite=cfg.overwrite,
                            progress=cfg.progress)
    return outputs, t, maps


def map_from_store(store_url: str, cfg, log_fn=print) -> MapRun:
    """Maps (or a cube) from an existing store: no imagery and no image inference, only the
    query pass, through :func:`psm_mapping.session.open_session`."""
    from .checks import _check_output
    from .config import check_hour, check_month
    from .offline import set_offline
    from .session import metadata_tags, open_session

    t0 = time.perf_counter()
    cfg.check_output_name()
    cfg.month, cfg.hour = check_month(cfg.month), check_hour(cfg.hour)
    cfg.check_time()
    if cfg.offline:
        set_offline()
    store = EmbeddingStore.open(store_url, storage_options=cfg.store_options or None)
    _check_output(cfg.out, cfg.overwrite, cfg.previews)
    session = open_session(store_url, cfg.checkpoint, encoders=("text", "audio") if cfg.audio else ("text",),
                           clap_config=cfg.clap_config, tokenizer=cfg.tokenizer, device=cfg.device, dtype=cfg.dtype,
                           storage_options=cfg.store_options or None, progress=cfg.progress, log_fn=log_fn)
    store, model = session.store, session.model
    cfg.tokenizer = session.tokenizer
    prov = dict(store.attrs.get("provenance", {}))
    md = MetadataOptions(cfg.month, cfg.hour, cfg.audio_source, cfg.caption_source, cfg.fuse)
    check_answer(cfg, model.config, md, zooms=len(store.spec.zoom_levels))
    queries = session.queries(cfg.queries, cfg.audio, combine=cfg.combine, storage_options=cfg.store_options or None)
    t1 = time.perf_counter()
    prov.update(metadata_tags(model, md))
    fault_pixels = int((store.status() == FAULT).sum())
    if fault_pixels:  # holes from failed reads: the map says so (the map run retries them)
        prov["imagery_faults"] = fault_message(fault_pixels).replace(
            "rerun the same command", "rerun the map command that built the store")
    outputs, _, _ = answer_store(store, queries, model, md, cfg, store, prov)
    t2 = time.perf_counter()
    from .maps import counted_pixels

    return MapRun.from_timings(outputs, store_url, t0, [("setup", t1), ("query", t2)],
                               pixels=counted_pixels(store), blocks_total=int(store.done_mask().sum()),
                               fault_pixels=fault_pixels)
