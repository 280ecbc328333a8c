"""QGIS-native: the style beside every map COG, the Processing provider ``psm`` and "Add to QGIS".

The QGIS half runs in Debian's ``python3-qgis`` (``/usr/bin/python3``; the project's venv cannot
import it): each check is a headless QGIS subprocess (``QT_QPA_PLATFORM=offscreen``, its own
HOME so no user settings leak in) that prints ``RESULT:{json}``. Without python3-qgis those
tests skip (``.ci/run`` installs it). The plugin is installed by ``psm-map qgis install`` into
a temporary plugins folder, recording a ``psm-map`` wrapper that runs this checkout.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import rasterio

from psm_mapping.cli import main

from test_map_e2e import base_args, make_inputs, write_region

REPO = Path(__file__).resolve().parents[1]
QGIS_PYTHON = os.environ.get("PSM_QGIS_PYTHON", "/usr/bin/python3")
QGIS_PLUGINS = "/usr/share/qgis/python/plugins"  # Debian's Processing framework


@lru_cache(maxsize=1)
def qgis_available() -> str | None:
    """None if QGIS's Python works headless, else why not."""
    if not Path(QGIS_PYTHON).is_file():
        return f"{QGIS_PYTHON} not found"
    try:
        out = subprocess.run([QGIS_PYTHON, "-c", "import qgis.core, sys; sys.path.insert(0, %r); "
                              "import processing; print(qgis.core.Qgis.QGIS_VERSION)" % QGIS_PLUGINS],
                             capture_output=True, text=True, timeout=120, env=qgis_env(Path("/tmp")))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"QGIS's Python did not start ({exc})"
    return None if out.returncode == 0 else f"python3-qgis is not installed ({out.stderr.strip()[-200:]})"


def needs_qgis():
    why = qgis_available()
    if why:
        pytest.skip(why + ": apt-get install python3-qgis (as .ci/run does)")


def qgis_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(QT_QPA_PLATFORM="offscreen", HOME=str(home), XDG_RUNTIME_DIR=str(home),
               XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local" / "share"),
               OMP_NUM_THREADS="2")
    return env


PRELUDE = """
import json, os, sys, time
sys.path[:0] = [{qgis_plugins!r}, {plugins!r}]
from qgis.core import (QgsApplication, QgsProcessingContext, QgsProcessingException, QgsProcessingFeedback,
                       QgsRasterLayer)
app = QgsApplication([], {gui})
app.initQgis()
from processing.core.Processing import Processing
Processing.initialize()
import processing
from processing.core.ProcessingConfig import ProcessingConfig
import psm_mapping_qgis
plugin = psm_mapping_qgis.classFactory(None)
plugin.initProcessing()
reg = QgsApplication.processingRegistry()
ARGS = json.loads({args!r})
OUT = {{}}


class Feedback(QgsProcessingFeedback):
    def __init__(self):
        super().__init__()
        self.texts, self.infos, self.progress, self.pid = [], [], [], None
        self.progressChanged.connect(lambda p: self.progress.append(p))

    def setProgressText(self, text):
        self.texts.append(text)
        super().setProgressText(text)

    def pushInfo(self, text):
        self.infos.append(text)
        super().pushInfo(text)

    def pushDebugInfo(self, text):
        if text.startswith("psm-map process id "):
            self.pid = int(text.rsplit(" ", 1)[1])
        super().pushDebugInfo(text)
"""


def run_qgis(body: str, home: Path, plugins: Path, args: dict | None = None, gui: bool = False,
             timeout: float = 600) -> dict:
    """Run ``body`` after :data:`PRELUDE` in QGIS's Python; returns its ``OUT`` dict."""
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)  # also the XDG runtime folder
    script = PRELUDE.format(qgis_plugins=QGIS_PLUGINS, plugins=str(plugins), gui=gui,
                            args=json.dumps(args or {})) + textwrap.dedent(body) + \
        "\nprint('RESULT:' + json.dumps(OUT), flush=True)\nos._exit(0)  # QGIS may crash tearing down\n"
    path = home / "script.py"
    path.write_text(script)
    out = subprocess.run([QGIS_PYTHON, str(path)], capture_output=True, text=True, timeout=timeout,
                         env=qgis_env(home), cwd=home)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT:")]
    assert out.returncode == 0 and lines, f"QGIS script failed ({out.returncode}):\n{out.stdout[-3000:]}\n" \
                                          f"{out.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT:"):])


