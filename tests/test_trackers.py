"""--report_to: what TensorBoard and Weights & Biases get of the metrics rows (stepcoder/trackers.py).

The wandb run is offline (WANDB_MODE=offline: nothing goes to a server) and every file wandb writes is
under tmp_path; its history is read back from the run's transaction log, `run-ID.wandb`, which holds
every record the run wrote (the summary file has only the last values)."""
from __future__ import annotations

import json
import re
import struct
import sys
import types
import zlib
from pathlib import Path

import pytest

from stepcoder import train
from stepcoder.config import ConfigError, parse_config, wandb_key_missing
from stepcoder.trackers import WANDB_RUN_ID, open_tracker, scalars

TINY = ["--data", "builtin", "--limit", "8", "--problems_per_step", "4", "--rollouts_per_prompt", "2",
        "--max_new_tokens", "40", "--sft_steps", "60", "--generation_batch_size", "8", "--num_mini_batches", "2",
        "--sandbox_workers", "1", "--save_steps", "100", "--advantage", "grpo"]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """The trainer on the CPU uses the PyTorch references (tests/test_train.py says why)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch) -> Path:
    """wandb offline, quiet, with all its folders under tmp_path; returns its WANDB_DIR."""
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_PROJECT", "stepcoder-test")
    home = tmp_path / "wandb-home"
    for name, folder in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                         ("WANDB_DATA_DIR", "data"), ("WANDB_ARTIFACT_DIR", "artifacts")):
        (home / folder).mkdir(parents=True)
        monkeypatch.setenv(name, str(home / folder))
    return home / "dir"


def wandb_records(path: Path):
    """The records of a wandb transaction log (`run-ID.wandb`): a 7-byte header (":W&B", 0xBEE1, version 0),
    then LevelDB-log framing: 32 KiB blocks of chunks, each `<IHB` (CRC-32 of its type byte and data,
    length, type: 1 whole, 2 first, 3 middle, 4 last) and its data; a block's tail shorter than a chunk
    header is zeros. Each record is a wandb.proto Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), f"{path}: not a wandb transaction log"
    block, header = 32768, 7
    position, parts = 7, []
    while position + header <= len(data):
        if block - position % block < header:  # the block's zero-filled tail
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + header])
        if kind == 0:  # zeros to the end of the block
            position += block - position % block
            continue
        if position + header + length > len(data):
            break  # a chunk still being written
        chunk = data[position + header:position + header + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: a damaged record at {position}"
        position += header + length
        parts.append(chunk)
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_history(path: Path) -> dict[int, dict]:
    """Each logged step's values, from the run's history records."""
    history: dict[int, dict] = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                      for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(values)
    return history


def offline_runs(wandb_dir: Path) -> list[Path]:
    """The runs' transaction logs, complete: run.finish() only asks wandb's service process to close the
    run's log, so the service is shut down (wandb.teardown waits for it) before they are read."""
    import wandb

    wandb.teardown()
    return sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.mark.slow
def test_a_wandb_offline_run_logs_every_steps_metrics_row(tmp_path, offline_wandb):
    """A 3-step run with --report_to wandb: wandb's history has each step's pass_rate and reward_mean
    exactly as metrics.jsonl has them (and every other number of the row), under the project
    $WANDB_PROJECT, the name --run_name and the run's config; the run's id is kept in the output folder."""
    output = tmp_path / "run"
    history = train.main([*TINY, "--total_steps", "3", "--report_to", "wandb", "--run_name", "t",
                          "--output_dir", str(output)])
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and rows == history
    [log] = offline_runs(offline_wandb)
    run_id = (output / WANDB_RUN_ID).read_text().strip()
    assert log.name == f"run-{run_id}.wandb"
    logged = wandb_history(log)
    assert sorted(logged) == [1, 2, 3], [record.WhichOneof("record_type") for record in wandb_records(log)]
    for row in rows:
        got = logged[row["step"]]
        print(f"step {row['step']}: wandb pass_rate {got['pass_rate']!r} reward_mean {got['reward_mean']!r}; "
              f"metrics.jsonl pass_rate {row['pass_rate']!r} reward_mean {row['reward_mean']!r}")
        assert got["pass_rate"] == row["pass_rate"] and got["reward_mean"] == row["reward_mean"]
        assert got["_step"] == row["step"]
        assert {name: got[name] for name in scalars(row)} == scalars(row)  # outcomes/pass, ... too
    [run] = [record.run for record in wandb_records(log) if record.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.display_name, run.project) == (run_id, "t", "stepcoder-test")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["total_steps"] == 3 and config["report_to"] == "wandb" and config["run_name"] == "t"
    assert not (output / "wandb").exists()  # $WANDB_DIR says where wandb's files go


def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path, offline_wandb, monkeypatch):
    """Without $WANDB_DIR wandb's files go to OUTPUT_DIR/wandb, and the run is named after the folder; a
    run continued with --resume_from_checkpoint opens the same wandb run (its id from OUTPUT_DIR/wandb_run_id,
    resume="allow"); a new run in the folder gets a new id."""
    monkeypatch.delenv("WANDB_DIR")
    output = tmp_path / "my-run"
    output.mkdir()
    first = open_tracker(parse_config(["--output_dir", str(output), "--report_to", "wandb"]), output)
    first.log({"step": 1, "pass_rate": 0.25}, 1)
    first.close()
    run_id = (output / WANDB_RUN_ID).read_text().strip()
    assert first.run.name == "my-run"
    again = open_tracker(parse_config(["--output_dir", str(output), "--report_to", "wandb",
                                       "--resume_from_checkpoint", "latest"]), output)
    again.log({"step": 2, "pass_rate": 0.5}, 2)
    again.close()
    assert again.run.id == run_id
    logs = offline_runs(output)
    assert [log.name for log in logs] == [f"run-{run_id}.wandb"] * 2
    assert [sorted(wandb_history(log)) for log in logs] == [[1], [2]]
    new = open_tracker(parse_config(["--output_dir", str(output), "--report_to", "wandb"]), output)
    new.close()
    assert new.run.id != run_id and (output / WANDB_RUN_ID).read_text().strip() == new.run.id


