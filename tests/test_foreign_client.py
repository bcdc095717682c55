"""A client generated from proto/ alone (no splitnet import) can use the service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch
from conftest import ServerThread, run_protoc

from splitnet.data import load_digits
from splitnet.models import load_model

CLIENT = r"""
import json, sys
import grpc
import numpy as np
import splitnet
assert splitnet.__file__.startswith(sys.argv[2]), splitnet.__file__  # generated code only
try:
    import splitnet.codecs
    raise SystemExit("splitnet's own code is importable: the test proves nothing")
except ImportError:
    pass
from splitnet.v1 import inference_pb2, inference_pb2_grpc, tensor_pb2

stub = inference_pb2_grpc.SplitInferenceStub(grpc.insecure_channel(sys.argv[1]))
info = stub.GetModelInfo(inference_pb2.ModelInfoRequest())
model = info.models[0]
x = np.array(json.loads(sys.stdin.read()), dtype="<f4")
t = tensor_pb2.Tensor(shape=x.shape, dtype=tensor_pb2.DTYPE_FLOAT32,
                      raw_nbytes=x.nbytes, payload=x.tobytes())
resp = stub.Infer(inference_pb2.InferRequest(id=7, model=model.name, cut="input",
                                             fingerprint=model.fingerprint, frontier=[t]))
out = resp.outputs[0]
assert out.dtype == tensor_pb2.DTYPE_FLOAT32 and not out.steps
y = np.frombuffer(out.payload, dtype="<f4").reshape(tuple(out.shape))
print(json.dumps({"model": model.name, "cuts": [c.name for c in model.cuts], "id": resp.id,
                  "y": y.tolist(), "batch": resp.timing.batch_size}))
"""


def test_client_from_proto_alone(
    digits_server: ServerThread, digits_weights: Path, tmp_path: Path
) -> None:
    run_protoc(tmp_path)
    # Make the generated folders regular packages so they shadow the installed splitnet.
    (tmp_path / "splitnet" / "__init__.py").write_text("")
    (tmp_path / "splitnet" / "v1" / "__init__.py").write_text("")
    (tmp_path / "client.py").write_text(CLIENT)
    x = load_digits()["test"].x[:2]
    # -S: no site hooks, so splitnet's editable-install finder is not loaded; grpc and
    # numpy come from site-packages named explicitly.
    site = sysconfig.get_paths()
    path = os.pathsep.join([str(tmp_path), site["purelib"], site["platlib"]])
    out = subprocess.run(
        [sys.executable, "-S", "client.py", digits_server.address, str(tmp_path)],
        input=json.dumps(x.tolist()),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["model"] == "digits-cnn" and doc["id"] == 7 and "pool1" in doc["cuts"]
    want = load_model("digits-cnn", digits_weights)(x)
    assert torch.equal(torch.tensor(doc["y"]), want)