def load_runner():
    """The plugin's runner module (no QGIS import at its top)."""
    spec = importlib.util.spec_from_file_location("psm_qgis_runner", REPO / "psm_mapping" / "qgis_plugin" / "runner.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def wrapper(tmp_path_factory) -> Path:
    """A ``psm-map`` executable that runs this checkout with this venv's Python."""
    p = tmp_path_factory.mktemp("bin") / "psm-map"
    p.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} OMP_NUM_THREADS=2 exec {sys.executable} -m psm_mapping "$@"\n')
    p.chmod(0o755)
    return p


@pytest.fixture(scope="module")
def plugins(tmp_path_factory, wrapper) -> Path:
    root = tmp_path_factory.mktemp("plugins")
    assert main(["qgis", "install", "--plugins-dir", str(root), "--psm-map", str(wrapper)]) == 0
    return root


@pytest.fixture(scope="module")
def inp(tmp_path_factory, tiny_ckpt, tokenizer_dir):
    return make_inputs(tmp_path_factory.mktemp("qgis-inputs"), tiny_ckpt, tokenizer_dir)


# ---------------------------------------------------------------------------- without QGIS
def test_style_beside_the_cog_has_the_previews_ramp_and_range(tmp_path):
    from psm_mapping.outputs import write_outputs
    from psm_mapping.outputs.preview import colormap_lut, value_range
    from test_writers import make_result

    res = make_result()
    got = write_outputs(res, tmp_path / "map.tif")
    qml = tmp_path / "map.qml"
    assert got["style"] == qml
    root = ET.parse(qml).getroot()
    r = root.find("pipe/rasterrenderer")
    assert r.get("type") == "singlebandpseudocolor" and r.get("band") == "1"
    lo, hi = value_range(res.bands[0].kind, np.asarray(res.bands[0].data, np.float32))
    shader = r.find("rastershader/colorrampshader")
    assert float(shader.get("minimumValue")) == pytest.approx(lo)
    assert float(shader.get("maximumValue")) == pytest.approx(hi)
    items = shader.findall("item")
    assert len(items) == 256 and shader.get("clip") == "0"
    lut = colormap_lut("viridis")
    assert [i.get("color") for i in items] == ["#%02x%02x%02x" % tuple(c) for c in lut]
    assert float(items[0].get("value")) == pytest.approx(lo) and float(items[-1].get("value")) == pytest.approx(hi)
    # the preview page shows the same range for band 1
    html = (tmp_path / "map.tif.preview" / "index.html").read_text()
    assert json.dumps(lo) in html and json.dumps(hi) in html
    item = json.loads((tmp_path / "map.tif.stac.json").read_text())
    assert item["assets"]["style"] == {"href": "./map.qml", "type": "text/xml", "roles": ["style"],
                                       "title": item["assets"]["style"]["title"]}
    # an uncertainty-first map gets magma; user strings never break the XML
    res.bands = [res.bands[2], *res.bands[:2]]
    res.bands[1].name, res.bands[1].query = 'q<"&>', 'q<"&>'
    write_outputs(res, tmp_path / "map.tif", overwrite=True, previews=False)
    items = ET.parse(qml).getroot().findall("pipe/rasterrenderer/rastershader/colorrampshader/item")
    assert items[0].get("color") == "#%02x%02x%02x" % tuple(colormap_lut("magma")[0])


