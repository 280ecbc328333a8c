"""Downloads from a shared Google Drive folder with httpx (no gdown): list the folder, find a file
by its path, get past Drive's confirmation page and stream the file, resumably.

Drive answers a download of a large file (``/uc?export=download&id=ID``) with an HTML page ("can't
scan this file for viruses ... Download anyway"): a form whose action (today
``https://drive.usercontent.google.com/download``) and hidden fields (``id``, ``export``,
``confirm``, ``uuid``) give the real download; older pages carry a ``confirm=TOKEN`` link or a
``download_warning`` cookie instead. All three are followed. A folder's page embeds its listing as
a JavaScript string (``window['_DRIVE_ivd']``): a JSON array of ``[id, parents, name, mime, ...]``.

``$PSM_DRIVE_URL`` replaces ``https://drive.google.com`` (a mirror that answers the same way: the
tests run one on 127.0.0.1).
"""
from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from urllib.parse import urljoin

from .errors import CheckpointError

DRIVE = "https://drive.google.com"
FOLDER_MIME = "application/vnd.google-apps.folder"
#: the longest HTML page (folder listing, confirmation) read into memory
MAX_PAGE_BYTES = 8 << 20
_IVD = re.compile(r"_DRIVE_ivd'\]\s*=\s*'((?:[^'\\]|\\.)*)'")
_FORM = re.compile(r"<form[^>]*id=\"download-form\"[^>]*>(.*?)</form>", re.S | re.I)
_ACTION = re.compile(r"action=\"([^\"]+)\"", re.I)
_INPUT = re.compile(r"<input[^>]*>", re.I)
_ATTR = re.compile(r"(\w+)=\"([^\"]*)\"")
_CONFIRM = re.compile(r"confirm=([0-9A-Za-z_-]+)")
_ESC = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|.)", re.S)


def drive_base() -> str:
    return os.environ.get("PSM_DRIVE_URL", DRIVE).rstrip("/")


def _js_unescape(text: str) -> str:
    def sub(m: re.Match) -> str:
        e = m.group(1)
        if e[0] in "xu" and len(e) > 1:
            return chr(int(e[1:], 16))
        return {"n": "\n", "t": "\t", "r": "\r"}.get(e, e)

    return _ESC.sub(sub, text)


def _page(resp, what: str) -> str:
    """The body of an HTML answer, bounded by :data:`MAX_PAGE_BYTES`."""
    data = bytearray()
    for chunk in resp.iter_bytes(1 << 16):
        data += chunk
        if len(data) > MAX_PAGE_BYTES:
            raise CheckpointError(f"Google Drive's page for {what} is larger than "
                                  f"{MAX_PAGE_BYTES >> 20} MB: not a page Drive sends; retry later")
    return data.decode(resp.encoding or "utf-8", errors="replace")


def list_folder(client, folder_id: str) -> list[tuple[str, str, str]]:
    """``(id, name, mime type)`` of the items of a shared folder."""
    with client.stream("GET", f"{drive_base()}/drive/folders/{folder_id}", params={"hl": "en"}) as r:
        if r.status_code != 200:
            raise CheckpointError(f"Google Drive answered HTTP {r.status_code} for folder {folder_id}")
        text = _page(r, f"folder {folder_id}")
    m = _IVD.search(text)
    try:
        items = json.loads(_js_unescape(m.group(1)))[0] or [] if m else None
    except (ValueError, IndexError, TypeError):
        items = None
    if items is None:
        raise CheckpointError(f"cannot read Google Drive's listing of folder {folder_id} (the page "
                              "changed?)")
    return [(str(e[0]), str(e[2]), str(e[3])) for e in items if isinstance(e, list) and len(e) > 3]


def find_file(client, folder_id: str, path: str) -> str:
    """The file id of ``path`` (``sub/folder/name``) under a shared folder."""
    parts = [p for p in path.split("/") if p]
    current = folder_id
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        for fid, fname, mime in list_folder(client, current):
            if fname == name and (mime != FOLDER_MIME) == last:
                current = fid
                break
        else:
            raise CheckpointError(f"{path} is not in the Google Drive folder {folder_id}")
    return current


def _confirmation(text: str, url: str, params: dict, cookies) -> tuple[str, dict] | None:
    """The request Drive's "download anyway" page leads to, or None if the page has none."""
    form = _FORM.search(text)
    if form:
        action = _ACTION.search(text[max(0, form.start()):form.start() + 2000])
        fields = {}
        for tag in _INPUT.findall(form.group(1)):
            attrs = {k.lower(): html.unescape(v) for k, v in _ATTR.findall(tag)}
            if attrs.get("type", "").lower() == "hidden" and "name" in attrs:
                fields[attrs["name"]] = attrs.get("value", "")
        target = html.unescape(action.group(1)) if action else url
        return urljoin(url, target), fields
    m = _CONFIRM.search(text)
    if m:
        return url, {**params, "confirm": m.group(1)}
    for name, value in cookies.items():
        if name.startswith("download_warning"):
            return url, {**params, "confirm": value}
    return None


def download_file(client, file_id: str, part: Path, name: str, quiet: bool) -> None:
    """Drive file ``file_id`` into ``part``: past the confirmation pages, with a progress bar,
    resuming a partial ``part`` (HTTP Range)."""
    url, params = f"{drive_base()}/uc", {"export": "download", "id": file_id}
    for _ in range(4):
        have = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with client.stream("GET", url, params=params, headers=headers) as r:
            if r.status_code not in (200, 206, 416):
                raise CheckpointError(f"Google Drive answered HTTP {r.status_code} for {name}")
            if "text/html" not in r.headers.get("Content-Type", ""):
                return _write(r, part, have, name, quiet)
            text = _page(r, name)
            nxt = _confirmation(text, str(r.url.copy_with(query=None)), params, r.cookies)
        if nxt is None:
            title = re.search(r"<title>(.*?)</title>", text, re.S | re.I)
            why = " ".join(html.unescape(title.group(1)).split()) if title else "no download link"
            raise CheckpointError(f"Google Drive did not give {name} ({why}; too many downloads "
                                  "today?): retry later")
        url, params = nxt
    raise CheckpointError(f"Google Drive kept asking to confirm the download of {name}: retry later")


def stream_to(client, url: str, params: dict | None, part: Path, name: str, quiet: bool) -> None:
    """GET into ``part`` with a progress bar, resuming a partial file (HTTP Range)."""
    have = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.stream("GET", url, params=params, headers=headers) as r:
        _write(r, part, have, name, quiet)


def _write(r, part: Path, have: int, name: str, quiet: bool) -> None:
    """Stream response ``r`` into ``part`` (appending to ``have`` bytes on a 206); a download that
    ends short of its announced size is an error (the next try resumes it)."""
    from tqdm.auto import tqdm

    if r.status_code == 416:  # already complete
        return
    if r.status_code not in (200, 206):
        raise CheckpointError(f"download of {name} from {r.url.host} failed (HTTP {r.status_code})")
    if r.status_code == 200:
        have = 0
    total = int(r.headers.get("Content-Length", 0)) + have or None
    with open(part, "ab" if have else "wb") as fh, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"downloading {name}", disable=quiet) as bar:
        for chunk in r.iter_bytes():  # as received: an interrupted download keeps every byte
            fh.write(chunk)
            bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise CheckpointError(f"download of {name} ended at {part.stat().st_size:,} of {total:,} bytes")
