"""Numbers fixed by the PSM checkpoints (PSM_SPEC.md sections 2, 3 and 6)."""
from __future__ import annotations

#: ground sample distance in metres of one pixel of a zoom-1 training tile
GSD: dict[str, float] = {"sentinel": 10.0, "bingmap": 0.6, "googleEarth": 0.2}
#: base tile size in pixels before the resize to 224
BASE_TILE: dict[str, int] = {"sentinel": 256, "bingmap": 300, "googleEarth": 256}
SAT_TYPES = tuple(GSD)
CHIP_SIZE = 224
PATCH_SIZE = 16
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_ZOOM_LEVELS = (1, 3, 5)
#: chips per model call, unless told otherwise
DEFAULT_BATCH_SIZE = 64
#: the smallest valid imagery fraction of a chip that is embedded, unless told otherwise
DEFAULT_MIN_VALID = 0.5
#: the ranges of the month (1..12) and hour (0..23) metadata
MONTH_RANGE = (1, 12)
HOUR_RANGE = (0, 23)

AUDIO_SOURCES: dict[str, int] = {"yfcc": 0, "iNat": 1, "aporee": 2, "freesound": 3}
CAPTION_SOURCES: dict[str, int] = {"meta": 0, "qwen": 1, "pengi": 2}
#: order of the metadata tokens after [CLS, z_img]
METADATA_ITEMS = ("asource", "tsource", "latlong", "month", "time")
FULL_METADATA = "latlong_month_time_asource_tsource"
#: what the authors' mapping scripts use when metadata is on but not given
MAPPING_DEFAULTS = {"month": 5, "hour": 14, "audio_source": "yfcc", "caption_source": "meta"}


def footprint_m(sat_type: str, zoom: int) -> float:
    """Ground extent in metres of a chip at ``zoom`` for ``sat_type``."""
    return zoom * BASE_TILE[sat_type] * GSD[sat_type]


def chip_resolution_m(sat_type: str, zoom: int) -> float:
    """Metres per pixel of a 224 px chip at ``zoom``."""
    return footprint_m(sat_type, zoom) / CHIP_SIZE