def test_style_is_staged_with_its_cog(tmp_path, monkeypatch):
    from psm_mapping.errors import OutputError
    from psm_mapping.outputs import qml as qml_mod, write_outputs
    from test_writers import make_result

    res = make_result()
    (tmp_path / "map.qml").write_text("mine")  # a style the user keeps: not replaced without overwrite
    with pytest.raises(OutputError, match="map.qml exists"):
        write_outputs(res, tmp_path / "map.tif", previews=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.qml"]
    (tmp_path / "map.qml").unlink()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("psm_mapping.outputs.write.write_qml", boom)
    with pytest.raises(OutputError, match="No space left"):
        write_outputs(res, tmp_path / "map.tif", previews=False)
    assert list(tmp_path.iterdir()) == []  # neither COG nor style nor item
    monkeypatch.setattr("psm_mapping.outputs.write.write_qml", qml_mod.write_qml)
    assert write_outputs(res, tmp_path / "map.tif", previews=False)["style"].is_file()


def test_cube_styles_share_the_cube_range(inp, tmp_path):
    from psm_mapping.outputs.preview import value_range

    out = tmp_path / "m.tif"
    store = ["--store", str(tmp_path / "store")]
    assert main(base_args(inp, out, "--query", "birds", *store, "--no-previews")) == 0
    (built,) = (tmp_path / "store").glob("*.zarr")
    common = ["--checkpoint", str(inp["ckpt"]), "--clap-config", str(inp["clap"]), "--tokenizer", str(inp["tokenizer"]),
              "--device", "cpu", "--quiet", "--no-previews", "--query", "birds", "--months", "3,9"]
    assert main(["query", str(built), *common, "--cube-layout", "folder", "--out", str(tmp_path / "c.tif")]) == 0
    assert main(["query", str(built), *common, "--out", str(tmp_path / "b.tif")]) == 0
    firsts = []
    for f in ("c/c_m03.tif", "c/c_m09.tif"):
        with rasterio.open(tmp_path / f) as src:
            firsts.append(src.read(1))
    lo, hi = value_range("similarity", np.stack(firsts))
    for q in (tmp_path / "c" / "c_m03.qml", tmp_path / "c" / "c_m09.qml", tmp_path / "b.qml"):
        sh = ET.parse(q).getroot().find("pipe/rasterrenderer/rastershader/colorrampshader")
        assert (float(sh.get("minimumValue")), float(sh.get("maximumValue"))) == pytest.approx((lo, hi), rel=1e-6)
    item = json.loads((tmp_path / "c.stac.json").read_text())
    assert item["assets"]["m03_style"]["href"] == "./c/c_m03.qml"
    assert json.loads((tmp_path / "b.tif.stac.json").read_text())["assets"]["style"]["href"] == "./b.qml"


def test_install_and_zip(tmp_path, wrapper):
    from psm_mapping import qgis_install
    from psm_mapping.outputs.results import software_version

    runner = load_runner()
    assert runner.CONFIG_FILE == qgis_install.CONFIG_FILE
    dst = qgis_install.install_plugin(tmp_path / "plugins", psm_map=str(wrapper))
    assert dst == tmp_path / "plugins" / "psm_mapping_qgis"
    names = sorted(p.name for p in dst.iterdir())
    assert names == ["LICENSE", "__init__.py", "algorithms.py", "icon.png", "metadata.txt", "plugin.py",
                     "provider.py", "psm_map.json", "runner.py"]
    assert runner.default_executable(dst) == str(wrapper)
    meta = (dst / "metadata.txt").read_text()
    assert f"version={software_version()}\n" in meta and "hasProcessingProvider=yes" in meta
    (dst / "stale.py").write_text("")  # a reinstall replaces the folder as a whole
    qgis_install.install_plugin(tmp_path / "plugins", psm_map=str(wrapper))
    assert not (dst / "stale.py").exists()
    # the CLI, with the standard per-OS folders
    home = Path("/h")
    assert qgis_install.plugins_dir("work", platform="linux", env={}, home=home) == \
        home / ".local/share/QGIS/QGIS3/profiles/work/python/plugins"
    assert qgis_install.plugins_dir(platform="darwin", env={}, home=home) == \
        home / "Library/Application Support/QGIS/QGIS3/profiles/default/python/plugins"
    assert qgis_install.plugins_dir(platform="win32", env={"APPDATA": "/a"}, home=home) == \
        Path("/a/QGIS/QGIS3/profiles/default/python/plugins")
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "psm_mapping", "qgis", "install", "--profile", "p1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "xdg/QGIS/QGIS3/profiles/p1/python/plugins/psm_mapping_qgis/metadata.txt").is_file()
    out = subprocess.run([sys.executable, "-m", "psm_mapping", "qgis", "install", "--profile", "../x"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--profile" in out.stderr
    # the zip QGIS's installer takes
    z = tmp_path / "psm.zip"
    assert main(["qgis", "zip", str(z)]) == 0
    with zipfile.ZipFile(z) as zf:
        zn = zf.namelist()
    assert all(n.startswith("psm_mapping_qgis/") for n in zn)
    assert "psm_mapping_qgis/metadata.txt" in zn and "psm_mapping_qgis/__init__.py" in zn
    assert not [n for n in zn if "__pycache__" in n or n.endswith("psm_map.json")]
    with pytest.raises(SystemExit):  # `psm-map qgis` alone: argparse usage, exit 2
        main(["qgis"])


def test_runner_reads_tqdm_and_builds_argument_lists():
    from tqdm import tqdm
    import io

    runner = load_runner()
    buf = io.StringIO()
    bar = tqdm(total=200, desc="embedding", unit="chip", file=buf, mininterval=0, ascii=False)
    for _ in range(4):
        bar.update(50)
    bar.close()
    segs = [s for s in buf.getvalue().replace("\r", "\n").split("\n") if s.strip()]
    got = [runner.parse_progress(s) for s in segs]
    assert ("embedding", 75) in got and ("embedding", 100) in got
    # a redraw reaches QGIS at once, though tqdm writes no newline after it
    import queue
    import threading

    r, w = os.pipe()
    q = queue.Queue()
    with open(r, "rb", buffering=0) as rf:
        t = threading.Thread(target=runner._reader, args=(rf, "err", q), daemon=True)
        t.start()
        os.write(w, "\rembedding:   0%|          | 0/9 [00:00<?, ?chip/s]".encode())
        first = q.get(timeout=5)
        first = first if first[1] else q.get(timeout=5)  # (the empty text before the carriage return)
        assert first == ("err", "embedding:   0%|          | 0/9 [00:00<?, ?chip/s]")
        bar = "\rembedding:  44%|████▍     | 4/9".encode()
        os.write(w, bar[:20])  # a block character split between two writes
        os.write(w, bar[20:] + b"\nmap: m.tif\n")
        os.close(w)
        t.join(5)
    got_q = []
    while not q.empty():
        got_q.append(q.get())
    assert ("err", "embedding:  44%|████▍     | 4/9") in got_q and ("err", "map: m.tif") in got_q
    assert got_q[-1] == ("err", None) and not [x for x in got_q if x[1] and "\ufffd" in x[1]]
    assert runner.parse_progress("psm-map: error: no region given") is None
    assert runner.parse_progress("map.tif: 3 bands, 100% valid") is None
    argv = ["x y", "--query", "a;b"]  # one argument each, whatever they hold
    assert runner.command_line("/v/bin/psm-map", argv) == ["/v/bin/psm-map", *argv]
    assert runner.command_line("/v/bin/python3.11", ["q"]) == ["/v/bin/python3.11", "-m", "psm_mapping", "q"]
    assert runner.error_message(["a", "psm-map: error: bad --stride: give 10", "b"], 2) == \
        "psm-map: error: bad --stride: give 10"


# ---------------------------------------------------------------------------- with QGIS
def test_provider_loads_and_lists_its_algorithms(tmp_path, plugins, wrapper):
    needs_qgis()
    from psm_mapping.cli import COMMANDS

    got = run_qgis("""
        p = reg.providerById("psm")
        OUT["name"] = p.name()
        OUT["algs"] = sorted(a.id() for a in p.algorithms())
        OUT["exe"] = ProcessingConfig.getSetting("PSM_MAP_EXECUTABLE")
        OUT["params"] = [d.name() for d in reg.algorithmById("psm:map").parameterDefinitions()]
        OUT["query"] = [d.name() for d in reg.algorithmById("psm:query").parameterDefinitions()]
        OUT["zonal"] = [d.name() for d in reg.algorithmById("psm:zonal").parameterDefinitions()]
        plugin.unload()
        OUT["after_unload"] = reg.providerById("psm") is None
        # as QGIS loads an installed plugin at start: its metadata, then initProcessing
        import qgis.utils
        qgis.utils.plugin_paths = [{plugins!r}]
        qgis.utils.updateAvailablePlugins()
        OUT["meta"] = [qgis.utils.pluginMetadata("psm_mapping_qgis", k)
                       for k in ("name", "version", "hasProcessingProvider")]
        OUT["started"] = (qgis.utils.loadPlugin("psm_mapping_qgis")
                          and qgis.utils.startProcessingPlugin("psm_mapping_qgis"))
        OUT["again"] = sorted(a.id() for a in reg.providerById("psm").algorithms())
    """.replace("{plugins!r}", repr(str(plugins))), tmp_path / "home", plugins)
    want = ["psm:map", "psm:points", "psm:query", "psm:zonal"] + (["psm:assess"] if "assess" in COMMANDS else [])
    assert got["algs"] == sorted(want) and got["name"] == "PSM soundscape maps"
    assert got["exe"] == str(wrapper)
    assert got["params"] == ["REGION", "IMAGERY", "QUERY", "AUDIO", "MONTH", "HOUR", "ZOOM_LEVELS", "STRIDE",
                             "CHECKPOINT", "CLAP_CONFIG", "TOKENIZER", "STORE", "OUTPUT"]
    assert got["query"] == ["STORE", "QUERY", "AUDIO", "MONTH", "HOUR", "CHECKPOINT", "CLAP_CONFIG", "TOKENIZER",
                            "OUTPUT"]
    assert got["zonal"][:2] == ["MAP", "ZONES"] and got["zonal"][-1] == "OUTPUT"
    from psm_mapping.outputs.results import software_version

    assert got["after_unload"] is True and got["started"] is True and got["again"] == got["algs"]
    assert got["meta"] == ["PSM soundscape maps", software_version(), "yes"]


def test_qgis_draws_the_map_as_the_previews_do(tmp_path, plugins):
    """QGIS opens the COG by path with the style beside it and paints each pixel the colour the
    preview gives it (interpolated ramp vs the previews' 256 steps: within a few levels)."""
    needs_qgis()
    from psm_mapping.outputs import write_outputs
    from psm_mapping.outputs.preview import colorize, value_range
    from test_writers import make_result

    res = make_result()
    write_outputs(res, tmp_path / "map.tif", previews=False)
    with rasterio.open(tmp_path / "map.tif") as src:
        arr = src.read(1)
        h, w = arr.shape
    want = colorize(arr, "viridis", value_range("similarity", arr))
    got = run_qgis("""
        from qgis.PyQt.QtGui import qRed, qGreen, qBlue, qAlpha
        lyr = QgsRasterLayer(ARGS["map"], "map")
        r = lyr.renderer()
        OUT["type"], OUT["band"] = r.type(), r.band()
        b = r.block(1, lyr.extent(), ARGS["w"], ARGS["h"])
        OUT["rgba"] = [[[f(b.color(i, j)) for f in (qRed, qGreen, qBlue, qAlpha)] for j in range(ARGS["w"])]
                       for i in range(ARGS["h"])]
    """, tmp_path / "home", plugins, {"map": str(tmp_path / "map.tif"), "w": w, "h": h})
    assert got["type"] == "singlebandpseudocolor" and got["band"] == 1
    rgba = np.asarray(got["rgba"], np.int16)
    valid = np.isfinite(arr)
    assert (~valid).any() and np.all(rgba[..., 3][~valid] == 0)  # nodata transparent
    assert np.all(rgba[..., 3][valid] == 255)
    diff = np.abs(rgba[..., :3][valid] - want[..., :3][valid].astype(np.int16))
    assert diff.max() <= 6, diff.max()


MAP_RUN = """
def params(out, store, **kw):
    p = {"REGION": ARGS["region"], "IMAGERY": ARGS["scene"], "QUERY": "birds", "ZOOM_LEVELS": "1",
         "STRIDE": ARGS["stride"], "CHECKPOINT": ARGS["ckpt"], "CLAP_CONFIG": ARGS["clap"],
         "TOKENIZER": ARGS["tokenizer"], "STORE": store, "OUTPUT": out}
    p.update(kw)
    return p
"""


def test_processing_map_equals_the_command(tmp_path, plugins, inp):
    needs_qgis()
    cli = tmp_path / "cli" / "map.tif"
    cli.parent.mkdir()
    assert main(base_args(inp, cli, "--query", "birds", "--no-previews")) == 0
    sites = tmp_path / "sites.geojson"
    from pyproj import Transformer

    from test_map_e2e import LEFT, RES, SIZE, TOP

    tr = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True)
    cx, cy = LEFT + SIZE * RES / 2, TOP - SIZE * RES / 2
    rows = [tr.transform(cx + d, cy - d) for d in (-100, -60)]
    sites.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"name": f"s{i}"}, "geometry": {"type": "Point", "coordinates": [lon, lat]}}
        for i, (lon, lat) in enumerate(rows)]}))
    args = {k: str(v) for k, v in inp.items()}
    args.update(stride=40.0, out=str(tmp_path / "qgis" / "map.tif"), store=str(tmp_path / "qgis" / "store"),
                sites=str(sites), pts=str(tmp_path / "qgis" / "pts.gpkg"), zonal=str(tmp_path / "qgis" / "z.gpkg"),
                q=str(tmp_path / "qgis" / "q.tif"))
    (tmp_path / "qgis").mkdir()
    got = run_qgis(MAP_RUN + textwrap.dedent("""
        fb = Feedback()
        res = processing.runAndLoadResults("psm:map", params(ARGS["out"], ARGS["store"]), feedback=fb)
        OUT["output"] = res["OUTPUT"]
        from qgis.core import QgsProject
        added = [l for l in QgsProject.instance().mapLayers().values() if l.source() == res["OUTPUT"]]
        OUT["added"] = [l.renderer().type() for l in added]  # as the Processing dialog adds it
        OUT["texts"], OUT["progress"], OUT["infos"] = fb.texts, fb.progress, fb.infos
        lyr = QgsRasterLayer(res["OUTPUT"], "map")  # opened by path: the .qml beside it is its style
        OUT["renderer"] = lyr.renderer().type()
        stores = [os.path.join(ARGS["store"], n) for n in os.listdir(ARGS["store"]) if n.endswith(".zarr")]
        res = processing.run("psm:query", {"STORE": stores[0], "QUERY": "birds", "MONTH": 5,
                                           "CHECKPOINT": ARGS["ckpt"], "CLAP_CONFIG": ARGS["clap"],
                                           "TOKENIZER": ARGS["tokenizer"], "OUTPUT": ARGS["q"]}, feedback=Feedback())
        OUT["q"] = res["OUTPUT"]
        res = processing.run("psm:zonal", {"MAP": ARGS["out"], "ZONES": ARGS["region"], "OUTPUT": ARGS["zonal"]})
        from qgis.core import QgsVectorLayer
        z = QgsVectorLayer(res["OUTPUT"], "z")
        OUT["zonal_fields"] = [f.name() for f in z.fields()]
        OUT["zonal_n"] = z.featureCount()
        res = processing.run("psm:points", {"SITES": ARGS["sites"], "IMAGERY": ARGS["scene"], "QUERY": "birds",
                                            "ZOOM_LEVELS": "1", "CHECKPOINT": ARGS["ckpt"], "CLAP_CONFIG": ARGS["clap"],
                                            "TOKENIZER": ARGS["tokenizer"], "STORE": ARGS["store"],
                                            "OUTPUT": ARGS["pts"]})
        p = QgsVectorLayer(res["OUTPUT"], "p")
        OUT["pts"] = [{k: f[k] for k in p.fields().names() if not k.startswith("fid")} for f in p.getFeatures()]
    """), tmp_path / "home", plugins, args)
    qg = Path(got["output"])
    assert qg == tmp_path / "qgis" / "map.tif" and (tmp_path / "qgis" / "map.qml").is_file()
    with rasterio.open(cli) as a, rasterio.open(qg) as b:
        assert a.descriptions == b.descriptions and a.transform == b.transform and a.crs == b.crs
        np.testing.assert_array_equal(a.read(), b.read())  # the same pixels, NaN where NaN
    assert got["renderer"] == "singlebandpseudocolor" and got["added"] == ["singlebandpseudocolor"]
    assert "embedding" in got["texts"] and max(got["progress"]) == 100  # tqdm into the progress bar
    assert any("map.tif" in t for t in got["infos"])  # psm-map's summary into the log
    ref = tmp_path / "cli" / "q.tif"
    (store,) = [p for p in (tmp_path / "qgis" / "store").glob("*.zarr") if not p.name.startswith("points")]
    assert main(["query", str(store), "--query", "birds", "--month", "5",
                 "--checkpoint", str(inp["ckpt"]), "--clap-config", str(inp["clap"]), "--tokenizer",
                 str(inp["tokenizer"]), "--quiet", "--no-previews", "--out", str(ref)]) == 0
    with rasterio.open(ref) as a, rasterio.open(got["q"]) as b:
        np.testing.assert_array_equal(a.read(), b.read())
    assert got["zonal_n"] == 1 and any(f.startswith("similarity") for f in got["zonal_fields"])
    assert [p["name"] for p in got["pts"]] == ["s0", "s1"]
    assert all(isinstance(v, float) for p in got["pts"] for k, v in p.items() if k.startswith("similarity"))


