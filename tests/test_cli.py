"""The command line as a user meets it: a misspelt or mistyped override is one `error:` line (exit 2)
before anything is written, naming the field and the closest valid names."""
from __future__ import annotations

import pytest

from vipamin_scale.cli import main


@pytest.mark.parametrize("override, says", [
    ("model.pol=cls", "error: model.pol: no such field; did you mean model.pool?"),
    ("+model.pol=cls", "error: model.pol: no such field; did you mean model.pool?"),  # `+` adds nothing read
    ("trian.lr=0.1", "error: trian.lr: no such field; did you mean train.lr?"),
    ("train.lr=abc", "error: train.lr: 'abc' is not a float"),
    ("prompt.deep=maybe", "error: prompt.deep: 'maybe' is not a boolean"),
    ("engine=zero4", "error: engine=zero4: no such option; the options are ddp, deepspeed, fairscale, fsdp2, "
                     "zero1, zero2, zero3"),
], ids=["field", "added_field", "section", "float", "bool", "group_option"])
def test_bad_override_is_one_line_before_anything_is_written(override, says, tmp_path, capfd):
    run = tmp_path / "run"
    code = main(["train", "model=vit_test_d64", override, f"hydra.run.dir={run}"])
    err = capfd.readouterr().err
    assert code == 2, err
    assert err.strip().splitlines() == [says], err
    assert not run.exists()

