"""Featurize image-text input shards (featurize/inputs.py says how rows and work are laid out)."""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import DataLoader

from common.config import DataConfig, FeaturizeConfig
from common.errors import UserError
from common.files import atomic_write_json, read_json
from featurize.backbone import Backbone
from featurize.extract import _writer, run_loop, shard_size
from featurize.inputs import INPUTS, InputShardImages, Layout, done_inputs, drop_unfinished, layout, mark_done
from featurize.prepare import FeaturizeError, SingleProcess
from shards import finalize, make_plan
from shards.manifest import PLAN, WriterLock
from shards.remote import expand

log = logging.getLogger(__name__)


def input_urls(dcfg: DataConfig, split: str) -> list[str]:
    """The input shards' URLs, for the split they are (`data.shards_split`)."""
    if split != dcfg.shards_split:
        raise FeaturizeError(f"--input_shards are the {dcfg.shards_split} split (--shards_split); featurize --split "
                             f"{dcfg.shards_split}, or give the {split} split's shards with --shards_split {split}")
    urls = expand(dcfg.input_shards)
    seen: set[str] = set()
    for url in urls:
        if url in seen:  # its samples would be featurized twice, under the same keys
            raise FeaturizeError(f"--input_shards: {url} is listed twice; list each input shard once")
        seen.add(url)
    return urls


def input_layout(out: Path, urls: list[str], fcfg: FeaturizeConfig, dcfg: DataConfig, S: int, state) -> Layout:
    """Where each input shard's samples go (featurize/inputs.py): their counts from img2dataset's
    stats files or the local tars, else `input_shard_samples` rows reserved for each, with a warning.
    The main process counts (once: a resumed run takes the counts its plan.json recorded) and
    writes them to inputs/layout.json; the other processes read them there."""
    path = out / INPUTS / "layout.json"
    if state.is_main_process:
        lay = planned_layout(out, urls, S) or layout(urls, fcfg.input_shard_samples, S, dcfg.url_timeout)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"source_urls": urls, **lay.info()})
    state.wait_for_everyone()
    if not state.is_main_process:
        lay = Layout.from_info(read_json(path, "input layout"), S)
    if lay.exact and lay.rows == 0:
        raise FeaturizeError(f"--input_shards: the {len(urls)} input shards hold no samples ({lay.source})")
    if state.is_main_process:
        if lay.exact:
            log.info(f"{len(urls)} input shards hold {lay.rows} samples ({lay.source}): {lay.rows} rows, "
                     f"{-(-lay.rows // S)} output shards")
        else:
            log.warning(f"{len(urls)} input shards without img2dataset's NNNNN_stats.json beside them: "
                        f"{lay.counts[0]} rows reserved per input shard (--input_shard_samples "
                        f"{fcfg.input_shard_samples}); the rows a shard does not fill stay empty (write the stats "
                        "files, or featurize local copies, whose samples are counted)")
    return lay


def planned_layout(out: Path, urls: list[str], S: int) -> Layout | None:
    """The layout a run of the same input shards recorded in its plan.json (resuming: not counted again)."""
    try:
        info = read_json(out / PLAN, "plan")["info"]
        lay = Layout.from_info(info, S)
    except (UserError, KeyError, TypeError, ValueError):
        return None
    return lay if info.get("source_urls") == urls and len(lay.counts) == len(urls) else None


def featurize_input_shards(dcfg: DataConfig, fcfg: FeaturizeConfig, split: str, backbone: Backbone, info: dict,
                           state=None, progress: bool = True, timing: dict | None = None) -> dict | None:
    """Featurize the input shards `data.input_shards` into FEATURES/split; returns the manifest
    (main process). Same store, same records as from a split file; the manifest lists the URLs."""
    state = state or SingleProcess()
    if fcfg.decode == "device":
        raise FeaturizeError("--decode device reads image files of a split file; input shards decode in the "
                             "DataLoader workers (--decode workers)")
    urls = input_urls(dcfg, split)
    out = Path(dcfg.features) / split
    S = shard_size(fcfg, dcfg.format, backbone.channels)
    with WriterLock(out, state.process_index):
        lay = input_layout(out, urls, fcfg, dcfg, S, state)
        plan = make_plan(dcfg.format, lay.rows, S, fcfg.grid, backbone.channels,
                         {**info, "split": split, "input_json": "", "input_shards": dcfg.input_shards,
                          "source_urls": urls, **lay.info()},
                         fcfg.codec if dcfg.format == "zarr" else "")
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            drop_unfinished(out, lay)  # a killed run's half-written units are redone whole
        writer = _writer(out, plan, state)
        done = done_inputs(out, len(urls))
        mine = [i for i in range(len(urls)) if i % state.num_processes == state.process_index and i not in done]
        shards = [k for i in mine for k in lay.shards(i)]
        dataset = InputShardImages(urls, mine, lay, fcfg.image_size, fcfg.batch_size, dcfg.url_timeout)
        workers = min(fcfg.num_workers, len(mine))
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                            prefetch_factor=4 if workers else None)
        pending: list[tuple] = []

        def markers(batch, assembled) -> None:
            """An input shard's marker once all of its output shards are written."""
            if batch is not None and batch.get("input_done"):
                pending.append(batch["input_done"])
            for item in list(pending):
                i = item[0]
                if assembled.all_written(lay.shards(i)):
                    mark_done(out, i, item[1], item[2], item[3])
                    pending.remove(item)

        clock = run_loop(fcfg, split, backbone, state, writer, plan, shards, None, loader, None, progress, markers)
        if pending:
            raise FeaturizeError(f"{out}: input shards {[p[0] for p in pending]} were read but not all of their "
                                 "output shards were written")
    if timing is not None:
        timing.update(clock)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    missing = sorted(set(range(len(urls))) - done_inputs(out, len(urls)))
    if missing:
        raise FeaturizeError(f"{out}: input shard {urls[missing[0]]} was not featurized; rerun to resume")
    return finalize(out, split)
