"""Bad input: exit code 2, one stderr line ``psm-map: error: ...`` naming the problem and the fix,
no partial output, and the store in --store untouched."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from psm_mapping.cli import main
from psm_mapping.model.factory import tiny_clap_config

from geo_fixtures import utm_scene
from test_map_e2e import UTM, base_args, make_inputs, write_region


@pytest.fixture(scope="module")
def inp(tmp_path_factory, ckpt_factory, tokenizer_dir):
    # no metadata fuser: a small checkpoint that loads fast (these runs stop before inference)
    ckpt = ckpt_factory(sat_type="sentinel", metadata_type="none")
    d = tmp_path_factory.mktemp("bad-inputs")
    inp = make_inputs(d, ckpt, tokenizer_dir)
    inp["far"] = write_region(d / "far.geojson", center=(420_000.0, 5_200_000.0))
    inp["text"] = d / "region.txt"
    inp["text"].write_text("this is not a vector file\n")
    inp["garbage_tif"] = d / "garbage.tif"
    inp["garbage_tif"].write_bytes(os.urandom(5000))
    inp["one_band"] = utm_scene(d / "gray.tif", np.full((1, 400, 400), 120, np.uint8), 10.0,
                                origin=(498000.0, 4986000.0), crs=UTM)
    for name, geom in (("points", {"type": "Point", "coordinates": [9.0, 45.0]}),
                       ("line", {"type": "LineString", "coordinates": [[9.0, 45.0], [9.01, 45.01]]})):
        inp[name] = d / f"{name}.geojson"
        inp[name].write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {}, "geometry": geom}]}))
    inp["bad_json"] = d / "bad.geojson"
    inp["bad_json"].write_text('{"type": "FeatureCollection", "features": [')
    inp["empty_fc"] = d / "empty.geojson"
    inp["empty_fc"].write_text('{"type": "FeatureCollection", "features": []}')
    inp["folder"] = d / "a-folder"
    inp["folder"].mkdir()
    inp["notes"] = d / "notes.txt"
    inp["notes"].write_text("not audio, not a catalog\n")
    inp["corrupt_ogg"] = d / "corrupt.ogg"
    inp["corrupt_ogg"].write_bytes(b"OggS" + os.urandom(3000))
    inp["corrupt_st"] = d / "corrupt.safetensors"
    inp["corrupt_st"].write_bytes(os.urandom(3000))
    inp["bad_clap_json"] = d / "bad_clap.json"
    inp["bad_clap_json"].write_text("{not json")
    inp["file_store"] = d / "store-file"
    inp["file_store"].write_text("x")
    data = inp["ckpt"].read_bytes()
    inp["truncated"] = d / "truncated.ckpt"
    inp["truncated"].write_bytes(data[: len(data) // 2])
    inp["wrong_clap"] = d / "wrong_clap.json"
    tiny_clap_config(text_config={**tiny_clap_config().text_config.to_dict(), "hidden_size": 48,
                                  "intermediate_size": 96}).to_json_file(str(inp["wrong_clap"]))
    inp["garbage_wav"] = d / "garbage.wav"
    inp["garbage_wav"].write_bytes(b"RIFF" + os.urandom(2000))
    inp["empty_wav"] = d / "empty.wav"
    sf.write(str(inp["empty_wav"]), np.zeros(0, np.float32), 16000)
    inp["silent_wav"] = d / "silent.wav"
    sf.write(str(inp["silent_wav"]), np.zeros(16000, np.float32), 16000)
    return inp


@pytest.fixture(scope="module")
def good_store(inp, tmp_path_factory):
    """A store built by a good run with the same settings; no bad run may change it."""
    out = tmp_path_factory.mktemp("good") / "map.tif"
    root = out.parent / "stores"
    assert main(base_args(inp, out, "--query", "birds", "--no-previews", "--store", str(root))) == 0
    return root


def fingerprint(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _replace(args: list[str], flag: str, value: str) -> list[str]:
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def _drop(args: list[str], flag: str) -> list[str]:
    args = list(args)
    i = args.index(flag)
    del args[i:i + 2]
    return args


# name -> (how to change the good arguments, words the message must hold: problem..., fix)
CASES = {
    "missing region": (lambda a, i: ["/nonexistent/region.geojson"] + a[1:],
                       ["region.geojson", "does not exist", "check the path"]),
    "region not vector": (lambda a, i: [str(i["text"])] + a[1:],
                          ["region.txt", "vector", "geojson"]),
    "region outside imagery": (lambda a, i: [str(i["far"])] + a[1:],
                               ["does not overlap the imagery", "--imagery"]),
    "unreadable imagery": (lambda a, i: _replace(a, "--imagery", str(i["garbage_tif"])),
                           ["garbage.tif", "imagery"]),
    "imagery without rgb": (lambda a, i: _replace(a, "--imagery", str(i["one_band"])),
                            ["gray.tif", "band"]),
    "missing checkpoint": (lambda a, i: _replace(a, "--checkpoint", "/nonexistent/x.ckpt"),
                           ["x.ckpt", "not found", "--checkpoint"]),
    "truncated checkpoint": (lambda a, i: _replace(a, "--checkpoint", str(i["truncated"])),
                             ["truncated.ckpt", "truncated", "re-download"]),
    "mismatched checkpoint": (lambda a, i: _replace(a, "--clap-config", str(i["wrong_clap"])),
                              ["does not match the model", "text_encoder", "--clap-config"]),
    "missing tokenizer": (lambda a, i: _replace(a, "--tokenizer", "/nonexistent/tok"),
                          ["tokenizer", "/nonexistent/tok"]),
    "unreadable audio": (lambda a, i: a + ["--audio", str(i["garbage_wav"])],
                         ["garbage.wav", "decode", "convert"]),
    "empty audio": (lambda a, i: a + ["--audio", str(i["empty_wav"])], ["empty.wav", "empty"]),
    "silent audio": (lambda a, i: a + ["--audio", str(i["silent_wav"])], ["silent.wav", "silent"]),
    "missing audio": (lambda a, i: a + ["--audio", "/nonexistent/a.wav"], ["a.wav", "not found"]),
    "month 13": (lambda a, i: a + ["--month", "13"], ["month", "13", "1..12"]),
    "hour 24": (lambda a, i: a + ["--hour", "24"], ["hour", "24", "0..23"]),
    "unknown audio source": (lambda a, i: a + ["--audio-source", "youtube"],
                             ["youtube", "yfcc"]),
    "unknown caption source": (lambda a, i: a + ["--caption-source", "gpt"], ["gpt", "meta"]),
    "stride 0": (lambda a, i: _replace(a, "--stride", "0"), ["--stride", "positive", "metres"]),
    "stride negative": (lambda a, i: _replace(a, "--stride", "-40"), ["--stride", "-40", "positive"]),
    "over max pixels": (lambda a, i: a + ["--max-pixels", "10"], ["pixels", "--max-pixels"]),
    "output folder missing": (lambda a, i: _replace(a, "--out", "/nonexistent/dir/map.tif"),
                              ["/nonexistent/dir", "does not exist"]),
    "output exists": (lambda a, i: a, ["exists", "--overwrite"]),
    "output not writable": (lambda a, i: a, ["not writable", "--out"]),
    # the sweep of a demanding user's mistakes
    "region of points": (lambda a, i: [str(i["points"])] + a[1:], ["points.geojson", "no area", "polygons"]),
    "region of lines": (lambda a, i: [str(i["line"])] + a[1:], ["line.geojson", "no area", "polygons"]),
    "region invalid json": (lambda a, i: [str(i["bad_json"])] + a[1:], ["bad.geojson", "cannot read", "geojson"]),
    "region no features": (lambda a, i: [str(i["empty_fc"])] + a[1:], ["empty.geojson", "no features"]),
    "bbox out of range": (lambda a, i: ["--bbox", "9,45,200,46"] + a[1:], ["--bbox", "out of range", "[-180, 180]"]),
    "bbox three numbers": (lambda a, i: ["--bbox", "9,45,10"] + a[1:], ["--bbox", "four numbers"]),
    "bbox south above north": (lambda a, i: ["--bbox", "9,46,10,45"] + a[1:], ["--bbox", "south must be below north"]),
    "bbox and region": (lambda a, i: a + ["--bbox", "9,45,10,46"], ["both a region file and --bbox", "exactly one"]),
    "unknown feature": (lambda a, i: a + ["--feature", "nope"], ["nope", "--feature"]),
    "imagery is a folder": (lambda a, i: _replace(a, "--imagery", str(i["folder"])), ["a-folder", "raster"]),
    "xyz without placeholders": (lambda a, i: _replace(a, "--imagery", "xyz:https://example.invalid/t.png"),
                                 ["placeholders", "{z}"]),
    "stac not a catalog": (lambda a, i: _replace(a, "--imagery", "stac:" + str(i["notes"])),
                           ["stac catalog", "notes.txt", "check the url or path"]),
    "unknown preset": (lambda a, i: _replace(a, "--imagery", "s2cloudless-1999"),
                       ["unknown imagery preset", "s2cloudless-1999", "s2cloudless-2020", "psm-map --imagery"]),
    "web-map zoom": (lambda a, i: _replace(a, "--zoom-level", "13"), ["--zoom-level", "1..5", "1,3,5"]),
    "empty query": (lambda a, i: _replace(a, "--query", ""), ["query is empty", "--query"]),
    "audio is text": (lambda a, i: a + ["--audio", str(i["notes"])], ["notes.txt", "decode", "convert"]),
    "corrupt ogg": (lambda a, i: a + ["--audio", str(i["corrupt_ogg"])], ["corrupt.ogg", "decode", "convert"]),
    "checkpoint is a folder": (lambda a, i: _replace(a, "--checkpoint", str(i["folder"])),
                               ["a-folder", "not found", "--checkpoint"]),
    "corrupt safetensors": (lambda a, i: _replace(a, "--checkpoint", str(i["corrupt_st"])),
                            ["corrupt.safetensors", "safetensors", "psm-map convert"]),
    "clap config not json": (lambda a, i: _replace(a, "--clap-config", str(i["bad_clap_json"])),
                             ["bad_clap.json", "not valid json"]),
    "tokenizer is a file": (lambda a, i: _replace(a, "--tokenizer", str(i["notes"])), ["tokenizer", "--tokenizer"]),
    "out png": (lambda a, i: _replace(a, "--out", a[a.index("--out") + 1][:-4] + ".png"),
                ["map.png", "--format cog", "*.tif"]),
    "zarr format tif name": (lambda a, i: a + ["--format", "zarr"], ["map.tif", "--format zarr", "*.zarr"]),
    "store is a file": (lambda a, i: _replace(a, "--store", str(i["file_store"])),
                        ["store-file", "not a folder", "--store"]),
    "batch size 0": (lambda a, i: a + ["--batch-size", "0"], ["--batch-size", "at least 1"]),
    "workers 0": (lambda a, i: a + ["--workers", "0"], ["--workers", "at least 1"]),
    "crs garbage": (lambda a, i: a + ["--crs", "garbage"], ["--crs", "garbage", "epsg:"]),
    "crs geographic": (lambda a, i: a + ["--crs", "EPSG:4326"], ["epsg:4326", "not a projected crs", "utm"]),
    "month negative": (lambda a, i: a + ["--month", "-3"], ["month", "-3", "1..12"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, inp, good_store, tmp_path, capsys):
    change, words = CASES[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "map.tif"
    if case == "output exists":
        out.write_bytes(b"an earlier map")
    if case == "output not writable":
        if os.geteuid() == 0:
            pytest.skip("root ignores folder permissions")
        out_dir.chmod(0o555)
    before_out = fingerprint(out_dir)
    before_store = fingerprint(good_store)
    args = change(base_args(inp, out, "--query", "birds", "--store", str(good_store)), inp)
    try:
        rc = main(args)
    finally:
        out_dir.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("psm-map: error: "), err
    msg = err[0].lower()
    for w in words:
        assert w.lower() in msg, (w, err[0])
    # a fix is named: the message says what to do after a colon
    assert ": " in err[0][len("psm-map: error: "):]
    # nothing written next to the output, the existing file untouched, the store unchanged
    assert fingerprint(out_dir) == before_out
    assert fingerprint(good_store) == before_store
    assert not list(Path(tmp_path).rglob("*.tmp*"))


def test_argparse_errors_exit_2(inp, tmp_path, capsys):
    """Malformed values (not numbers) are refused by the parser: exit 2, usage on stderr."""
    with pytest.raises(SystemExit) as e:
        main(base_args(inp, tmp_path / "m.tif", "--query", "birds", "--month", "May"))
    assert e.value.code == 2
    assert "--month" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_query_subcommand_bad_inputs(inp, good_store, tmp_path, capsys):
    (store,) = good_store.glob("*.zarr")
    before = fingerprint(good_store)
    common = ["--checkpoint", str(inp["ckpt"]), "--tokenizer", str(inp["tokenizer"]), "--device", "cpu",
              "--quiet", "--out", str(tmp_path / "q.tif")]
    for extra, word in ((["--query", "birds", "--month", "13"], "month"),
                        (["--query", "birds", "--audio", str(inp["silent_wav"])], "silent"),
                        ([], "no query")):
        assert main(["query", str(store), *common, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("psm-map: error:") and word in err[0], err
    assert main(["query", str(tmp_path / "nope.zarr"), *common, "--query", "birds"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "store" in err[0], err
    assert fingerprint(good_store) == before
    assert list(tmp_path.iterdir()) == []


# argparse-level mistakes: one line too, naming the flag and the expected values
PARSER_CASES = {
    "hour not whole": (["--hour", "12.5"], ["--hour", "12.5", "whole number", "0..23"]),
    "month word": (["--month", "May"], ["--month", "whole number", "1..12"]),
    "zoom 0": (["--zoom-level", "0"], ["--zoom-level", "positive integers"]),
    "zoom not numbers": (["--zoom-level", "a,b"], ["--zoom-level", "integers like 1,3,5"]),
}


@pytest.mark.parametrize("case", list(PARSER_CASES))
def test_parser_errors_one_line(case, inp, tmp_path, capsys):
    extra, words = PARSER_CASES[case]
    args = base_args(inp, tmp_path / "m.tif", "--query", "birds")
    if extra[0] == "--zoom-level":
        args = _replace(args, "--zoom-level", extra[1])
    else:
        args += extra
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psm-map: error: "), err
    for w in words:
        assert w.lower() in err[0].lower(), (w, err[0])
    assert list(tmp_path.iterdir()) == []


def test_audio_source_any_case(inp, good_store, tmp_path, capsys):
    out = tmp_path / "m.tif"
    args = base_args(inp, out, "--query", "birds", "--no-previews", "--store", str(good_store),
                     "--audio-source", "YFCC", "--caption-source", "Meta")
    assert main(args) == 0, capsys.readouterr().err
    assert out.is_file()


def _subcommand_cases(inp, good_store, tmp):
    """(argv, words) of bad subcommand inputs; ``tmp`` is the only place they could write."""
    ck, tok, notes = str(inp["ckpt"]), str(inp["tokenizer"]), str(inp["notes"])
    (store,) = good_store.glob("*.zarr")
    q = ["--query", "birds", "--checkpoint", ck, "--tokenizer", tok, "--device", "cpu", "--quiet"]
    return {
        "query on a folder that is no store": (["query", str(inp["folder"]), *q, "--out", f"{tmp}/q.tif"],
                                               ["no embedding store", "a-folder"]),
        "query on a file": (["query", notes, *q, "--out", f"{tmp}/q.tif"], ["no embedding store", "notes.txt"]),
        "query out png": (["query", str(store), *q, "--out", f"{tmp}/q.png"], ["q.png", "*.tif"]),
        "info missing": (["info", f"{tmp}/nope.tif"], ["nope.tif", "does not exist"]),
        "info text file": (["info", notes], ["notes.txt", "cannot read"]),
        "info corrupt safetensors": (["info", str(inp["corrupt_st"])], ["corrupt.safetensors", "safetensors"]),
        "convert to existing": (["convert", ck, str(inp["corrupt_st"])], ["exists", "--overwrite"]),
        "convert to .ckpt": (["convert", ck, f"{tmp}/x.ckpt"], ["x.ckpt", ".safetensors"]),
        "evaluate missing shards": (["evaluate", "--checkpoint", ck, "--shards", f"{tmp}/s-{{000..002}}.tar",
                                     "--tokenizer", tok, "--device", "cpu", "--quiet"], ["s-000.tar", "does not exist"]),
        "evaluate shard not tar": (["evaluate", "--checkpoint", ck, "--shards", notes, "--tokenizer", tok,
                                    "--device", "cpu", "--quiet"], ["notes.txt", "not a readable tar"]),
        "evaluate batch 0": (["evaluate", "--checkpoint", ck, "--shards", notes, "--batch-size", "0", "--quiet"],
                             ["--batch-size", "at least 1"]),
        "evaluate unknown metadata": (["evaluate", "--checkpoint", ck, "--shards", notes, "--metadata", "foo",
                                       "--quiet"], ["--metadata", "foo", "latlong"]),
        "build-shards missing table": (["build-shards", f"{tmp}/t.csv", "--imagery", str(inp["scene"]),
                                        "--out", f"{tmp}/sh", "--quiet"], ["t.csv", "not found"]),
        "build-shards binary table": (["build-shards", str(inp["garbage_tif"]), "--imagery", str(inp["scene"]),
                                       "--out", f"{tmp}/sh", "--quiet"], ["garbage.tif", "utf-8"]),
        "build-shards bad imagery": (["build-shards", str(inp["table"]), "--imagery", f"{tmp}/x.tif",
                                      "--out", f"{tmp}/sh", "--quiet"], ["x.tif", "does not exist"]),
        "train shard not tar": (["train", "--shards", notes, "--tiny", "--tokenizer", tok, "--out", f"{tmp}/t",
                                 "--max-steps", "1", "--accelerator", "cpu", "--quiet"], ["notes.txt", "not a readable tar"]),
        "train unknown metadata": (["train", "--shards", notes, "--metadata", "foo", "--out", f"{tmp}/t", "--quiet"],
                                   ["--metadata", "foo", "latlong"]),
        "train lr negative": (["train", "--shards", notes, "--lr", "-1", "--out", f"{tmp}/t", "--quiet"],
                              ["--lr", "not positive", "5e-5"]),
        "train batch 0": (["train", "--shards", notes, "--batch-size", "0", "--out", f"{tmp}/t", "--quiet"],
                          ["--batch-size", "at least 1"]),
        "train resume missing": (["train", "--shards", notes, "--resume", f"{tmp}/r.ckpt", "--out", f"{tmp}/t",
                                  "--quiet"], ["r.ckpt", "not found", "--resume"]),
    }


SUBCOMMAND_CASES = ["query on a folder that is no store", "query on a file", "query out png", "info missing",
                    "info text file", "info corrupt safetensors", "convert to existing", "convert to .ckpt",
                    "evaluate missing shards", "evaluate shard not tar", "evaluate batch 0",
                    "evaluate unknown metadata", "build-shards missing table", "build-shards binary table",
                    "build-shards bad imagery", "train shard not tar", "train unknown metadata",
                    "train lr negative", "train batch 0", "train resume missing"]


@pytest.mark.parametrize("case", SUBCOMMAND_CASES)
def test_subcommand_bad_input(case, inp, good_store, tmp_path, capsys):
    if "table" not in inp:
        inp["table"] = inp["notes"].parent / "samples.csv"
        inp["table"].write_text("audio,latitude,longitude,date,audio_source,caption\n"
                                f"{inp['audio']},45.0,9.0,2020-05-01,yfcc,birds\n")
    out = tmp_path / "out"
    out.mkdir()
    argv, words = _subcommand_cases(inp, good_store, out)[case]
    before = fingerprint(inp["notes"].parent), fingerprint(good_store)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psm-map: error: "), err
    for w in words:
        assert w.lower() in err[0].lower(), (w, err[0])
    assert ": " in err[0][len("psm-map: error: "):]
    assert list(out.iterdir()) == []
    assert (fingerprint(inp["notes"].parent), fingerprint(good_store)) == before


def test_corrupt_mp3_one_line_at_fd_level(inp, good_store, tmp_path, capfd):
    """libmpg123 writes to fd 2 itself: the user must still see one line."""
    mp3 = tmp_path / "corrupt.mp3"
    mp3.write_bytes(b"ID3" + np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    out.mkdir()
    args = base_args(inp, out / "m.tif", "--query", "birds", "--store", str(good_store), "--audio", str(mp3))
    assert main(args) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psm-map: error: "), err
    assert "corrupt.mp3" in err[0] and "convert" in err[0] and "does not exist" not in err[0]
    assert list(out.iterdir()) == []
