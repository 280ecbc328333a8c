"""The restricted tensor loader: genuine tensors round-trip, malicious pickles run nothing."""
from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch

from psm_mapping.errors import CheckpointError, InputError
from psm_mapping.safe_pickle import dump_tensor, load_object, load_tensor


def mel() -> torch.Tensor:
    return torch.randn(4, 1001, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda t: pickle.dumps(t), id="raw-pickle"),
        pytest.param(lambda t: pickle.dumps(t, protocol=2), id="raw-pickle-p2"),
        pytest.param(lambda t: pickle.dumps(torch.nn.Parameter(t)), id="parameter"),
        pytest.param(lambda t: dump_tensor(t), id="dump_tensor"),
        pytest.param(lambda t: dump_tensor(t, legacy_pickle=True), id="dump_tensor-legacy"),
        pytest.param(lambda t: _torch_save(t, zip_=True), id="torch.save"),
        pytest.param(lambda t: _torch_save(t, zip_=False), id="torch.save-legacy"),
        pytest.param(lambda t: pickle.dumps(t.numpy()), id="numpy-p4"),
        pytest.param(lambda t: pickle.dumps(t.numpy(), protocol=5), id="numpy-p5"),
        pytest.param(lambda t: pickle.dumps(t.numpy(), protocol=2), id="numpy-p2"),
    ],
)
def test_roundtrip_exact(encode, tmp_path):
    t = mel()
    data = encode(t)
    out = load_tensor(data)
    assert out.dtype == torch.float32 and out.shape == (4, 1001, 64)
    assert torch.equal(out, t)
    p = tmp_path / "x.audio_mel1.pyd"
    p.write_bytes(data)
    assert torch.equal(load_tensor(p), t)


def _torch_save(t, zip_: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf, _use_new_zipfile_serialization=zip_)
    return buf.getvalue()


def test_view_and_half():
    base = torch.randn(10, 8)
    v = base[2:4, 1:3]
    assert torch.equal(load_tensor(pickle.dumps(v)), v)
    assert torch.equal(load_tensor(dump_tensor(v)), v)
    assert len(dump_tensor(v)) < len(dump_tensor(base))  # only the view's data is stored
    h = base.half()
    assert torch.equal(load_tensor(pickle.dumps(h)), h)


def test_dump_tensor_loads_with_weights_only():
    t = torch.randn(3, 5)
    assert torch.equal(torch.load(io.BytesIO(dump_tensor(t)), weights_only=True), t)
    assert torch.equal(pickle.loads(dump_tensor(t, legacy_pickle=True)), t)


class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Eval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


class _WriteFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_os_system_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_System(f"touch {marker}"))
    with pytest.raises(InputError, match=r"forbidden global (posix|os|nt)\.system"):
        load_tensor(payload)
    assert not marker.exists()
    # the same payload inside a tensor container: still nothing runs
    nested = pickle.dumps({"x": torch.zeros(2), "y": _System(f"touch {marker}")})
    with pytest.raises(InputError, match="forbidden global builtins.dict|system"):
        load_object(nested)
    assert not marker.exists()
    # the check is real: an unrestricted unpickler would have created the file
    pickle.loads(payload)
    assert marker.exists()


def test_malicious_eval_open_and_error_class(tmp_path):
    with pytest.raises(CheckpointError, match="builtins.eval"):
        load_tensor(pickle.dumps(_Eval()), error=CheckpointError)
    target = tmp_path / "written"
    with pytest.raises(InputError, match=r"forbidden global (io|builtins)\.open"):
        load_tensor(pickle.dumps(_WriteFile(str(target))))
    assert not target.exists()


def test_malicious_storage_bytes_are_loaded_weights_only(tmp_path):
    """A raw pickle whose nested storage bytes are themselves a hostile legacy pickle."""
    marker = tmp_path / "inner"
    inner = pickle.dumps(_System(f"touch {marker}"), protocol=2)

    class Outer:
        def __reduce__(self):
            import torch.storage

            return (torch.storage._load_from_bytes, (inner,))

    with pytest.raises(InputError, match="not a loadable tensor pickle"):
        load_object(pickle.dumps(Outer()))
    assert not marker.exists()


def test_rejects_non_float_and_non_tensor(tmp_path):
    with pytest.raises(InputError, match="dtype"):
        load_tensor(pickle.dumps(torch.arange(5)))
    with pytest.raises(InputError, match="dtype"):
        load_tensor(pickle.dumps(np.arange(5)))
    with pytest.raises(InputError, match="OrderedDict|expected one tensor"):
        load_tensor(pickle.dumps(__import__("collections").OrderedDict(a=1)))
    with pytest.raises(InputError, match="not a loadable"):
        load_tensor(b"garbage bytes")
    with pytest.raises(InputError, match="cannot read"):
        load_tensor(tmp_path / "missing.pyd")