def test_cancel_stops_the_run_within_2_s_and_errors_are_one_line(tmp_path, plugins, inp):
    needs_qgis()
    big = write_region(tmp_path / "big.geojson", half_m=240.0, shape="square")  # 48 x 48 px at 10 m: long
    args = {k: str(v) for k, v in inp.items()}
    args.update(region=str(big), stride=10.0, store=str(tmp_path / "store"), out=str(tmp_path / "map.tif"),
                bad=str(tmp_path / "bad.tif"))
    got = run_qgis(MAP_RUN + textwrap.dedent("""
        import threading
        fb = Feedback()
        t = {}

        def cancel():
            t["cancel"] = time.monotonic()
            fb.cancel()

        def on_text(text):
            if text == "embedding" and "timer" not in t:
                t["timer"] = threading.Timer(0.5, cancel)
                t["timer"].start()

        orig = fb.setProgressText
        def spt(text):
            on_text(text)
            orig(text)
        fb.setProgressText = spt
        t0 = time.monotonic()
        try:
            processing.run("psm:map", params(ARGS["out"], ARGS["store"]), feedback=fb)
            OUT["cancel_error"] = None
        except QgsProcessingException as exc:
            OUT["cancel_error"] = str(exc)
        OUT["stopped_after"] = time.monotonic() - t.get("cancel", float("nan"))
        try:
            os.kill(fb.pid, 0)
            OUT["alive"] = True
        except ProcessLookupError:
            OUT["alive"] = False
        OUT["store"] = os.listdir(ARGS["store"])

        def error_of(**kw):
            try:
                processing.run("psm:map", params(ARGS["bad"], ARGS["store"], **kw),
                               feedback=Feedback())
            except QgsProcessingException as exc:
                return str(exc)
        OUT["t"] = [time.monotonic() - t0]
        OUT["bad_zoom"] = error_of(ZOOM_LEVELS="1,x")
        OUT["t"].append(time.monotonic() - t0)
        OUT["bad_checkpoint"] = error_of(CHECKPOINT=ARGS["store"] + "/none.ckpt")
        OUT["t"].append(time.monotonic() - t0)
        ProcessingConfig.setSettingValue("PSM_MAP_EXECUTABLE", ARGS["region"])  # exists, not a program
        OUT["no_exe"] = error_of()
    """), tmp_path / "home", plugins, args)
    assert got["cancel_error"] and "canceled" in got["cancel_error"]
    print(f"Cancel -> psm-map gone in {got['stopped_after']:.2f} s; steps at {got['t']}")
    assert got["stopped_after"] < 2.0, got  # Cancel -> psm-map gone within 2 s
    assert got["alive"] is False and got["store"]  # the store stays for the next run to resume
    for key, needle in (("bad_zoom", "--zoom-level"), ("bad_checkpoint", "none.ckpt")):
        msg = got[key]
        assert msg and msg.startswith("psm-map: error:") and "\n" not in msg and needle in msg, (key, msg)
    assert got["no_exe"] and "cannot run psm-map" in got["no_exe"]


