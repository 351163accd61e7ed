"""Refactors change no number: tiny runs of every order, linear regression, the toy, every
decoder and the likelihood bounds reproduce the hashes and values recorded in
tests/golden/golden.json before the change (re-record only for a deliberate change of results:
``python tests/golden/record.py --write``)."""
import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("golden_record", Path(__file__).parent / "golden" / "record.py")
record = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record)


def test_every_number_is_bit_identical_to_the_record():
    golden = json.loads(record.GOLDEN.read_text())
    now = json.loads(json.dumps(record.collect()))
    differences = record.diff(golden, now)
    assert not differences, "\n".join(differences[:40])
