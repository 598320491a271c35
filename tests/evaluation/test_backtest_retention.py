"""`oryx-ts backtest --retention` replays a trained checkpoint under bounded retention exactly as a checkpoint built from the changed config would."""

import json

import pytest

from oryx_ts import OryxForecaster, load, save
from oryx_ts.cli import main
from oryx_ts.datasets import SyntheticConfig, to_parquet

ARGS = ["--horizon", "16", "--peers", "none", "--router", "fixed:4", "--warmup-tokens", "16", "--season", "32", "--quiet",
        "--threads", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("bt_retention")
    data = root / "telemetry.parquet"
    to_parquet(data, 3000, 2, seed=5, config=SyntheticConfig().with_coverage(anomaly=0.05))
    assert main(["backtest", "--dataset", str(data), "--out", str(root / "train"), "--train-steps", "3",
                 "--set", "train.batch_size=2", *ARGS]) == 0
    return root, data, root / "train" / "model"


def _scores(root, data, name, *extra) -> dict:
    assert main(["backtest", "--dataset", str(data), "--out", str(root / name), *extra, *ARGS]) == 0
    return json.loads((root / name / "backtest.json").read_text())


def test_backtest_retention_equals_a_checkpoint_built_under_it(trained):
    root, data, ckpt = trained
    model = load(ckpt)
    built = OryxForecaster(model.config.replace(block={"retention": "bounded", "window": 8, "pinned": 2}))
    built.load_state_dict(model.state_dict())
    save(built, root / "built")
    switched = _scores(root, data, "switched", "--model", str(ckpt), "--retention", "bounded:8:2")
    rebuilt = _scores(root, data, "rebuilt", "--model", str(root / "built"))
    own = _scores(root, data, "own", "--model", str(ckpt))
    assert switched["scores"]["oryx"] == rebuilt["scores"]["oryx"] != own["scores"]["oryx"]
    assert switched["oryx"]["model"]["retention"] == {"retention": "bounded", "window": 8, "pinned": 2}
    assert main(["backtest", "--dataset", str(data), "--model", str(ckpt), "--retention", "bounded:x", "--out",
                 str(root / "bad"), *ARGS]) == 2
