"""`adatsq upgrade DIR`: rewrite an older checkpoint folder in the current format, in place, atomically.

Format 1 -> 2: base/ becomes the folder itself (model_index.json and the other components where
diffusers keeps them), the denoiser's tensors move into its component folder under the name its
library loads (`diffusion_pytorch_model*.safetensors` for diffusers models), and adatsq_config.json
becomes that folder's config.json `quantization_config`. Tensor bytes, checksums and shard hashes do
not change (files are hard-linked where the disk allows, else copied). The new folder is built beside
the old one and renamed into place (adatsq.core.io.output_folder): a failure leaves the old one as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from adatsq.checkpoint.format import CONFIG, FORMAT_VERSION, is_checkpoint, read_checkpoint_config
from adatsq.checkpoint.save import weights_stem, write_component_config
from adatsq.checkpoint.shards import INDEX, index_name, shard_name, weights_name
from adatsq.checkpoint.validate import open_checkpoint
from adatsq.core.io import output_folder, write_json

log = logging.getLogger(__name__)


def _place(source: Path, target: Path) -> None:
    """`target` gets `source`'s bytes: a hard link (no copy of a large file), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def _place_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file():
            _place(path, target / path.relative_to(source))


def _move_tensors(source: Path, target: Path, stem: str) -> list[str]:
    """Format 1's model.safetensors / shards + index, renamed for `stem`; returns the source names used."""
    index = source / INDEX
    if not index.is_file():
        _place(source / weights_name(), target / weights_name(stem))
        return [weights_name()]
    data = json.loads(index.read_text(encoding="utf-8"))
    count = len(set(data["weight_map"].values()))
    renamed = {shard_name(i, count): shard_name(i, count, stem) for i in range(1, count + 1)}
    for old, new in renamed.items():
        _place(source / old, target / new)
    data["weight_map"] = {key: renamed[name] for key, name in data["weight_map"].items()}
    data["metadata"]["sha256"] = {renamed[name]: h for name, h in data["metadata"]["sha256"].items()}
    write_json(target / index_name(stem), data)
    return [INDEX, *renamed]


def upgrade_checkpoint(directory: str | Path, verify: bool = True) -> str:
    """Rewrite `directory` in format FORMAT_VERSION, validated first as `adatsq.load` does; a summary."""
    directory = Path(directory)
    _, layout = read_checkpoint_config(directory)
    if layout.version == FORMAT_VERSION:
        return f"{directory} is already format {FORMAT_VERSION}: nothing to do"
    opened = open_checkpoint(directory, verify)  # the whole folder is sound before anything is written
    adapter, config = opened.adapter, dict(opened.config)
    with output_folder(directory, overwrite=True, owned=is_checkpoint) as tmp:
        _place_tree(layout.base, tmp)
        component = tmp / adapter.denoiser_folder
        component.mkdir(parents=True, exist_ok=True)
        used = _move_tensors(layout.tensors, component, weights_stem(adapter.denoiser()))
        skip = {CONFIG, layout.base.name, *used}
        for entry in sorted(directory.iterdir()):  # report.json, plan.json
            if entry.name not in skip and entry.is_file():
                _place(entry, tmp / entry.name)
        config["format_version"] = FORMAT_VERSION
        write_component_config(component, adapter.denoiser(), config)
    where = f"{adapter.denoiser_folder}/" if adapter.denoiser_folder else "the folder itself"
    log.info("upgraded %s", directory)
    stem = weights_stem(adapter.denoiser())
    return (
        f"upgraded {directory}: format {layout.version} -> {FORMAT_VERSION}; the denoiser is {where} "
        f"(config.json with quantization_config + {weights_name(stem)})"
    )