def test_a_resumed_wandb_run_skips_the_steps_it_already_has(tmp_path, monkeypatch, capsys):
    """Online, a resumed wandb run starts past the last step the interrupted run logged (its
    starting_step), and wandb refuses a step below it: the steps the resumed run does again up to there
    are not sent (one line says so), the later ones are. The project defaults to stepcoder."""
    calls = []

    class Run:
        id, starting_step = "abc123", 5

        def log(self, values, step):
            calls.append((step, values))

        def finish(self):
            calls.append("finish")

    def init(**kwargs):
        calls.append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    output = tmp_path / "run"
    output.mkdir()
    (output / WANDB_RUN_ID).write_text("abc123\n")
    config = parse_config(["--output_dir", str(output), "--report_to", "wandb", "--resume_from_checkpoint", "latest"])
    tracker = open_tracker(config, output)
    for step in (3, 4, 5, 6):
        tracker.log({"step": step, "pass_rate": step / 10, "outcomes": {"pass": step}, "stage": "x"}, step)
    tracker.close()
    kwargs = calls[0]
    assert (kwargs["id"], kwargs["resume"], kwargs["project"], kwargs["name"], kwargs["dir"]) == \
        ("abc123", "allow", "stepcoder", "run", None)
    assert kwargs["config"]["resume_from_checkpoint"] == "latest"
    assert calls[1:] == [(5, {"pass_rate": 0.5, "outcomes/pass": 5}), (6, {"pass_rate": 0.6, "outcomes/pass": 6}),
                         "finish"]
    assert tracker.skipped == [3, 4]
    assert capsys.readouterr().err.count("resumed at step 5") == 1


def test_tensorboard_gets_the_rows_numbers(tmp_path, monkeypatch, capsys):
    """--report_to tensorboard writes OUTPUT_DIR/tensorboard with a scalar per number of the row (but the
    step, its x axis) and closes the writer at the end; where torch cannot import TensorBoard the run goes
    on with metrics.jsonl only, saying so."""
    writers = []

    class SummaryWriter:
        def __init__(self, directory):
            self.directory, self.scalars, self.closed = directory, [], False
            writers.append(self)

        def add_scalar(self, name, value, step):
            self.scalars.append((name, value, step))

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    config = parse_config(["--output_dir", str(tmp_path), "--report_to", "tensorboard"])
    tracker = open_tracker(config, tmp_path)
    tracker.log({"step": 2, "pass_rate": 0.5, "reward_mean": -0.25, "outcomes": {"pass": 1, "fail": 3},
                 "cccs_histogram": [1, 2], "data": "builtin"}, 2)
    tracker.close()
    [writer] = writers
    assert writer.directory == str(tmp_path / "tensorboard") and writer.closed
    assert writer.scalars == [("pass_rate", 0.5, 2), ("reward_mean", -0.25, 2), ("outcomes/pass", 1, 2),
                              ("outcomes/fail", 3, 2)]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it raises ImportError
    assert open_tracker(config, tmp_path) is None
    assert "tensorboard is not installed; logging to jsonl only" in capsys.readouterr().err
    assert open_tracker(parse_config(["--output_dir", str(tmp_path)]), tmp_path) is None  # --report_to none


def test_report_to_wandb_without_wandb_is_refused_before_any_work(tmp_path, monkeypatch):
    """Where wandb is not installed, --report_to wandb stops the run at once, naming the install command,
    before the output folder or the warm-up."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "wandb" else real(name, *args))
    output = tmp_path / "run"
    with pytest.raises(SystemExit, match=re.escape('install it with pip install -e ".[wandb]"')):
        train.main([*TINY, "--output_dir", str(output), "--report_to", "wandb"])
    assert not output.exists()
    with pytest.raises(ConfigError, match="report_to: 'mlflow' is not one of none, tensorboard, wandb"):
        parse_config(["--output_dir", str(output), "--report_to", "mlflow"])


def test_an_online_wandb_run_without_a_key_is_refused_before_any_work(tmp_path, monkeypatch):
    """Online W&B with no key (no WANDB_API_KEY, no netrc entry for the server) stops the run at once, saying
    how to log in; a key in either place, or WANDB_MODE=offline, lets it start."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    output = tmp_path / "run"
    with pytest.raises(SystemExit, match="no W&B API key for api.wandb.ai .*wandb login"):
        train.main([*TINY, "--output_dir", str(output), "--report_to", "wandb"])
    assert not output.exists()
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_key_missing() is None
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert "wandb.example.org" in wandb_key_missing()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_key_missing() is None
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_key_missing() is None
