"""`python audited_cli.py REPORT_DIR ROOT <mimflow args>`: the mimflow CLI with an audit hook that
records every write-like file operation under ROOT, saved per rank to REPORT_DIR/rank<R>.json.

Python's audit events see what Python code does (open for writing, rename/replace, mkdir, remove,
tempfile, shutil) and SQLite connections; files written through them (safetensors writes into a
mkstemp file, MLflow's store through sqlite3) are covered.
"""
import atexit
import json
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "shutil.copyfile",
          "shutil.move", "tempfile.mkstemp", "tempfile.mkdtemp", "sqlite3.connect"}


def main() -> None:
    report_dir, root, args = Path(sys.argv[1]), os.path.realpath(sys.argv[2]), sys.argv[3:]
    rank = os.environ.get("RANK", "0")
    writes: list[tuple[str, str]] = []

    def under_root(path, dir_fd=None) -> bool:
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if not isinstance(path, (str, os.PathLike)):
            return False
        if isinstance(dir_fd, int) and not os.path.isabs(path):  # e.g. shutil.rmtree's os.remove
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.realpath(os.path.abspath(path)).startswith(root)

    def hook(event, args_):
        if event == "open":
            path, mode, flags = args_
            writing = (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS)
            if writing and under_root(path):
                writes.append((event, str(path)))
        elif event in EVENTS and args_:
            path = args_[1] if event in ("shutil.copyfile", "shutil.move") else args_[0]
            dir_fd = args_[-1] if event in ("os.remove", "os.rmdir", "os.mkdir") else None
            if under_root(path, dir_fd):
                writes.append((event, str(path)))

    def save():
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / f"rank{rank}.json").write_text(json.dumps(writes))

    sys.addaudithook(hook)
    atexit.register(save)
    from pipeline.cli import main as cli

    sys.exit(cli(args))


if __name__ == "__main__":
    main()
