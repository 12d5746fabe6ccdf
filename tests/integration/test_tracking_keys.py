"""Issue 14, case 2: keys and values MLflow refuses never cost the other entries of a batch.

Class folders named `Cat (domestic)` or `a,b+c` made every per-class metric key invalid; MLflow
refused the whole `log_batch` and the evaluate run ended without any metric, exit 0. Checked on a
real SQLite store (and a real `mlflow server` for the REST path).
"""
import json

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from conftest import seed_sqlite_store
from pipeline.config import TrackingConfig
from pipeline.tracking.delivery import MlflowTracker, deliver, log_entries
from pipeline.tracking.keys import RENAMED_TAG, KeyMap, is_valid_key, sanitize_key
from pipeline.tracking.runs import setup

CLASS_KEYS = {"test/accuracy": 0.75, "test/auroc_Cat (domestic)": 0.8, "test/auroc_a,b+c": 0.7,
              "test/auroc_ok": 0.6, "test/auroc_Cat _domestic_": 0.5}


@pytest.fixture
def store(tmp_path):
    seed_sqlite_store(tmp_path / "mlflow.db")
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_location=str(tmp_path / "art"),
                         backlog_dir=str(tmp_path / "backlog"), retry_max_backoff_s=0.2)
    client = MlflowClient(cfg.uri)
    return cfg, client, client.create_run(setup(cfg)).info.run_id


def test_sanitised_keys_are_accepted_by_mlflow_and_stay_readable(store):
    _, client, run_id = store
    awkward = ["a(b)", "x,y+z", "a//b", "./lead", "../up", "/abs", "tail/", "é ü:ok", "q?#%&*", "", "x" * 300]
    for raw in awkward:
        key = sanitize_key(raw)
        assert is_valid_key(key), (raw, key)
        client.log_metric(run_id, key, 1.0)  # the real store agrees
    assert sanitize_key("a(b)") == "a_b_" and sanitize_key("a//b") == "a/b" and sanitize_key("../up") == "up"
    assert sanitize_key("test/auroc_forest") == "test/auroc_forest"
    assert len(sanitize_key("x" * 300)) == 250 and sanitize_key("x" * 300) != sanitize_key("x" * 301)


def test_keymap_never_merges_two_originals_and_prefers_valid_keys():
    keys = KeyMap()
    mapped = keys.map(["m/a(b", "m/a_b_", "m/a)b"], "metric")
    assert mapped["m/a_b_"] == "m/a_b_"  # the valid key keeps its name
    assert len(set(mapped.values())) == 3 and all(is_valid_key(k) for k in mapped.values())
    assert keys.renamed() == {mapped["m/a(b"]: "m/a(b", mapped["m/a)b"]: "m/a)b"}
    assert keys.map(["m/a(b"], "metric") == {"m/a(b": mapped["m/a(b"]}  # stable


def test_tracker_delivers_every_metric_and_maps_renamed_keys_back(store, capsys):
    cfg, client, run_id = store
    t = MlflowTracker(run_id, cfg)
    t.log_metrics(CLASS_KEYS)
    t.set_tags({"classes": json.dumps(["Cat (domestic)", "a,b+c"]), "weird tag!": "v"})
    t.log_params({"option (x)": 1, "long": "v" * 7000})
    assert t.close(timeout_s=30)
    data = client.get_run(run_id).data
    assert len(data.metrics) == len(CLASS_KEYS) and data.metrics["test/accuracy"] == 0.75
    renamed = json.loads(data.tags[RENAMED_TAG])
    assert {renamed.get(k, k) for k in data.metrics} == set(CLASS_KEYS)  # every original recovered
    assert {data.metrics[k] for k, orig in renamed.items() if orig in CLASS_KEYS} == {0.8, 0.7}
    assert renamed["weird tag_"] == "weird tag!" and renamed["option _x_"] == "option (x)"
    assert len(data.params["long"]) == 6000 and data.params["option _x_"] == "1"
    err = capsys.readouterr().err
    assert "metric key 'test/auroc_Cat (domestic)' is not a key MLflow accepts: logged as" in err
    assert "param 'long': value of 7000 characters cut to MLflow's limit of 6000" in err


def test_one_refused_entry_costs_only_itself(store, capsys):
    _, client, run_id = store
    good = [["loss", float(i), 0, i] for i in range(1, 40)]
    deliver(client, run_id, [{"op": "metrics", "items": good[:20] + [["bad(key)", 1.0, 0, 1]] + good[20:]}])
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 40))
    assert "MLflow refused metric 'bad(key)' for run" in capsys.readouterr().err
    # a resumed run's changed param keeps the old value; the new params beside it arrive
    log_entries(client, run_id, "params", [Param("a", "1")])
    log_entries(client, run_id, "params", [Param("b", "2"), Param("a", "changed"), Param("c", "3")])
    assert client.get_run(run_id).data.params == {"a": "1", "b": "2", "c": "3"}
    assert "param 'a' differs from the value logged before the resume" in capsys.readouterr().err


@pytest.mark.slow
def test_rest_store_refusals_cost_only_the_bad_entry(mlflow_server, capsys):
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("keys") or client.get_experiment(client.create_experiment("keys"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    log_entries(client, run_id, "metrics", [Metric("ok", 1.0, 0, 0), Metric("no(t)", 2.0, 0, 0),
                                            Metric("fine", 3.0, 0, 0)])
    assert client.get_run(run_id).data.metrics == {"ok": 1.0, "fine": 3.0}
    assert "MLflow refused metric 'no(t)'" in capsys.readouterr().err

