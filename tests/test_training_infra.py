"""Training infrastructure: typed configs, checkpoints, RNG state, logging."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medssl.config import (
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_overrides,
)
from medssl.errors import CheckpointError, ConfigError, MedsslError
from medssl.training.checkpoint import (
    CheckpointManager,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from medssl.training.logger import TrainLogger
from medssl.training.seed import seed_everything, worker_init_fn


@dataclass(frozen=True)
class FocalMixCfg:
    sharpen_t: float = 0.5
    mix: Literal["mixup", "none"] = "mixup"
    anchors_mm: tuple[float, ...] = (5.0, 10.0, 20.0)

    def __post_init__(self) -> None:
        if not 0 < self.sharpen_t <= 1:
            raise ValueError(f"sharpen_t must be in (0, 1], got {self.sharpen_t}")


@dataclass(frozen=True)
class TrainCfg:
    seed: int = 0
    lr: float = 1e-3
    amp: bool = False
    name: str = "run"
    patch: tuple[int, int, int] = (96, 96, 96)
    resume: str | None = None
    focalmix: FocalMixCfg = field(default_factory=FocalMixCfg)


# -- config -----------------------------------------------------------------------------------


def test_missing_keys_keep_defaults_and_nested_sections_build():
    cfg = config_from_dict(TrainCfg, {"seed": 3, "focalmix": {"mix": "none"}})
    assert cfg == TrainCfg(seed=3, focalmix=FocalMixCfg(mix="none"))


def test_unknown_nested_key_names_the_dotted_key_and_suggests():
    with pytest.raises(ConfigError) as info:
        config_from_dict(TrainCfg, {"focalmix": {"sharpen_temp": 0.3}})
    msg = str(info.value)
    assert "'focalmix.sharpen_temp'" in msg and "did you mean 'focalmix.sharpen_t'" in msg
    assert info.value.key == "focalmix.sharpen_temp"
    assert isinstance(info.value, MedsslError)


@pytest.mark.parametrize(
    ("data", "key", "bad"),
    [
        ({"seed": 1.5}, "seed", "1.5"),
        ({"seed": True}, "seed", "True"),
        ({"amp": 1}, "amp", "1"),
        ({"lr": "fast"}, "lr", "'fast'"),
        ({"name": 3}, "name", "3"),
        ({"patch": [96, 96]}, "patch", "[96, 96]"),
        ({"patch": [96, "x", 96]}, "patch[1]", "'x'"),
        ({"focalmix": {"anchors_mm": 5}}, "focalmix.anchors_mm", "5"),
        ({"focalmix": 3}, "focalmix", "3"),
    ],
)
def test_wrong_type_names_key_and_value(data, key, bad):
    with pytest.raises(ConfigError) as info:
        config_from_dict(TrainCfg, data)
    assert f"'{key}'" in str(info.value) and bad in str(info.value)


def test_types_are_converted():
    cfg = config_from_dict(
        TrainCfg, {"lr": 1, "patch": [64, 64, 32], "resume": None, "focalmix": {"anchors_mm": [4]}}
    )
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.patch == (64, 64, 32)
    assert cfg.focalmix.anchors_mm == (4.0,) and isinstance(cfg.focalmix.anchors_mm[0], float)
    assert config_from_dict(TrainCfg, {"resume": "x.pt"}).resume == "x.pt"


def test_literal_choices_are_enforced():
    with pytest.raises(ConfigError, match=r"'focalmix.mix'.*'mixup', 'none'.*'cutmix'"):
        config_from_dict(TrainCfg, {"focalmix": {"mix": "cutmix"}})


def test_post_init_range_error_names_the_section():
    with pytest.raises(ConfigError, match=r"'focalmix'.*sharpen_t must be in") as info:
        config_from_dict(TrainCfg, {"focalmix": {"sharpen_t": 2.0}})
    assert info.value.key == "focalmix"


def test_load_config_reads_yaml_with_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("lr: 1e-4\nfocalmix:\n  sharpen_t: 0.25\n")
    cfg = load_config(TrainCfg, path, overrides={"focalmix.mix": "none", "seed": 7})
    assert cfg.lr == pytest.approx(1e-4)
    assert cfg.focalmix == FocalMixCfg(sharpen_t=0.25, mix="none")
    assert cfg.seed == 7


def test_overrides_are_validated(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match=r"exp.yaml.*'focalmix.sharpen'"):
        load_config(TrainCfg, path, overrides={"focalmix.sharpen": 0.1})
    with pytest.raises(ConfigError, match=r"'seed'.*int.*'x'"):
        load_config(TrainCfg, path, overrides={"seed": "x"})
    with pytest.raises(ConfigError, match=r"'seed.deep'.*'seed' holds the value 1"):
        load_config(TrainCfg, path, overrides={"seed.deep": 1})


def test_parse_overrides_reads_yaml_values():
    assert parse_overrides(["a.b=1e-3", "c=[1, 2]", "d=true", "e=null", "f=text"]) == {
        "a.b": 1e-3,
        "c": [1, 2],
        "d": True,
        "e": None,
        "f": "text",
    }
    with pytest.raises(ConfigError, match="'novalue'"):
        parse_overrides(["novalue"])


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(TrainCfg, path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(TrainCfg, path)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(TrainCfg, tmp_path / "missing.yaml")


def test_config_round_trips_through_yaml(tmp_path):
    cfg = TrainCfg(
        seed=5,
        lr=2.5e-4,
        patch=(32, 48, 64),
        resume="a.pt",
        focalmix=FocalMixCfg(0.3, "none", (6.0,)),
    )
    plain = config_to_dict(cfg)
    assert plain["patch"] == [32, 48, 64] and plain["focalmix"]["anchors_mm"] == [6.0]
    json.dumps(plain)
    path = dump_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(TrainCfg, path) == cfg
    assert config_from_dict(TrainCfg, plain) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]


# -- checkpoints ------------------------------------------------------------------------------


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((2, 2), value)}, "step_value": value}


def test_checkpoint_save_latest_best_prune_and_index(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, metric="cpm", mode="max")
    assert mgr.latest() is None and mgr.best() is None
    cpms = {100: 0.5, 200: 0.8, 300: 0.6, 400: None}
    for step, cpm in cpms.items():
        path = mgr.save(
            _state(float(step)), step, None if cpm is None else {"cpm": cpm, "loss": 1.0}
        )
        assert path == tmp_path / "checkpoints" / f"step_{step:08d}.pt"
    ckpt = tmp_path / "checkpoints"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["best.pt", "index.json", "last.pt", "step_00000300.pt", "step_00000400.pt"]
    assert mgr.load(mgr.latest())["step_value"] == 400.0
    assert mgr.load(mgr.best())["step_value"] == 200.0  # its step file was pruned
    index = json.loads((ckpt / "index.json").read_text())
    assert index["best_step"] == 200 and index["best_value"] == 0.8
    assert index["last_step"] == 400 and index["steps"] == [300, 400]
    assert [h["step"] for h in index["history"]] == [100, 200, 300, 400]
    assert index["history"][1]["metrics"] == {"cpm": 0.8, "loss": 1.0}


def test_checkpoint_manager_resumes_best_from_index_and_min_mode(tmp_path):
    mgr = CheckpointManager(tmp_path, metric="val_loss", mode="min")
    mgr.save(_state(1.0), 1, {"val_loss": 0.4})
    mgr.save(_state(2.0), 2, {"val_loss": 0.5})
    again = CheckpointManager(tmp_path, metric="val_loss", mode="min")
    again.save(_state(3.0), 3, {"val_loss": 0.45})  # worse than 0.4 recorded before restart
    assert again.load(again.best())["step_value"] == 1.0
    again.save(_state(4.0), 4, {"val_loss": torch.tensor(0.1)})
    assert again.load(again.best())["step_value"] == 4.0
    again.save(_state(5.0), 5, {"val_loss": float("nan")})
    assert again.index["best_step"] == 4
    assert json.loads(again.index_path.read_text())["history"][-1]["metrics"] == {"val_loss": None}


def test_checkpoint_writes_leave_no_temp_files(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step in range(3):
        mgr.save(_state(step), step, {"cpm": step})
    assert not [p for p in mgr.dir.iterdir() if p.name.startswith(".")]

    def boom(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(_state(9.0), 2, {"cpm": 99})
    monkeypatch.undo()
    assert not [p for p in mgr.dir.iterdir() if p.name.startswith(".")]
    assert mgr.load(mgr.step_path(2))["step_value"] == 2  # the old file is intact
    assert mgr.load(mgr.latest())["step_value"] == 2


def test_corrupt_checkpoint_raises_checkpoint_error_naming_the_file(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(_state(1.0), 1)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt") as info:
        load_checkpoint(truncated)
    assert info.value.path == truncated and "corrupt" in str(info.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        mgr.load(garbage)
    with pytest.raises(CheckpointError, match="absent.pt.*does not exist"):
        mgr.load(tmp_path / "absent.pt")


def test_checkpoint_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="'maximum'"):
        CheckpointManager(tmp_path, mode="maximum")
    with pytest.raises(ValueError, match="-1"):
        CheckpointManager(tmp_path).save({}, -1)


def _draw() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_reproduces_draws(tmp_path):
    seed_everything(123)
    _draw()
    mgr = CheckpointManager(tmp_path)
    mgr.save({"rng": rng_state()}, 1)
    expected = [_draw() for _ in range(3)]
    seed_everything(999)
    assert _draw() != expected[0]
    set_rng_state(mgr.load(mgr.latest())["rng"])
    assert [_draw() for _ in range(3)] == expected


def test_seed_everything_repeats_and_validates():
    seed_everything(7)
    first = _draw()
    seed_everything(7)
    assert _draw() == first
    with pytest.raises(ValueError, match="-1"):
        seed_everything(-1)


class _NumpyDraws(torch.utils.data.Dataset):
    """Returns this worker's numpy/random draws and what the worker's seed predicts."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple:
        seed = torch.utils.data.get_worker_info().seed
        expected = (np.random.RandomState(seed % 2**32).rand(), random.Random(seed).random())
        return (float(np.random.rand()), random.random()), expected


