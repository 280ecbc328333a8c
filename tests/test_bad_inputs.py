"""Bad input: exit code 2, one stderr line ``psm-map: error: ...`` naming the problem and the fix,
no partial output, and the store in --store untouched."""
from __future__ import annotations

import hashlib
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
