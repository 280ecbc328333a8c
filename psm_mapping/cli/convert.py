"""``psm-map convert CKPT OUT.safetensors``: weights + config, memory-mappable."""
from __future__ import annotations

from pathlib import Path

from ..errors import OutputError
from .base import parser


def cmd_convert(argv: list[str]) -> int:
    p = parser("convert", "Convert an official PSM .ckpt to safetensors (weights + config, memory-mappable).")
    p.add_argument("checkpoint")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--clap-config", help="CLAP config JSON (default: laion/clap-htsat-fused)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.suffix != ".safetensors":
        raise OutputError(f"output {out} must end in .safetensors (the converted format): "
                          f"pass e.g. {out.with_suffix('.safetensors')}")
    if out.exists() and not a.overwrite:
        raise OutputError(f"{out} exists: pass --overwrite or choose another output path")
    if not out.parent.is_dir():
        raise OutputError(f"output folder {out.parent} does not exist: create it first")
    from ..checks import _can_create_in

    if not _can_create_in(out.parent):  # a probe file: os.access says yes for root even under /proc
        raise OutputError(f"cannot write in {out.parent} (read-only or not a folder files can be made in): "
                          "choose an output folder you can write")
    from ..model import PSM

    model = PSM.from_checkpoint(a.checkpoint, clap_config=a.clap_config)
    _export(model, out)
    print(f"wrote {out} ({model.config.sat_type}, metadata {model.config.metadata_type}, "
          f"{model.config.loss_type})")
    return 0


def _export(model, out: Path) -> None:
    """Write under a temporary name beside ``out`` and rename: a failed write (full disk, a folder
    turned read-only) leaves nothing behind and is one line."""
    import os

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        model.export_safetensors(tmp)
        os.replace(tmp, out)
    except Exception as exc:  # OSError, safetensors' SafetensorError (an I/O error inside Rust)
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {out} ({' '.join(str(exc).split()) or type(exc).__name__}): free some "
                          "space or choose an output folder you can write") from None
