"""Names of months and of month x hour settings in band names, tables and pages."""
from __future__ import annotations

MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August",
               "September", "October", "November", "December")


def setting_label(month: int | None, hour: int | None) -> str:
    """``"May, 14:00"`` (a masked item left out)."""
    parts = [MONTH_NAMES[month - 1] if month is not None else None,
             f"{hour:02d}:00" if hour is not None else None]
    return ", ".join(p for p in parts if p) or "month and hour masked"
