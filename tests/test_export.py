import logging
import os
import warnings

import onnx
import pytest
import torch

import dsd_fx
from conftest import TinyMLP, mlp_args


def test_sparse_export_folds_masks(tmp_path):
    model = TinyMLP()
    sparse = dsd_fx.transform(model)
    code_before = sparse.code
    path = tmp_path / "s.onnx"
    proto = dsd_fx.export_onnx(sparse, mlp_args(), path, optimize=False)
    assert [n.op_type for n in proto.graph.node].count("Mul") == 0
    assert sorted(i.name for i in proto.graph.initializer) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert sparse.code == code_before  # export never rewrites the training graph
    assert onnx.load(str(path)).graph.node  # the file is complete
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_export_leaves_training_mode_alone():
    model = TinyMLP().train()
    dsd_fx.export_onnx(model, mlp_args())
    assert model.training and model.fc1.training


class _Chatty(torch.nn.Module):
    """A model whose forward prints and warns, as user code does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        print("message from the user's forward")
        warnings.warn("warning from the user's forward", UserWarning)
        return self.fc(x)


def test_export_leaves_stdout_and_warnings_to_the_user(capsys):
    with pytest.warns(UserWarning, match="warning from the user's forward"):
        dsd_fx.export_onnx(_Chatty(), mlp_args())
    assert "message from the user's forward" in capsys.readouterr().out


_LEVELS: list[int] = []


class _SeesLogLevel(torch.nn.Module):
    """Records the torch.onnx logger's level while the exporter runs its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        _LEVELS.append(logging.getLogger("torch.onnx").level)
        return self.fc(x)


@pytest.mark.parametrize("user_level", [logging.NOTSET, logging.INFO])
def test_exporter_loggers_quiet_unless_the_user_set_a_level(user_level):
    logger = logging.getLogger("torch.onnx")
    logger.setLevel(user_level)
    _LEVELS.clear()
    try:
        dsd_fx.export_onnx(_SeesLogLevel(), mlp_args())
        assert _LEVELS and set(_LEVELS) == {logging.ERROR if user_level == logging.NOTSET else user_level}
        assert logger.level == user_level  # as it was
    finally:
        logger.setLevel(logging.NOTSET)


def test_export_imports_nothing_above_it():
    import ast
    import pathlib

    tree = ast.parse((pathlib.Path(dsd_fx.__file__).parent / "proof" / "export.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"dsd_fx.proof.zero_overhead", "dsd_fx.proof.runtime", "dsd_fx.diagnostics.graph_diff", "dsd_fx.infra.pipeline", "dsd_fx.diagnostics.print_changed"}
