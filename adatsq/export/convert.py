"""`adatsq export`: read the source, let the target refuse what it cannot hold, write the folder atomically.

Every output folder also gets adatsq_export.json: where it came from, which variant of each layer it
kept, and what the target keeps and loses, so the choice of segment is never implicit.
"""

from __future__ import annotations

from pathlib import Path

from adatsq.core.io import check_output, output_folder, write_json
from adatsq.core.version import __version__
from adatsq.errors import ConfigError
from adatsq.export import compressed_tensors, gptqmodel, quanto, torchao  # noqa: F401  (they register)
from adatsq.export.base import EXPORTERS, ExportOptions, ExportSource, Selection, Written, bits_summary
from adatsq.export.source import read_source
from adatsq.quant.scheme import WeightScheme

RECORD = "adatsq_export.json"
RECORD_VERSION = 1


def is_export(folder: Path) -> bool:
    """A folder this command wrote (--overwrite replaces only those)."""
    return (folder / RECORD).is_file()


def record(target: str, source: ExportSource, written: Written) -> dict:
    return {
        "format_version": RECORD_VERSION,
        "adatsq_version": __version__,
        "target": target,
        "source": {"kind": source.kind, "path": str(source.path), "family": source.family},
        "selection": {
            "segment": source.selection.segment,
            "widest": source.selection.segment is None,
            "text": source.selection_text,
            "segment_steps": source.segment_steps,
        },
        "layers": {
            name: {"bits": layer.bits, "row": list(layer.row)} for name, layer in source.layers.items()
        },
        "files": list(written.files),
        "keeps": list(written.keeps),
        "loses": list(written.loses),
    }


def export(
    source_path: Path,
    target: str,
    out: Path,
    selection: Selection | None = None,
    *,
    overwrite: bool = False,
    options: ExportOptions | None = None,
    verify: bool = True,
    weight: WeightScheme | None = None,
) -> str:
    """Export a checkpoint folder (or a plan.json, for config-only targets) to `target`; returns one line.

    `selection` picks each layer's variant (Selection(K): segment K; Selection(): the widest); None is
    accepted only when no layer switches bits. `weight` gives a plan's group size and symmetry.
    """
    exporter = EXPORTERS.get(target)()
    check_output(
        out, overwrite, folder=True, owned=lambda folder: (folder / RECORD).is_file()
    )  # before reading
    source = read_source(Path(source_path), selection, verify, weight)
    if source.kind == "plan" and not exporter.reads_plans:
        readers = [name for name in EXPORTERS.names() if EXPORTERS.get(name).reads_plans]
        raise ConfigError(
            f"{target} stores quantized tensors, which a plan does not have: export a checkpoint quantized "
            f"with it (`adatsq quantize --plan`), or export the plan to one of {', '.join(readers)}"
        )
    options = options or ExportOptions()
    exporter.check(source, options)
    with output_folder(out, overwrite, owned=is_export) as tmp:
        written = exporter.write(source, options, tmp)
        write_json(tmp / RECORD, record(target, source, written))
    return (
        f"wrote {out}: {written.description}; {len(source.layers)} layers ({bits_summary(source.layers)}), "
        f"{source.selection_text}"
    )
