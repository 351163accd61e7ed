"""``anyorder selfcheck --tiny`` end to end on the CPU: every order trains and decodes, cached
decoding equals uncached, FSDP2 on one rank trains what the plain run trains, the JSON is written."""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from anyorder.cli import main
from anyorder.orders import ORDERS
from anyorder.selfcheck import run_selfcheck


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("selfcheck")
    return out, run_selfcheck(out, tiny=True, echo=lambda line: None)


def test_every_order_trains_and_decodes(report):
    out, rep = report
    assert rep["ok"], rep["failures"]
    assert set(rep["orders"]) == set(ORDERS.names())
    assert json.loads((out / "selfcheck.json").read_text())["orders"].keys() == rep["orders"].keys()
    for name, rec in rep["orders"].items():
        assert rec["train_tokens_per_s"] > 0 and rec["final_loss"] > 0, name
        dec = rec["decode"]
        assert dec["uncached"]["tokens_per_s"] > 0, name
        if "rows" in dec:  # the order's decoder takes a KV cache: every row decodes to the same tokens
            assert dec["rows"] == 8 and dec["rows_equal"] == 8 and dec["cached_equals_uncached"], name
        else:
            assert "KV cache" in dec["cached"]["unavailable"], name
    # the exact caches of ar and block are checked, not skipped
    assert all("rows" in rep["orders"][o]["decode"] for o in ("ar", "block"))


def test_fsdp_on_one_rank_trains_what_the_plain_run_trains(report):
    """Same batches, bf16 both: FSDP's mixed-precision policy (bf16 parameters) against autocast."""
    _, rep = report
    fsdp = rep["fsdp"]
    assert "error" not in fsdp, fsdp
    assert fsdp["final_loss"] == pytest.approx(fsdp["final_loss_plain"], abs=0.05)
    state = json.loads((Path(fsdp["run_dir"]) / "checkpoint" / "state.json").read_text())
    assert state["sharded"] == "sharded" and state["config"]["strategy"] == "fsdp"
    assert not dist.is_initialized()  # the one-rank process group is gone again
    assert (rep["device"].startswith("cpu")) != torch.cuda.is_available()


def test_a_failure_is_reported_and_exits_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["selfcheck", "--tiny", "--out-dir", str(tmp_path), "--orders", "nosuchorder"])
    assert exc.value.code == 1
    rep = json.loads((tmp_path / "selfcheck.json").read_text())
    assert not rep["ok"] and rep["failures"][0].startswith("nosuchorder: ValueError: unknown order")
    assert "selfcheck FAILED" in capsys.readouterr().out
