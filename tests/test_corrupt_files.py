"""Corrupted files: tensor files carry a sha256 checked on every load (safetensors alone reads zeroed
bytes silently), a checkpoint's state.json records every file's sha256, unparsable JSON is an error
naming the file, files written before checksums still load; a Sudoku puzzle without exactly one
solution is flagged by ``anyorder sample``."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anyorder.cli import main
from anyorder.experiment import build, load_run, train
from anyorder.train import CorruptFileError, Trainer, load_checkpoint, load_weights, save_weights
from anyorder.train.files import SHA256_KEY, load_tensors, save_tensors

from test_tasks_config_cli import tiny_cfg
from test_trainer import cfg_for, make_loss_fn, make_model


def zero_bytes(path: Path, where: str = "data", n: int = 16) -> None:
    """Overwrite n bytes with zeros: inside the tensor data (middle of the data section) or the header."""
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    at = (header + len(raw)) // 2 if where == "data" else 12
    raw[at:at + n] = bytes(n)
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    return train(tiny_cfg(tmp_path_factory.mktemp("run")))


@pytest.fixture
def run(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "t"))


def test_zeroed_bytes_in_model_safetensors_are_detected(run, capsys):
    weights = run / "model.safetensors"
    load_run(run)  # intact: loads
    zero_bytes(weights)
    load_file(str(weights))  # the point: safetensors itself reads the damaged file without a word
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is corrupted: its sha256 is [0-9a-f]{12}\.\.\., "
                                               r"not the [0-9a-f]{12}\.\.\. recorded in its header"):
        load_run(run)
    assert main(["eval", str(run), "--n", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.safetensors is corrupted" in err[0]


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_a_damaged_header_or_a_truncated_file_names_the_file(run, damage):
    weights = run / "model.safetensors"
    if damage == "header":
        zero_bytes(weights, "header")
    else:
        weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is corrupted: not a readable safetensors file"):
        load_weights(build(tiny_cfg(run.parent)).model, weights)


def test_weights_written_before_checksums_still_load(tmp_path):
    model = make_model()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"format": "pt"})  # what save_weights wrote before: no sha256
    other = make_model(init_seed=5)
    load_weights(other, tmp_path / "old.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_checksum_covers_every_dtype_and_shape(tmp_path):
    tensors = {"f": torch.randn(3, 4), "b": torch.tensor(True), "h": torch.ones(5, dtype=torch.bfloat16),
               "e": torch.zeros(0, 2), "i": torch.arange(6).reshape(2, 3), "s": torch.tensor(2.5)}
    digest = save_tensors(tmp_path / "x.safetensors", tensors)
    out = load_tensors(tmp_path / "x.safetensors", expected_sha256=digest)
    assert all(torch.equal(out[k], tensors[k]) and out[k].dtype == tensors[k].dtype for k in tensors)
    with pytest.raises(CorruptFileError, match="not the 000000000000... recorded in state.json"):
        load_tensors(tmp_path / "x.safetensors", expected_sha256="0" * 64, where="in state.json")


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_run(tmp_path):
    cfg = cfg_for(ema=0.9, steps=6, checkpoint_every=3)
    Trainer(make_model(), make_loss_fn(), cfg, tmp_path / "run").fit()
    # resuming with two more steps loads the checkpoint (a finished run at its own step count has
    # nothing to do: fit() returns its summary without touching the checkpoint)
    return tmp_path / "run" / "checkpoint", cfg_for(ema=0.9, steps=8, checkpoint_every=3)


@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_a_corrupted_checkpoint_file_stops_the_resume_naming_it(tmp_path, name):
    ckpt, longer = checkpoint_run(tmp_path)
    state = json.loads((ckpt / "state.json").read_text())
    assert set(state["checksums"]) == {"model.safetensors", "ema.safetensors", "optimizer.safetensors",
                                       "optimizer.json", "rng.safetensors"}
    zero_bytes(ckpt / name)
    with pytest.raises(CorruptFileError, match=rf"checkpoint/{name} is corrupted: its sha256 is"):
        Trainer(make_model(), make_loss_fn(), longer, tmp_path / "run").fit()


def test_a_checkpoint_file_from_elsewhere_does_not_match_state_json(tmp_path):
    """Each file is intact by its own header, but not the one this checkpoint's state.json recorded."""
    ckpt, _ = checkpoint_run(tmp_path)
    save_weights(make_model(init_seed=1), ckpt / "model.safetensors")
    with pytest.raises(CorruptFileError, match=r"model\.safetensors is corrupted: .* recorded in .*state\.json"):
        load_checkpoint(ckpt, make_model())


