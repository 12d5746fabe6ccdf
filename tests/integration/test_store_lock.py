"""Issue 14, case 7 (the fast half; test_field_cases.py starts four commands at once on a fresh
store): the lock beside a SQLite store is real, waited for, and named when it is held too long."""
import pytest
from filelock import FileLock

from conftest import seed_sqlite_store
from pipeline.config import TrackingConfig
from pipeline.tracking import runs
from pipeline.tracking.runs import setup


def test_a_held_store_lock_is_waited_for_then_named(tmp_path, monkeypatch):
    seed_sqlite_store(tmp_path / "mlflow.db")
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", backlog_dir=str(tmp_path / "backlog"))
    monkeypatch.setattr(runs, "STORE_LOCK_TIMEOUT_S", 0.5)
    with FileLock(tmp_path / "mlflow.db.lock"):  # another opener of the same store
        with pytest.raises(RuntimeError, match=r"has held .*mlflow\.db\.lock for over 0.5 s while opening the store"):
            setup(cfg)
    assert setup(cfg) == setup(cfg)  # free again: one experiment, found the second time