def test_worker_init_fn_seeds_numpy_and_random_from_the_torch_worker_seed():
    def draws() -> list:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(
            _NumpyDraws(),
            batch_size=None,
            num_workers=2,
            worker_init_fn=worker_init_fn,
            multiprocessing_context="fork",
        )
        return [((float(a), float(b)), (float(c), float(d))) for (a, b), (c, d) in loader]

    first = draws()
    # items 0, 2 come from worker 0 and items 1, 3 from worker 1: each first draw is seeded
    assert first[0][0] == first[0][1] and first[1][0] == first[1][1]
    assert first[0][0][0] != first[1][0][0] and first[0][0][1] != first[1][0][1]
    assert draws() == first  # repeatable under the same torch seed


# -- logger -----------------------------------------------------------------------------------


class _Stream:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_logger_writes_tensorboard_events_and_jsonl(tmp_path):
    stream = _Stream()
    with TrainLogger(tmp_path, total_steps=10, print_every=5, stream=stream) as logger:
        for step in range(1, 11):
            logger.log(step, loss=torch.tensor(1.0 / step), lr=np.float32(0.1))
            logger.advance(step, loss=1.0 / step)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[1]["loss"] == pytest.approx(0.5) and rows[0]["lr"] == pytest.approx(0.1)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 11))
    lines = stream.text.strip().splitlines()
    assert len(lines) == 2  # steps 5 and 10: plain lines when not a TTY
    assert lines[0].startswith("step 5/10 (50%)") and "it/s" in lines[0] and "ETA" in lines[0]
    assert "loss=0.2" in lines[0] and lines[1].startswith("step 10/10 (100%)")


