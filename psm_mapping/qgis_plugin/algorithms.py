"""The Processing algorithms: each builds a ``psm-map`` argument list from its parameters and
runs it (:mod:`.runner`). Optional parameters left empty are not passed, so they take the CLI's
defaults; the CLI checks every value and its one-line error becomes QGIS's error."""
from __future__ import annotations

from qgis.core import (QgsProcessing, QgsProcessingAlgorithm, QgsProcessingException,
                       QgsProcessingLayerPostProcessorInterface, QgsProcessingParameterDefinition,
                       QgsProcessingParameterFeatureSource, QgsProcessingParameterFile,
                       QgsProcessingParameterFileDestination, QgsProcessingParameterNumber,
                       QgsProcessingParameterRasterDestination, QgsProcessingParameterRasterLayer,
                       QgsProcessingParameterString, QgsProcessingParameterVectorDestination, QgsProcessingUtils,
                       QgsRasterLayer)

from pathlib import Path

from . import runner

_VECTOR_EXTS = ["gpkg", "geojson", "shp"]
_FILE, _FOLDER = QgsProcessingParameterFile.File, QgsProcessingParameterFile.Folder


class StyleBesideIt(QgsProcessingLayerPostProcessorInterface):
    """Loads the ``.qml`` psm-map wrote beside a map into the layer Processing adds to the project
    (Processing opens its outputs without their default style)."""

    instance = None  # Processing keeps no reference: the one instance lives here

    def postProcessLayer(self, layer, context, feedback):
        if isinstance(layer, QgsRasterLayer):
            qml = Path(layer.source()).with_suffix(".qml")
            if qml.is_file():
                _msg, ok = layer.loadNamedStyle(str(qml))
                if ok:
                    layer.triggerRepaint()

    @classmethod
    def create(cls) -> "StyleBesideIt":
        cls.instance = cls()
        return cls.instance


def load_styled(out: str, context) -> None:
    """When ``out`` is loaded on completion, give it the style beside it."""
    if context.willLoadLayerOnCompletion(out):
        context.layerToLoadOnCompletionDetails(out).setPostProcessor(StyleBesideIt.create())


class PsmAlgorithm(QgsProcessingAlgorithm):
    """What every psm-map algorithm shares: parameter helpers and the run."""

    NAME = ""
    DISPLAY = ""
    HELP = ""

    def name(self):
        return self.NAME

    def displayName(self):
        return self.DISPLAY

    def group(self):
        return "Soundscape maps"

    def groupId(self):
        return "maps"

    def shortHelpString(self):
        return self.HELP

    def createInstance(self):
        return type(self)()

    # ----------------------------------------------------------- parameters
    def add(self, param, advanced: bool = False):
        if advanced:
            param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(param)

    def add_text(self, name, label, optional=True, multiline=False, advanced=False):
        self.add(QgsProcessingParameterString(name, label, multiLine=multiline, optional=optional), advanced)

    def add_file(self, name, label, behavior=_FILE, extension="", advanced=False, filter=""):
        self.add(QgsProcessingParameterFile(name, label, behavior=behavior, extension=extension, optional=True,
                                            fileFilter=filter), advanced)

    def add_int(self, name, label, lo, hi, advanced=False):
        self.add(QgsProcessingParameterNumber(name, label, QgsProcessingParameterNumber.Integer, None, True, lo, hi),
                 advanced)

    def add_query_params(self, multi_query=True):
        self.add_text("QUERY", "Text query (one per line)" if multi_query else "Text query", multiline=multi_query)
        self.add_file("AUDIO", "Audio query (a sound file)", filter="Audio (*.wav *.flac *.mp3 *.ogg);;All files (*)")
        self.add_int("MONTH", "Month (1-12; empty: masked)", 1, 12)
        self.add_int("HOUR", "Hour (0-23; empty: masked)", 0, 23)

    def add_model_params(self):
        self.add_file("CHECKPOINT", "PSM checkpoint (.ckpt/.safetensors; empty: the official one)", advanced=True)
        self.add_file("CLAP_CONFIG", "CLAP config JSON", extension="json", advanced=True)
        self.add_file("TOKENIZER", "Tokenizer folder (RoBERTa)", behavior=_FOLDER, advanced=True)

    @staticmethod
    def given(parameters, name) -> bool:
        v = parameters.get(name)
        if v is None:
            return False
        if hasattr(v, "isNull") and v.isNull():  # a NULL QVariant
            return False
        return str(v).strip() != ""

    def text(self, parameters, name, context) -> str | None:
        return self.parameterAsString(parameters, name, context).strip() if self.given(parameters, name) else None

    def option(self, args, flag, value):
        if value is not None and str(value) != "":
            args += [flag, str(value)]

    def query_args(self, parameters, context) -> list[str]:
        args: list[str] = []
        q = self.text(parameters, "QUERY", context)
        for line in (q or "").splitlines():
            if line.strip():
                args += ["--query", line.strip()]
        self.option(args, "--audio", self.text(parameters, "AUDIO", context))
        for name in ("MONTH", "HOUR"):
            if self.given(parameters, name):
                args += [f"--{name.lower()}", str(self.parameterAsInt(parameters, name, context))]
        return args

    def model_args(self, parameters, context) -> list[str]:
        args: list[str] = []
        for name in ("CHECKPOINT", "CLAP_CONFIG", "TOKENIZER"):
            self.option(args, "--" + name.lower().replace("_", "-"), self.text(parameters, name, context))
        return args

    def vector_path(self, parameters, name, context, feedback) -> str:
        """A file psm-map can read for a vector input (the layer's own file, or a temporary
        GeoPackage of its selected/filtered features)."""
        return self.parameterAsCompatibleSourceLayerPath(parameters, name, context, _VECTOR_EXTS, "gpkg", feedback)

    def imagery(self, parameters, context) -> str | None:
        """IMAGERY: a loaded raster layer (its file), a path, ``xyz:URL``, ``stac:URL`` or a preset."""
        value = self.text(parameters, "IMAGERY", context)
        if not value:
            return None
        layer = QgsProcessingUtils.mapLayerFromString(value, context, False)
        if isinstance(layer, QgsRasterLayer) and layer.providerType() == "gdal":
            return layer.source()
        return value

    def run_psm_map(self, args, feedback) -> list[str]:
        from processing.core.ProcessingConfig import ProcessingConfig

        exe = ProcessingConfig.getSetting(runner.SETTING) or runner.default_executable()
        return runner.run(args, feedback, exe)