def test_edited_optimizer_json_is_detected(tmp_path):
    ckpt, _ = checkpoint_run(tmp_path)
    text = (ckpt / "optimizer.json").read_text()
    (ckpt / "optimizer.json").write_text(text.replace('"weight_decay": 0.1', '"weight_decay": 0.2', 1))
    opt = Trainer(make_model(), make_loss_fn(), cfg_for(ema=0.9), tmp_path / "other").optimizer
    with pytest.raises(CorruptFileError, match=r"optimizer\.json is corrupted: its sha256 is"):
        load_checkpoint(ckpt, make_model(), opt)


@pytest.mark.parametrize("name", ["state.json", "optimizer.json"])
def test_unparsable_checkpoint_json_names_the_file(tmp_path, name):
    ckpt, longer = checkpoint_run(tmp_path)
    zero_bytes(ckpt / name, "header")
    # state.json does not parse; optimizer.json fails its sha256 in state.json first
    with pytest.raises(CorruptFileError, match=rf"checkpoint/{name} is corrupted: (not valid JSON|its sha256 is)"):
        Trainer(make_model(), make_loss_fn(), longer, tmp_path / "run").fit()


def test_a_checkpoint_written_before_checksums_still_resumes(tmp_path):
    ckpt, longer = checkpoint_run(tmp_path)
    for f in ckpt.glob("*.safetensors"):  # rewrite each file as before: no sha256 in its header
        tensors = load_file(str(f))
        with safe_open(str(f), framework="pt") as so:
            meta = {k: v for k, v in (so.metadata() or {}).items() if k != SHA256_KEY}
        save_file(tensors, str(f), metadata=meta)
    state = json.loads((ckpt / "state.json").read_text())
    del state["checksums"]
    (ckpt / "state.json").write_text(json.dumps(state))
    assert Trainer(make_model(), make_loss_fn(), longer, tmp_path / "run").fit()["resumed_from"] == 6


def test_corrupted_run_json_names_the_file_on_resume(tmp_path):
    _, longer = checkpoint_run(tmp_path)
    (tmp_path / "run" / "run.json").write_text('{"run_info": ')
    with pytest.raises(CorruptFileError, match=r"run\.json is corrupted: not valid JSON"):
        Trainer(make_model(), make_loss_fn(), longer, tmp_path / "run").fit()


# ----------------------------------------------------------------------------- sudoku puzzles
def test_sample_flags_a_puzzle_without_exactly_one_solution(run, capsys):
    unique, clash, several = "1...\n..2.\n.3..\n...4", "11..\n....\n....\n....", "................"
    exp = load_run(run)
    assert exp.task.check_puzzle(unique) is None
    assert "has no solution" in exp.task.check_puzzle(clash)
    assert "has no solution" in exp.task.check_puzzle("12........3...4.")  # consistent clues, no completion
    assert "several solutions" in exp.task.check_puzzle(several)
    capsys.readouterr()
    assert main(["sample", str(run), "--puzzle", unique, "--puzzle", clash, "--puzzle", several,
                 "--decoder", "top_prob"]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 3  # every puzzle is still decoded
    warns = err.strip().splitlines()
    assert len(warns) == 2 and warns[0].startswith("anyorder: warning: puzzle 2 (11..") and "no solution" in warns[0]
    assert warns[1].startswith("anyorder: warning: puzzle 3") and "several solutions" in warns[1]
