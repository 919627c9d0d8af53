import json

import pytest
import torch
from typer.testing import CliRunner

from igkd.cli import app, main
from igkd.errors import IgkdError
from igkd.models import build_model, count_parameters, load_model, save_model
from igkd.models.registry import parse_model_name

EXPECTED = {  # reference-facts.md
    "teacher": (2_236_682, 1.00),
    "k3": (1_019_402, 2.19),
    "k5": (543_498, 4.12),
    "k7": (306_954, 7.29),
    "k9": (185_738, 12.04),
    "k11": (77_194, 28.97),
    "k13": (40_970, 54.59),
    "k15": (16_042, 139.43),
    "k17": (1_994, 1121.71),
}


def test_models_json_lists_exact_family():
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert {name: (row["params"], row["cf"]) for name, row in rows.items()} == EXPECTED
    assert rows["teacher"]["macs"] > rows["k5"]["macs"] > rows["k17"]["macs"] > 0


def test_teacher_layout_matches_reference():
    teacher = build_model("teacher")
    assert len(teacher.features) == 19
    assert teacher.features[0][0].stride == (1, 1)  # CIFAR stem: stride 1
    assert isinstance(teacher.classifier[0], torch.nn.Dropout) and teacher.classifier[0].p == 0.2
    assert teacher.classifier[1].in_features == 1280
    student = build_model("k5")
    assert len(student.features) == 14 and student.classifier[0].p == 0
    assert student(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_width_multiplier_shrinks():
    assert count_parameters(build_model("teacher", width=0.5)) < count_parameters(build_model("teacher")) / 2


@pytest.mark.parametrize("name", ["k4", "k19", "resnet", "student-k2"])
def test_unknown_model_name(name):
    with pytest.raises(IgkdError, match="unknown model"):
        parse_model_name(name)


def test_safetensors_round_trip(tmp_path):
    model = build_model("k11", num_classes=7, width=0.5, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5)).eval()
    save_model(tmp_path / "m.safetensors", model, {"note": "x"})
    loaded, meta = load_model(tmp_path / "m.safetensors")
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert meta["spec"]["name"] == "k11" and meta["note"] == "x" and meta["format"] == "igkd-safetensors"


def test_reference_layouts_load_with_their_input_convention(tmp_path):
    student = build_model("k5").eval()
    state = {k: v for k, v in student.state_dict().items() if not k.startswith("normalize.")}
    torch.save(state, tmp_path / "ref_student.pth")
    loaded, meta = load_model(tmp_path / "ref_student.pth")
    assert meta["format"] == "reference-student"
    assert loaded.normalize.mean.flatten().tolist() == [0.0, 0.0, 0.0]  # trained on raw [0, 1] inputs
    # attention-transfer layout: front_layers.i / middle_layer / end_layers.j
    at_state = {}
    for key, value in state.items():
        if key.startswith("features."):
            _, idx, rest = key.split(".", 2)
            idx = int(idx)
            new = f"front_layers.{idx}" if idx < 7 else ("middle_layer" if idx == 7 else f"end_layers.{idx - 8}")
            key = f"{new}.{rest}"
        at_state[key] = value
    torch.save(at_state, tmp_path / "ref_at.pth")
    at_model, at_meta = load_model(tmp_path / "ref_at.pth")
    assert at_meta["format"] == "reference-attention-student"
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(at_model(x), loaded(x))
    teacher = build_model("teacher").eval()
    torch.save({k: v for k, v in teacher.state_dict().items() if not k.startswith("normalize.")}, tmp_path / "t.pt")
    t_model, t_meta = load_model(tmp_path / "t.pt")
    assert t_meta["format"] == "reference-teacher"
    assert torch.allclose(t_model(x), teacher(x))  # normalised-input convention restored


def test_wrong_architecture_is_one_clear_line(tmp_path, capsys):
    save_model(tmp_path / "k5.safetensors", build_model("k5"))
    with pytest.raises(IgkdError, match="holds a k5 model, but a teacher model is needed"):
        load_model(tmp_path / "k5.safetensors", expect="teacher")
    state = build_model("k5").state_dict()
    state["classifier.1.weight"] = torch.zeros(10, 99)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(tmp_path / "bad.pt"), "--dataset", "digits"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "does not match the k5 architecture" in err[0]
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(IgkdError, match="cannot read"):
        load_model(tmp_path / "notes.txt")