class MapAlgorithm(PsmAlgorithm):
    NAME, DISPLAY = "map", "Soundscape map of a region"
    HELP = ("Runs <code>psm-map REGION --query ...</code>: embeds the imagery over the region into an embedding "
            "store (resumable: a canceled run continues where it stopped) and writes the map COG with its QGIS "
            "style, STAC Item and previews. Empty optional fields take psm-map's defaults.")

    def initAlgorithm(self, config=None):
        self.add(QgsProcessingParameterFeatureSource("REGION", "Region (polygons)",
                                                     [QgsProcessing.TypeVectorPolygon]))
        self.add_text("IMAGERY", "Imagery: raster layer or path, xyz:URL, stac:URL or a preset "
                                 "(empty: the newest s2cloudless)")
        self.add_query_params()
        self.add_text("ZOOM_LEVELS", "Zoom levels (e.g. 1,3,5)")
        self.add(QgsProcessingParameterNumber("STRIDE", "Pixel size (metres)", QgsProcessingParameterNumber.Double,
                                              None, True, 0.0))
        self.add_model_params()
        self.add_file("STORE", "Embedding store folder (empty: psm-store beside the map)", behavior=_FOLDER)
        self.add(QgsProcessingParameterRasterDestination("OUTPUT", "Soundscape map"))

    def processAlgorithm(self, parameters, context, feedback):
        out = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        args = [self.vector_path(parameters, "REGION", context, feedback)]
        self.option(args, "--imagery", self.imagery(parameters, context))
        args += self.query_args(parameters, context)
        self.option(args, "--zoom-level", self.text(parameters, "ZOOM_LEVELS", context))
        if self.given(parameters, "STRIDE"):
            args += ["--stride", repr(self.parameterAsDouble(parameters, "STRIDE", context))]
        args += self.model_args(parameters, context)
        self.option(args, "--store", self.text(parameters, "STORE", context))
        args += ["--out", out, "--overwrite"]
        self.run_psm_map(args, feedback)
        load_styled(out, context)
        return {"OUTPUT": out}


class QueryAlgorithm(PsmAlgorithm):
    NAME, DISPLAY = "query", "Soundscape map from an embedding store"
    HELP = ("Runs <code>psm-map query STORE --query ...</code>: a new map from a store an earlier run built, "
            "without imagery or image inference (seconds).")

    def initAlgorithm(self, config=None):
        self.add(QgsProcessingParameterFile("STORE", "Embedding store (.zarr folder)", behavior=_FOLDER))
        self.add_query_params()
        self.add_model_params()
        self.add(QgsProcessingParameterRasterDestination("OUTPUT", "Soundscape map"))

    def processAlgorithm(self, parameters, context, feedback):
        out = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        args = ["query", self.parameterAsFile(parameters, "STORE", context), *self.query_args(parameters, context),
                *self.model_args(parameters, context), "--out", out, "--overwrite"]
        self.run_psm_map(args, feedback)
        load_styled(out, context)
        return {"OUTPUT": out}