# ---------------------------------------------------------------------------- Add to QGIS
def test_connection_xml_format_and_escaping():
    from psm_mapping.serve.qgis import connection_xml, xyz_url

    url = xyz_url("http://127.0.0.1:8000/", {"text": 'a b&c"<', "month": "5", "other": "dropped"}, token="t0k")
    assert url == "http://127.0.0.1:8000/tiles/{z}/{x}/{y}.png?text=a%20b%26c%22%3C&month=5&token=t0k"
    text = connection_xml('psm: a "b" & <c>', url)
    assert text.startswith("<!DOCTYPE connections>\n<qgsXYZTilesConnections")
    (node,) = ET.fromstring(text.split("\n", 1)[1]).findall("xyztiles")
    assert node.get("name") == 'psm: a "b" & <c>' and node.get("url") == url
    assert (node.get("zmin"), node.get("zmax")) == ("0", "20")


def test_connection_xml_from_the_explorer_loads_in_qgis(tmp_path, inp, plugins):
    needs_qgis()
    from pyproj import Transformer

    from test_serve import Server

    out = tmp_path / "map.tif"
    assert main(base_args(inp, out, "--query", "birds", "--no-previews", "--store", str(tmp_path / "store"))) == 0
    (store,) = (tmp_path / "store").glob("*.zarr")
    server = Server([str(store), "--checkpoint", str(inp["ckpt"]), "--clap-config", str(inp["clap"]),
                     "--tokenizer", str(inp["tokenizer"]), "--basemap", "none"], tmp_path)
    try:
        r = server.get("/api/qgis-connection.xml", params={"text": "birds", "month": "5"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
        (node,) = ET.fromstring(r.text.split("\n", 1)[1]).findall("xyztiles")
        assert node.get("url").startswith(server.url + "/tiles/{z}/{x}/{y}.png?text=birds")
        # a foreign Host (DNS rebinding) is refused before any route: its URL never reaches the file
        spoofed = server.get("/api/qgis-connection.xml", params={"text": "birds"}, headers={"Host": "evil.example:80"})
        assert spoofed.status_code == 400 and "error" in spoofed.json(), spoofed.text
        for params, status in (({"text": "birds", "band": "nope"}, 400), ({}, 400),
                               ({"text": "birds", "month": "13"}, 400)):
            bad = server.get("/api/qgis-connection.xml", params=params)
            assert bad.status_code == status and "error" in bad.json(), (params, bad.text)
        xml_path = tmp_path / "psm-xyz.xml"
        xml_path.write_bytes(r.content)
        info = server.get("/api/info").json()
        w, s, e, n = info["lonlat_bounds"]
        tr = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
        x0, y0 = tr.transform(w, s)
        x1, y1 = tr.transform(e, n)
        # QGIS's own importer (Browser > XYZ Tiles > Load Connections) takes the file; the imported
        # connection, as QGIS builds its layer URI, draws the explorer's tiles
        got = run_qgis("""
            from qgis.gui import QgsManageConnectionsDialog as D
            from qgis.core import QgsSettings, QgsRectangle
            from qgis.PyQt.QtCore import QUrl
            from qgis.PyQt.QtGui import qAlpha
            d = D(None, D.Import, D.XyzTiles, ARGS["xml"])
            d.selectAll()
            d.doExportImport()
            s = QgsSettings()
            s.beginGroup("qgis/connections-xyz")
            OUT["names"] = s.childGroups()
            name = OUT["names"][0]
            url, zmin, zmax = s.value(name + "/url"), s.value(name + "/zmin"), s.value(name + "/zmax")
            OUT["url"] = url
            uri = "type=xyz&url=" + bytes(QUrl.toPercentEncoding(url)).decode() + f"&zmax={zmax}&zmin={zmin}"
            lyr = QgsRasterLayer(uri, name, "wms")
            OUT["valid"] = lyr.isValid()
            b = lyr.dataProvider().block(1, QgsRectangle(*ARGS["extent"]), 64, 64)
            OUT["opaque"] = sum(1 for r in range(64) for c in range(64) if qAlpha(b.color(r, c)) > 0)
        """, tmp_path / "home", plugins, {"xml": str(xml_path), "extent": [x0, y0, x1, y1]}, gui=True)
    finally:
        server.stop()
    assert got["names"] == ["psm-mapping: birds, month 5"]
    assert got["url"] == server.url + "/tiles/{z}/{x}/{y}.png?text=birds&month=5"
    assert got["valid"] is True and got["opaque"] > 64 * 64 // 4  # the map's pixels came through QGIS


def test_processing_assess_when_psm_map_has_it(tmp_path, plugins, inp):
    """``psm:assess`` runs ``psm-map assess MAP OBSERVATIONS --column ... --out report.json`` (only
    where this checkout has that command)."""
    from psm_mapping.cli import COMMANDS

    if "assess" not in COMMANDS:
        pytest.skip("this psm-map has no assess command: psm:assess is not listed (test_provider_loads...)")
    needs_qgis()
    from pyproj import Transformer

    import numpy as np
    import rasterio

    out = tmp_path / "map.tif"
    assert main(base_args(inp, out, "--query", "birds", "--no-previews")) == 0

    with rasterio.open(out) as src:  # sites at 16 pixel centres of the map that hold a value
        band = src.read(1)
        rows, cols = np.nonzero(np.isfinite(band))
        pick = np.linspace(0, len(rows) - 1, 16).astype(int)
        xy = [src.xy(int(rows[k]), int(cols[k])) for k in pick]
        tr = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True)
    obs = tmp_path / "obs.geojson"
    obs.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"present": i % 2},
         "geometry": {"type": "Point", "coordinates": list(tr.transform(*p))}} for i, p in enumerate(xy)]}))
    report = tmp_path / "report.json"
    got = run_qgis("""
        OUT["algs"] = sorted(a.id() for a in reg.providerById("psm").algorithms())
        res = processing.run("psm:assess", {"MAP_OR_STORE": ARGS["map"], "OBSERVATIONS": ARGS["obs"],
                                            "COLUMN": "present", "SEED": 0, "OUTPUT": ARGS["report"]})
        OUT["output"] = res["OUTPUT"]
    """, tmp_path / "home", plugins, {"map": str(out), "obs": str(obs), "report": str(report)})
    assert "psm:assess" in got["algs"] and got["output"] == str(report)
    assert isinstance(json.loads(report.read_text()), dict)
