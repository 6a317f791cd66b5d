"""MXNet .params reading and ResNet-38d conversion, on files written here in that format."""

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlps_dist.models import create_classifier
from mlps_dist.models.resnet38d import create_resnet38d, create_small38
from mlps_dist.models.weights import (
    DTYPES,
    LIST_MAGIC,
    V2_MAGIC,
    convert_mxnet_resnet38d,
    load_pretrained,
    match_state_dict,
    mxnet_name_to_resnet38d,
    read_mxnet_params,
)

REPO = Path(__file__).resolve().parents[2]


def write_mxnet_params(path: str | Path, arrays: dict[str, np.ndarray], legacy: bool = False) -> None:
    """Write ``arrays`` as ``mx.nd.save`` does (V2 headers, or legacy uint32 shapes): the
    files the reader is tested on."""
    flag_of = {np.dtype(v): k for k, v in DTYPES.items()}
    with open(path, "wb") as f:
        f.write(struct.pack("<QQQ", LIST_MAGIC, 0, len(arrays)))
        for arr in arrays.values():
            flag = flag_of[np.dtype(arr.dtype)]
            if legacy:
                f.write(struct.pack(f"<I{arr.ndim}I", arr.ndim, *arr.shape))
            else:
                f.write(struct.pack(f"<Iii{arr.ndim}q", V2_MAGIC, 0, arr.ndim, *arr.shape))
            f.write(struct.pack("<iii", 1, 0, flag))
            f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        f.write(struct.pack("<Q", len(arrays)))
        for name in arrays:
            raw = name.encode("utf-8")
            f.write(struct.pack("<Q", len(raw)) + raw)


BN_LEAF = {
    "weight": ("arg", "gamma"),
    "bias": ("arg", "beta"),
    "running_mean": ("aux", "moving_mean"),
    "running_var": ("aux", "moving_var"),
}


def mxnet_name(ours: str) -> str:
    """The MXNet ResNet-38 A1 name of one of our keys (written independently of the code
    under test: b4 -> unit 4a, b4_5 -> unit 4b5)."""
    parts = ours.split(".")
    if parts[0] == "conv1a":
        return "arg:conv1a_weight"
    if parts[0] == "bn7":
        prefix, leaf = BN_LEAF[parts[1]]
        return f"{prefix}:bn7_{leaf}"
    stage, _, index = parts[0][1:].partition("_")
    unit = f"{stage}b{index}" if index else f"{stage}a"
    layer, branch = parts[1].split("_", 1)
    if layer == "conv":
        return f"arg:res{unit}_{branch}_weight"
    prefix, leaf = BN_LEAF[parts[2]]
    return f"{prefix}:bn{unit}_{branch}_{leaf}"