def test_logger_tty_shows_rich_bar(tmp_path):
    stream = _Stream()
    with TrainLogger(tmp_path, total_steps=4, stream=stream, tty=True) as logger:
        for step in range(1, 5):
            logger.advance(step, loss=0.25)
    assert "4/4" in stream.text and "loss=0.25" in stream.text and "it/s" in stream.text


def test_disabled_logger_writes_nothing(tmp_path):
    stream = _Stream()
    logger = TrainLogger(tmp_path / "rank1", total_steps=5, enabled=False, stream=stream)
    logger.log(1, loss=1.0)
    logger.advance(5, loss=1.0)
    logger.close()
    assert not (tmp_path / "rank1").exists() and stream.text == ""


def test_a_resumed_run_logs_every_step_once(tmp_path):
    """A process killed past its last checkpoint (step 4) logged steps 5-6 and half a line; the
    resumed run redoes 5-6: log.jsonl must hold each step once, the cut line gone."""
    import io

    with TrainLogger(tmp_path, total_steps=8, stream=io.StringIO()) as logger:
        for step in range(1, 7):
            logger.log(step, loss=float(step))
    with open(tmp_path / "log.jsonl", "a") as fh:
        fh.write('{"step": 7, "lo')  # killed mid-write
    with TrainLogger(tmp_path, total_steps=8, stream=io.StringIO(), resume_step=4) as logger:
        for step in range(5, 9):
            logger.log(step, loss=10.0 * step)
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 4.0, 50.0, 60.0, 70.0, 80.0]
    # a fresh logger (no resume step) appends, as before
    with TrainLogger(tmp_path, total_steps=8, stream=io.StringIO()) as logger:
        logger.log(9, loss=0.0)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 9
