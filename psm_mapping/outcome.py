"""What a run produced and what it cost (:class:`MapRun`), shared by the builder
(:mod:`psm_mapping.run`, :mod:`psm_mapping.distributed`) and the answers (:mod:`psm_mapping.answer`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .outputs import describe_outputs


@dataclass
class MapRun:
    """What a run produced and what it cost."""

    outputs: dict[str, Any]
    store: str
    pixels: int
    chips: int = 0
    blocks_total: int = 0
    blocks_computed: int = 0
    image_model_calls: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    faults: int = 0
    #: dask runs only: blocks that ran more than once (worker lost or task error retried)
    blocks_retried: int | None = None
    #: region pixel-zooms that are NaN in the map because an imagery read failed
    fault_pixels: int = 0
    #: readers' mean queue depth (blocks read ahead when the model asked for the next one)
    queue_depth: float = 0.0

    @classmethod
    def from_timings(cls, outputs: dict, store: str, t_start: float, marks: Sequence[tuple[str, float]],
                     detail: dict[str, float] | None = None, **counts) -> "MapRun":
        """A run from ``write_outputs``' answer and clock readings: ``marks`` are (stage, end time)
        in order, each stage's seconds counted from the previous mark (the first from ``t_start``);
        ``detail`` (e.g. read / model seconds) is listed after the first stage; ``total`` last."""
        seconds: dict[str, float] = {}
        prev = t_start
        for i, (name, t) in enumerate(marks):
            seconds[name] = t - prev
            prev = t
            if i == 0 and detail:
                seconds.update(detail)
        seconds["total"] = prev - t_start
        return cls(outputs=describe_outputs(outputs), store=store, seconds=seconds, **counts)

    def summary(self) -> str:
        s = self.seconds
        retried = "" if self.blocks_retried is None else f"; blocks retried {self.blocks_retried}"
        lines = [f"pixels {self.pixels:,}; chips embedded {self.chips:,}; blocks {self.blocks_computed} "
                 f"computed / {self.blocks_total} total{retried}; tile faults {self.faults}",
                 "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.items()),
                 f"store: {self.store}"]
        for k, v in self.outputs.items():
            lines.append(f"{k}: {v}")
        if self.fault_pixels:
            lines.append(fault_message(self.fault_pixels))
        return "\n".join(lines)


def fault_message(fault_pixels: int) -> str:
    """The line that says a map has holes from failed reads, and how they heal."""
    return (f"{fault_pixels:,} pixel-zooms are masked (NaN) because imagery reads failed (tile "
            "server errors after retries): rerun the same command to retry exactly those")