def backbone_as_mxnet(state: dict, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    arrays = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        shape = tuple(value.shape)
        arrays[mxnet_name(key)] = (
            rng.standard_normal(shape).astype(np.float32)
            if rng is not None
            else np.broadcast_to(np.zeros((), np.float32), shape)
        )
    return arrays


@pytest.mark.parametrize("legacy", [False, True])
def test_reads_real_naming_pattern_for_a_few_blocks(tmp_path, legacy):
    rng = np.random.default_rng(0)
    arrays = {
        "arg:conv1a_weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "arg:bn2a_branch2a_gamma": rng.standard_normal(4).astype(np.float32),
        "aux:bn2a_branch2a_moving_var": rng.random(4).astype(np.float32),
        "arg:res2a_branch1_weight": rng.standard_normal((8, 4, 1, 1)).astype(np.float32),
        "arg:res4b5_branch2b1_weight": rng.standard_normal((2, 2, 3, 3)).astype(np.float16),
        "aux:bn5b2_branch2a_moving_mean": rng.standard_normal(3).astype(np.float64),
        "arg:res7a_branch2b2_weight": rng.standard_normal((6, 2, 1, 1)).astype(np.float32),
        "arg:bn7_beta": rng.standard_normal(6).astype(np.float32),
        "arg:linear1000_weight": rng.standard_normal((10, 6)).astype(np.float32),
    }
    path = tmp_path / "tiny.params"
    write_mxnet_params(path, arrays, legacy=legacy)
    read = read_mxnet_params(path)
    assert list(read) == list(arrays)
    for name, arr in arrays.items():
        assert read[name].dtype == arr.dtype and np.array_equal(read[name], arr), name

    state, dropped = convert_mxnet_resnet38d(read)
    assert dropped == ["arg:linear1000_weight"]
    expected = {
        "conv1a.weight": "arg:conv1a_weight",
        "b2.bn_branch2a.weight": "arg:bn2a_branch2a_gamma",
        "b2.bn_branch2a.running_var": "aux:bn2a_branch2a_moving_var",
        "b2.conv_branch1.weight": "arg:res2a_branch1_weight",
        "b4_5.conv_branch2b1.weight": "arg:res4b5_branch2b1_weight",
        "b5_2.bn_branch2a.running_mean": "aux:bn5b2_branch2a_moving_mean",
        "b7.conv_branch2b2.weight": "arg:res7a_branch2b2_weight",
        "bn7.bias": "arg:bn7_beta",
    }
    assert set(state) == set(expected)
    for ours, theirs in expected.items():
        assert state[ours].dtype == torch.float32
        assert torch.equal(state[ours], torch.from_numpy(arrays[theirs].astype(np.float32)))


def test_bad_files_and_names_fail_clearly(tmp_path):
    path = tmp_path / "w.params"
    write_mxnet_params(path, {"arg:conv1a_weight": np.ones((2, 3, 3, 3), np.float32)})
    data = path.read_bytes()
    (tmp_path / "cut.params").write_bytes(data[:60])
    with pytest.raises(ValueError, match="cut.params: truncated"):
        read_mxnet_params(tmp_path / "cut.params")
    (tmp_path / "junk.params").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.params: not an MXNet NDArray list"):
        read_mxnet_params(tmp_path / "junk.params")
    with pytest.raises(ValueError, match="arg:fc6_weight"):
        mxnet_name_to_resnet38d("arg:fc6_weight")
    with pytest.raises(FileNotFoundError, match="nope.params"):
        read_mxnet_params(tmp_path / "nope.params")


def test_tool_converts_a_complete_small38_file_and_reports(tmp_path, capsys):
    own = create_small38().state_dict()
    arrays = backbone_as_mxnet(own, np.random.default_rng(1))
    arrays["arg:linear1000_weight"] = np.zeros((1000, 512), np.float32)
    arrays["arg:linear1000_bias"] = np.zeros(1000, np.float32)
    src, out = tmp_path / "small.params", tmp_path / "out" / "small38.pth"
    write_mxnet_params(src, arrays)
    run = subprocess.run(
        [sys.executable, "-m", "mlps_dist", "weights", "--mxnet", str(src), "--out", str(out), "--model", "small38"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert f"loaded {len(arrays) - 2} tensors" in run.stdout
    assert "linear1000_weight" in run.stdout and "missing" not in run.stdout

    model = create_classifier("small38", num_classes=3, pretrained=str(out))
    loaded = model.backbone.state_dict()
    assert torch.equal(loaded["b4_5.conv_branch2b1.weight"], torch.from_numpy(arrays["arg:res4b5_branch2b1_weight"]))
    assert torch.equal(loaded["bn7.running_var"], torch.from_numpy(arrays["aux:bn7_moving_var"]))

    del arrays["arg:res5b1_branch2a_weight"]  # an incomplete file is reported, exit status 1
    write_mxnet_params(src, arrays)
    from mlps_dist.cli import weights as tool

    assert tool.main(["--mxnet", str(src), "--out", str(out), "--model", "small38"]) == 1
    printed = capsys.readouterr().out
    assert "missing" in printed and "b5_1.conv_branch2a.weight" in printed


def test_full_shape_resnet38d_conversion_has_no_missing_keys(tmp_path):
    with torch.device("meta"):  # names and shapes only
        own = create_resnet38d().state_dict()
    path = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    arrays = backbone_as_mxnet(own, rng=None)
    arrays["arg:linear1000_weight"] = np.broadcast_to(np.zeros((), np.float32), (1000, 4096))
    write_mxnet_params(path, arrays)
    del arrays
    state, dropped = convert_mxnet_resnet38d(read_mxnet_params(path))
    report = match_state_dict(own, state, str(path), dropped)
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == sum(not k.endswith("num_batches_tracked") for k in own)
    assert report.dropped == ["arg:linear1000_weight"]
    model = create_resnet38d()
    model.load_state_dict(state, strict=False)  # a real load of every tensor
    assert model.b7.conv_branch1.weight.abs().sum() == 0 and model.bn7.running_var.abs().sum() == 0


def test_load_pretrained_reports_and_rejects(tmp_path, caplog):
    model = create_small38()
    state = {
        f"module.{k}": torch.randn_like(v) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
        if not k.startswith("b6.")
    }
    state["fc8.weight"] = torch.zeros(4, 512, 1, 1)  # a public stage-1 head: dropped
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": state}, path)
    with caplog.at_level("WARNING"):
        report = load_pretrained(model, path, kind="resnet38d")
    assert report.dropped == ["fc8.weight"] and report.unexpected == ["extra.weight"]
    assert report.missing and all(k.startswith("b6.") for k in report.missing)
    assert "partial.pth" in caplog.text and "b6." in caplog.text
    assert torch.equal(model.b4_5.conv_branch2a.weight, state["module.b4_5.conv_branch2a.weight"])

    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1a.weight": torch.zeros(9, 3, 3, 3)}, wrong)
    with pytest.raises(ValueError, match=r"wrong.pth.*conv1a.weight.*\(9, 3, 3, 3\)"):
        load_pretrained(model, wrong, kind="resnet38d")
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"encoder.weight": torch.zeros(1)}, unrelated)
    with pytest.raises(ValueError, match="unrelated.pth: no tensor name matches"):
        load_pretrained(model, unrelated, kind="resnet38d")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_pretrained(model, tmp_path / "missing.pth", kind="resnet38d")


@pytest.mark.parametrize("magic", [0xF993FAC8, 0xF993FACA])  # V1 (int64 shape), V3 (np-shape)
def test_reads_v1_and_v3_headers(tmp_path, magic):
    import struct

    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    name = b"arg:bn7_gamma"
    header = struct.pack("<II", magic, 2) if magic == 0xF993FAC8 else struct.pack("<Iii", magic, 0, 2)
    blob = (
        struct.pack("<QQQ", 0x112, 0, 1)
        + header
        + struct.pack("<2q", 2, 3)
        + struct.pack("<iii", 1, 0, 0)
        + arr.tobytes()
        + struct.pack("<QQ", 1, len(name))
        + name
    )
    path = tmp_path / "v.params"
    path.write_bytes(blob)
    assert np.array_equal(read_mxnet_params(path)["arg:bn7_gamma"], arr)