class PointsAlgorithm(PsmAlgorithm):
    NAME, DISPLAY = "points", "Soundscape scores at sites"
    HELP = ("Runs <code>psm-map points SITES --query ...</code>: similarity, 0-1 score and uncertainty per query and "
            "zoom level at each point, with the sites' own columns.")

    def initAlgorithm(self, config=None):
        self.add(QgsProcessingParameterFeatureSource("SITES", "Sites (points)", [QgsProcessing.TypeVectorPoint]))
        self.add_text("IMAGERY", "Imagery: raster layer or path, xyz:URL, stac:URL or a preset "
                                 "(empty: the newest s2cloudless)")
        self.add_query_params()
        self.add_text("ZOOM_LEVELS", "Zoom levels (e.g. 1,3,5)")
        self.add_model_params()
        self.add_file("STORE", "Point store folder (empty: psm-store beside the table)", behavior=_FOLDER)
        self.add(QgsProcessingParameterVectorDestination("OUTPUT", "Scores at sites", QgsProcessing.TypeVectorPoint))

    def processAlgorithm(self, parameters, context, feedback):
        out = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        args = ["points", self.vector_path(parameters, "SITES", context, feedback)]
        self.option(args, "--imagery", self.imagery(parameters, context))
        args += self.query_args(parameters, context)
        self.option(args, "--zoom-level", self.text(parameters, "ZOOM_LEVELS", context))
        args += self.model_args(parameters, context)
        self.option(args, "--store", self.text(parameters, "STORE", context))
        args += ["--out", out, "--overwrite"]
        self.run_psm_map(args, feedback)
        return {"OUTPUT": out}


class ZonalAlgorithm(PsmAlgorithm):
    NAME, DISPLAY = "zonal", "Soundscape statistics per zone"
    HELP = ("Runs <code>psm-map zonal MAP ZONES</code>: per-polygon statistics of every band of a psm-map map, "
            "pixel coverage weighted exactly.")

    def initAlgorithm(self, config=None):
        self.add(QgsProcessingParameterRasterLayer("MAP", "Soundscape map (a psm-map COG)"))
        self.add(QgsProcessingParameterFeatureSource("ZONES", "Zones (polygons)", [QgsProcessing.TypeVectorPolygon]))
        self.add(QgsProcessingParameterNumber("THRESHOLD", "Score threshold of frac_above (0-1; empty: 0.5)",
                                              QgsProcessingParameterNumber.Double, None, True, 0.0, 1.0), True)
        self.add(QgsProcessingParameterVectorDestination("OUTPUT", "Zonal statistics",
                                                         QgsProcessing.TypeVectorAnyGeometry))

    def processAlgorithm(self, parameters, context, feedback):
        layer = self.parameterAsRasterLayer(parameters, "MAP", context)
        if layer is None:
            raise QgsProcessingException("MAP is not a raster layer: choose a map psm-map wrote")
        out = self.parameterAsOutputLayer(parameters, "OUTPUT", context)
        args = ["zonal", layer.source(), self.vector_path(parameters, "ZONES", context, feedback), "--out", out,
                "--overwrite"]
        if self.given(parameters, "THRESHOLD"):
            args += ["--threshold", repr(self.parameterAsDouble(parameters, "THRESHOLD", context))]
        self.run_psm_map(args, feedback)
        return {"OUTPUT": out}


class AssessAlgorithm(PsmAlgorithm):
    NAME, DISPLAY = "assess", "Assess a map against field observations"
    HELP = ("Runs <code>psm-map assess MAP_OR_STORE OBSERVATIONS</code>: how well the map (or a store, with a "
            "query) predicts field observations; a report as JSON, CSV or HTML.")

    def initAlgorithm(self, config=None):
        self.add(QgsProcessingParameterFile("MAP_OR_STORE", "Soundscape map (.tif) or embedding store (.zarr)",
                                            behavior=_FILE))
        self.add(QgsProcessingParameterFeatureSource("OBSERVATIONS", "Field observations (points)",
                                                     [QgsProcessing.TypeVectorPoint]))
        self.add_text("QUERY", "Text query (with a store)")
        self.add_text("COLUMN", "Observation column (empty: psm-map's default)")
        self.add_int("SEED", "Random seed", 0, 2 ** 31 - 1, advanced=True)
        self.add(QgsProcessingParameterFileDestination("OUTPUT", "Report",
                                                       "JSON (*.json);;CSV (*.csv);;HTML (*.html)"))

    def processAlgorithm(self, parameters, context, feedback):
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        args = ["assess", self.parameterAsFile(parameters, "MAP_OR_STORE", context),
                self.vector_path(parameters, "OBSERVATIONS", context, feedback)]
        self.option(args, "--query", self.text(parameters, "QUERY", context))
        self.option(args, "--column", self.text(parameters, "COLUMN", context))
        if self.given(parameters, "SEED"):
            args += ["--seed", str(self.parameterAsInt(parameters, "SEED", context))]
        args += ["--out", out]
        self.run_psm_map(args, feedback)
        return {"OUTPUT": out}


#: every algorithm; ``assess`` is listed only when the psm-map in use has that command
ALGORITHMS = [MapAlgorithm, QueryAlgorithm, PointsAlgorithm, ZonalAlgorithm]
OPTIONAL = {"assess": AssessAlgorithm}
